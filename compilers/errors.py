"""The compilers package's exception hierarchy."""

from __future__ import annotations

from edgefleet.core.errors import EdgefleetError, ErrorCode


class CompileError(EdgefleetError):
    """A model could not be turned into a deployable artifact."""

    code = ErrorCode.FAILED_PRECONDITION


class ParityError(CompileError):
    """The exported graph's outputs differ from torch's beyond the stated tolerance."""


class UnknownTargetError(CompileError):
    """A target name that no profile defines."""

    code = ErrorCode.INVALID_ARGUMENT


class TargetUnavailableError(CompileError):
    """The target needs software or hardware this machine lacks (e.g. TensorRT)."""


class AccuracyDropError(CompileError):
    """A precision change (INT8, FP16) lost more accuracy than the caller allows."""
