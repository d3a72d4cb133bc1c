from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from agent.errors import StateError
from agent.state import Identity, Slot, StateStore


def test_identity_and_keys_round_trip(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "agent.db")
    assert state.identity() is None
    state.save_identity(Identity("dev-7", "tok"), [b"k1", b"k2"])
    state.close()
    state = StateStore(tmp_path / "agent.db")
    assert state.identity() == Identity("dev-7", "tok")
    assert sorted(state.trusted_keys()) == [b"k1", b"k2"]


def test_switch_moves_active_to_previous(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "agent.db")
    state.switch("m", Slot(1, "d1", tmp_path / "1"), 1)
    record = state.switch("m", Slot(2, "d2", tmp_path / "2"), 2)
    assert record.active == Slot(2, "d2", tmp_path / "2")
    assert record.previous == Slot(1, "d1", tmp_path / "1")
    assert record.observed_generation == 2


def test_a_failure_inside_the_switch_leaves_the_old_version(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "agent.db")
    state.switch("m", Slot(1, "d1", tmp_path / "1"), 1)

    def boom() -> None:
        raise OSError("power cut")

    with pytest.raises(OSError):
        state.switch("m", Slot(2, "d2", tmp_path / "2"), 2, before_commit=boom)
    record = state.model("m")
    assert record is not None and record.active is not None
    assert record.active.version == 1 and record.previous is None


def _die_mid_switch(db: str) -> None:
    state = StateStore(Path(db))
    state.switch("m", Slot(2, "d2", Path("/2")), 2, before_commit=lambda: os._exit(9))


def test_a_kill_inside_the_switch_leaves_the_old_version(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    state = StateStore(db)
    state.switch("m", Slot(1, "d1", Path("/1")), 1)
    state.close()
    proc = multiprocessing.get_context("spawn").Process(target=_die_mid_switch, args=(str(db),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    record = StateStore(db).model("m")
    assert record is not None and record.active == Slot(1, "d1", Path("/1"))


def test_a_newer_schema_is_refused_with_advice(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    StateStore(db).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version=99")
    raw.close()
    with pytest.raises(StateError, match="upgrade the agent"):
        StateStore(db)


def test_errors_are_recorded_per_model(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "agent.db")
    state.record_error("m", "chunk abc is corrupt")
    record = state.model("m")
    assert (
        record is not None and record.last_error == "chunk abc is corrupt" and record.active is None
    )
