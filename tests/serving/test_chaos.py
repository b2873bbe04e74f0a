"""The short chaos run (`npuserve chaos`): a load of greedy streams through two gateways and
two workers while a worker is SIGKILLed, a worker drained, Redis restarted, a gateway
SIGKILLed and a gateway frozen past its registration's expiry. Every token arrives exactly
once and equals the calm run's; a failure names what each failed request was refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(420)


def test_no_token_is_lost_duplicated_or_changed_under_faults(tiny_qwen3: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    run = subprocess.run(
        [sys.executable, "-m", "common.cli", "chaos", "--model", str(tiny_qwen3),
         "--duration", "30", "--fault-every", "4", "--concurrency", "3", "--max-tokens",
         "32", "--prompts", "6", "--out", str(out)],
        capture_output=True, text=True, timeout=400)
    report = json.loads((out / "chaos.json").read_text())
    summary = report["summary"]
    print(run.stdout[-2000:])
    faults = [f["fault"].split()[0] for f in report["faults"]]
    assert faults[:5] == ["worker-kill", "drain", "redis-restart", "gateway-kill",
                          "gateway-stall"]
    assert summary["requests"] >= 20 and summary["tokens_received"] > 0
    failed = [e["request_id"] for e in report["errors"]]
    log = (out / "chaos.log").read_text(errors="replace").splitlines()
    context = [line for line in log if any(f"[{rid}]" in line or f" {rid} " in line
                                           for rid in failed)][-40:]
    assert (summary["lost"], summary["duplicated"], summary["mismatched"],
            summary["errors"]) == (0, 0, 0, 0), (report["errors"], context)
    assert summary["longest_stall_s"] < 15
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "chaos.png").stat().st_size > 10_000
