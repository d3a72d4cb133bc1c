from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest

from agent.errors import StateError
from agent.state import Identity, Slot, StateStore
from edgefleet.core.trust import RootKey


def test_identity_trust_and_floors_survive_a_reopen_in_a_private_file(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "agent.db")
    assert state.identity() is None and state.root_keys() == []
    identity = Identity("dev-7", "tok", b"CERT", b"KEY", 7443)
    state.save_identity(identity)
    state.trust([RootKey(1, b"k" * 32)])
    state.trust([RootKey(1, b"x" * 32), RootKey(2, b"n" * 32)])  # never replaces a key
    state.accept(5, 100.0)
    state.switch("m", Slot(3, "d3", tmp_path / "3"), 5)
    state.close()
    state = StateStore(tmp_path / "agent.db")
    assert state.identity() == identity
    assert state.root_keys() == [RootKey(1, b"k" * 32), RootKey(2, b"n" * 32)]
    assert state.accepted() == (5, 100.0)
    assert state.floor("m") == 3
    # The credential and the device key are in it: only this user may read it.
    assert (tmp_path / "agent.db").stat().st_mode & 0o777 == 0o600


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
