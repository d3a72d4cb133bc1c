"""The agent's errors: one class per code (each under edgefleet.core.errors' class of that
code), and the named cases below; codes map to gRPC status in edgefleet.core.rpc."""

from __future__ import annotations

from edgefleet.core import errors as core


class AgentError(core.EdgefleetError):
    """Base of every error the agent raises on purpose."""


class InvalidRequest(AgentError, core.InvalidArgument):
    pass


class ModelNotFound(AgentError, core.NotFound):
    pass


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
