"""A built artifact: the files compiled for one target, in one folder, ready for the registry.

One type from the compiler (which fills files, metrics and steps), through the job worker
(which adds golden samples, preprocessing and metadata) and its result file, to the
registry (which chunks, signs and records it). Torch-free and onnx-free: the cloud process
imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.core.golden import GoldenRef


@dataclass(frozen=True)
class Build:
    """`files` are paths relative to `folder`, the entrypoint first; `golden` names files
    among them. `format` is "onnx" or "tensorrt-plan"."""

    target: str
    folder: Path
    files: tuple[str, ...]
    format: str = "onnx"
    metrics: Mapping[str, float] = field(default_factory=dict)
    steps: tuple[str, ...] = ()
    golden: tuple[GoldenRef, ...] = ()
    preprocessing: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def entrypoint(self) -> Path:
        return self.folder / self.files[0]
