"""`npuserve up`: the whole local stack in one command — Redis, a gateway and a worker per
device (one CPU worker by default).

Each part is a child process with its output prefixed by its name. `up` waits until the
gateway's grpc.health.v1 check says SERVING (which needs a live worker), prints how to call it,
and on Ctrl-C or SIGTERM stops the worker and gateway with SIGTERM (they drain), then Redis.
If any child dies on its own, the others are stopped and `up` exits non-zero.

It starts the services as subprocesses and imports neither the gateway's code nor the engine;
it lives with the worker's other operator tools (bench, quantize, model builders).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common.config import env
from worker.backends.torch_settings import device_indices
from worker.processes import ChildSet, free_port, wait_for_port

DEFAULT_MODEL_DIR = "models/smollm2-135m-instruct"
HEALTH_SERVICE = ""
"""grpc.health.v1 service `up` waits on: the server's overall status."""
DEMO_KV_TOKENS = 16 * 1024
"""The KV cache a CPU worker of `up` gets unless --worker-args sizes it: 16 requests of 1,024
tokens at once (or fewer, longer ones), not a share of the machine's memory."""
EXAMPLE_PROMPT = "What is the capital of France?"
"""What the banner suggests asking: the default model, SmolLM2-135M, answers English (a Qwen
model is needed for Chinese)."""


def register(subparsers: Any) -> None:
    """Add `up` to the root parser's subparsers."""
    p = subparsers.add_parser(
        "up",
        help="run the local stack: Redis, a gateway and one CPU worker",
        description="Start a throwaway redis-server (unless --redis is given), `npuserve "
                    "gateway` and one CPU `npuserve worker`, wait until the gateway is SERVING, "
                    "and stream their logs. Ctrl-C stops everything.",
    )
    p.add_argument("--listen", default=env("GATEWAY_LISTEN", "0.0.0.0:50051"),
                   help="gateway host:port (default 0.0.0.0:50051, env NPUSERVE_GATEWAY_LISTEN)")
    p.add_argument("--http-listen", default=env("GATEWAY_HTTP_LISTEN", "0.0.0.0:8000"),
                   help="host:port of the gateway's OpenAI-compatible HTTP API and chat page "
                        "(default 0.0.0.0:8000; empty: none; env NPUSERVE_GATEWAY_HTTP_LISTEN)")
    p.add_argument("--model", default=env("MODEL_DIR", DEFAULT_MODEL_DIR),
                   help=f"model directory for the worker (default {DEFAULT_MODEL_DIR}, "
                        "env NPUSERVE_MODEL_DIR)")
    p.add_argument("--devices", nargs="+", default=env("UP_DEVICES", "cpu").split(),
                   metavar="DEVICE",
                   help="one worker per DEVICE: cpu, cuda:N, npu:N, or a group of devices for "
                        "one tensor-parallel worker (npu:0-7, cuda:0,1); default: one CPU "
                        "worker (env NPUSERVE_UP_DEVICES, space-separated)")
    p.add_argument("--redis", default=env("UP_REDIS_URL", ""),
                   help="use this Redis URL instead of starting a throwaway redis-server "
                        "(env NPUSERVE_UP_REDIS_URL)")
    p.add_argument("--gateway-args", default=env("UP_GATEWAY_ARGS", ""),
                   help="extra arguments for `npuserve gateway`, one shell-quoted string "
                        "(env NPUSERVE_UP_GATEWAY_ARGS)")
    p.add_argument("--worker-args", default=env("UP_WORKER_ARGS", ""),
                   help="extra arguments for `npuserve worker`, one shell-quoted string: "
                        "--worker-args=\"--max-num-seqs 8\" (env NPUSERVE_UP_WORKER_ARGS)")
    p.add_argument("--metrics-port", type=int, default=int(env("METRICS_PORT", "0")),
                   help="expose Prometheus /metrics (and the probes) on loopback: the gateway "
                        "on this port, worker i on this port + 1 + i; 0 (the default) "
                        "exposes none (env NPUSERVE_METRICS_PORT)")
    p.add_argument("--startup-timeout", type=float,
                   default=float(env("UP_STARTUP_TIMEOUT", "300")),
                   help="seconds to wait for the stack to become SERVING (default 300, env "
                        "NPUSERVE_UP_STARTUP_TIMEOUT)")
    p.add_argument("--stop-timeout", type=float, default=float(env("UP_STOP_TIMEOUT", "45")),
                   help="seconds the gateway and worker get to drain on stop before SIGKILL "
                        "(default 45: the worker's drain timeout is 30; env "
                        "NPUSERVE_UP_STOP_TIMEOUT)")
    p.set_defaults(handler=_run)


def kv_cache_gb(model_dir: Path, tokens: int = DEMO_KV_TOKENS) -> float:
    """GiB of a float32 KV cache holding `tokens` tokens of the model in model_dir (read
    from its config.json, without loading anything)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * 4
    return float(max(per_token * tokens / (1 << 30), 0.01))


def _client_target(listen: str) -> str:
    """Where a local client reaches a server bound to `listen` (wildcards become loopback)."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _run(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(f"npuserve up: no model in {model}; build it with "
              f"`npuserve model smollm2 {model}` (or `make setup`)", file=sys.stderr)
        return 1
    children = ChildSet()
    stop = threading.Event()
    interrupts = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            # A second Ctrl-C while draining means "now": skip the grace period.
            children.kill_all()
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="npuserve-up-"))
    try:
        code = _start_and_serve(args, model, children, stop, workdir)
    finally:
        serving = [n for n in children.children if n.startswith("worker")] + ["gateway"]
        if set(serving) & set(children.children):
            children.say("stopping workers and gateway")
        children.terminate(serving, args.stop_timeout)
        children.terminate(["redis"], 10.0)
        shutil.rmtree(workdir, ignore_errors=True)
    children.say("stopped" if code == 0 else f"stopped (exit {code})")
    return code


def _start_and_serve(args: argparse.Namespace, model: Path, children: ChildSet,
                     stop: threading.Event, workdir: Path) -> int:
    python = [sys.executable, "-m", "common.cli", "--log-level", args.log_level]
    redis_url = args.redis
    if not redis_url:
        binary = shutil.which("redis-server")
        if binary is None:
            children.say("redis-server is not on PATH: run `make setup` or pass --redis URL")
            return 1
        port = free_port()
        children.say(f"starting redis-server on 127.0.0.1:{port}")
        children.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", str(workdir),
                                 "--daemonize", "no", "--loglevel", "warning"])
        if not wait_for_port("127.0.0.1", port, 10.0, children.get("redis")):
            children.say("redis-server did not start")
            return 1
        redis_url = f"redis://127.0.0.1:{port}/0"
    shown = re.sub(r"//[^/@]*@", "//***@", redis_url)  # never print a password
    children.say(f"starting gateway on {args.listen} (redis {shown})")
    metrics = ["--metrics-port", str(args.metrics_port)] if args.metrics_port else []
    http = ["--http-listen", args.http_listen] if args.http_listen else []
    children.start("gateway", [*python, "gateway", "--listen", args.listen, "--redis", redis_url,
                               *http, *metrics, *shlex.split(args.gateway_args)])
    for i, device in enumerate(args.devices):
        name = "worker" if len(args.devices) == 1 else f"worker{i}"
        ranks = len(device_indices(device.partition(":")[2]) or [device])
        group = ["--tensor-parallel", str(ranks)] if ranks > 1 else []
        children.say(f"starting {name}: loading {model} on {device}")
        extra = (["--metrics-port", str(args.metrics_port + 1 + i)] if args.metrics_port
                 else [])
        if device.startswith("cpu") and "--kv-cache-gb" not in args.worker_args:
            extra += ["--kv-cache-gb", f"{kv_cache_gb(model):.3f}"]
        children.start(name, [*python, "worker", "--model", str(model), "--backend", "torch",
                              "--device", device, *group, "--redis", redis_url, *extra,
                              *shlex.split(args.worker_args)])
    target = _client_target(args.listen)
    if not _wait_serving(target, children, stop, args.startup_timeout):
        return 0 if stop.is_set() and children.failed() is None else 1
    _banner(children, target, args.listen, args.http_listen, args.metrics_port,
            len(args.devices))
    while not stop.wait(0.2):
        if (dead := children.failed()) is not None:
            children.say(f"{dead.name} exited with code {dead.proc.returncode}; "
                         "stopping the others")
            return 1
    return 0


def _wait_serving(target: str, children: ChildSet, stop: threading.Event,
                  timeout: float) -> bool:
    """Poll the gateway's health until SERVING, reporting each change of state."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.monotonic()
    last_state, last_note = "", start
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.wait(0.5):
            if (dead := children.failed()) is not None:
                children.say(f"{dead.name} exited with code {dead.proc.returncode} while "
                             "starting; stopping the others")
                return False
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE),
                                   timeout=2.0)
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                state = "UNREACHABLE" if exc.code() == grpc.StatusCode.UNAVAILABLE else (
                    exc.code().name)
            if state == "SERVING":
                return True
            now = time.monotonic()
            if state != last_state or now - last_note > 15:
                waiting = ("waiting for the gateway to listen" if state == "UNREACHABLE"
                           else f"gateway is {state}: waiting for the worker to load the model")
                children.say(f"{waiting} ({now - start:.0f}s)")
                last_state, last_note = state, now
            if now - start > timeout:
                children.say(f"not SERVING after {timeout:.0f}s (gateway says {state}); "
                             "giving up")
                return False
    return False


def _banner(children: ChildSet, target: str, listen: str, http_listen: str,
            metrics_port: int, workers: int) -> None:
    where = target if target.split(":")[0] == listen.split(":")[0] else (
        f"{target} (listening on {listen})")
    request = ('{"text": "' + EXAMPLE_PROMPT + '", "max_tokens": 64, '
               '"sampling": {"temperature": 0}}')
    http: list[str] = []
    if http_listen:
        base = f"http://{_client_target(http_listen)}"
        body = ('{"messages": [{"role": "user", "content": "' + EXAMPLE_PROMPT + '"}], '
                '"max_tokens": 64, "temperature": 0}')
        http = [f"  chat page: {base}/chat",
                f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
                f"-d '{body}'"]
    metrics = [f"  metrics: http://127.0.0.1:{metrics_port + i}/metrics"
               + (" (gateway)" if i == 0 else f" (worker {i - 1})")
               for i in range(1 + workers)] if metrics_port else []
    children.say("\n".join([
        f"npuserve is ready: gRPC on {where}",
        f"  npuserve client --target {target} --temperature 0 \"{EXAMPLE_PROMPT}\"",
        f"  npuserve client --target {target} --chat",
        f"  grpcurl -plaintext -d '{request}' {target} npuserve.v1.Generation/Generate",
        *http,
        *metrics,
        "Ctrl-C stops everything.",
    ]))

