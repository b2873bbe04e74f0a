"""libgomp's wait policy for the processes that run torch on a CPU, set before torch loads.

OpenMP's threads meet at a barrier after every parallel region. libgomp lets a thread that
waits there spin about 300,000 times (milliseconds) before it sleeps; on cores another
process shares, the thread being waited for is descheduled and the spinners burn their
time slices. Measured on a 2-core Xeon beside one busy loop, 60 decode-sized projections
with 2 threads: 614 ms at the default, 78 ms at 10,000 spins, 48 ms sleeping at once
(OMP_WAIT_POLICY=PASSIVE); idle, 15.6, 15.1 and 16.8 ms. The worker also takes threads
away while others keep cores busy (worker/backends/cpu_threads.py), so the spin only has
to bridge the gaps between a step's regions cheaply.
"""

from __future__ import annotations

import os

SPIN_COUNT = "10000"
"""GOMP_SPINCOUNT: some tens of microseconds of spinning."""


def configure_openmp() -> None:
    """Set GOMP_SPINCOUNT unless the user chose it or a wait policy; libgomp reads it once,
    when torch loads it, so call this before importing torch."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
