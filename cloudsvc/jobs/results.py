"""What a worker hands back to the manager (result.json or error.json in the job's folder).

The worker builds files; the manager, in the cloud process, turns them into a registered
version or artifact, so the registry's numbering and the store's writes stay in one
process. The parts are the domain types themselves, written as JSON (edgefleet.core.wire).
"""

from __future__ import annotations

from dataclasses import dataclass

from compilers.build import Build
from edgefleet.core.data import InputStats
from edgefleet.core.jobs import TargetOutcome, Trial
from edgefleet.core.versions import Evaluation, Lineage

RESULT_FILE = "result.json"
ERROR_FILE = "error.json"


@dataclass(frozen=True)
class JobResult:
    """Everything a finished worker produced; `source`, lineage and evaluation only for
    fine-tunes (`test` where the fine-tune kept a test set), `scored` only for an evaluate
    job (its result, recorded with the version)."""

    builds: tuple[Build, ...] = ()
    source: Build | None = None
    outcomes: tuple[TargetOutcome, ...] = ()
    trials: tuple[Trial, ...] = ()
    lineage: Lineage | None = None
    evaluation: Evaluation | None = None
    baseline: tuple[InputStats, ...] = ()
    test: Evaluation | None = None
    scored: Evaluation | None = None


@dataclass(frozen=True)
class WorkerError:
    message: str
    code: str = "failed_precondition"
    phase: str = ""
