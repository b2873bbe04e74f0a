"""How many threads the torch backend computes with on a CPU: the container's share of the
machine, and fewer while other processes keep some of those cores busy.

OpenMP's threads meet at a barrier after every parallel region, several hundred times per
decode step; on a core another process keeps busy, the thread being waited for is
descheduled for whole time slices. Beside one busy loop on a 2-core Xeon, 60 decode-sized
projections took 2.5x longer with 2 threads than with 1, even with libgomp's spinning cut
short (common/openmp.py). So:

- `cpu_budget`: the CPUs this process may run on (its affinity), capped by a cgroup CPU
  quota (a container given 2 CPUs on a 64-core host gets 2 threads, not 64);
- `ThreadGovernor`: about once a second, from /proc/stat (the CPUs it may use) and its own
  CPU time, how many cores other processes kept busy; the threads become the cores left,
  at least 1, at most the budget. Two workers on one host settle at half each. A neighbour
  that starts takes its cores at the next look (threads left beside it collapse, so waiting
  costs more than giving a core up for a second too long); one that stops gives them back as
  the running estimate decays.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
"""How often the governor looks at the machine."""
SMOOTHING = 0.5
"""Weight of the newest window in the governor's running estimate of others' load."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of the cgroup CPU quota (v2 cpu.max, else v1 cfs), or None when there is
    none."""
    v2 = _read(root / "cpu.max")
    v1 = (_read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us"))
    try:
        if v2 is not None:
            quota, period = v2.split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if v1[0] is not None and v1[1] is not None:
            quota_us, period_us = int(v1[0]), int(v1[1])
            return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except ValueError as exc:
        log.warning("unreadable cgroup CPU quota under %s (%s): using every allowed CPU",
                    root, exc)
    return None


def allowed_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def cpu_budget(root: Path = Path("/sys/fs/cgroup")) -> int:
    """Threads this process can keep busy: its CPUs, capped by a cgroup quota (rounded up:
    1.5 CPUs' worth runs 2 threads)."""
    cpus = len(allowed_cpus())
    quota = _cgroup_quota(root)
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else max(1, cpus)


def _busy_and_total(cpus: set[int], stat: str) -> tuple[int, int]:
    """Busy and total jiffies of these CPUs from /proc/stat's text (steal counts as busy:
    the hypervisor gave the core to someone else)."""
    busy = total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]
        idle = values[3] + values[4]  # idle, iowait
        busy += sum(values) - idle
        total += sum(values)
    return busy, total


def _own_jiffies() -> int:
    """This process's user + system CPU time in clock ticks (every thread's)."""
    t = os.times()
    return round((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


class ThreadGovernor:
    """Sets torch's thread count to the cores of its budget that other processes leave
    free. `maybe_adjust` is cheap between its looks at the machine; call it once a step."""

    def __init__(self, budget: int, stat_path: str = "/proc/stat") -> None:
        self.budget = budget
        self._cpus = allowed_cpus()
        self._stat_path = stat_path
        self._others: float | None = None
        self._last = self._sample()
        """The first look's window starts here (the model loads meanwhile)."""
        self._next = time.monotonic() + INTERVAL_S
        self.threads = budget
        torch.set_num_threads(budget)

    def _sample(self) -> tuple[int, int, int] | None:
        """(busy and total jiffies of our CPUs, our own), or None if /proc/stat is
        unreadable."""
        try:
            busy, total = _busy_and_total(self._cpus, Path(self._stat_path).read_text())
        except (OSError, ValueError) as exc:
            log.debug("cannot read %s (%s): threads unchanged", self._stat_path, exc)
            return None
        return busy, total, _own_jiffies()

    def maybe_adjust(self) -> int:
        """Look at the machine if INTERVAL_S has passed, and set the threads; returns them."""
        now = time.monotonic()
        if now < self._next:
            return self.threads
        self._next = now + INTERVAL_S
        sample = self._sample()
        if sample is None:
            return self.threads
        last, self._last = self._last, sample
        busy, total, own = sample
        if last is None or total <= last[1]:
            return self.threads
        # the share of the CPUs' time busy with others, in cores
        others = (max(0.0, (busy - last[0]) - (own - last[2])) / (total - last[1])
                  * len(self._cpus))
        self._others = (others if self._others is None
                        else SMOOTHING * others + (1 - SMOOTHING) * self._others)
        busy_cores = max(others, self._others)  # at once up, decaying down
        threads = max(1, min(self.budget, int(len(self._cpus) - busy_cores + 0.5)))
        if threads != self.threads:
            log.debug("other processes keep %.1f of %d cores busy: %d -> %d threads",
                      busy_cores, len(self._cpus), self.threads, threads)
            self.threads = threads
            torch.set_num_threads(threads)
        return self.threads
