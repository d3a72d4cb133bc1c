"""The cloud service's errors: one class per code (each under edgefleet.core.errors' class
of that code, so clients and tests catch them by the same name), and named cases below."""

from __future__ import annotations

from edgefleet.core import errors as core


class CloudError(core.EdgefleetError):
    """Root of every error the cloud service raises on purpose."""


class InvalidRequest(CloudError, core.InvalidArgument):
    pass


class UnknownResource(CloudError, core.NotFound):
    pass


class Conflict(CloudError, core.AlreadyExists):
    pass


class NotReady(CloudError, core.FailedPrecondition):
    pass


class NotAuthenticated(CloudError, core.Unauthenticated):
    pass


class Forbidden(CloudError, core.PermissionDenied):
    pass


class TooLarge(CloudError, core.ResourceExhausted):
    pass


class StoreError(CloudError, core.Internal):
    pass


class BadModel(InvalidRequest):
    """An uploaded file that ONNX Runtime cannot load or that cannot be described."""


class BlobCorrupt(StoreError):
    """Stored bytes whose digest no longer matches their name."""


class JobFailed(NotReady):
    """A job that cannot go on; the message says what to change."""
