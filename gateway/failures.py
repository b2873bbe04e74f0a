"""How any exception raised while serving a call becomes what a client is told: one neutral
ErrorCode and a message. Every front end asks here, then maps the code its own way (a gRPC
status, an HTTP status and OpenAI error type).

An NpuserveError carries its code and a message meant for the client. Redis going away is
UNAVAILABLE. Anything else is a bug: INTERNAL with the request id, the traceback logged under
that id, never shown to the client.
"""

from __future__ import annotations

import logging

from common.errors import ErrorCode, NpuserveError
from gateway import context
from gateway.redis_queue import REDIS_DOWN

log = logging.getLogger(__name__)


def describe(exc: BaseException, where: str) -> tuple[ErrorCode, str]:
    """The code and client message for `exc`, raised while serving `where` (a method or path);
    logs it under the current request id."""
    request_id = context.current()
    if isinstance(exc, NpuserveError):
        log.info("%s %s: %s %s", where, request_id, exc.code.value, exc)
        return exc.code, str(exc)
    if isinstance(exc, REDIS_DOWN):
        log.warning("%s %s: Redis failed: %s", where, request_id, exc)
        return ErrorCode.UNAVAILABLE, f"Redis is unreachable ({exc}); retry later"
    log.error("%s %s: internal error", where, request_id, exc_info=exc)
    return ErrorCode.INTERNAL, (
        f"internal error while serving request {request_id}; "
        "the gateway's log has the details under that id")
