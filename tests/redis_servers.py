"""Real redis-server processes of a test's own, on free loopback ports (never 6379), each in
its own directory and stopped by PID: a plain server with any extra options (ACL file, TLS),
and a Sentinel group (a master, a replica and three sentinels)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from worker.processes import free_port


@dataclass
class RedisProcess:
    """One redis-server (or sentinel) and the files it writes."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def log(self) -> Path:
        return self.workdir / "redis.log"

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return f"--- {self.name} :{self.port} (exit {self.proc.poll()}) ---\n" + "\n".join(
            text[-lines:])

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last write."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def pause(self, paused: bool = True) -> None:
        """SIGSTOP (or SIGCONT): it holds its connections but reads nothing."""
        self.proc.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; run `make setup`")
    return binary


def wait_listening(server: RedisProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.2):
                return
        except OSError:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"{server.name} did not listen on {server.port}\n{server.tail()}")
            time.sleep(0.05)


def start_redis(name: str, workdir: Path, *options: str, conf: str = "",
                port: int | None = None, sentinel: bool = False,
                tls: Path | None = None) -> RedisProcess:
    """redis-server on a free loopback port (or `port`), writing into `workdir`; `conf` is
    written to redis.conf first (sentinels need a writable config file). With `tls` (a
    directory deploy/tls/self-signed.sh wrote) the port speaks TLS only and clients must
    present a certificate that CA signed."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = workdir / "redis.conf"
    config.write_text(conf)
    listen = ["--port", str(port)]
    if tls is not None:
        listen = ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "yes",
                  "--tls-cert-file", str(tls / "server.pem"),
                  "--tls-key-file", str(tls / "server.key"),
                  "--tls-ca-cert-file", str(tls / "ca.pem")]
    argv = [redis_binary(), str(config), *(["--sentinel"] if sentinel else []),
            "--bind", "127.0.0.1", "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
            "--daemonize", "no", *listen,
            *([] if sentinel else ["--save", "", "--appendonly", "no"]), *options]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    server = RedisProcess(name, port, proc, workdir)
    wait_listening(server)
    return server


def self_signed(directory: Path) -> Path:
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate, made by
    deploy/tls/self-signed.sh into `directory`."""
    script = Path(__file__).resolve().parents[1] / "deploy" / "tls" / "self-signed.sh"
    subprocess.run(["bash", str(script), str(directory)], check=True, capture_output=True)
    return directory


SYNC_AT_ONCE = ("--repl-diskless-sync-delay", "0")
"""A master starts a replica's full sync at once, not after 5 s of waiting for others."""


@dataclass
class SentinelGroup:
    """A master, one replica and three sentinels watching them as `service`."""

    service: str
    master: RedisProcess
    replica: RedisProcess
    sentinels: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def all(self) -> list[RedisProcess]:
        return [self.master, self.replica, *self.sentinels]

    def tails(self) -> str:
        return "\n".join(s.tail() for s in self.all())

    def stop(self) -> None:
        for server in self.all():
            server.stop()

    def master_port(self) -> int:
        """The master's port, as the first sentinel that answers names it."""
        import redis

        for sentinel in self.sentinels:
            try:
                with redis.Redis(port=sentinel.port, socket_timeout=1) as c:
                    _, port = c.sentinel_get_master_addr_by_name(self.service)
                    return int(port)
            except redis.RedisError:
                continue
        raise RuntimeError(f"no sentinel names a master\n{self.tails()}")

    def replace_replica(self, timeout: float = 30.0) -> None:
        """After a failover: the promoted replica is the master; start a server on the dead
        master's port as its replica, and wait until every sentinel sees it in sync."""

        if self.master_port() == self.replica.port:
            self.master.kill()
            self.master, self.replica = self.replica, start_redis(
                "replica", self.master.workdir.parent / f"replica-{self.master.port}",
                *SYNC_AT_ONCE, "--replicaof", "127.0.0.1", str(self.replica.port),
                port=self.master.port)
        self.wait_in_sync(timeout)

    def wait_in_sync(self, timeout: float = 30.0) -> None:
        """Until the replica is in sync with the master and every sentinel has seen it so
        (a failover can promote only such a replica); its first sync can take a while on a
        loaded machine."""
        import redis

        deadline = time.monotonic() + timeout
        while True:
            ready = 0
            for s in self.sentinels:
                with redis.Redis(port=s.port, socket_timeout=1) as c:
                    ready += any(r["port"] == self.replica.port and not r["is_sdown"]
                                 and r.get("master-link-status") == "ok"
                                 for r in c.sentinel_slaves(self.service))
            if ready == len(self.sentinels):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sentinels never saw the replica in sync\n"
                                   f"{self.tails()}")
            time.sleep(0.2)


def start_sentinel_group(workdir: Path, service: str = "npuserve", *,
                         down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                         master_options: tuple[str, ...] = ()) -> SentinelGroup:
    """A master, a replica of it and three sentinels (quorum 2) that declare the master down
    after `down_after_ms` without a reply. Waits until the sentinels see the replica."""
    import redis

    master = start_redis("master", workdir / "master", *SYNC_AT_ONCE, *master_options)
    replica = start_redis("replica", workdir / "replica", *SYNC_AT_ONCE, "--replicaof",
                          "127.0.0.1", str(master.port))
    group = SentinelGroup(service, master, replica)
    conf = (f"sentinel monitor {service} 127.0.0.1 {master.port} 2\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service} 1\n")
    try:
        for i in range(3):
            group.sentinels.append(start_redis(f"sentinel{i}", workdir / f"sentinel{i}",
                                               conf=conf, sentinel=True))
        deadline = time.monotonic() + 30
        while True:
            ready = 0
            for s in group.sentinels:
                with redis.Redis(port=s.port, socket_timeout=1) as c:
                    replicas = c.sentinel_slaves(service)
                    others = c.sentinel_sentinels(service)
                ready += len(others) >= 2 and any(r["port"] == replica.port for r in replicas)
            if ready == len(group.sentinels):
                group.wait_in_sync(60)
                return group
            if time.monotonic() > deadline:
                raise TimeoutError("the sentinels did not find the replica and each other")
            time.sleep(0.2)
    except BaseException:
        group.stop()
        raise
