"""Parsing of the Redis URLs that name several servers: `redis+sentinel://` (the sentinels)
and `redis+cluster://` (startup nodes). One grammar for both:

    SCHEME://[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]...][/PATH][?OPTION=VALUE&...]

HOST may be `[IPv6]`; the options are redis-py's query-string connection options (typed as
redis-py types them: `ssl_ca_certs`, `socket_timeout`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.connection import URL_QUERY_ARGUMENT_PARSERS

from common.errors import InvalidRequestError

Bad = Callable[[str], InvalidRequestError]
"""Makes the error for what is wrong with the URL (its caller names the URL form)."""


@dataclass(frozen=True, slots=True)
class MultiHostURL:
    hosts: list[tuple[str, int]]
    path: list[str]
    """The path's non-empty segments, unquoted."""
    username: str | None = None
    password: str | None = None
    """A password written in the URL (better given by file or environment)."""
    options: dict[str, Any] = field(default_factory=dict)


def _host_port(item: str, default_port: int, what: str, bad: Bad) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise bad(f"{what} {item!r} has no host")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise bad(f"{what} {item!r} has a bad port") from None
    if not 0 < number < 65536:
        raise bad(f"{what} {item!r} has a bad port")
    return unquote(host), number


def parse_multi_host(url: str, *, default_port: int, what: str, bad: Bad) -> MultiHostURL:
    """The parts of a multi-host URL; `what` names one address in messages ("sentinel
    address"); `bad` makes the error for anything malformed."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", parts.netloc
    addresses = [_host_port(h, default_port, what, bad) for h in hosts.split(",") if h]
    if not addresses:
        raise bad(f"no {what}")
    user, colon, password = userinfo.partition(":")
    options: dict[str, Any] = {}
    for name, values in parse_qs(parts.query).items():
        parser = cast(Callable[[str], Any] | None, URL_QUERY_ARGUMENT_PARSERS.get(name))
        try:
            options[name] = parser(values[0]) if parser else values[0]
        except (TypeError, ValueError):
            raise bad(f"option {name} has a bad value") from None
    return MultiHostURL(addresses, [unquote(p) for p in parts.path.split("/") if p],
                        unquote(user) or None, unquote(password) if colon else None, options)
