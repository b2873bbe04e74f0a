"""A worker's liveness, on a thread of its own: however long an engine step takes, the
worker keeps renewing its leases and its registration, so a slow step never makes a live
worker look dead (no gateway refuses its model, no other worker re-runs its requests).

Every beat: renew the leases of the requests the worker holds (those no longer its own are
handed to the engine thread to drop, as are those whose gateway's registration expired;
a request resumed at another gateway has its events sent there from then on),
refresh the registration, re-queue the requests of dead workers (an expired lease, or a
worker whose registration expired), keep the model's info published, and look at the step
in progress (`StepWatchdog`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import redis

from worker.metrics import WorkerMetrics
from worker.redis_queue import RedisQueue

log = logging.getLogger(__name__)


def now_ms() -> int:
    """Wall-clock ms since the epoch: the clock of enqueue_ms, deadlines and leases."""
    return time.time_ns() // 1_000_000


class StepWatchdog:
    """Times the engine step in progress. Past `warn_s` it is logged once and counted as
    slow; past `timeout_s` (0: never) `on_stuck` runs, on the liveness thread."""

    def __init__(self, warn_s: float, timeout_s: float, metrics: WorkerMetrics,
                 on_stuck: Callable[[float], None]) -> None:
        self.warn_s = warn_s
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.on_stuck = on_stuck
        self._started: float | None = None
        self._warned = False
        self.last_s = 0.0
        """How long the last finished step took."""

    def started(self) -> None:
        self._warned = False
        self._started = time.monotonic()

    def finished(self) -> None:
        if self._started is not None:
            self.last_s = time.monotonic() - self._started
        self._started = None

    def age_s(self) -> float:
        """Seconds the step in progress has run; 0 between steps."""
        started = self._started
        return 0.0 if started is None else time.monotonic() - started

    def check(self) -> float:
        age = self.age_s()
        self.metrics.step_in_progress.set(age)
        if age > self.warn_s and not self._warned:
            self._warned = True
            self.metrics.slow_steps.inc()
            log.warning("an engine step has run for %.1fs (--step-warn-s %.1f); leases and "
                        "the registration stay renewed meanwhile", age, self.warn_s)
        if self.timeout_s and age > self.timeout_s:
            self.on_stuck(age)
        return age


class Reports:
    """What the liveness thread found for the engine thread to act on, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lost: dict[str, int] = {}
        """Requests no longer leased to this worker, and when that was read (ms): a request
        the worker claimed back since then stays."""
        self._orphaned: set[str] = set()
        self._gateway_of: dict[str, str] = {}
        """Held requests' live gateways, as last read."""

    def lose(self, ids: list[str], read_ms: int) -> None:
        """Liveness thread: these requests are no longer leased to this worker."""
        with self._lock:
            self._lost.update(dict.fromkeys(ids, read_ms))

    def gateways(self, found: dict[str, tuple[str, bool]]) -> None:
        """Liveness thread: the held requests' gateways, and whether each is alive."""
        with self._lock:
            for rid, (gateway, alive) in found.items():
                if alive:
                    self._gateway_of[rid] = gateway
                else:
                    self._orphaned.add(rid)

    def take_lost(self) -> dict[str, int]:
        with self._lock:
            lost, self._lost = self._lost, {}
        return lost

    def take_gateways(self) -> tuple[set[str], dict[str, str]]:
        """(requests whose gateway's registration expired, the others' live gateways)."""
        with self._lock:
            orphaned, self._orphaned = self._orphaned, set()
            current, self._gateway_of = self._gateway_of, {}
        return orphaned, current

    def kept(self, ids: list[str]) -> None:
        """These requests are this worker's after all (written back by its repair)."""
        with self._lock:
            for rid in ids:
                self._lost.pop(rid, None)


class Liveness:
    """The heartbeat thread of one worker (see the module docstring)."""

    def __init__(self, queue: RedisQueue, period_s: float, info: dict[str, str],
                 registration: Callable[[], dict[str, str]],
                 held: Callable[[], list[str]], on_lost: Callable[[list[str], int], None],
                 on_gateways: Callable[[dict[str, tuple[str, bool]]], None],
                 watchdog: StepWatchdog) -> None:
        self.queue = queue
        self.period_s = period_s
        self.info = info
        self.registration = registration
        self.held = held
        self.on_lost = on_lost
        self.on_gateways = on_gateways
        self.watchdog = watchdog
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_at = self._attempt_at = time.monotonic()
        self.registered = False
        """Whether the last beat refreshed the registration."""

    def beat_age_s(self) -> float:
        """Seconds since a beat last succeeded (Redis answered)."""
        return time.monotonic() - self._beat_at

    def attempt_age_s(self) -> float:
        """Seconds since the thread last tried to beat: what shows a wedged thread, apart
        from an unreachable Redis."""
        return time.monotonic() - self._attempt_at

    def beat(self) -> None:
        self._attempt_at = time.monotonic()
        self.watchdog.check()
        if self._stop.is_set():  # the watchdog ended the worker
            return
        self.queue.check_master()
        now = now_ms()
        held = self.held()
        if lost := self.queue.renew(held, now):
            self.on_lost(lost, now)
        if gateways := self.queue.gateways(held):
            self.on_gateways(gateways)
        registration = {**self.registration(),
                        "step_age_ms": str(int(self.watchdog.age_s() * 1000))}
        self.queue.register(registration, max(1, math.ceil(3 * self.period_s)), now)
        self.registered = True
        if reaped := self.queue.reap(now, turn_ms=max(1, int(self.period_s * 1000))):
            log.warning("re-queued %d requests whose worker stopped renewing", reaped)
        self.queue.ensure_model_info(self.info)
        self._beat_at = time.monotonic()

    def start(self) -> None:
        """Beat once now (the registration exists before the first claim), then every
        period on a daemon thread."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)
        self._thread.start()

    def beat_soon(self) -> None:
        """Beat now rather than at the end of the period (the registration changed: a
        drain began)."""
        self._wake.set()

    def halt(self) -> None:
        """No beat after the current one (callable from the liveness thread itself)."""
        self._stop.set()
        self._wake.set()

    def stop(self) -> None:
        """Halt and wait for the thread."""
        self.halt()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        failures = 0
        while True:
            self._wake.wait(self.period_s if failures == 0 else
                            min(self.period_s, 0.1 * 2 ** failures))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.beat()
                failures = 0
            except redis.RedisError as exc:
                failures += 1
                self.registered = False
                log.error("heartbeat failed (%s); retrying", exc)
            except Exception:  # a bug here must not silently stop the heartbeat
                failures += 1
                log.exception("heartbeat failed; retrying")
