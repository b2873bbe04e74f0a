"""Publishing a step's batch on a thread of its own, while the engine runs the next step.

One publish at a time, in step order: the worker loop sends step N's batch, runs step N+1,
then collects step N's outcome before it sends step N+1's. Collecting records what Redis
acknowledged in the worker's PublishLog. Each publish also reads the cancel flags of the
requests running when it was sent (`RedisQueue.publish`), so the next iteration asks Redis
only about requests claimed since (`flagged`). Requests whose device failed are handed back
right after their batch is written, from the same thread.

Threads: the engine thread alone sends and collects (this object's fields are its own); the
liveness thread only waits for the publish in flight (`wait`, before a stuck worker hands its
requests back), reading the future's reference once. The Redis client is shared by the engine,
liveness and publish threads, which redis-py allows: every command, every pipeline (built per
call) and every script call takes a connection of the pool for itself. `RedisQueue._call`
builds its retry state per call; the only state of `RedisQueue` written from more than one
thread is its `disrupted` flag, a plain attribute any thread may set, which the engine thread
clears only while no publish is in flight (it settles first, see `WorkerService.run_once`).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Collection

from worker.published import PublishLog
from worker.redis_queue import RedisQueue, StepBatch

GRACE_S = 10.0
"""How long past its retries (RedisQueue.retry_s) `wait` waits for a publish: one more
attempt's socket timeout, and some."""


class Publisher:
    """Sends one StepBatch at a time to Redis on a dedicated thread."""

    def __init__(self, queue: RedisQueue, log: PublishLog) -> None:
        self.queue = queue
        self.log = log
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                           thread_name_prefix="publish")
        self._batch: StepBatch | None = None
        self._running: tuple[str, ...] = ()
        self._future: concurrent.futures.Future[set[str]] | None = None
        self._read: tuple[tuple[str, ...], set[str]] | None = None
        """The cancel flags the last collected publish read: (requests read, those flagged)."""

    @property
    def in_flight(self) -> StepBatch | None:
        """The batch sent and not yet collected."""
        return self._batch

    def touches(self, request_id: str) -> bool:
        """Whether the batch in flight writes anything of this request."""
        batch = self._batch
        return batch is not None and (
            request_id in batch.tokens or request_id in batch.finished
            or request_id in batch.retry
            or any(e.request_id == request_id for events in batch.events.values()
                   for e in events))

    def send(self, batch: StepBatch, running: Collection[str]) -> None:
        """Start writing `batch` and reading the cancel flags of `running`; the publish sent
        before must have been collected."""
        if self._future is not None:
            raise RuntimeError("a publish is still in flight: collect it before sending")
        self._batch, self._running = batch, tuple(running)
        self._future = self._pool.submit(self._publish, batch, self._running)

    def _publish(self, batch: StepBatch, running: tuple[str, ...]) -> set[str]:
        flagged = self.queue.publish(batch, running)
        if batch.retry:  # their failure count is written: hand them back
            self.queue.requeue(batch.retry)
        return flagged

    def collect(self) -> None:
        """Wait for the publish in flight, if any, and record it. Raises what it raised (a
        redis.RedisError): the batch may then be written in part or not at all, its
        requests still leased to this worker, and nothing of it is recorded."""
        future, batch, running = self._future, self._batch, self._running
        if future is None or batch is None:
            return
        self._future, self._batch, self._running = None, None, ()
        self._read = (running, future.result())
        self.log.record(batch.events)
        for rid in batch.retry:  # no longer this worker's
            self.log.forget(rid)

    def flagged(self, running: Collection[str]) -> set[str]:
        """Which of `running` a gateway flagged as cancelled: as the last collected publish
        read them, and, for those it did not read (claimed since it was sent), read now.
        Each publish's reading is used once."""
        read, self._read = self._read, None
        checked, flagged = read or ((), set())
        seen = set(checked)
        return ({rid for rid in flagged if rid in running}
                | self.queue.cancelled([rid for rid in running if rid not in seen]))

    def wait(self) -> bool:
        """From another thread: wait until the publish in flight (if any) is done, without
        collecting it; False if it still runs after its retries and GRACE_S."""
        future = self._future
        if future is None:
            return True
        done = concurrent.futures.wait([future], self.queue.retry_s + GRACE_S)
        return not done.not_done

    def close(self) -> None:
        """Let the publish in flight finish, then stop the thread."""
        self._pool.shutdown(wait=True)
