"""The root of every edgefleet exception: one class per error code.

Domain code raises these (or its package's subclasses, each in that package's `errors`
module and each under exactly one of these); only the transport layer
(``edgefleet.core.rpc``) turns a code into a gRPC status, and a client turns a status back
into the same class, so ``except NotFound:`` works on either side of the wire.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"


class EdgefleetError(Exception):
    """An error with a message that says what went wrong and how to fix it."""

    code: ErrorCode = ErrorCode.INTERNAL

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(EdgefleetError):
    """The caller sent something wrong; the message says what to change."""

    code = ErrorCode.INVALID_ARGUMENT


class NotFound(EdgefleetError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(EdgefleetError):
    code = ErrorCode.ALREADY_EXISTS


class FailedPrecondition(EdgefleetError):
    """The request is fine but the system is not in a state to do it."""

    code = ErrorCode.FAILED_PRECONDITION


class Unauthenticated(EdgefleetError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(EdgefleetError):
    code = ErrorCode.PERMISSION_DENIED


class ResourceExhausted(EdgefleetError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(EdgefleetError):
    """The other side cannot be reached or did not answer in time; retrying may work."""

    code = ErrorCode.UNAVAILABLE


class Unimplemented(EdgefleetError):
    code = ErrorCode.UNIMPLEMENTED


class Internal(EdgefleetError):
    """A fault of ours, not the caller's."""

    code = ErrorCode.INTERNAL


BY_CODE: dict[ErrorCode, type[EdgefleetError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        Unimplemented,
        Internal,
    )
}


class ManifestError(FailedPrecondition):
    """A manifest that fails its digest, signature, schema or structure check."""
