"""The id of the request the current task serves, for error messages and logs.

It lives with the gateway core, not in any front end: each front end sets it when a call
arrives (`begin`), the core binds the client's own id once the request is parsed, and every
log line (common.logs) and internal-error message quotes it.
"""

from __future__ import annotations

import uuid

from common.logs import REQUEST_ID


def new_request_id() -> str:
    """A fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


def begin() -> str:
    """A call arrived: give it a fresh id until the request names its own."""
    request_id = new_request_id()
    REQUEST_ID.set(request_id)
    return request_id


def bind_request_id(client_id: str) -> str:
    """Make `client_id` (or, when empty, the id `begin` picked) the current request's id."""
    request_id = client_id or REQUEST_ID.get() or new_request_id()
    REQUEST_ID.set(request_id)
    return request_id


def current() -> str:
    """The current request's id ("" outside a call)."""
    return REQUEST_ID.get()
