"""The closed loop end to end, on an in-process cloud with its real job manager: drift in a
device's telemetry starts a run; it waits while too few captures carry a label; with enough
it fine-tunes (warm-started from the running version, on the labelled rows it did not hold
out plus the original data), scores both versions on the held-out rows and rolls out only a
better candidate; a candidate trained on permuted labels is kept back; disable stops it.

The loop's thread is stopped and its steps driven with `tick()`, so each test says exactly
what one step does; drift is checked with `DriftMonitor.check()` for the same reason."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from cloudsvc.jobs.captures import held_out, parse
from cloudsvc.jobs.spec import FineTuneSpec, parse_spec, spec_from_json
from cloudsvc.registry import SOURCE_KEY
from cloudsvc.server import CloudServer, serve
from cloudsvc.settings import CloudSettings, JobSettings
from cloudsvc.store.data import Batch, CaptureQuery
from edgefleet.cli import cli
from edgefleet.client import AdminClient
from edgefleet.core.data import (
    CaptureLabel,
    DriftAlert,
    InputStats,
    ModelWindow,
    TelemetryRecord,
    channel_stats,
)
from edgefleet.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from edgefleet.core.golden import tensor_set_bytes
from edgefleet.core.jobs import JobState
from edgefleet.core.loop import LoopConfig, LoopRun, RunState
from edgefleet.core.wire import to_proto
from protos.fleet.v1 import data_pb2
from tests.cloudsvc.conftest import ADMIN_TOKEN, ENROLL_TOKEN
from tests.cloudsvc.test_jobs import wait_for
from transfer.synthetic import CLASSES, synthetic_pixels

MODEL = "shapes"
DEVICE = "cam-1"
HOLDOUT = 0.25


def shifted(pixels: np.ndarray) -> np.ndarray:
    """What the camera sees after the drift: washed out and brighter."""
    return np.clip(pixels * 0.35 + 150.0, 0, 255).astype(np.float32)


@dataclass
class World:
    cloud: CloudServer
    admin: AdminClient
    spools: Iterator[int]

    def ingest(
        self, images: np.ndarray, labels: list[str], at: float, version: int = 1
    ) -> list[int]:
        """Captured rows (one image each) as a device syncs them; their cloud ids."""
        rows = [
            data_pb2.Capture(
                seq=n + 1,
                model=MODEL,
                version=version,
                at=at,
                inputs=tensor_set_bytes({"image": images[n : n + 1]}),
                outputs=tensor_set_bytes({"logits": np.zeros((1, 4), np.float32)}),
                label=label,
                reason="sampled",
            )
            for n, label in enumerate(labels)
        ]
        spool = f"s{next(self.spools)}"
        self.cloud.data.ingest(Batch(DEVICE, spool, [], rows))
        found = self.cloud.data.captures(CaptureQuery(MODEL, since=at))
        return [c.id for c in found if c.at == at]

    def drift(self, images: np.ndarray, version: int = 1) -> list[DriftAlert]:
        """Telemetry windows of `images` (binned as the version's baseline) from the
        device, then one drift check."""
        baseline = self.cloud.registry.get_version(MODEL, version).baseline[0]
        now = time.time()
        stats = InputStats("image", channel_stats(images, baseline.edges), baseline.edges)
        window = TelemetryRecord(
            1, ModelWindow(MODEL, version, now - 60, now - 1, requests=len(images), inputs=(stats,))
        )
        spool = f"s{next(self.spools)}"
        record = to_proto(window, data_pb2.TelemetryRecord)
        self.cloud.data.ingest(Batch(DEVICE, spool, [record]))
        return [a for a in self.cloud.drift.check() if a.model == MODEL]

    def run(self) -> LoopRun:
        return self.admin.loop(MODEL).runs[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("loop")
    settings = CloudSettings.load(
        None,
        data_dir=root / "cloud",
        port=0,
        admin_token=ADMIN_TOKEN,
        enroll_tokens=[ENROLL_TOKEN],
        max_workers=11,
        jobs=JobSettings(fashion_mnist_dir=root / "none", threads=1, cancel_grace_s=5.0),
        drift={"interval_s": 3600, "min_count": 10},
        loop={"tick_s": 600},
    )
    cloud = serve(settings)
    cloud.loop.stop()  # the tests take each step with tick()
    admin = AdminClient(cloud.address, ADMIN_TOKEN, ca_file=cloud.trust_dir / "ca.pem")
    try:
        spec = parse_spec(
            FineTuneSpec,
            {
                "model": MODEL,
                "base": "small-cnn",
                "data": "synthetic:240",
                "params": {"epochs": "3"},
                "targets": ("onnx-cpu-fp32",),
            },
        )
        assert isinstance(spec, FineTuneSpec)
        job = wait_for(cloud.jobs, cloud.jobs.submit(spec).job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        cloud.fleet.enroll(ENROLL_TOKEN, DEVICE)
        cloud.fleet.label(DEVICE, {"site": "plant-1"})
        cloud.fleet.deploy(MODEL, 1, {"site": "plant-1"})
        yield World(cloud, admin, itertools.count(1))
    finally:
        admin.close()
        cloud.stop(grace=1.0)


def head_of(world: World, version: int, tmp: Path) -> dict[str, np.ndarray]:
    """The trained tensors of a version, from its kept FP32 export."""
    record = world.cloud.registry.get_version(MODEL, version)
    folder = tmp / f"v{version}"
    world.cloud.registry.materialize(record.metadata[SOURCE_KEY], folder)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=True)
    return {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}


def test_the_loop_waits_for_labels_then_warm_starts_and_rolls_out_a_better_candidate(
    world: World,
) -> None:
    cloud = world.cloud
    with pytest.raises(NotFound, match="has no loop"):
        world.admin.loop(MODEL)
    with pytest.raises(InvalidArgument, match="captures"):
        world.admin.enable_loop(LoopConfig(MODEL, "synthetic:240"))
    with pytest.raises(InvalidArgument, match="holdout"):
        world.admin.enable_loop(LoopConfig(MODEL, f"captures:{MODEL}", holdout=0.9))
    world.admin.enable_loop(
        LoopConfig(
            MODEL, f"captures:{MODEL}", min_new_rows=150, holdout=HOLDOUT, waves=(1.0,), bake_s=60
        )
    )
    pixels, classes = synthetic_pixels(400, seed=11)
    images = shifted(pixels)
    names = [CLASSES[c] for c in classes]
    at = time.time() - 300
    # 100 rows come back, 20 of them labelled by the client that sent the request.
    ids = world.ingest(images[:100], [n if i < 20 else "" for i, n in enumerate(names[:100])], at)
    alerts = world.drift(images[:200])
    assert {a.scope for a in alerts} == {"fleet", f"device:{DEVICE}"}
    alert = alerts[0]
    assert alert.version == 1 and alert.psi >= alert.threshold
    cloud.loop.tick()  # the first alert starts a run; the second finds it under way
    run = world.run()
    assert run.number == 1 and run.state is RunState.WAITING and run.trigger.kind == "drift"
    assert run.trigger.psi == pytest.approx(alert.psi) and run.parent_version == 1
    assert "under way" in world.admin.loop(MODEL).note
    assert (run.captured_rows, run.labelled_rows) == (100, 20)
    assert "20 of 100 captured rows carry a label" in run.reason
    assert "150 needed" in run.reason and not run.job_id
    cloud.loop.tick()  # still too few: it keeps waiting, no job
    assert world.run().state is RunState.WAITING and not cloud.jobs.list(MODEL, active_only=True)

    # The rest is labelled later through the labelling path, and 300 labelled rows arrive.
    cloud.data.label(CaptureLabel(i, names[n]) for n, i in enumerate(ids) if n >= 20)
    world.ingest(images[100:], names[100:], at + 1)
    cloud.loop.tick()
    run = world.run()
    assert run.state is RunState.TRAINING, run.reason
    assert run.labelled_rows == 400 and run.new_rows == 400
    assert run.train_rows + run.holdout_rows == 400 and 60 < run.holdout_rows < 140
    job = cloud.jobs.get(run.job_id)
    spec = spec_from_json(job.request_json)
    assert isinstance(spec, FineTuneSpec) and spec.warm_start and spec.parent_version == 1
    source = parse(spec.data)
    assert (source.holdout, source.through) == (HOLDOUT, run.through_id)
    assert spec.extra_data == ("synthetic:240",)  # the running version's original data
    assert wait_for(cloud.jobs, run.job_id).state is JobState.SUCCEEDED

    cloud.loop.tick()  # the job ended: candidate recorded, then scored
    cloud.loop.tick()
    run = world.run()
    assert run.candidate_version == 2
    candidate = cloud.registry.get_version(MODEL, 2)
    lineage = candidate.lineage
    assert lineage is not None and lineage.warm_start_from == 1 and candidate.parent_version == 1
    assert lineage.dataset == f"{spec.data} + synthetic:240"
    # It trained on the rows it did not hold out plus the original 240, nothing else.
    assert lineage.train_examples + lineage.validation_examples == run.train_rows + 240
    assert run.running is not None and run.candidate is not None
    assert run.running.count == run.candidate.count == run.holdout_rows
    assert run.running.low <= run.running.accuracy <= run.running.high
    assert run.candidate.accuracy > run.running.accuracy, run.reason
    assert run.decision == "promote" and run.state is RunState.ROLLED_OUT, run.reason
    rollout = cloud.rollouts.get(run.rollout_id)
    assert rollout.spec.version == 2 and rollout.spec.selector == {"site": "plant-1"}
    assert [g.text for g in rollout.spec.gates] == ["p95_latency_ms<+20%", "error_rate<1%"]
    assert rollout.spec.bake_s == 60 and DEVICE in {d.device_id for d in rollout.devices}
    # Held-out rows really are the ones the hash picks, and none of them trained.
    held = [c.id for c in cloud.data.captures(CaptureQuery(MODEL)) if held_out(c.id, HOLDOUT)]
    assert len(held) == run.holdout_rows
    cloud.rollouts.abort(run.rollout_id, "test over")  # an ordinary rollout


def test_the_warm_start_begins_from_the_parents_trained_head(world: World, tmp_path: Path) -> None:
    """A fine-tune that cannot move its weights (one epoch at a learning rate of 1e-9)
    ends where it started: warm-started, that is v1's trained head (a fresh head could not
    get there), and the backbone tensors v1 shipped."""
    cloud = world.cloud
    spec = parse_spec(
        FineTuneSpec,
        {
            "model": MODEL,
            "base": "small-cnn",
            "data": "synthetic:120",
            "params": {"epochs": "1", "lr": "1e-9"},
            "targets": ("onnx-cpu-fp32",),
            "parent_version": 1,
            "warm_start": True,
        },
    )
    assert isinstance(spec, FineTuneSpec)
    job = wait_for(cloud.jobs, cloud.jobs.submit(spec).job_id)
    assert job.state is JobState.SUCCEEDED, job.error
    lineage = cloud.registry.get_version(MODEL, job.result_version).lineage
    assert lineage is not None and lineage.warm_start_from == 1
    assert any("warm start from v1: head rows of 4 of 4" in e.message for e in
               cloud.metadata.list_job_events(job.job_id))  # fmt: skip
    warm, parent = head_of(world, job.result_version, tmp_path), head_of(world, 1, tmp_path)
    assert set(warm) == set(parent)
    for name, tensor in parent.items():
        np.testing.assert_allclose(warm[name], tensor, atol=1e-5, err_msg=name)
    # A warm start needs a parent with a kept export.
    with pytest.raises(InvalidArgument, match=r"parent.s weights needs a parent version"):
        cloud.jobs.submit(spec.model_copy(update={"model": "fresh", "parent_version": 0}))


def test_a_candidate_trained_on_permuted_labels_is_kept_back(world: World) -> None:
    cloud = world.cloud
    since = time.time() - 100
    world.admin.enable_loop(
        LoopConfig(
            MODEL,
            f"captures:{MODEL}?since={since}",
            on_drift=False,
            min_new_rows=100,
            holdout=HOLDOUT,
            waves=(1.0,),
        )
    )
    pixels, classes = synthetic_pixels(500, seed=23)
    ids = world.ingest(pixels, [CLASSES[c] for c in classes], since + 10)
    # The rows it may train on are labelled wrongly (each class as the next one); the
    # held-out rows keep their true labels.
    cloud.data.label(
        CaptureLabel(i, CLASSES[(c + 1) % len(CLASSES)])
        for i, c in zip(ids, classes, strict=True)
        if not held_out(i, HOLDOUT)
    )
    loop = world.admin.run_loop(MODEL)
    with pytest.raises(AlreadyExists, match="wait for it"):
        world.admin.run_loop(MODEL)
    number = loop.runs[0].number
    cloud.loop.tick()
    run = world.run()
    assert run.number == number and run.state is RunState.TRAINING, run.reason
    assert run.trigger.kind == "manual"
    assert wait_for(cloud.jobs, run.job_id).state is JobState.SUCCEEDED
    rollouts_before = len(cloud.rollouts.list(MODEL))
    cloud.loop.tick()
    cloud.loop.tick()
    run = world.run()
    assert run.running is not None and run.candidate is not None
    assert run.candidate.accuracy <= run.running.accuracy, run.reason
    assert run.state is RunState.REJECTED and run.decision == "keep"
    assert "does not beat" in run.reason and not run.rollout_id
    assert len(cloud.rollouts.list(MODEL)) == rollouts_before


def test_disable_cancels_the_fine_tune_and_starts_no_rollout(world: World) -> None:
    cloud = world.cloud
    since = time.time() - 50
    world.admin.enable_loop(
        LoopConfig(MODEL, f"captures:{MODEL}?since={since}", min_new_rows=20, holdout=HOLDOUT)
    )
    pixels, classes = synthetic_pixels(60, seed=5)
    world.ingest(shifted(pixels), [CLASSES[c] for c in classes], since + 5)
    world.admin.run_loop(MODEL)
    cloud.loop.tick()
    run = world.run()
    assert run.state is RunState.TRAINING
    rollouts_before = len(cloud.rollouts.list(MODEL))
    loop = world.admin.disable_loop(MODEL, "labelling backlog")
    stopped = loop.runs[0]
    assert not loop.config.enabled and stopped.state is RunState.STOPPED
    assert "labelling backlog" in stopped.reason and "cancelled" in stopped.reason
    assert wait_for(cloud.jobs, run.job_id).state is JobState.CANCELLED
    cloud.loop.tick()
    assert world.run().state is RunState.STOPPED
    assert len(cloud.rollouts.list(MODEL)) == rollouts_before
    with pytest.raises(FailedPrecondition, match="disabled"):
        world.admin.run_loop(MODEL)
    # A drift alert while disabled starts nothing; enabled again, one in the cooldown
    # after the last run is noted and ignored.
    alert = DriftAlert(MODEL, 1, DEVICE, "image", 0, 3.0, 0.2, time.time())
    cloud.loop.on_alert(alert)
    cloud.loop.tick()
    assert world.run().number == stopped.number
    world.admin.enable_loop(LoopConfig(MODEL, f"captures:{MODEL}?since={since}"))
    cloud.loop.on_alert(alert)
    cloud.loop.tick()
    loop = world.admin.loop(MODEL)
    assert loop.runs[0].number == stopped.number and "cooldown" in loop.note
    assert [item.config.model for item in world.admin.loops()] == [MODEL]


def test_the_command_line(world: World) -> None:
    cloud = world.cloud
    env = {
        "EDGEFLEET_CLOUD": cloud.address,
        "EDGEFLEET_CA_FILE": str(cloud.trust_dir / "ca.pem"),
        "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN,
        "COLUMNS": "250",
    }
    runner = CliRunner()

    def run(*args: str) -> str:
        done = runner.invoke(cli, ["loop", *args], env=env, catch_exceptions=False)
        assert done.exit_code == 0, done.output
        return done.output

    out = run(
        "enable", MODEL, "--data", f"captures:{MODEL}", "--manual", "--min-new-rows", "5000",
        "--holdout", "10%", "--margin", "2%", "--cooldown", "1h", "--waves", "5%,100%",
        "--gate", "error_rate<0.5%", "--bake", "2m", "-l", "site=plant-1",
    )  # fmt: skip
    assert f"{MODEL} loop on" in out and "holdout 10%" in out and "margin 2.0%" in out
    config = world.admin.loop(MODEL).config
    assert (config.on_drift, config.min_new_rows, config.cooldown_s) == (False, 5000, 3600)
    assert config.waves == (0.05, 1.0) and config.gates == ("error_rate<0.5%",)
    assert (config.bake_s, dict(config.selector)) == (120, {"site": "plant-1"})
    out = run("run", MODEL)
    assert "waiting" in out or "started by an operator" in out
    cloud.loop.tick()
    payload = json.loads(run("status", MODEL, "--json"))
    assert payload["runs"][0]["state"] == "waiting"
    assert "5000 needed" in payload["runs"][0]["reason"]
    assert MODEL in run("list")
    assert "loop off" in run("disable", MODEL, "--reason", "done")
    done = runner.invoke(
        cli, ["loop", "enable", MODEL, "--data", "x", "--holdout", "lots"], env=env
    )
    assert done.exit_code != 0 and "share" in done.output
