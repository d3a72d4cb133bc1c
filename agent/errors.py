"""The agent's errors: one class per code (each under edgefleet.core.errors' class of that
code), and the named cases below. ``STATUS`` is the one table from a code to what each of the
agent's transports answers: the gRPC status (the same as edgefleet.core.rpc.GRPC_STATUS, which
the interceptor of every gRPC server applies; a test keeps the two equal) and the HTTP status
of the REST port."""

from __future__ import annotations

from http import HTTPStatus

import grpc

from edgefleet.core import errors as core
from edgefleet.core.errors import ErrorCode


class AgentError(core.EdgefleetError):
    """Base of every error the agent raises on purpose."""


class InvalidRequest(AgentError, core.InvalidArgument):
    pass


class ModelNotFound(AgentError, core.NotFound):
    pass


class RegionNotFound(AgentError, core.NotFound):
    """No shared-memory object or region by that name."""


class ArtifactRejected(AgentError, core.FailedPrecondition):
    """A version failed a check (digest, signature, load, smoke test) and will not be served,
    or the device cannot take it (disk)."""


class RequestTooLarge(AgentError, core.ResourceExhausted):
    pass


class Unavailable(AgentError, core.Unavailable):
    """The cloud, a port or a run cannot be had right now; trying again may work."""


class SettingsError(InvalidRequest):
    """Settings that do not validate; the message names the setting."""


class NotEnrolled(ArtifactRejected):
    """No device credential yet, and no enroll token to get one."""


class StateError(ArtifactRejected):
    """The state file cannot be opened or is from a newer agent."""


class DiskFull(ArtifactRejected):
    """Not enough free disk for a version's download and assembly."""


class ChunkCorrupt(ArtifactRejected):
    """A downloaded chunk did not match its sha256; its bytes were deleted."""


class ChunkIncomplete(ArtifactRejected):
    """The stream ended early; the .part file is kept so the next try resumes."""


class NotAuthorized(AgentError, core.Unauthenticated):
    """An inference call without the bearer token the port requires."""


class Forbidden(AgentError, core.PermissionDenied):
    """The caller may not do this from where it is (shared memory from another host, a
    region owned by another user)."""


class AlreadyExists(AgentError, core.AlreadyExists):
    pass


class NotImplementedHere(AgentError, core.Unimplemented):
    """A protocol method or extension this agent does not serve; the message says so."""


# code -> (gRPC status, HTTP status). Not ready/not found/unavailable keep their meaning over
# both transports; a request over its size limit is 413 over HTTP.
STATUS: dict[ErrorCode, tuple[grpc.StatusCode, HTTPStatus]] = {
    ErrorCode.INVALID_ARGUMENT: (grpc.StatusCode.INVALID_ARGUMENT, HTTPStatus.BAD_REQUEST),
    ErrorCode.NOT_FOUND: (grpc.StatusCode.NOT_FOUND, HTTPStatus.NOT_FOUND),
    ErrorCode.ALREADY_EXISTS: (grpc.StatusCode.ALREADY_EXISTS, HTTPStatus.CONFLICT),
    ErrorCode.FAILED_PRECONDITION: (
        grpc.StatusCode.FAILED_PRECONDITION,
        HTTPStatus.PRECONDITION_FAILED,
    ),
    ErrorCode.UNAUTHENTICATED: (grpc.StatusCode.UNAUTHENTICATED, HTTPStatus.UNAUTHORIZED),
    ErrorCode.PERMISSION_DENIED: (grpc.StatusCode.PERMISSION_DENIED, HTTPStatus.FORBIDDEN),
    ErrorCode.RESOURCE_EXHAUSTED: (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    ),
    ErrorCode.UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, HTTPStatus.SERVICE_UNAVAILABLE),
    ErrorCode.UNIMPLEMENTED: (grpc.StatusCode.UNIMPLEMENTED, HTTPStatus.NOT_IMPLEMENTED),
    ErrorCode.INTERNAL: (grpc.StatusCode.INTERNAL, HTTPStatus.INTERNAL_SERVER_ERROR),
}


def grpc_status(error: core.EdgefleetError) -> grpc.StatusCode:
    return STATUS[error.code][0]


def http_status(error: core.EdgefleetError) -> HTTPStatus:
    return STATUS[error.code][1]
