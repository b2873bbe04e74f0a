"""The Redis ACL users shipped in deploy/redis: a gateway and a worker, each logged in as its
own user with a password from a file, serve generations, cancellations and resumes with no
command or key refused (Redis's ACL LOG stays empty), while neither user can run anything
else: no FLUSHALL, CONFIG or KEYS, no key outside the prefix, and no write to what the
other role owns."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.client import GenerationClient, collect
from protos import npuserve_pb2 as pb
from tests.redis_servers import RedisProcess, start_redis
from tests.serving.conftest import Fleet, served, start_service, wait_until
from worker.processes import free_port

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[2]
MODEL = "acl"
PREFIX = "npuserve-acl:"
ROLES = ("gateway", "worker", "admin")


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisProcess, Path]]:
    """redis-server with deploy/redis's users (rendered by its script); yields it and the
    directory of password files, one per role."""
    secrets = tmp_path_factory.mktemp("secrets")
    for role in ROLES:
        (secrets / role).write_text(f"{role}-pw-{time.time_ns()}\n")
    workdir = tmp_path_factory.mktemp("redis-acl")
    subprocess.run([str(REPO / "deploy" / "redis" / "render-acl.sh"), str(secrets),
                    str(workdir / "users.acl"), PREFIX], check=True)
    acl = (workdir / "users.acl").read_text()
    assert "pw-" not in acl and not re.search(r"@[A-Z]+@", acl)
    server = start_redis("redis-acl", workdir / "data", "--aclfile", str(workdir / "users.acl"))
    try:
        yield server, secrets
    finally:
        server.stop()


def login(server: RedisProcess, secrets: Path, role: str) -> redis.Redis:
    return redis.Redis(port=server.port, username=f"npuserve-{role}",
                       password=(secrets / role).read_text().strip(), decode_responses=True)


@pytest.fixture(scope="module")
def acl_fleet(acl_redis: tuple[RedisProcess, Path], tiny_qwen3: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server, secrets = acl_redis
    url = f"redis://127.0.0.1:{server.port}/0"
    fl = Fleet(url, PREFIX, f"127.0.0.1:{free_port()}", "", 0, tmp_path_factory.mktemp("acl"))

    def as_role(role: str, args: list[str]) -> list[str]:
        return [*args, "--redis", url.replace("://", f"://npuserve-{role}@"),
                "--redis-password-file", str(secrets / role)]

    try:
        fl.services.append(start_service("gateway", as_role("gateway", fl.gateway_args(
            fl.gateway)), fl.log_dir))
        fl.services.append(start_service("worker", as_role("worker", fl.worker_args(
            tiny_qwen3, MODEL, "--heartbeat", "0.5")), fl.log_dir))
        wait_until(served(fl.gateway, {MODEL: 1}), 150, "the fleet did not come up",
                   fl.services)
        yield fl
    finally:
        for service in fl.services:
            service.stop()


def test_the_gateway_and_worker_users_serve_with_nothing_refused(
        acl_fleet: Fleet, acl_redis: tuple[RedisProcess, Path]) -> None:
    server, secrets = acl_redis
    greedy = {"model": MODEL, "sampling": pb.SamplingParameters(temperature=0)}
    with GenerationClient(acl_fleet.gateway, timeout=60) as client:
        done = collect(client.generate([5, 6, 7], max_tokens=12, request_id="acl-1", **greedy))
        assert len(done.token_ids) == 12
        again = collect(client.resume("acl-1", 4))  # a finished request read again (ADOPT)
        assert again.token_ids == done.token_ids[4:]
        stream = client.generate([8, 9], max_tokens=2000, ignore_eos=True,
                                 request_id="acl-2", **greedy)
        next(iter(stream))
        assert client.cancel("acl-2")  # running: flagged for the worker (CANCEL)
        rest = list(stream)
        assert rest and rest[-1].finish_reason == pb.FINISH_REASON_CANCELLED
        assert [m.name for m in client.list_models().models] == [MODEL]
    time.sleep(1.5)  # a few heartbeats, reaps and health checks more
    with login(server, secrets, "admin") as admin:
        refused = admin.acl_log()
    assert not refused, f"the shipped users lack a command or key npuserve uses: {refused}"


@pytest.mark.parametrize(("role", "command"), [
    ("gateway", ["FLUSHALL"]),
    ("gateway", ["CONFIG", "SET", "appendonly", "no"]),
    ("gateway", ["KEYS", "*"]),
    ("gateway", ["GET", "elsewhere:secret"]),
    ("gateway", ["HSET", f"{PREFIX}worker:forged", "model", "acl"]),
    ("gateway", ["ZADD", f"{PREFIX}lease:{{acl}}", "0", "stolen"]),
    ("gateway", ["EVAL", "return 1", "0"]),
    ("worker", ["FLUSHDB"]),
    ("worker", ["SHUTDOWN", "NOSAVE"]),
    ("worker", ["SET", "elsewhere:secret", "1"]),
    ("worker", ["HSET", f"{PREFIX}gateway:{{forged}}", "host", "x"]),
    ("worker", ["XREAD", "STREAMS", f"{PREFIX}replies:{{g}}", "0"]),
    ("worker", ["ACL", "LIST"]),
])
def test_each_user_can_do_nothing_else(acl_redis: tuple[RedisProcess, Path], role: str,
                                       command: list[str]) -> None:
    server, secrets = acl_redis
    with login(server, secrets, role) as r, pytest.raises(redis.exceptions.NoPermissionError):
        r.execute_command(*command)
    with login(server, secrets, "admin") as admin:
        admin.acl_log_reset()


def test_nobody_gets_in_without_a_user(acl_redis: tuple[RedisProcess, Path]) -> None:
    server, _ = acl_redis
    with redis.Redis(port=server.port) as anonymous, pytest.raises(
            redis.exceptions.AuthenticationError):
        anonymous.ping()
    with redis.Redis(port=server.port, username="npuserve-worker", password="guess") as r, \
            pytest.raises(redis.exceptions.AuthenticationError):
        r.ping()
