"""API keys: who is calling, for which tenant, in which role and under which limits.

The gateway reads its keys from a TOML file (`--api-keys`, e.g. a mounted secret), one
`[[keys]]` table per key. Only a key's SHA-256 is stored, so the file reveals no key:

    [[keys]]
    name = "chat-frontend"          # shown in logs and metrics; unique
    hash = "sha256:9f86d081884c7d65..."
    tenant = "acme"                 # whose requests these are (default: the name)
    role = "caller"                 # or "admin"
    max_streams = 64                # open Generate/Chat/Resume streams, fleet-wide (0: none)
    tokens_per_minute = 200000      # prompt + completion tokens, fleet-wide (0: no limit)
    max_priority = 5                # highest priority its requests may ask for

A caller may generate, tokenize, list models, and resume and cancel its own tenant's
requests; an admin may also cancel any tenant's requests, and by default use every priority
(a caller up to DEFAULT_CALLER_MAX_PRIORITY). Request ids are scoped per tenant: the same id
sent by two tenants names two requests, and a tenant asking about another's id is answered
as for an id nobody used.

The file is re-read when it changes (checked every second, and at once on SIGHUP); a file
that no longer parses is reported and the keys already loaded stay in force. `npuserve keys
add` appends a new key and prints it once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from common.errors import InvalidRequestError, PermissionDeniedError, UnauthenticatedError
from common.keys import MAX_PRIORITY
from gateway import metrics

log = logging.getLogger(__name__)

DEFAULT_CALLER_MAX_PRIORITY = 5
"""Highest priority a caller key may use unless its entry says otherwise; admins: all."""
KEY_PREFIX = "npk-"
"""Keys `npuserve keys add` makes start with this, so a leaked one is easy to search for."""
HASH_PREFIX = "sha256:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_FIELDS = frozenset({"name", "hash", "tenant", "role", "max_streams", "tokens_per_minute",
                     "max_priority"})
FAILURE_LOG_INTERVAL_S = 60.0


class Role(StrEnum):
    CALLER = "caller"
    ADMIN = "admin"


def hash_key(key: str) -> str:
    """What the key file stores of `key`."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a call comes from: its key's name, tenant, role and limits."""

    name: str
    tenant: str
    role: Role
    max_streams: int = 0
    """Concurrent streams across the fleet; 0: no limit."""
    tokens_per_minute: int = 0
    """Prompt + completion tokens per minute across the fleet; 0: no limit."""
    max_priority: int = MAX_PRIORITY

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def scope(self, request_id: str, tenant: str | None = None) -> str:
        """The fleet-wide id of this caller's request `request_id` (of `tenant`'s, for an
        admin naming one): ids are per tenant."""
        tenant = self.tenant if tenant is None else tenant
        return f"{tenant}/{request_id}" if tenant else request_id

    def check_priority(self, priority: int) -> None:
        if priority > self.max_priority:
            raise PermissionDeniedError(
                f"priority {priority} is above {self.max_priority}, the highest API key "
                f"{self.name!r} may use (its max_priority in the key file)")

    def tenant_for_cancel(self, tenant: str) -> str | None:
        """The tenant whose request a Cancel names: an admin may name any; a caller only
        its own (None: keep the caller's own)."""
        if not tenant or tenant == self.tenant:
            return None
        if not _NAME.match(tenant):
            raise InvalidRequestError("tenant", "must be 1-64 characters of letters, digits, "
                                      "'.', '_' and '-'")
        if not self.is_admin:
            raise PermissionDeniedError(
                f"API key {self.name!r} may cancel only its own tenant's requests; naming "
                "another tenant needs an admin key")
        return tenant


OPEN = Caller(name="", tenant="", role=Role.ADMIN)
"""Every call, when the gateway has no key file: no tenants, no limits."""


def _entry(raw: Any, where: str) -> tuple[str, Caller]:
    if not isinstance(raw, dict):
        raise InvalidRequestError("api_keys", f"{where}: each [[keys]] entry must be a table")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise InvalidRequestError("api_keys", f"{where}: unknown field(s) "
                                  f"{', '.join(sorted(unknown))} (known: "
                                  f"{', '.join(sorted(_FIELDS))})")
    name, digest = raw.get("name"), raw.get("hash")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError("api_keys", f"{where}: name must be 1-64 characters of "
                                  "letters, digits, '.', '_' and '-'")
    if not isinstance(digest, str) or not _HASH.match(digest):
        raise InvalidRequestError("api_keys", f"{where} ({name}): hash must be 'sha256:' and "
                                  "64 lowercase hex digits (`npuserve keys hash`)")
    tenant = raw.get("tenant", name)
    if not isinstance(tenant, str) or not _NAME.match(tenant):
        raise InvalidRequestError("api_keys", f"{where} ({name}): tenant must be 1-64 "
                                  "characters of letters, digits, '.', '_' and '-'")
    try:
        role = Role(raw.get("role", "caller"))
    except ValueError:
        raise InvalidRequestError("api_keys", f"{where} ({name}): role must be 'caller' or "
                                  "'admin'") from None
    numbers = {}
    default_priority = MAX_PRIORITY if role is Role.ADMIN else DEFAULT_CALLER_MAX_PRIORITY
    for field, default, top in (("max_streams", 0, None), ("tokens_per_minute", 0, None),
                                ("max_priority", default_priority, MAX_PRIORITY)):
        value = raw.get(field, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (
                top is not None and value > top):
            bound = f"an integer in [0, {top}]" if top is not None else "an integer >= 0"
            raise InvalidRequestError("api_keys", f"{where} ({name}): {field} must be {bound}")
        numbers[field] = value
    return digest, Caller(name=name, tenant=tenant, role=role, **numbers)


def parse_keys(text: str, source: str) -> dict[str, Caller]:
    """The keys a key file's text defines, by hash; InvalidRequestError says what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequestError("api_keys", f"{source} is not valid TOML: {exc}") from None
    extra = set(data) - {"keys"}
    if extra:
        raise InvalidRequestError("api_keys", f"{source}: unknown top-level entries "
                                  f"{', '.join(sorted(extra))}; keys go in [[keys]] tables")
    entries = data.get("keys", [])
    if not isinstance(entries, list):
        raise InvalidRequestError("api_keys", f"{source}: 'keys' must be [[keys]] tables")
    keys: dict[str, Caller] = {}
    names: set[str] = set()
    for i, raw in enumerate(entries):
        digest, caller = _entry(raw, f"{source}, key #{i + 1}")
        if caller.name in names:
            raise InvalidRequestError("api_keys", f"{source}: the name {caller.name!r} is "
                                      "used twice")
        if digest in keys:
            raise InvalidRequestError("api_keys", f"{source}: keys {keys[digest].name!r} and "
                                      f"{caller.name!r} have the same hash")
        names.add(caller.name)
        keys[digest] = caller
    return keys


def _fingerprint(path: Path) -> tuple[int, int, int]:
    """Changes whenever the file is rewritten or replaced (a secret's symlink swapped)."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


class KeyStore:
    """The gateway's API keys; `authenticate` maps a presented key to its Caller. Without a
    key file every call is OPEN."""

    def __init__(self, path: str = "") -> None:
        self.path = Path(path) if path else None
        self._keys: dict[str, Caller] = {}
        self._fingerprint: tuple[int, int, int] | None = None
        self._failures = 0
        self._failures_logged = -FAILURE_LOG_INTERVAL_S
        if self.path is not None:
            self._load()
            log.info("API keys: %d from %s", len(self._keys), self.path)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def callers(self) -> list[Caller]:
        """The keys in force, by name."""
        return sorted(self._keys.values(), key=lambda caller: caller.name)

    def _load(self) -> None:
        assert self.path is not None
        try:
            fingerprint = _fingerprint(self.path)
            text = self.path.read_text()
        except OSError as exc:
            raise InvalidRequestError("api_keys", f"cannot read {self.path}: "
                                      f"{exc.strerror}") from None
        self._keys = parse_keys(text, str(self.path))
        self._fingerprint = fingerprint

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since it was read; True when new keys are in force.
        A file that cannot be read or parsed is logged and the current keys kept."""
        if self.path is None:
            return False
        try:
            if _fingerprint(self.path) == self._fingerprint:
                return False
        except OSError:
            pass  # gone or unreadable: _load reports it
        return self.reload()

    def reload(self) -> bool:
        """Re-read the file now; True when its keys are in force."""
        if self.path is None:
            return False
        try:
            self._load()
        except InvalidRequestError as exc:
            log.error("API keys not reloaded, the %d loaded keep working: %s",
                      len(self._keys), exc.message)
            return False
        log.info("API keys reloaded: %d from %s", len(self._keys), self.path)
        return True

    def authenticate(self, presented: str | None) -> Caller:
        """The Caller of a call that presented `presented` (the bearer key, or None)."""
        if self.path is None:
            return OPEN
        if not presented:
            self._refused("missing")
            raise UnauthenticatedError(
                "this gateway needs an API key: send 'Authorization: Bearer <key>' (gRPC "
                "metadata or HTTP header; npuserve client: NPUSERVE_API_KEY or "
                "--api-key-file)")
        caller = self._keys.get(hash_key(presented))
        if caller is None:
            self._refused("unknown")
            raise UnauthenticatedError("the API key is not valid (unknown, or revoked)")
        return caller

    def _refused(self, reason: str) -> None:
        metrics.AUTH_FAILURES.labels(reason).inc()
        self._failures += 1
        now = time.monotonic()
        if now - self._failures_logged >= FAILURE_LOG_INTERVAL_S:
            log.warning("%d calls refused for a missing or unknown API key since the last "
                        "report (latest: %s)", self._failures, reason)
            self._failures, self._failures_logged = 0, now


def bearer(value: str | None) -> str | None:
    """The key in an `authorization` header or metadata value ('Bearer <key>')."""
    if value is None:
        return None
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def append_key(path: Path, caller: Caller, digest: str) -> None:
    """Add a key's entry to a key file (created, mode 0600, if missing), replacing the file
    in one rename so a gateway never reads half of it."""
    text = path.read_text() if path.exists() else (
        "# npuserve API keys: only each key's SHA-256 is kept. `npuserve keys add` adds one.\n")
    keys = parse_keys(text, str(path))
    if any(c.name == caller.name for c in keys.values()):
        raise InvalidRequestError("name", f"{path} already has a key named {caller.name!r}")
    entry = [
        "",
        "[[keys]]",
        f'name = "{caller.name}"',
        f'hash = "{digest}"',
        f'tenant = "{caller.tenant}"',
        f'role = "{caller.role.value}"',
        f"max_streams = {caller.max_streams}",
        f"tokens_per_minute = {caller.tokens_per_minute}",
        f"max_priority = {caller.max_priority}",
    ]
    text = text.rstrip("\n") + "\n" + "\n".join(entry) + "\n"
    parse_keys(text, str(path))  # never write a file the gateway would refuse
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
