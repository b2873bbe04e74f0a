"""`npuserve chaos`: a bounded load and fault run against a throwaway stack of its own.

It starts a redis-server (append-only file, fsync always, so a restart keeps every write), two
gateways and N workers of one model, records every prompt's greedy completion on the calm
stack, then for `--duration` seconds keeps `--concurrency` greedy streams going, alternating
gateways, while it injects faults in turn every `--fault-every` seconds: a worker SIGKILLed, a
worker drained (SIGTERM), Redis restarted, a gateway SIGKILLed (each restarted a second
later), a gateway frozen (SIGSTOP) past its registration's expiry, so the workers stop what
still runs of its requests as orphaned, then thawed (SIGCONT). A stream whose gateway breaks
resumes at the other one (`Resume`); one refused before it got a token is resumed or sent
again. At the end it prints and writes (JSON and a plot) the tokens expected and received,
and those lost, duplicated and mismatched against the calm run, the streams' longest
stalls, and the faults' times. It stops by itself.

With `--sentinel`, Redis is a master, a replica and three sentinels (no append-only file:
the replica is the copy), reached through a redis+sentinel:// URL, and the Redis fault is a
failover: the current master SIGKILLed, the sentinels promote the replica, and the old
master comes back as the new one's replica for the next round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.keys import GATEWAY_TTL_S
from worker.processes import ChildSet, free_port, wait_for_port
from worker.resumable_load import Client, Outcome, run_one, tally

FAULTS = ("worker-kill", "drain", "redis-restart", "gateway-kill", "gateway-stall",
          "redis-failover")
PLAIN_FAULTS = ("worker-kill", "drain", "redis-restart", "gateway-kill", "gateway-stall")
SENTINEL_FAULTS = ("worker-kill", "drain", "redis-failover", "gateway-kill", "gateway-stall")
STALL_S = GATEWAY_TTL_S + 2
"""How long gateway-stall freezes a gateway (SIGSTOP): past its registration's expiry, so the
workers stop what still runs of its requests as orphaned while its clients wait on it."""
MODEL = "chaos"
SERVICE = "chaos"
"""The master's name in the sentinels' configuration (--sentinel)."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "chaos", help="a bounded load run with injected faults, counting lost tokens",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--model", default="models/smollm2-135m-instruct",
                   help="model directory the workers serve")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--concurrency", type=int, default=4, help="streams kept going")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--prompts", type=int, default=12, help="distinct prompts, reused")
    p.add_argument("--fault-every", type=float, default=8.0, help="seconds between faults")
    p.add_argument("--faults", default="",
                   help=f"comma-separated, in turn, of {', '.join(FAULTS)} (default: "
                   f"{','.join(PLAIN_FAULTS)}; with --sentinel {','.join(SENTINEL_FAULTS)})")
    p.add_argument("--sentinel", action="store_true",
                   help="Redis as a master, a replica and three sentinels: redis-failover "
                   "replaces redis-restart")
    p.add_argument("--out", default="chaos-results", help="directory for the JSON and plot")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run)


class Stack:
    """Redis, two gateways and the workers, as child processes logging to one file."""

    def __init__(self, args: argparse.Namespace, workdir: Path, log: Any) -> None:
        self.args = args
        self.workdir = workdir
        self.children = ChildSet(out=log)
        self.redis_port = free_port()
        self.gateways = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        self.prefix = "chaos:"
        self.nodes = {"redis": self.redis_port, "redis-b": free_port()}
        """--sentinel: the two data nodes (either may be the master) and their ports."""
        self.sentinels = [free_port() for _ in range(3)] if args.sentinel else []

    @property
    def redis_url(self) -> str:
        if self.sentinels:
            hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
            return f"redis+sentinel://{hosts}/{SERVICE}/0"
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(self) -> None:
        """The plain Redis; with --sentinel, both data nodes and the sentinels."""
        if not self.sentinels:
            self._start_node("redis", self.redis_port, "--appendonly", "yes",
                             "--appendfsync", "always")
            return
        self._start_node("redis", self.nodes["redis"])
        self._start_node("redis-b", self.nodes["redis-b"], "--replicaof", "127.0.0.1",
                         str(self.nodes["redis"]))
        for i, port in enumerate(self.sentinels):
            conf = self.workdir / f"sentinel{i}.conf"
            conf.write_text(f"sentinel monitor {SERVICE} 127.0.0.1 {self.nodes['redis']} 2\n"
                            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                            f"sentinel failover-timeout {SERVICE} 3000\n")
            self._start_node(f"sentinel{i}", port, config=conf)
        self._await_sentinels(lambda s: any(
            r["port"] in self.nodes.values() and r.get("master-link-status") == "ok"
            for r in s.sentinel_slaves(SERVICE)) and len(s.sentinel_sentinels(SERVICE)) >= 2,
            "the sentinels never saw the replica and each other")

    def _start_node(self, name: str, port: int, *options: str, config: Path | None = None
                    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("npuserve chaos: redis-server is not on PATH (make setup)")
        head = [binary, str(config), "--sentinel"] if config else [
            binary, "--dbfilename", f"{name}.rdb", "--save", ""]
        for _attempt in range(2):  # a child forked beside busy threads can hang before exec
            child = self.children.start(name, [
                *head, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                *options])
            if wait_for_port("127.0.0.1", port, 10, child):
                return
            child.proc.kill()
            child.proc.wait()
        raise RuntimeError(f"{name} did not listen on port {port}")

    def _await_sentinels(self, ready: Any, what: str, timeout: float = 30.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            clients = [redis.Redis(port=p, socket_timeout=1, decode_responses=True)
                       for p in self.sentinels]
            try:
                if all(ready(c) for c in clients):
                    return
            except redis.RedisError:
                pass
            finally:
                for c in clients:
                    c.close()
            time.sleep(0.2)
        raise RuntimeError(what)

    def master(self) -> str:
        """--sentinel: the data node the sentinels name master."""
        import redis

        for port in self.sentinels:
            try:
                with redis.Redis(port=port, socket_timeout=1) as s:
                    _, master = s.sentinel_get_master_addr_by_name(SERVICE)
                return next(n for n, p in self.nodes.items() if p == int(master))
            except (redis.RedisError, StopIteration, TypeError):
                continue
        raise RuntimeError("no sentinel names a master")

    def fail_over(self) -> str:
        """SIGKILL the master; once the sentinels promoted the replica, start the old master
        again as its replica. Returns the node killed."""
        old = self.master()
        self.send(old, signal.SIGKILL)
        new = next(n for n in self.nodes if n != old)
        self._await_sentinels(lambda s: s.sentinel_get_master_addr_by_name(SERVICE)[1]
                              == self.nodes[new], f"the sentinels never promoted {new}")
        time.sleep(1.0)  # as the other faults' restarts: not before the promotion settled
        self._start_node(old, self.nodes[old], "--replicaof", "127.0.0.1",
                         str(self.nodes[new]))
        self._await_sentinels(lambda s: any(
            r["port"] == self.nodes[old] and r.get("master-link-status") == "ok"
            and not r["is_sdown"] for r in s.sentinel_slaves(SERVICE)),
            f"the sentinels never saw {old} back as a replica")
        return old

    def start(self, name: str) -> None:
        python = [sys.executable, "-m", "common.cli"]
        common = ["--redis", self.redis_url, "--prefix", self.prefix]
        if name.startswith("gateway"):
            listen = self.gateways[int(name[-1])]
            self.children.start(name, [*python, "gateway", "--listen", listen,
                                       "--gateway-id", name, *common])
        else:
            self.children.start(name, [*python, "worker", "--model", self.args.model,
                                       "--name", MODEL, "--worker-id", name, "--heartbeat",
                                       "0.5", "--kv-cache-gb", "0.2", "--threads", "1",
                                       "--drain-timeout", "2", *common])

    def send(self, name: str, sig: signal.Signals, *, wait: bool = True) -> None:
        """Signal a child and, with `wait`, wait for it to exit."""
        child = self.children.get(name)
        if child is not None and child.proc.poll() is None:
            child.proc.send_signal(sig)
            if wait:
                child.proc.wait(60)

    def stop(self) -> None:
        names = list(self.children.children)
        redis_names = [n for n in names if n.startswith(("redis", "sentinel"))]
        self.children.terminate([n for n in names if n not in redis_names], 30)
        self.children.terminate(redis_names, 10)


def _run(args: argparse.Namespace) -> int:
    # The run forks children while its gRPC client threads stream: gRPC's fork handlers
    # would run in a child that only execs (and can hang it), so they are turned off.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    faults = [f for f in args.faults.split(",") if f] or list(
        SENTINEL_FAULTS if args.sentinel else PLAIN_FAULTS)
    if unknown := set(faults) - set(FAULTS):
        print(f"npuserve chaos: unknown faults {sorted(unknown)}; use {', '.join(FAULTS)}",
              file=sys.stderr)
        return 2
    if ("redis-restart" if args.sentinel else "redis-failover") in faults:
        print("npuserve chaos: redis-failover needs --sentinel, and redis-restart does not "
              "go with it", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(10, 5000) for _ in range(rng.randrange(4, 16))]
               for _ in range(args.prompts)]
    workdir = Path(tempfile.mkdtemp(prefix="npuserve-chaos-"))
    log_path = out / "chaos.log"
    with open(log_path, "w") as log:
        stack = Stack(args, workdir, log)
        try:
            return _experiment(args, stack, prompts, faults, out)
        finally:
            stack.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def _experiment(args: argparse.Namespace, stack: Stack, prompts: list[list[int]],
                faults: list[str], out: Path) -> int:
    from protos import npuserve_pb2 as pb

    say = stack.children.say
    print(f"chaos: starting Redis, 2 gateways and {args.workers} workers (log: {out})")
    stack.start_redis()
    workers = [f"worker{i}" for i in range(args.workers)]
    for name in ["gateway0", "gateway1", *workers]:
        stack.start(name)
    clients = [Client(target) for target in stack.gateways]
    _wait_serving(clients, args.workers, stack)
    print(f"chaos: reference run of {len(prompts)} prompts on the calm stack")
    reference = [[t for m in clients[0].generate(
        p, model=MODEL, max_tokens=args.max_tokens, ignore_eos=True,
        sampling=pb.SamplingParameters(temperature=0)) for t in m.token_ids] for p in prompts]
    start = time.monotonic()
    stop_load = start + args.duration
    events: list[tuple[float, str]] = []
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    counter = iter(range(1 << 30))

    def load(slot: int) -> None:
        while time.monotonic() < stop_load:
            n = next(counter)
            outcome = Outcome(f"chaos-{n}", n % len(prompts))
            with lock:
                outcomes.append(outcome)
            run_one(clients, outcome, prompts[outcome.prompt], n % 2, args.max_tokens,
                    stop_load + 120, MODEL)

    load_done = threading.Event()
    failed_restarts: list[str] = []

    def inject() -> None:
        """Faults in turn. This thread lives until the load ends: the processes it restarts
        are tied to it (they get SIGTERM when the thread that started them exits)."""
        k = 0
        while time.monotonic() + args.fault_every < stop_load and faults:
            time.sleep(args.fault_every)
            fault = faults[k % len(faults)]
            at = time.monotonic() - start
            try:
                target = _inject(stack, fault, k, workers)
            except (RuntimeError, OSError) as exc:  # reported, and the run fails
                failed_restarts.append(f"{fault}: {exc}")
                target = f"FAILED ({exc})"
            events.append((at, f"{fault} {target}"))
            print(f"chaos: {at:5.1f}s {fault} {target}")
            say(f"injected {fault} {target}", "chaos")
            k += 1
        load_done.wait()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(args.concurrency)]
    injector = threading.Thread(target=inject)
    for t in [*threads, injector]:
        t.start()
    for t in threads:
        t.join()
    load_done.set()
    injector.join()
    for client in clients:
        client.close()
    report = _report(args, outcomes, reference, events, start)
    (out / "chaos.json").write_text(json.dumps(report, indent=2))
    _plot(report, outcomes, start, out / "chaos.png")
    s = report["summary"]
    print(f"chaos: {s['requests']} requests, {s['tokens_expected']} tokens expected, "
          f"{s['tokens_received']} received; lost {s['lost']}, duplicated "
          f"{s['duplicated']}, mismatched {s['mismatched']}; {s['errors']} errors; longest "
          f"stall {s['longest_stall_s']:.1f}s (p99 {s['stall_p99_s']:.1f}s); "
          f"{s['resumes']} resumes. Results: {out / 'chaos.json'}, {out / 'chaos.png'}")
    if failed_restarts:
        print(f"chaos: the run is void, a restart failed: {'; '.join(failed_restarts)}")
    clean = s["lost"] == s["duplicated"] == s["mismatched"] == s["errors"] == 0
    return 0 if clean and not failed_restarts else 1


def _inject(stack: Stack, fault: str, k: int, workers: list[str]) -> str:
    if fault == "redis-failover":
        return stack.fail_over()
    if fault == "redis-restart":
        stack.send("redis", signal.SIGTERM)
        time.sleep(1.0)
        stack.start_redis()
        return "redis"
    if fault == "gateway-stall":
        name = f"gateway{k % 2}"
        stack.send(name, signal.SIGSTOP, wait=False)
        time.sleep(STALL_S)
        stack.send(name, signal.SIGCONT, wait=False)
        return name
    if fault == "gateway-kill":
        name = f"gateway{k % 2}"
        stack.send(name, signal.SIGKILL)
    else:
        name = workers[k % len(workers)]
        stack.send(name, signal.SIGKILL if fault == "worker-kill" else signal.SIGTERM)
    time.sleep(1.0)
    stack.start(name)
    return name


def _wait_serving(clients: list[Any], workers: int, stack: Stack) -> None:
    import grpc

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if failed := stack.children.failed():
            raise SystemExit(f"npuserve chaos: {failed.name} exited while starting")
        try:
            if all(any(m.name == MODEL and len(m.workers) >= workers
                       for m in c.list_models(timeout=2).models) for c in clients):
                return
        except grpc.RpcError:
            pass  # not listening yet
        time.sleep(0.5)
    raise SystemExit("npuserve chaos: the stack did not come up within 300 s")


def _report(args: argparse.Namespace, outcomes: list[Outcome], reference: list[list[int]],
            events: list[tuple[float, str]], start: float) -> dict[str, Any]:
    return {
        "config": {k: v for k, v in vars(args).items() if k != "handler"},
        "summary": tally(outcomes, reference),
        "faults": [{"at_s": round(t, 2), "fault": f} for t, f in events],
        "errors": [{"request_id": o.request_id, "error": o.error,
                    "refusals": _distinct(o.refusals)} for o in outcomes if o.error],
        "requests": [{**{k: v for k, v in asdict(o).items() if k not in ("tokens", "arrivals")},
                      "received": len(o.tokens), "refusals": _distinct(o.refusals),
                      "stall_s": round(o.stall(), 3),
                      "first_s": round(o.arrivals[0] - start, 3) if o.arrivals else None}
                     for o in outcomes],
    }


def _distinct(refusals: list[str]) -> list[str]:
    """Each refusal once, in order, with how often it came (a request that gives up has
    been refused the same way hundreds of times)."""
    counts = Counter(r.split(" ", 1)[1] for r in refusals)
    seen: set[str] = set()
    out = []
    for r in refusals:
        what = r.split(" ", 1)[1]
        if what not in seen:
            seen.add(what)
            out.append(f"{r} (x{counts[what]})" if counts[what] > 1 else r)
    return out


def _plot(report: dict[str, Any], outcomes: list[Outcome], start: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = sorted(t - start for o in outcomes for t in o.arrivals)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    if times:
        width = 0.5
        bins = [i * width for i in range(int(times[-1] / width) + 2)]
        top.hist(times, bins=bins, color="tab:blue")
    top.set_ylabel(f"tokens per {0.5:g} s")
    s = report["summary"]
    top.set_title(f"npuserve chaos: lost {s['lost']}, duplicated {s['duplicated']}, "
                  f"mismatched {s['mismatched']}, errors {s['errors']} "
                  f"({s['tokens_received']} tokens, {s['requests']} requests)")
    for ax in (top, bottom):
        for fault in report["faults"]:
            ax.axvline(fault["at_s"], color="tab:red", linestyle="--", linewidth=1)
    for fault in report["faults"]:
        top.annotate(fault["fault"], (fault["at_s"], 0), rotation=90, fontsize=7,
                     xytext=(2, 5), textcoords="offset points", color="tab:red")
    starts = [(o.arrivals[0] - start, o.stall()) for o in outcomes if o.arrivals]
    bottom.scatter([a for a, _ in starts], [b for _, b in starts], s=8)
    bottom.set_ylabel("longest stall of the stream (s)")
    bottom.set_xlabel("seconds since the load started (first token of each stream)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
