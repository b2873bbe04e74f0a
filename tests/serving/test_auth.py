"""API keys on a real gateway and worker: no key no service, request ids per tenant (another
tenant's id is unknown to a caller, an admin may cancel it), priority caps, fleet-wide limits
on streams and tokens per minute, and keys added and revoked while the gateway runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.api_keys import Caller, Role, append_key, hash_key, new_key
from gateway.client import GenerationClient, collect, sampling
from tests.serving.conftest import Fleet, Stream, one_of_each, wait_until

pytestmark = pytest.mark.timeout(300)
MODEL = "keyed"
LONG: dict[str, Any] = {"model": MODEL, "max_tokens": 2000, "ignore_eos": True,
                        "sampling": sampling(temperature=0)}
"""Runs for many seconds; every test cancels its long streams."""
PROMPT = [1000, 2000, 3000, 4000, 5000]
KEYS = {
    "acme": Caller("acme", "acme", Role.CALLER, max_streams=2),
    "globex": Caller("globex", "globex", Role.CALLER, max_priority=5),
    "ops": Caller("ops", "ops", Role.ADMIN),
    "metered": Caller("metered", "metered", Role.CALLER, tokens_per_minute=40),
}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys = {name: new_key() for name in KEYS}
    for name, caller in KEYS.items():
        append_key(path, caller, hash_key(keys[name]))
    return path, keys


@pytest.fixture(scope="module")
def keyed(redis_server: str, tiny_qwen3: Path, key_file: tuple[Path, dict[str, str]],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    path, keys = key_file
    with one_of_each(redis_server, tiny_qwen3, MODEL, tmp_path_factory.mktemp("keyed"),
                     "--max-num-seqs", "8", gateway_flags=["--api-keys", str(path)],
                     api_key=keys["ops"]) as fl:
        yield fl


@pytest.fixture(scope="module")
def clients(keyed: Fleet, key_file: tuple[Path, dict[str, str]]
            ) -> Iterator[dict[str, GenerationClient]]:
    _, keys = key_file
    made = {name: GenerationClient(keyed.gateway, timeout=60, api_key=key)
            for name, key in keys.items()}
    made["nobody"] = GenerationClient(keyed.gateway, timeout=60)
    made["forged"] = GenerationClient(keyed.gateway, timeout=60, api_key=new_key())
    yield made
    for client in made.values():
        client.close()


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, (bool, list)) and hasattr(result, "__iter__"):
            collect(result)
    return info.value.code(), info.value.details() or ""


def test_calls_without_a_valid_key_are_unauthenticated(
        clients: dict[str, GenerationClient]) -> None:
    calls = (lambda c: c.generate(PROMPT, model=MODEL, max_tokens=2),
             lambda c: c.chat([{"role": "user", "content": "hi"}], model=MODEL),
             lambda c: c.tokenize("hi", MODEL),
             lambda c: c.list_models(),
             lambda c: c.cancel("x"),
             lambda c: c.resume("x", 0))
    for who in ("nobody", "forged"):
        for call in calls:
            code, details = status_of(lambda: call(clients[who]))  # noqa: B023
            assert code == grpc.StatusCode.UNAUTHENTICATED, (who, details)
            assert ("authorization: bearer" in details.lower() if who == "nobody"
                    else "not valid" in details)
    wait_until(lambda: clients["nobody"].health() == "SERVING", 10,
               "health without a key")  # probes need no key


def test_request_ids_are_per_tenant(clients: dict[str, GenerationClient]) -> None:
    acme, globex, ops = clients["acme"], clients["globex"], clients["ops"]
    mine = Stream(acme.generate(PROMPT, request_id="job-1", **LONG))
    mine.wait_first_token()
    # Another tenant cannot see, resume or cancel it: the id is unknown to it.
    assert globex.cancel("job-1") is False
    code, _ = status_of(lambda: globex.resume("job-1", 0))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = status_of(lambda: acme.cancel("job-1", tenant="globex"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    # ... and may use the same id for a request of its own, side by side.
    theirs = Stream(globex.generate(PROMPT, request_id="job-1", **LONG))
    theirs.wait_first_token()
    seen = len(mine.result.token_ids)
    wait_until(lambda: len(mine.result.token_ids) > seen + 5, 30,
               "acme's stream stopped after globex's cancel")
    assert mine.result.request_id == theirs.result.request_id == "job-1"
    # An admin may cancel any tenant's request.
    assert ops.cancel("job-1", tenant="acme") is True
    assert mine.finish().finish_reason == "cancelled" or (
        mine.code == grpc.StatusCode.CANCELLED)
    assert theirs.is_alive()
    assert globex.cancel("job-1") is True
    theirs.finish()
    both = min(len(mine.result.token_ids), len(theirs.result.token_ids))
    assert both > 0 and mine.result.token_ids[:both] == theirs.result.token_ids[:both]


def test_priorities_above_the_keys_cap_are_denied(clients: dict[str, GenerationClient]) -> None:
    code, details = status_of(lambda: clients["globex"].generate(
        PROMPT, model=MODEL, max_tokens=2, priority=6))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "priority 6 is above 5" in details and "max_priority" in details
    ok = collect(clients["globex"].generate(PROMPT, model=MODEL, max_tokens=2, priority=5))
    assert ok.completion_tokens == 2
    ok = collect(clients["ops"].generate(PROMPT, model=MODEL, max_tokens=2, priority=9))
    assert ok.completion_tokens == 2


def test_max_streams_is_resource_exhausted_until_a_stream_ends(
        clients: dict[str, GenerationClient]) -> None:
    acme = clients["acme"]
    held = [Stream(acme.generate(PROMPT, request_id=f"held-{i}", **LONG)) for i in range(2)]
    for stream in held:
        stream.wait_first_token()
    code, details = status_of(lambda: acme.generate(PROMPT, model=MODEL, max_tokens=2))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'acme' has 2 streams open, its max_streams" in details
    ok = collect(clients["globex"].generate(PROMPT, model=MODEL, max_tokens=2))
    assert ok.completion_tokens == 2  # other keys are not limited by acme's
    assert acme.cancel("held-0") is True
    held[0].finish()

    def admitted() -> bool:
        try:
            return collect(acme.generate(PROMPT, model=MODEL, max_tokens=2)).completion_tokens == 2
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            return False

    wait_until(admitted, 10, "the ended stream's slot was not freed")
    assert acme.cancel("held-1") is True
    held[1].finish()


def test_tokens_per_minute_is_resource_exhausted_with_a_retry_hint(
        clients: dict[str, GenerationClient]) -> None:
    metered = clients["metered"]
    used = collect(metered.generate(PROMPT, model=MODEL, max_tokens=40, ignore_eos=True))
    assert used.prompt_tokens + used.completion_tokens >= 40

    def refused() -> bool:  # the completion is charged as the stream ends
        try:
            collect(metered.generate(PROMPT, model=MODEL, max_tokens=1))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            assert "'metered' used its tokens_per_minute (40); retry in about" in exc.details()
            return True
        return False

    wait_until(refused, 10, "the key's tokens per minute were not enforced")
    ok = collect(clients["globex"].generate(PROMPT, model=MODEL, max_tokens=2))
    assert ok.completion_tokens == 2


def test_keys_are_added_and_revoked_while_the_gateway_runs(
        keyed: Fleet, key_file: tuple[Path, dict[str, str]]) -> None:
    path, _ = key_file
    before = path.read_text()
    key = new_key()
    append_key(path, Caller("late", "late", Role.CALLER), hash_key(key))
    with GenerationClient(keyed.gateway, timeout=30, api_key=key) as late:
        def works() -> bool:
            try:
                return bool(late.list_models().models)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                return False

        started = time.monotonic()
        wait_until(works, 10, "a key added to the file was not accepted", keyed.services)
        accepted_s = time.monotonic() - started
        path.write_text(before)  # revoked
        wait_until(lambda: not works(), 10, "a revoked key was still accepted",
                   keyed.services)
    assert accepted_s < 3
