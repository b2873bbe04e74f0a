"""How npuserve names a Redis in logs and messages: never with its password, and with what
to fix when Redis refuses npuserve's credentials."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """The URL with any password replaced by ***, fit for logs and client messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def refused_credentials(url: str, exc: BaseException) -> str:
    """What to say when Redis refuses npuserve's user or password."""
    return (f"Redis at {redact(url)} refused npuserve's credentials ({exc}): set the "
            "password with NPUSERVE_REDIS_PASSWORD or --redis-password-file (and the user, "
            "if not 'default', in the URL: redis://USER@HOST:PORT/DB)")
