"""The compilers package's exception hierarchy."""

from __future__ import annotations

from edgefleet.errors import EdgefleetError, ErrorCode


class CompileError(EdgefleetError):
    """A model could not be turned into a deployable artifact."""

    code = ErrorCode.FAILED_PRECONDITION


class ParityError(CompileError):
    """The exported graph's outputs differ from torch's beyond the stated tolerance."""
