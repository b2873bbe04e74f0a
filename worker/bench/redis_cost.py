"""`npuserve bench redis`: what one generated token costs Redis, and what one Redis carries.

It starts a redis-server of its own, a gateway and a worker, lets the stack idle for a few
seconds (heartbeats, health checks and the idle worker's wait cost Redis something per
second whatever the load), then streams `--requests` greedy requests of `--max-tokens`
tokens, `--concurrency` at a time, and reads Redis's own counters before and after:
`INFO commandstats` (every command, those a Lua script runs counted too, and the script's
EVALSHA itself) and `INFO cpu` (the server's CPU seconds). Per generated token, net of the
idle rate: commands, by name, and Redis CPU. Then `redis-benchmark` against the same server
measures what it answers per second on this machine, plain and pipelined. The capacity of
one Redis in tokens per second follows two ways: one core's worth of CPU over the CPU per
token, and the benchmark's pipelined operations per second over the commands per token.
With `--replicas N` the server has N replicas (as a Sentinel-managed primary does): the
primary's CPU then includes feeding them, and each replica's own CPU per token is shown.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from worker.processes import ChildSet, free_port, wait_for_port

MODEL = "redis-cost"
IDLE_S = 4.0
BENCH_TESTS = "set,get,rpush,hset,zadd"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "redis", help="Redis commands and CPU per generated token; what one Redis carries",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--replicas", type=int, default=0,
                   help="replicas of the server (as under Sentinel): their cost to it, and "
                   "their own CPU per token")
    p.add_argument("--bench-requests", type=int, default=200_000,
                   help="requests per redis-benchmark test (0: skip the benchmark)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    p.set_defaults(handler=_run)


def snapshot(client: Any) -> tuple[dict[str, int], float]:
    """(calls by command, server CPU seconds)."""
    stats = client.info("commandstats")
    cpu = client.info("cpu")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def delta(before: tuple[dict[str, int], float], after: tuple[dict[str, int], float]
          ) -> tuple[dict[str, int], float]:
    calls = {k: n - before[0].get(k, 0) for k, n in after[0].items()}
    return {k: n for k, n in calls.items() if n}, after[1] - before[1]


def redis_benchmark(port: int, requests: int) -> dict[str, dict[str, float]]:
    """Requests per second of each BENCH_TESTS command, one at a time and 16 pipelined."""
    binary = shutil.which("redis-benchmark")
    if binary is None or requests <= 0:
        return {}
    out: dict[str, dict[str, float]] = {}
    for label, pipeline in (("plain", 1), ("pipelined16", 16)):
        text = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port), "-n", str(requests), "-c", "50",
             "-P", str(pipeline), "-t", BENCH_TESTS, "--csv"],
            capture_output=True, text=True, check=True, timeout=600).stdout
        for row in text.splitlines()[1:]:
            cells = [c.strip('"') for c in row.split(",")]
            name = cells[0].split()[0].lower()
            out.setdefault(name, {})[label] = float(cells[1])
    return out


def _tokens(stream: Any) -> int:
    """Tokens a Generate stream carried, read to its end (raises grpc.RpcError on failure)."""
    return sum(len(message.token_ids) for message in stream)


def _run(args: argparse.Namespace) -> int:
    import grpc
    import redis

    from protos import npuserve_pb2 as pb
    from worker.resumable_load import Client

    binary = shutil.which("redis-server")
    if binary is None:
        print("npuserve bench redis: redis-server is not on PATH (make setup)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="npuserve-redis-cost-"))
    log = open(workdir / "stack.log", "w")  # noqa: SIM115 -- closed in finally
    children = ChildSet(out=log)
    port, target = free_port(), f"127.0.0.1:{free_port()}"
    url = f"redis://127.0.0.1:{port}/0"
    python = [sys.executable, "-m", "common.cli"]
    try:
        redis_child = children.start("redis", [binary, "--port", str(port), "--bind",
                                               "127.0.0.1", "--save", "", "--appendonly", "no",
                                               "--dir", str(workdir)])
        if not wait_for_port("127.0.0.1", port, 10, redis_child):
            raise RuntimeError("redis-server did not start")
        replicas = []
        for i in range(args.replicas):
            replica_port = free_port()
            child = children.start(f"replica{i}", [
                binary, "--port", str(replica_port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(workdir), "--dbfilename", f"r{i}.rdb",
                "--replicaof", "127.0.0.1", str(port)])
            if not wait_for_port("127.0.0.1", replica_port, 10, child):
                raise RuntimeError("a replica did not start")
            replicas.append(redis.Redis(port=replica_port, decode_responses=True))
        children.start("gateway", [*python, "gateway", "--listen", target, "--redis", url])
        children.start("worker", [*python, "worker", "--model", args.model, "--name", MODEL,
                                  "--redis", url, "--max-num-seqs", str(args.concurrency),
                                  "--kv-cache-gb", "0.5"])
        greedy = {"model": MODEL, "max_tokens": args.max_tokens, "ignore_eos": True,
                  "sampling": pb.SamplingParameters(temperature=0)}
        client = Client(target, timeout=300)
        deadline = time.monotonic() + 300
        while True:
            if failed := children.failed():
                raise RuntimeError(f"{failed.name} exited; see {workdir / 'stack.log'}")
            try:
                if any(m.name == MODEL for m in client.list_models(timeout=2).models):
                    break
            except grpc.RpcError:  # not listening yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the stack did not come up within 300 s")
            time.sleep(0.5)
        _tokens(client.generate([1, 2, 3], **{**greedy, "max_tokens": 4}))  # warm
        r = redis.Redis(port=port, decode_responses=True)
        r.config_resetstat()
        idle0 = snapshot(r)
        time.sleep(IDLE_S)
        idle_calls, idle_cpu = delta(idle0, snapshot(r))
        tokens = [0]
        lock = threading.Lock()
        todo = iter(range(args.requests))

        def stream() -> None:
            for n in todo:
                generated = _tokens(client.generate([10 + n % 50, 20, 30, 40], **greedy))
                with lock:
                    tokens[0] += generated

        replicas_before = [snapshot(c)[1] for c in replicas]
        before, start = snapshot(r), time.monotonic()
        threads = [threading.Thread(target=stream) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - start
        calls, cpu = delta(before, snapshot(r))
        replica_cpu = [snapshot(c)[1] - b for c, b in zip(replicas, replicas_before,
                                                            strict=True)]
        client.close()
        scale = seconds / IDLE_S
        net = {k: n - idle_calls.get(k, 0) * scale for k, n in calls.items()}
        per_token = {k: round(v / tokens[0], 3) for k, v in
                     sorted(net.items(), key=lambda kv: -kv[1]) if v / tokens[0] >= 0.001}
        ops = sum(net.values()) / tokens[0]
        cpu_per_token = (cpu - idle_cpu * scale) / tokens[0]
        bench = redis_benchmark(port, args.bench_requests)
        pipelined = [v["pipelined16"] for v in bench.values() if "pipelined16" in v]
        results: dict[str, Any] = {
            "requests": args.requests, "max_tokens": args.max_tokens,
            "concurrency": args.concurrency, "tokens": tokens[0], "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens[0] / seconds, 1),
            "redis_ops_per_token": round(ops, 2), "redis_calls_per_token": per_token,
            "redis_cpu_us_per_token": round(cpu_per_token * 1e6, 1),
            "replicas": args.replicas,
            "replica_cpu_us_per_token": [round(c / tokens[0] * 1e6, 1) for c in replica_cpu],
            "idle_ops_per_s": round(sum(idle_calls.values()) / IDLE_S, 1),
            "idle_cpu_ms_per_s": round(idle_cpu / IDLE_S * 1e3, 2),
            "benchmark_requests_per_s": bench,
            "capacity_tokens_per_s_by_cpu": round(1 / cpu_per_token) if cpu_per_token > 0
            else None,
            "capacity_tokens_per_s_by_benchmark": round(min(pipelined) / ops)
            if pipelined else None,
        }
        print(_table(results))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    finally:
        names = list(children.children)
        children.terminate([n for n in names if n != "redis"], 30)
        children.terminate(["redis"], 10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _table(res: dict[str, Any]) -> str:
    lines = [
        f"{res['tokens']} tokens in {res['seconds']} s ({res['tokens_per_s']} tokens/s; "
        f"{res['requests']} requests x {res['max_tokens']} tokens, {res['concurrency']} at "
        "a time)",
        f"Redis per generated token: {res['redis_ops_per_token']} commands, "
        f"{res['redis_cpu_us_per_token']} us of CPU (net of the idle fleet's "
        f"{res['idle_ops_per_s']} commands and {res['idle_cpu_ms_per_s']} ms CPU per second)"
        + (f"; with {res['replicas']} replicas, each replica "
           f"{res['replica_cpu_us_per_token']} us" if res["replicas"] else ""),
        "  " + ", ".join(f"{k} {v}" for k, v in res["redis_calls_per_token"].items()),
    ]
    for name, rates in res["benchmark_requests_per_s"].items():
        lines.append(f"redis-benchmark {name:6}: " + ", ".join(
            f"{label} {rate:,.0f}/s" for label, rate in rates.items()))
    lines.append(f"one Redis core carries about {res['capacity_tokens_per_s_by_cpu']} tokens/s "
                 f"by CPU, {res['capacity_tokens_per_s_by_benchmark']} by the pipelined "
                 "benchmark rate")
    return "\n".join(re.sub(r"\s+$", "", line) for line in lines)
