"""`captures:MODEL` as a fine-tune's data set: labelled rows, stacked, with their labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloudsvc.errors import InvalidRequest, NotReady
from cloudsvc.jobs.captures import CaptureSource, load_captures, parse
from cloudsvc.store.data import Batch
from cloudsvc.store.data_sqlite import SqliteDataStore
from edgefleet.core.golden import tensor_set_bytes
from protos.fleet.v1 import data_pb2


def row(seq: int, images: np.ndarray, label: str, version: int = 1) -> data_pb2.Capture:
    return data_pb2.Capture(
        seq=seq,
        model="shapes",
        version=version,
        at=1.8e9 + seq,
        inputs=tensor_set_bytes({"image": images}),
        outputs=tensor_set_bytes({"logits": np.zeros((len(images), 2), np.float32)}),
        label=label,
    )


def test_references_parse_and_say_how_to_write_them() -> None:
    assert parse("captures:shapes") == CaptureSource("shapes")
    assert parse("captures:shapes@2?since=2026-11-30&label=disc") == CaptureSource(
        "shapes", 2, 1_795_996_800.0, "disc"
    )
    assert parse("captures:shapes?since=100").since == 100.0
    for bad in ("captures:", "captures:Bad Name", "captures:m?when=x", "captures:m?since=soon"):
        with pytest.raises(InvalidRequest):
            parse(bad)


def test_labelled_rows_become_a_data_set(tmp_path: Path) -> None:
    store = SqliteDataStore(tmp_path / "data.db")
    one = np.full((1, 3, 4, 4), 1.0, np.float32)
    two = np.full((2, 3, 4, 4), 2.0, np.float32)  # a request of two rows, one label
    store.ingest(
        Batch(
            "d1",
            "s1",
            [],
            [row(1, one, "disc"), row(2, two, "checker"), row(3, one, ""), row(4, one, "disc", 2)],
        )
    )
    store.close()
    data = load_captures("captures:shapes", tmp_path / "data.db")
    assert data.kind == "image" and data.class_names == ("checker", "disc")
    assert data.inputs.shape == (4, 3, 4, 4)  # the unlabelled row left out
    assert [data.class_names[i] for i in data.labels] == ["disc", "checker", "checker", "disc"]
    only_v2 = load_captures("captures:shapes@2", tmp_path / "data.db")
    assert len(only_v2) == 1
    with pytest.raises(NotReady, match="no labelled rows"):
        load_captures("captures:other", tmp_path / "data.db")


def test_held_out_rows_and_rows_after_through_never_train(tmp_path: Path) -> None:
    from cloudsvc.jobs.captures import held_out

    store = SqliteDataStore(tmp_path / "data.db")
    one = np.full((1, 3, 4, 4), 1.0, np.float32)
    store.ingest(Batch("d1", "s1", [], [row(n, one, "disc") for n in range(1, 41)]))
    store.close()
    kept = [i for i in range(1, 31) if not held_out(i, 0.25)]
    data = load_captures("captures:shapes?holdout=0.25&through=30", tmp_path / "data.db")
    assert len(data) == len(kept) and 0 < len(kept) < 30
    assert len(load_captures("captures:shapes", tmp_path / "data.db")) == 40
