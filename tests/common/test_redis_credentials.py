"""Redis credentials come from a file or the environment, never from an argument, and a
refused password is reported as such (not as an unreachable Redis) by the worker at start
(the gateway's side: tests/gateway/test_redis_credentials.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import RedisConfig
from common.errors import UnavailableError
from common.redis_credentials import redact
from worker.redis_queue import RedisQueue


def test_the_password_comes_from_a_file_or_the_environment(
        user_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("secret\n")
    monkeypatch.setenv("NPUSERVE_REDIS_PASSWORD", "wrong")  # the file wins
    queue = RedisQueue.connect(RedisConfig(url=user_url, password_file=str(secret)), "m",
                               "w1", 10_000)
    queue.register({"model": "m"}, ttl_s=5, now_ms=1)
    queue.close()
    monkeypatch.setenv("NPUSERVE_REDIS_PASSWORD", "secret")
    RedisQueue.connect(RedisConfig(url=user_url), "m", "w1", 10_000).close()


def test_a_refused_password_is_reported_as_such_by_the_worker(
        user_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPUSERVE_REDIS_PASSWORD", "wrong")
    with pytest.raises(UnavailableError, match="refused npuserve's credentials.*"
                       "NPUSERVE_REDIS_PASSWORD or --redis-password-file") as info:
        RedisQueue.connect(RedisConfig(url=user_url), "m", "w1", 10_000)
    assert "wrong" not in str(info.value)


def test_urls_are_redacted() -> None:
    assert redact("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"
