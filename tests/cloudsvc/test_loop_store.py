"""The closed loop's records in every MetadataStore (one suite), its settings checks, and
the arithmetic it reports (held-out share, Wilson interval)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cloudsvc.errors import InvalidRequest
from cloudsvc.jobs.captures import CaptureSource, held_out, parse
from cloudsvc.loop import check_config
from cloudsvc.store.memory import MemoryMetadataStore
from cloudsvc.store.metadata import MetadataStore
from cloudsvc.store.sqlite import SqliteMetadataStore
from edgefleet.core.loop import (
    HoldoutScore,
    Loop,
    LoopConfig,
    LoopRun,
    LoopTrigger,
    RunState,
)
from edgefleet.core.stats import wilson_interval


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetadataStore]:
    s: MetadataStore = (
        MemoryMetadataStore()
        if request.param == "memory"
        else SqliteMetadataStore(tmp_path / "m.db")
    )
    yield s
    s.close()


CONFIG = LoopConfig(
    "shapes",
    "captures:shapes?since=100",
    min_new_rows=10,
    waves=(0.1, 1.0),
    gates=("error_rate<1%",),
    selector={"site": "plant-1"},
)
TRIGGER = LoopTrigger("drift", 1, "cam-1", "image", 2, 0.7, 0.2, 1000.0)


def test_loops_and_their_runs_are_kept_and_replaced(store: MetadataStore) -> None:
    assert store.get_loop("shapes") is None and store.list_loops() == []
    store.put_loop(Loop(CONFIG, runs=(LoopRun("shapes", 9, RunState.WAITING, TRIGGER, 1.0),)))
    assert store.get_loop("shapes") == Loop(CONFIG)  # runs are stored apart
    store.put_loop(Loop(replace(CONFIG, enabled=False), note="disabled"))
    store.put_loop(Loop(replace(CONFIG, model="other", data="captures:other")))
    assert [loop.config.model for loop in store.list_loops()] == ["other", "shapes"]
    assert store.get_loop("shapes") == Loop(replace(CONFIG, enabled=False), note="disabled")

    first = LoopRun("shapes", 1, RunState.WAITING, TRIGGER, 1.0, reason="waiting for labels")
    store.put_loop_run(first)
    done = replace(
        first,
        state=RunState.REJECTED,
        job_id="job-3",
        candidate_version=2,
        running=HoldoutScore.of(1, 40, 50),
        candidate=HoldoutScore.of(2, 38, 50),
        decision="keep",
    )
    store.put_loop_run(done)  # the same run's next state
    second = LoopRun("shapes", 2, RunState.TRAINING, LoopTrigger("manual"), 2.0, job_id="job-4")
    store.put_loop_run(second)
    store.put_loop_run(LoopRun("other", 1, RunState.STOPPED, TRIGGER, 3.0))
    assert store.list_loop_runs("shapes") == [second, done]
    assert store.list_loop_runs("shapes", 1) == [second]
    assert store.list_loop_runs("shapes", 0) == [second, done]
    assert store.list_loop_runs("nothing") == []


def test_sqlite_keeps_loops_across_a_reopen(tmp_path: Path) -> None:
    store = SqliteMetadataStore(tmp_path / "m.db")
    run = LoopRun("shapes", 1, RunState.EVALUATING, TRIGGER, 1.0, candidate_version=2)
    store.put_loop(Loop(CONFIG))
    store.put_loop_run(run)
    store.close()
    again = SqliteMetadataStore(tmp_path / "m.db")
    assert again.get_loop("shapes") == Loop(CONFIG)
    assert again.list_loop_runs("shapes") == [run]
    again.close()


def test_settings_are_checked() -> None:
    assert check_config(CONFIG) == CONFIG
    bad = [
        (replace(CONFIG, data="synthetic:240"), "labelled captures"),
        (replace(CONFIG, data="captures:shapes?holdout=0.2"), "chooses the held-out"),
        (replace(CONFIG, min_new_rows=0), "min-new-rows"),
        (replace(CONFIG, holdout=0.0), "holdout"),
        (replace(CONFIG, holdout=0.6), "holdout"),
        (replace(CONFIG, margin=-0.1), "margin"),
        (replace(CONFIG, cooldown_s=-1), "cooldown"),
        (replace(CONFIG, waves=(0.5,)), "waves"),
        (replace(CONFIG, gates=("speed<3",)), "no metric"),
        (replace(CONFIG, model="Bad Name"), "not valid"),
    ]
    for config, message in bad:
        with pytest.raises(InvalidRequest, match=message):
            check_config(config)


def test_the_held_out_share_is_stable_and_left_out_of_training() -> None:
    picked = [i for i in range(1, 10_001) if held_out(i, 0.2)]
    assert 1900 < len(picked) < 2100
    assert picked == [i for i in range(1, 10_001) if held_out(i, 0.2)]  # the same every time
    assert not any(held_out(i, 0.0) for i in range(100))
    source = parse("captures:shapes?holdout=0.2&through=5000")
    assert source == CaptureSource("shapes", holdout=0.2, through=5000)
    assert parse(source.reference()) == source
    assert not any(source.trains_on(i) for i in picked)
    assert not source.trains_on(5001)
    for bad in ("captures:m?holdout=1", "captures:m?holdout=x", "captures:m?through=-1"):
        with pytest.raises(InvalidRequest):
            parse(bad)


def test_wilson_interval() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-3)
    score = HoldoutScore.of(3, 45, 50)
    assert score.accuracy == 0.9 and score.low < 0.9 < score.high
    assert "v3 90.0% (45/50" in score.describe()
