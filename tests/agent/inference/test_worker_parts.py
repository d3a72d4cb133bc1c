"""The parts of the worker-process mode that need no process: requests in flight across a
switch, statistics in shared counters, and recorders handing over to the control process's."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from agent.inference.limits import MemoryStats
from agent.inference.sharedstats import (
    SharedStatistics,
    create_files,
    make_folder,
    worker_totals,
)
from agent.inference.worker import InFlight, _NoSpool
from agent.inference.workers import threads_per_session, usable_cpus
from agent.recorder import Recorder
from agent.spool import CAPTURES, TELEMETRY, Spool
from edgefleet.core.data import CapturePolicy, InputBins
from edgefleet.core.fleet import Assignment
from protos.fleet.v1 import data_pb2


def test_a_switch_waits_for_the_requests_that_ran_before_it() -> None:
    inflight = InFlight()
    before = inflight.enter()
    done = threading.Event()
    waited: list[bool] = []

    def switch() -> None:
        waited.append(inflight.advance(timeout=10))
        done.set()

    threading.Thread(target=switch).start()
    time.sleep(0.05)
    after = inflight.enter()  # a request that came after the switch is not waited for
    assert not done.is_set()
    inflight.leave(before)
    assert done.wait(5) and waited == [True]
    assert inflight.running == 1
    inflight.leave(after)
    assert inflight.running == 0
    assert inflight.advance(timeout=0)  # nothing running: at once
    held = inflight.enter()
    assert not inflight.advance(timeout=0.05)  # still running: said so after the timeout
    inflight.leave(held)


def test_statistics_are_summed_over_the_workers_and_outlive_one(tmp_path: Path) -> None:
    folder = tmp_path / "stats"
    folder.mkdir()
    create_files(folder, 2)
    a, b = SharedStatistics(folder, 0, 2), SharedStatistics(folder, 1, 2)
    figures = {"queue_ns": 1, "input_ns": 2, "infer_ns": 3, "output_ns": 4, "total_ns": 10}
    for _ in range(3):
        a.of("m", 1).succeeded(rows=2, **figures)
    b.of("m", 1).succeeded(rows=1, **figures)
    b.of("m", 1).failed(7)
    b.of("m", 2).succeeded(rows=1, **figures)
    for stats in (a, b):  # whichever worker answers, the same sums
        f = stats.of("m", 1).figures()
        assert (f.success.count, f.fail.count, f.inference_count, f.execution_count) == (4, 1, 7, 4)
        assert (f.success.ns, f.fail.ns, f.compute_infer.ns) == (40, 7, 12)
    assert a.of("m", 2).figures().success.count == 1
    b.record_memory(MemoryStats(large_requests=2, refused_over_limit=1))
    # Worker 1 dies and is restarted: its successor counts on.
    b.close()
    again = SharedStatistics(folder, 1, 2)
    again.of("m", 1).succeeded(rows=1, **figures)
    again.record_memory(MemoryStats(large_requests=1))
    assert a.of("m", 1).figures().success.count == 5
    totals = worker_totals(folder, 2)
    assert [t.requests for t in totals] == [3, 4] and totals[1].failures == 1
    assert totals[1].memory == MemoryStats(3, 1, 0)
    # An unloaded version's figures go (Triton's rule), in every worker.
    a.keep({("m", 2)})
    again.keep({("m", 2)})
    assert a.of("m", 1).figures().success.count == 0
    assert again.of("m", 2).figures().success.count == 1
    a.close()
    again.close()


def test_the_statistics_folder_is_in_memory_and_stale_ones_go(tmp_path: Path) -> None:
    folder = make_folder()
    try:
        assert folder.name.startswith("edgefleet-workers-")
        if Path("/dev/shm").is_dir():
            assert folder.parent == Path("/dev/shm")
        stale = folder.parent / "edgefleet-workers-999999999-x"
        stale.mkdir()
        again = make_folder()
        again.rmdir()
        assert not stale.exists()
    finally:
        folder.rmdir()


def _worker_recorder(policy: CapturePolicy) -> Recorder:
    r = Recorder(cast(Spool, _NoSpool()), rng=random.Random(7), stats_per_second=1000)
    r.configure([_assignment(policy)])
    return r


def _assignment(policy: CapturePolicy) -> Assignment:
    bins = (InputBins("x", (-1.0, 0.0, 1.0)),)
    return Assignment("m", 3, "onnx-cpu-fp32", "d" * 64, capture=policy, bins=bins)


def test_workers_recorders_hand_over_and_each_request_counts_once(tmp_path: Path) -> None:
    policy = CapturePolicy(sample_rate=0.5)
    control = Recorder(Spool(tmp_path / "spool.db"), stats_per_second=1000)
    control.configure([_assignment(policy)])
    workers = [_worker_recorder(policy) for _ in range(2)]
    x = np.array([[-2.0, -0.5, 0.5, 2.0]], np.float32)
    probs = np.array([[0.2, 0.8]], np.float32)
    served = [0, 0]
    for i in range(300):
        w = i % 2 if i % 7 else 0
        workers[w].observe("m", 3, {"x": x}, ("p",), [probs], time.perf_counter() - 0.001)
        served[w] += 1
        if i % 50 == 0:  # hand-overs come while requests run
            control.take_over(workers[w].hand_over(), w)
    workers[1].failed("m", 3)
    workers[0].shadowed("m", 4, 3, time.perf_counter(), agreed=True)
    for w, r in enumerate(workers):
        control.take_over(r.hand_over(), w)
        assert r.hand_over().empty  # nothing twice
    captured = sum(r.stats.captured for r in workers)
    assert 100 < captured < 200
    totals = control.totals()
    assert (totals["m", 3].requests, totals["m", 3].errors) == (301, 1)
    assert totals["m", 3].captured == captured and totals["m", 4].requests == 1
    assert sum(totals["m", 3].latency) == 300
    assert control.write_captures() == captured == control.stats.captured
    control.flush_telemetry()
    pending = control.spool.pending(TELEMETRY, 100, 1 << 20)
    assert pending is not None
    records = [data_pb2.TelemetryRecord.FromString(b) for b in pending.bodies]
    windows = {r.model.version: r.model for r in records if r.WhichOneof("body") == "model"}
    assert (windows[3].requests, windows[3].errors, windows[3].captured) == (301, 1, captured)
    assert sum(windows[3].latency.counts) == 300
    (stats,) = windows[3].inputs
    assert [list(c.histogram) for c in stats.channels] == [
        [300, 0, 0, 0], [0, 300, 0, 0], [0, 0, 300, 0], [0, 0, 0, 300]
    ]  # fmt: skip
    assert (windows[4].compared, windows[4].agreed, windows[4].compared_with) == (1, 1, 3)
    rows = control.spool.pending(CAPTURES, 10_000, 64 << 20)
    assert rows is not None and len(rows.bodies) == captured


def test_worker_cpu_and_memory_join_the_device_window(tmp_path: Path) -> None:
    control = Recorder(Spool(tmp_path / "spool.db"))
    worker = Recorder(cast(Spool, _NoSpool()))
    control.take_over(replace(worker.hand_over(), cpu_seconds=5.0, rss=1 << 30), 0)
    control.take_over(replace(worker.hand_over(), cpu_seconds=2.0, rss=1 << 30), 1)
    control.forget(1)  # worker 1 ended
    control.flush_telemetry()
    pending = control.spool.pending(TELEMETRY, 10, 1 << 20)
    assert pending is not None
    (device,) = (data_pb2.TelemetryRecord.FromString(b).device for b in pending.bodies)
    assert device.cpu_seconds >= 7.0
    assert (1 << 30) < device.rss_bytes < (2 << 30)


@pytest.mark.parametrize(("setting", "workers"), [(1, 4), (3, 2), (0, 1), (0, 64)])
def test_threads_per_session(setting: int, workers: int) -> None:
    expected = setting or max(1, usable_cpus() // workers)
    assert threads_per_session(setting, workers) == expected
