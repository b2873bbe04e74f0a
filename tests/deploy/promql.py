"""The metric names npuserve exports, and the ones a PromQL expression selects."""

from __future__ import annotations

import functools
import re

MADE_BY_PROMETHEUS = frozenset({"up"})
"""Series Prometheus makes itself for every target."""
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                   "summary": ("", "_sum", "_count"), "info": ("_info",), "gauge": ("",),
                   "unknown": ("",)}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "atan2", "inf", "nan"}


@functools.cache
def exported_names() -> frozenset[str]:
    """Every sample name the gateway's default registry and a worker's registry (with
    device readings, so the device series exist) can expose, and Prometheus' own `up`."""
    from prometheus_client import REGISTRY

    import gateway.metrics  # noqa: F401 -- registers the gateway's metrics
    from worker.backends.base import DeviceStats
    from worker.metrics import WorkerMetrics

    worker = WorkerMetrics(model="m", backend="torch", device="cpu")
    worker.set_device(DeviceStats(1, 1, 0.5, 50.0))
    names: set[str] = set(MADE_BY_PROMETHEUS)
    for registry in (REGISTRY, worker.registry):
        for family in registry.collect():
            names.update(family.name + s for s in SAMPLE_SUFFIXES[family.type])
            names.update(s.name for s in family.samples)
    return frozenset(names)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions
    (followed by "("), keywords, label names (in matchers and by/on/... lists) or parts
    of numbers and durations."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)
    e = re.sub(r"\{[^}]*\}", "{}", e)
    e = re.sub(r"\[[^\]]*\]", "[]", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", e):
        rest = e[m.end():].lstrip()
        if m.group() not in KEYWORDS and not rest.startswith("("):
            names.add(m.group())
    return names


FLEET_GAUGES = ("npuserve_queue_depth", "npuserve_queue_oldest_age_seconds",
                "npuserve_requests_leased", "npuserve_requests_running", "npuserve_workers",
                "npuserve_workers_accepting", "npuserve_worker_slots")
"""Read from Redis by every gateway, which all report the same value: max, never sum."""


def fleet_gauges_outside_max(expr: str) -> list[str]:
    """The fleet gauges `expr` selects other than directly inside max(...) or max by."""
    out = []
    for name in FLEET_GAUGES:
        uses = len(re.findall(rf"\b{name}\b(?!_)", expr))
        under_max = len(re.findall(rf"\bmax(?:\s+by\s*\([^)]*\))?\s*\(\s*{name}\b(?!_)", expr))
        out += [name] * (uses - under_max)
    return out
