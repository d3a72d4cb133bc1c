"""The transfer package's exception hierarchy: every problem found before long work starts."""

from __future__ import annotations

from edgefleet.core.errors import EdgefleetError, ErrorCode


class TransferError(EdgefleetError):
    """Base of every error the transfer package raises on purpose."""

    code = ErrorCode.INVALID_ARGUMENT


class UnknownBackbone(TransferError):
    """The backbone name is neither built in nor a readable model file."""

    code = ErrorCode.NOT_FOUND


class BackboneUnavailable(TransferError):
    """A known backbone whose optional package or weights file is missing here."""

    code = ErrorCode.FAILED_PRECONDITION


class DatasetError(TransferError):
    """A data set that cannot be trained on as given."""


class DatasetNotFound(DatasetError):
    code = ErrorCode.NOT_FOUND


class EmptyDataset(DatasetError):
    pass


class SingleClassDataset(DatasetError):
    pass


class LabelsMissing(DatasetError):
    pass


class MismatchedImageSizes(DatasetError):
    pass


class IncompatibleData(TransferError):
    """The data set's inputs do not fit the backbone (image vs text, channels, shape)."""


class InvalidConfig(TransferError):
    """A fine-tune setting outside what the strategy accepts."""
