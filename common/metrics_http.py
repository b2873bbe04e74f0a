"""The HTTP side of every process: Prometheus `/metrics` plus probe paths, on a thread.

    probes = {"/livez": lambda: (True, "engine loop beat 0.2 s ago")}
    server = serve_http("127.0.0.1", 9400, registry, probes)
    ...
    server.shutdown()

A probe answers (ok, text): 200 with the text when ok, 503 otherwise, so a Kubernetes
httpGet probe and a person with curl read the same reason. Counters expose no `_created`
series (half the series of every counter, and nothing a dashboard uses).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

log = logging.getLogger(__name__)

disable_created_metrics()  # type: ignore[no-untyped-call]

Probe = Callable[[], tuple[bool, str]]
"""A health check: (healthy, a line saying why)."""


def version() -> str:
    """npuserve's installed version ("unknown" outside an installed tree)."""
    try:
        return importlib.metadata.version("npuserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def memory_limit_bytes() -> int:
    """The memory this process may use: its cgroup's limit (a container's), else the
    machine's RAM; 0 when neither can be read."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or v1's huge "unlimited"
            return int(text)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def process_metrics(component: str, registry: CollectorRegistry = REGISTRY) -> None:
    """What every npuserve process exposes about itself: `npuserve_build_info` (always 1,
    the labels say what runs), `npuserve_memory_limit_bytes` (the alert rules' denominator
    of `process_resident_memory_bytes`), and the process collector's `process_*` series
    in a registry of its own (the default registry has them already)."""
    info = Gauge("npuserve_build_info", "Always 1; the labels say what is running.",
                 ["component", "version", "python_version"], registry=registry)
    info.labels(component, version(), platform.python_version()).set(1)
    limit = Gauge("npuserve_memory_limit_bytes", "Memory this process may use: its cgroup's "
                  "limit, else the machine's RAM.", registry=registry)
    limit.set(memory_limit_bytes())
    if registry is not REGISTRY:
        ProcessCollector(registry=registry)


def serve_http(host: str, port: int, registry: CollectorRegistry = REGISTRY,
               probes: dict[str, Probe] | None = None) -> WSGIServer:
    """Serve /metrics and `probes` on host:port from a daemon thread; port 0 picks a free
    one (`server.server_port`). Call `shutdown()` to stop it."""
    metrics_app = make_wsgi_app(registry)
    probes = dict(probes or {})

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in probes:
            try:
                ok, text = probes[path]()
            except Exception as exc:  # a probe that fails says so instead of a 500 page
                log.exception("probe %s failed", path)
                ok, text = False, f"probe failed: {exc!r}"
            body = (text + "\n").encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
            return [body]
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        body = f"not found; paths: /metrics {' '.join(sorted(probes))}\n".encode()
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, app, Server, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, name=f"http:{server.server_port}",
                     daemon=True).start()
    log.info("metrics on http://%s:%d/metrics%s", host, server.server_port,
             "".join(f", {p}" for p in sorted(probes)))
    return server
