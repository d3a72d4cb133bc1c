"""The compilers package's errors: one class per code, and the named cases below."""

from __future__ import annotations

from edgefleet.core import errors as core


class CompileError(core.EdgefleetError):
    """A model could not be turned into a deployable artifact."""


class CompileRefused(CompileError, core.FailedPrecondition):
    pass


class InvalidCompileRequest(CompileError, core.InvalidArgument):
    pass


class ParityError(CompileRefused):
    """The exported graph's outputs differ from torch's beyond the stated tolerance."""


class UnknownTargetError(InvalidCompileRequest):
    """A target name that no profile defines."""


class TargetUnavailableError(CompileRefused):
    """The target needs software or hardware this machine lacks (e.g. TensorRT)."""


class AccuracyDropError(CompileRefused):
    """A precision change (INT8, FP16) lost more accuracy than the caller allows."""
