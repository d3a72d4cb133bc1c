"""Where a job's worker finds and puts things: written by the manager into the job folder
(env.json), read by the worker. Torch-free, so the manager never imports the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.core.wire import from_json, to_json

ENV_FILE = "env.json"
SPEC_FILE = "spec.json"
# The parent version's golden inputs, for a fine-tune with a parent (see jobs.compile).
PARENT_GOLDEN = "parent-golden"
# The parent version's kept FP32 export, for a warm-started fine-tune (its weights).
PARENT_SOURCE = "parent-source"
CLASS_NAMES_FILE = "class-names.json"  # in PARENT_SOURCE: the parent's outputs, in order


@dataclass(frozen=True)
class WorkerEnv:
    job_id: str
    job_dir: Path
    uploads_dir: Path
    cache_dir: Path
    fashion_mnist_dir: Path
    threads: int = 0  # torch threads; 0: torch's default
    # Captured data (`captures:` data sets); empty with a cloud keeping nothing on disk.
    data_path: Path | None = None

    def write(self) -> None:
        (self.job_dir / ENV_FILE).write_text(to_json(self))

    @classmethod
    def read(cls, job_dir: Path) -> WorkerEnv:
        return from_json(cls, (job_dir / ENV_FILE).read_text())
