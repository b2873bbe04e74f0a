"""Errors a user can cause, each mapped to one gRPC status code at the edge.

Engine and preprocessing code raise these; the gateway's interceptor turns them into
statuses. Every message says what to change, not just what went wrong.
"""

from __future__ import annotations


class NpuserveError(Exception):
    """Base of every error npuserve raises on purpose."""

    grpc_status = "INTERNAL"


class InvalidRequestError(NpuserveError, ValueError):
    """A request field is malformed or out of range (gRPC INVALID_ARGUMENT)."""

    grpc_status = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ResourceExhaustedError(NpuserveError):
    """A configured limit was reached; the message names it (gRPC RESOURCE_EXHAUSTED)."""

    grpc_status = "RESOURCE_EXHAUSTED"


class ModelConfigError(NpuserveError, ValueError):
    """A checkpoint uses a feature npuserve does not support, or is malformed."""

    grpc_status = "FAILED_PRECONDITION"
