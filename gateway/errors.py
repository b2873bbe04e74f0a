"""Failures only the gateway raises, each carrying the gRPC status it maps to.

They extend common.errors so the interceptor maps every NpuserveError the same way: by its
`grpc_status` name. The message is what the client reads; it says what to change.
"""

from __future__ import annotations

from common.errors import NpuserveError


class ModelNotFoundError(NpuserveError):
    """The requested model is not served by any live worker (gRPC NOT_FOUND)."""

    grpc_status = "NOT_FOUND"


class AlreadyExistsError(NpuserveError):
    """A request with this request_id is still in flight (gRPC ALREADY_EXISTS)."""

    grpc_status = "ALREADY_EXISTS"


class UnavailableError(NpuserveError):
    """Redis is unreachable, or no live worker serves the model (gRPC UNAVAILABLE)."""

    grpc_status = "UNAVAILABLE"


class DeadlineExceededError(NpuserveError):
    """The request's deadline passed while it was queued or running (DEADLINE_EXCEEDED)."""

    grpc_status = "DEADLINE_EXCEEDED"


class WorkerFailedError(NpuserveError):
    """A worker ended the request with an error event (gRPC INTERNAL, with the worker's text).

    Unlike an unexpected exception, its message is meant for the client: it is the worker's
    own description of what failed, prefixed with the request id.
    """

    grpc_status = "INTERNAL"
