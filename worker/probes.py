"""A worker's HTTP probes, served beside its /metrics: /livez (the engine loop and the
heartbeat thread go round; a Redis outage does not fail it, both keep retrying) and /readyz
(registered and claiming work; a draining worker is not ready)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.metrics_http import Probe

if TYPE_CHECKING:
    from worker.service import WorkerService


def worker_probes(service: WorkerService) -> dict[str, Probe]:
    """The probes of `service`, read when asked."""
    limit = service.config.liveness_timeout_s

    def livez() -> tuple[bool, str]:
        loop, beat = service.engine_loop_age_s(), service.liveness.attempt_age_s()
        step = service.watchdog.age_s()
        text = (f"engine loop went round {loop:.1f}s ago (a step has run {step:.1f}s), "
                f"heartbeat thread {beat:.1f}s ago; limit {limit:.0f}s (--liveness-timeout)")
        return loop <= limit and beat <= limit, text

    def readyz() -> tuple[bool, str]:
        if service.draining:
            return False, "draining: claims no new requests"
        if not service.liveness.registered:
            return False, "not registered in Redis yet (or Redis unreachable)"
        return True, f"serving {service.queue.model}: {len(service.active_ids)} running"

    return {"/livez": livez, "/readyz": readyz}
