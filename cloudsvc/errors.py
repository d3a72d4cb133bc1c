"""The cloud service's errors. Each carries an ErrorCode; servicers map codes to statuses."""

from __future__ import annotations

from edgefleet.core.errors import EdgefleetError, ErrorCode


class CloudError(EdgefleetError):
    """Root of every error the cloud service raises on purpose."""


class InvalidRequest(CloudError):
    code = ErrorCode.INVALID_ARGUMENT


class UnknownResource(CloudError):
    code = ErrorCode.NOT_FOUND


class Conflict(CloudError):
    code = ErrorCode.ALREADY_EXISTS


class NotReady(CloudError):
    code = ErrorCode.FAILED_PRECONDITION


class NotAuthenticated(CloudError):
    code = ErrorCode.UNAUTHENTICATED


class Forbidden(CloudError):
    code = ErrorCode.PERMISSION_DENIED


class TooLarge(CloudError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class BadModel(InvalidRequest):
    """An uploaded file that ONNX Runtime cannot load or that cannot be described."""


class BlobCorrupt(CloudError):
    """Stored bytes whose digest no longer matches their name."""

    code = ErrorCode.INTERNAL


class StoreError(CloudError):
    code = ErrorCode.INTERNAL
