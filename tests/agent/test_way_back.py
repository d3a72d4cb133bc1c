"""The way back, wired for real: an agent serves, captures under the policy the cloud set,
keeps telemetry, and syncs both to a real cloud service, which shows them as a data set
and as the model's telemetry."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cloudsvc.server import CloudServer, serve
from cloudsvc.settings import CloudSettings
from edgefleet.cli import cli
from edgefleet.client.inference import InferenceClient
from edgefleet.core.golden import tensors_from_bytes
from tests.agent.fakes import WIDTH, inline_golden, model_bytes
from tests.agent.live import admin_of, lab_agent, wait_for


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[CloudServer]:
    server = serve(CloudSettings.model_validate({"data_dir": tmp_path / "cloud", "port": 0}))
    yield server
    server.stop(grace=0.5)


def test_captures_and_telemetry_come_back_once_each(cloud: CloudServer, tmp_path: Path) -> None:
    admin = admin_of(cloud, tmp_path)
    agent = lab_agent(cloud, admin, tmp_path)
    try:
        agent.start()
        wait_for(lambda: len(admin.devices()) == 1)
        path = tmp_path / "m.onnx"
        path.write_bytes(model_bytes(2.0))
        admin.push_model("m", path, golden_samples=[inline_golden(2.0)])
        # Every request captured; the policy travels in the signed desired state.
        admin.set_capture_policy("m", sample_rate=1.0)
        admin.deploy("m", 1, selector={"site": "lab"})
        admin.wait_converged("m", 1, ["edge-1"], timeout=60)
        wait_for(lambda: agent.recorder is not None and "m" in agent.recorder._models)
        sent = [np.full((1, WIDTH), n, dtype=np.float32) for n in range(12)]
        with InferenceClient(f"127.0.0.1:{agent.inference_port}") as client:
            for n, x in enumerate(sent):
                client.infer("m", {"x": x}, label=f"class-{n % 3}", request_id=f"r{n}")

        def arrived() -> bool:
            sets = admin.data_sets()
            versions = admin.telemetry("m")
            return bool(sets and sets[0].rows == 12 and versions and versions[0].requests == 12)

        wait_for(arrived, 30)
        (data_set,) = admin.data_sets()
        assert (data_set.name, data_set.labelled, data_set.devices) == ("captures:m", 12, 1)
        assert dict(data_set.labels) == {"class-0": 4, "class-1": 4, "class-2": 4}
        rows = list(admin.export_captures("m"))
        assert [r.request_id for r in rows] == [f"r{n}" for n in range(12)]
        for row, x in zip(rows, sent, strict=True):
            assert row.device_id == "edge-1" and row.reason == "sampled"
            np.testing.assert_array_equal(tensors_from_bytes(row.inputs)["x"], x)
            y = tensors_from_bytes(row.outputs)["y"]
            assert np.allclose(y.astype(np.float64), x.astype(np.float64) + 2.0)
        (version,) = admin.telemetry("m")
        assert (version.version, version.requests, version.errors, version.captured) == (
            1,
            12,
            0,
            12,
        )
        assert 0 < version.p50_ms <= version.p99_ms
        (stats,) = version.inputs
        # A table-like input [rows, features]: statistics per feature.
        assert stats.input == "x" and len(stats.channels) == WIDTH
        assert stats.channels[7].count == 12 and stats.channels[7].mean == pytest.approx(5.5)
        # Labels imported back by id, as a user labelling an export does.
        assert admin.label_captures({rows[0].id: "corrected"}) == (1, 0)
        assert [r.label for r in admin.export_captures("m", label="corrected")] == ["corrected"]

        # The same through the command a user runs.
        env = {
            "EDGEFLEET_CLOUD": cloud.address,
            "EDGEFLEET_CA_FILE": str(cloud.trust_dir / "ca.pem"),
            "EDGEFLEET_ADMIN_TOKEN_FILE": str(tmp_path / "cloud" / "admin-token"),
            "COLUMNS": "200",
        }
        runner = CliRunner()

        def run(*args: str) -> str:
            done = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
            assert done.exit_code == 0, done.output
            return done.output

        listed = json.loads(run("data", "list", "--json"))
        assert [(d["name"], d["rows"]) for d in listed] == [("captures:m", 12)]
        out = tmp_path / "export"
        assert "exported 12 captures (12 rows)" in run(
            "data", "export", "captures:m", "--out", str(out)
        )
        with (out / "index.csv").open() as f:
            index = list(csv.DictReader(f))
        assert len(index) == 12 and np.load(out / "inputs.npz")["x"].shape == (12, WIDTH)
        for line in index:
            line["label"] = "relabelled"
        with (out / "index.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(index[0]))
            writer.writeheader()
            writer.writerows(index)
        assert "labelled 12 capture(s)" in run(
            "data", "label", "captures:m", str(out / "index.csv")
        )
        assert dict(admin.data_sets()[0].labels) == {"relabelled": 12}
        report = json.loads(run("telemetry", "m", "--json", "--price-per-device-hour", "0.36"))
        assert report[0]["requests"] == 12 and report[0]["cost_per_1000"] > 0
        assert "v1" in run("telemetry", "m") and "p99" in run("telemetry", "m")
        assert "devices capture nothing" in run("capture", "m")
    finally:
        agent.stop()
        admin.close()
    # Nothing was sent twice, and nothing is left to send.
    assert agent.spool is not None
