"""One error taxonomy for every front end: each failure a user can cause has one `ErrorCode`.

Engine, worker, preprocessing and gateway code raise these; a worker sends the code and the
message through Redis with the request's last event; each front end maps the code once (gRPC
status now, HTTP status and OpenAI error type next). Every message says what to change, not
just what went wrong.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Front-end-neutral failure classes; the names follow gRPC's status codes."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    """A request field is malformed or out of range; the message names the field."""
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    """The system is not in a state to serve this (e.g. an unsupported checkpoint)."""
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    """A configured limit was reached; the message names it."""
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    """No API key, or one the gateway does not know."""
    PERMISSION_DENIED = "PERMISSION_DENIED"
    """The API key is valid but its role or limits do not allow what was asked."""
    UNAVAILABLE = "UNAVAILABLE"
    """Retryable: Redis or every worker of the model is gone for now."""
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"
    """A bug; the message carries a request id to find the log entry, never a traceback."""

    @classmethod
    def parse(cls, name: str) -> ErrorCode:
        """The code called `name`; INTERNAL for a name this version does not know."""
        try:
            return cls(name)
        except ValueError:
            return cls.INTERNAL


class NpuserveError(Exception):
    """Base of every error npuserve raises on purpose; `code` says how front ends report it."""

    code = ErrorCode.INTERNAL


class InvalidRequestError(NpuserveError, ValueError):
    """A request field is malformed or out of range."""

    code = ErrorCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ResourceExhaustedError(NpuserveError):
    """A configured limit was reached; the message names it."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(NpuserveError):
    """The call carries no API key, or one the gateway does not know."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDeniedError(NpuserveError):
    """The caller's API key does not allow what the request asks (its role or its limits)."""

    code = ErrorCode.PERMISSION_DENIED


class DeviceError(NpuserveError):
    """A device call failed for one sequence (its slot is reset; other sequences go on)."""

    code = ErrorCode.INTERNAL


class ModelConfigError(NpuserveError, ValueError):
    """A checkpoint uses a feature npuserve does not support, or is malformed."""

    code = ErrorCode.FAILED_PRECONDITION


class ModelNotFoundError(NpuserveError):
    """The requested model is not served by any live worker."""

    code = ErrorCode.NOT_FOUND


class RequestNotFoundError(NpuserveError):
    """A request id no gateway knows (never sent, or finished longer ago than it is kept)."""

    code = ErrorCode.NOT_FOUND


class AlreadyExistsError(NpuserveError):
    """A request with this request_id is still in flight."""

    code = ErrorCode.ALREADY_EXISTS


class UnavailableError(NpuserveError):
    """Redis is unreachable, or no live worker serves the model."""

    code = ErrorCode.UNAVAILABLE


class DeadlineExceededError(NpuserveError):
    """The request's deadline passed while it was queued or running."""

    code = ErrorCode.DEADLINE_EXCEEDED


class RemoteError(NpuserveError):
    """A failure another process reported (a worker's error event), re-raised where a front
    end reports it. Its message is meant for the client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code  # per instance: whatever the remote side said
