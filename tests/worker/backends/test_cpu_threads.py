"""The CPU thread budget (affinity and cgroup quota) and the governor that gives threads up
while other processes keep cores busy."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worker.backends import cpu_threads
from worker.backends.cpu_threads import ThreadGovernor, cpu_budget


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("files", "expected"), [
    ({}, 8),
    ({"cpu.max": "max 100000\n"}, 8),
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs' worth runs 2 threads
    ({"cpu.max": "5000000 100000\n"}, 8),  # a quota above the CPUs allowed
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),
])
def test_the_budget_is_the_cpus_allowed_capped_by_the_cgroup_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str],
        expected: int) -> None:
    monkeypatch.setattr(cpu_threads, "allowed_cpus", lambda: set(range(8)))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_budget(tmp_path) == expected


def test_an_unreadable_quota_is_reported_and_ignored(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(cpu_threads, "allowed_cpus", lambda: {0, 1})
    (tmp_path / "cpu.max").write_text("lots 100000\n")
    with caplog.at_level(logging.WARNING, logger="worker.backends.cpu_threads"):
        assert cpu_budget(tmp_path) == 2
    assert "unreadable cgroup CPU quota" in caplog.text


def _stat(per_cpu: dict[int, tuple[int, int]]) -> str:
    """/proc/stat text with (busy, idle) jiffies per CPU (busy as user time)."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{c} {busy} 0 0 {idle} 0 0 0 0 0 0" for c, (busy, idle) in per_cpu.items()]
    return "\n".join([*lines, "intr 1 2 3", "ctxt 42"]) + "\n"


def test_the_governor_gives_up_the_cores_others_keep_busy_and_takes_them_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_threads, "allowed_cpus", lambda: {0, 1})
    own = [0]
    monkeypatch.setattr(cpu_threads, "_own_jiffies", lambda: own[0])
    stat = tmp_path / "stat"
    # cpu 2 is not ours: its load never counts
    ticks = {0: (0, 0), 1: (0, 0), 2: (0, 0)}

    def window(busy0: int, busy1: int, mine: int) -> int:
        """One look after 100 jiffies per CPU: cpu0 and cpu1 busy this many (ours included),
        of which `mine` were this process's."""
        for c, busy in ((0, busy0), (1, busy1)):
            ticks[c] = (ticks[c][0] + busy, ticks[c][1] + 100 - busy)
        ticks[2] = (ticks[2][0] + 100, ticks[2][1])
        own[0] += mine
        stat.write_text(_stat(ticks))
        gov._next = 0.0  # look now
        return gov.maybe_adjust()

    stat.write_text(_stat(ticks))
    gov = ThreadGovernor(2, stat_path=str(stat))  # the first window starts here
    assert gov.threads == 2 and torch.get_num_threads() == 2
    assert window(0, 0, 0) == 2
    assert window(90, 90, 180) == 2  # busy with itself: keeps its threads
    assert window(100, 100, 0) == 1  # others on both cores
    assert torch.get_num_threads() == 1
    assert window(100, 100, 100) == 1  # a busy loop on one core, our one thread on the other
    assert window(100, 100, 100) == 1
    assert window(0, 100, 100) == 2  # the loop ended: half a core busy, smoothed
    assert torch.get_num_threads() == 2
    for _ in range(4):
        assert window(0, 0, 0) == 2  # idle: the estimate decays to nothing
    # a neighbour that starts takes its core at the next look, not once the average says so
    assert window(60, 100, 100) == 1  # six tenths of a core
    assert window(0, 100, 100) == 2  # and gives it back as the estimate decays


def test_the_first_look_already_counts_a_neighbour_busy_since_the_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_threads, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(cpu_threads, "_own_jiffies", lambda: 0)
    stat = tmp_path / "stat"
    stat.write_text(_stat({0: (0, 0), 1: (0, 0)}))
    gov = ThreadGovernor(2, stat_path=str(stat))
    stat.write_text(_stat({0: (100, 0), 1: (0, 100)}))  # a busy loop while the model loaded
    gov._next = 0.0
    assert gov.maybe_adjust() == 1 and torch.get_num_threads() == 1


def test_an_unreadable_stat_keeps_the_threads(tmp_path: Path) -> None:
    gov = ThreadGovernor(1, stat_path=str(tmp_path / "missing"))
    gov._next = 0.0
    assert gov.maybe_adjust() == 1


@pytest.mark.skipif(len(cpu_threads.allowed_cpus()) != 2, reason="sized for 2 CPUs")
def test_a_real_busy_process_takes_a_thread_away() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        gov = ThreadGovernor(2)
        deadline = time.monotonic() + 10
        while gov.threads == 2 and time.monotonic() < deadline:
            time.sleep(0.3)
            gov._next = 0.0
            gov.maybe_adjust()
        assert gov.threads == 1
    finally:
        busy.kill()
        busy.wait()
