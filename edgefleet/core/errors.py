"""The root of every edgefleet exception and the error codes they carry.

Domain code raises these with an ErrorCode; only the transport layer
(``edgefleet.core.rpc``) turns a code into a gRPC status. Each package (agent,
cloudsvc, compilers, transfer) derives its own base class from ``EdgefleetError``.
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
    INTERNAL = "internal"


class EdgefleetError(Exception):
    """An error with a message that says what went wrong and how to fix it."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(EdgefleetError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(EdgefleetError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(EdgefleetError):
    code = ErrorCode.ALREADY_EXISTS


class FailedPrecondition(EdgefleetError):
    code = ErrorCode.FAILED_PRECONDITION


class Unauthenticated(EdgefleetError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(EdgefleetError):
    code = ErrorCode.PERMISSION_DENIED


class ResourceExhausted(EdgefleetError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(EdgefleetError):
    code = ErrorCode.UNAVAILABLE
