"""A worker's progress lines on their way to the job a user reads: a diverging loss (NaN)
is data, carried through the line format and the store, not an error."""

from __future__ import annotations

import io
import math
from dataclasses import replace
from pathlib import Path

import pytest

from cloudsvc.jobs.events import Reporter, parse_line
from cloudsvc.store.memory import MemoryMetadataStore
from cloudsvc.store.metadata import MetadataStore
from cloudsvc.store.sqlite import SqliteMetadataStore
from edgefleet.core.jobs import Job, JobState
from edgefleet.core.rpc import MAX_MESSAGE_BYTES, bounded
from edgefleet.core.wire import to_json


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_nan_loss_reaches_the_stored_job(backend: str, tmp_path: Path) -> None:
    out = io.StringIO()
    reporter = Reporter(out, min_interval_s=0)
    reporter.phase("training")
    reporter.update(epoch=1, epochs=3, loss=float("nan"), train_accuracy=0.25)
    lines = [parse_line(line) for line in out.getvalue().splitlines()]
    progress = [line.progress for line in lines if line.kind == "progress"][-1]
    assert progress is not None and math.isnan(progress.loss)
    store: MetadataStore = (
        MemoryMetadataStore() if backend == "memory" else SqliteMetadataStore(tmp_path / "m.db")
    )
    job = Job("job-1", "finetune", "m", "{}", JobState.RUNNING, 1.0)
    job = store.create_job(job)
    store.update_job(replace(job, progress=progress))
    stored = store.get_job(job.job_id)
    assert stored is not None and math.isnan(stored.progress.loss)
    assert stored.progress.train_accuracy == 0.25
    assert "NaN" in to_json(stored)  # what `edgefleet jobs show --json` prints


def test_status_messages_are_bounded_in_bytes_not_characters() -> None:
    """Status messages travel in HTTP/2 trailers: 2,000 three-byte characters are 6,000
    bytes, which a character count of 1,000 would let through."""
    message = bounded("é€" * 2000)
    assert len(message.encode("utf-8")) <= MAX_MESSAGE_BYTES
    assert message.startswith("é€é€") and "more characters" in message
    assert bounded("short") == "short"
