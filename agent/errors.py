"""The agent's exception hierarchy; codes map to gRPC status in edgefleet.core.rpc."""

from __future__ import annotations

from edgefleet.core.errors import EdgefleetError, ErrorCode


class AgentError(EdgefleetError):
    """Base of every error the agent raises on purpose."""


class ModelNotFound(AgentError):
    code = ErrorCode.NOT_FOUND


class ModelNotReady(AgentError):
    code = ErrorCode.FAILED_PRECONDITION


class InvalidRequest(AgentError):
    code = ErrorCode.INVALID_ARGUMENT


class RequestTooLarge(AgentError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class ArtifactRejected(AgentError):
    """A version failed a check (digest, signature, load, smoke test) and will not be served."""

    code = ErrorCode.FAILED_PRECONDITION


class CloudUnavailable(AgentError):
    code = ErrorCode.UNAVAILABLE
