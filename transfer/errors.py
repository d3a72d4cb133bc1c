"""The transfer package's errors, every problem found before long work starts: one class per
code (each under edgefleet.core.errors' class of that code), and the named cases below."""

from __future__ import annotations

from edgefleet.core import errors as core


class TransferError(core.EdgefleetError):
    """Base of every error the transfer package raises on purpose."""


class InvalidTransferInput(TransferError, core.InvalidArgument):
    """Data, settings or a backbone that cannot be used as given."""


class TransferInputNotFound(TransferError, core.NotFound):
    """A backbone or data set named but not there."""


class TransferUnavailable(TransferError, core.FailedPrecondition):
    """Something this machine lacks (a package, a weights file)."""


class UnknownBackbone(TransferInputNotFound):
    """The backbone name is neither built in nor a readable model file."""


class BackboneUnavailable(TransferUnavailable):
    """A known backbone whose optional package or weights file is missing here."""


class DatasetError(InvalidTransferInput):
    """A data set that cannot be trained on as given."""


class DatasetNotFound(TransferInputNotFound):
    pass


class EmptyDataset(DatasetError):
    pass


class SingleClassDataset(DatasetError):
    pass


class LabelsMissing(DatasetError):
    pass


class MismatchedImageSizes(DatasetError):
    pass


class IncompatibleData(InvalidTransferInput):
    """The data set's inputs do not fit the backbone (image vs text, channels, shape)."""


class InvalidConfig(InvalidTransferInput):
    """A fine-tune setting outside what the strategy accepts."""
