"""The API key file: parsing (every mistake named), authentication by hash only, roles and
tenants, reloading on change without losing the keys in force, and `npuserve keys`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import InvalidRequestError, PermissionDeniedError, UnauthenticatedError
from gateway.api_keys import (
    DEFAULT_CALLER_MAX_PRIORITY,
    OPEN,
    Caller,
    KeyStore,
    Role,
    append_key,
    bearer,
    hash_key,
    new_key,
    parse_keys,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def entry(name: str, key: str, **fields: object) -> str:
    lines = ["[[keys]]", f'name = "{name}"', f'hash = "{hash_key(key)}"']
    for field, value in fields.items():
        lines.append(f"{field} = {value!r}" if isinstance(value, int)
                     else f'{field} = "{value}"')
    return "\n".join(lines) + "\n"


def test_a_key_is_known_by_its_hash_only(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "keys.toml"
    path.write_text(entry("web", key, tenant="acme", max_streams=3, tokens_per_minute=100))
    assert key not in path.read_text()
    store = KeyStore(str(path))
    caller = store.authenticate(key)
    assert caller == Caller("web", "acme", Role.CALLER, 3, 100, DEFAULT_CALLER_MAX_PRIORITY)
    with pytest.raises(UnauthenticatedError, match="not valid"):
        store.authenticate(key + "x")
    with pytest.raises(UnauthenticatedError,
                       match="Authorization: Bearer <key>.*gRPC metadata or HTTP header"):
        store.authenticate(None)


def test_without_a_key_file_every_call_is_open() -> None:
    store = KeyStore("")
    assert not store.enabled
    assert store.authenticate(None) is OPEN
    assert OPEN.scope("abc") == "abc"  # no tenants: ids as before
    OPEN.check_priority(9)


def test_defaults_by_role() -> None:
    keys = parse_keys(entry("ops", "k1", role="admin") + entry("app", "k2"), "f")
    admin, caller = keys[hash_key("k1")], keys[hash_key("k2")]
    assert (admin.role, admin.max_priority, admin.tenant) == (Role.ADMIN, 9, "ops")
    assert (caller.role, caller.max_priority, caller.tenant) == (Role.CALLER, 5, "app")
    assert caller.max_streams == caller.tokens_per_minute == 0


@pytest.mark.parametrize(("text", "message"), [
    ("keys = 3", "must be \\[\\[keys\\]\\] tables"),
    ("[[keys]]\nname = 'a'\nhash = 'md5:00'", "hash must be 'sha256:'"),
    ("[[keys]]\nname = 'a b'\nhash = 'sha256:" + "0" * 64 + "'", "name must be"),
    ("[[keys]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\nrole = 'root'", "role must be"),
    ("[[keys]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\ntenant = 'x/y'", "tenant must"),
    ("[[keys]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\ntoken_per_minute = 5",
     "unknown field\\(s\\) token_per_minute"),
    ("[[keys]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\nmax_priority = 10",
     "max_priority must be an integer in \\[0, 9\\]"),
    ("[[keys]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\nmax_streams = -1",
     "max_streams must be an integer >= 0"),
    (entry("a", "k") + entry("a", "j"), "the name 'a' is used twice"),
    (entry("a", "k") + entry("b", "k"), "have the same hash"),
    ("[[keys]\n", "not valid TOML"),
    ("[other]\n", "unknown top-level entries other"),
])
def test_every_mistake_in_the_file_is_named(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_keys(text, "keys.toml")


def test_an_unreadable_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="cannot read"):
        KeyStore(str(tmp_path / "missing.toml"))


def test_tenants_scope_request_ids_and_only_admins_cross_them() -> None:
    caller = Caller("web", "acme", Role.CALLER, max_priority=5)
    admin = Caller("ops", "ops", Role.ADMIN)
    assert caller.scope("r1") == "acme/r1"
    assert caller.scope("a/b") == "acme/a/b"  # the tenant ends at the first '/'
    assert caller.tenant_for_cancel("") is None
    assert caller.tenant_for_cancel("acme") is None
    with pytest.raises(PermissionDeniedError, match="only its own tenant"):
        caller.tenant_for_cancel("globex")
    assert admin.scope("r1", admin.tenant_for_cancel("acme")) == "acme/r1"
    with pytest.raises(InvalidRequestError, match="tenant: must be"):
        admin.tenant_for_cancel("a/b")
    caller.check_priority(5)
    with pytest.raises(PermissionDeniedError, match="priority 6 is above 5"):
        caller.check_priority(6)


def test_bearer_values() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer   abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer") is None
    assert bearer(None) is None


def test_the_file_is_reloaded_when_it_changes_and_a_broken_one_keeps_the_old_keys(
        tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    old, new = new_key(), new_key()
    path.write_text(entry("old", old))
    store = KeyStore(str(path))
    assert not store.reload_if_changed()
    path.write_text(entry("new", new))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a coarse clock
    assert store.reload_if_changed()
    assert store.authenticate(new).name == "new"
    with pytest.raises(UnauthenticatedError):
        store.authenticate(old)  # revoked
    path.write_text("[[keys]\n")
    assert not store.reload_if_changed()
    assert store.authenticate(new).name == "new"
    path.unlink()
    assert not store.reload_if_changed()
    assert store.authenticate(new).name == "new"


def test_append_key_writes_a_file_the_store_reads(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    append_key(path, Caller("a", "t", Role.ADMIN, 2, 50, 9), hash_key("ka"))
    append_key(path, Caller("b", "b", Role.CALLER), hash_key("kb"))
    assert path.stat().st_mode & 0o777 == 0o600
    store = KeyStore(str(path))
    assert [c.name for c in store.callers()] == ["a", "b"]
    assert store.authenticate("ka") == Caller("a", "t", Role.ADMIN, 2, 50, 9)
    with pytest.raises(InvalidRequestError, match="already has a key named 'a'"):
        append_key(path, Caller("a", "t", Role.ADMIN), hash_key("kc"))
    with pytest.raises(InvalidRequestError, match="max_priority"):
        append_key(path, Caller("c", "c", Role.CALLER, max_priority=12), hash_key("kd"))
    assert [c.name for c in KeyStore(str(path)).callers()] == ["a", "b"]


def npuserve(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=REPO_ROOT,
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


def test_keys_command_adds_hashes_and_lists(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    added = npuserve("keys", "add", "--file", str(path), "--name", "web", "--tenant", "acme",
                     "--max-streams", "4")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("npk-") and key not in path.read_text()
    assert KeyStore(str(path)).authenticate(key).tenant == "acme"
    hashed = npuserve("keys", "hash", stdin=key + "\n")
    assert hashed.stdout.strip() == hash_key(key)
    listed = npuserve("keys", "list", "--file", str(path))
    assert listed.stdout.startswith("web\ttenant=acme\tcaller\tmax_streams=4")
    again = npuserve("keys", "add", "--file", str(path), "--name", "web")
    assert again.returncode == 2 and "already has a key named 'web'" in again.stderr
