"""How npuserve names a Redis in logs and messages: never with its password, and with what
to fix when Redis refuses npuserve's credentials."""

from __future__ import annotations

import re

SECRET_OPTIONS = ("password", "sentinel_password", "ssl_password")
"""Query-string options whose values are secrets."""
_SECRET_QUERY = re.compile(rf"([?&](?:{'|'.join(SECRET_OPTIONS)})=)[^&#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with any password replaced by ***, fit for logs and client messages.

    Works on every form npuserve takes (redis://, rediss://, unix://, redis+sentinel:// with
    several hosts) and on malformed ones, never raising: a password holding characters a
    URL should have escaped ('/', '?', '#', '@') is redacted too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _SECRET_QUERY.sub(r"\1***", url)
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        rest = _hide_password(userinfo) + "@" + host + rest[len(authority):]
    elif "@" in rest:
        # the authority ended early: a raw '/', '?' or '#' in a password, or an '@' further
        # on (in a path or an option); a port (digits after the colon) means the latter
        userinfo, tail = rest.rsplit("@", 1)
        before, colon, after = authority.partition(":")
        if colon and not after.isdigit():
            rest = f"{before}:***@{tail}"
    return _SECRET_QUERY.sub(r"\1***", f"{scheme}://{rest}")


def _hide_password(userinfo: str) -> str:
    user, colon, _ = userinfo.partition(":")
    return f"{user}:***" if colon else userinfo


def refused_credentials(url: str, exc: BaseException) -> str:
    """What to say when Redis refuses npuserve's user or password."""
    return (f"Redis at {redact(url)} refused npuserve's credentials ({exc}): set the "
            "password with NPUSERVE_REDIS_PASSWORD or --redis-password-file (and the user, "
            "if not 'default', in the URL: redis://USER@HOST:PORT/DB)")
