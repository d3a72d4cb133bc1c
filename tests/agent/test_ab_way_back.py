"""A/B and shadow end to end: a real cloud service and a real agent in process. The operator
splits traffic with `edgefleet traffic`; the agent serves the split; the shadow's agreement
with the primary comes back as telemetry and shows in `edgefleet telemetry`."""

from __future__ import annotations

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
from edgefleet.core.errors import InvalidArgument
from edgefleet.core.fleet import TrafficVariant
from tests.agent.live import admin_of, lab_agent, wait_for
from tests.cloudsvc.conftest import write_linear_model


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[CloudServer]:
    server = serve(CloudSettings.model_validate({"data_dir": tmp_path / "cloud", "port": 0}))
    yield server
    server.stop(grace=0.5)


def test_shadow_and_ab_from_the_cli_to_telemetry(cloud: CloudServer, tmp_path: Path) -> None:
    admin = admin_of(cloud, tmp_path)
    agent = lab_agent(cloud, admin, tmp_path)
    env = {
        "EDGEFLEET_CLOUD": cloud.address,
        "EDGEFLEET_CA_FILE": str(cloud.trust_dir / "ca.pem"),
        "EDGEFLEET_ADMIN_TOKEN_FILE": str(tmp_path / "cloud" / "admin-token"),
        "COLUMNS": "200",
    }
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        done = runner.invoke(cli, list(args), env=env, catch_exceptions=False)
        assert done.exit_code == code, done.output
        return done.output

    try:
        agent.start()
        wait_for(lambda: len(admin.devices()) == 1)
        # Two classifiers with different weights: they disagree on some inputs.
        for scale in (1.0, 3.0):
            admin.push_model("clf", write_linear_model(tmp_path / f"clf-{scale}.onnx", scale))
        admin.deploy("clf", 1, selector={"site": "lab"})
        admin.wait_converged("clf", 1, ["edge-1"], timeout=60)

        # The cloud refuses a split it cannot serve, before anything moves.
        assert "outside [0, 1)" in run("traffic", "clf", "--ab", "2=150%", code=1)
        assert "exactly one of" in run("traffic", "clf", "--shadow", "2", "--clear", code=2)
        with pytest.raises(InvalidArgument, match="as its primary"):
            admin.set_traffic("clf", [TrafficVariant(1, 0.5)])

        told = json.loads(run("traffic", "clf", "--shadow", "2", "-l", "site=lab", "--json"))
        assert told["devices"] == {"edge-1": 2} and told["variants"][0]["shadow"]
        endpoint = f"127.0.0.1:{agent.inference_port}"

        def shadowing() -> bool:
            return agent.repository.route("clf")[1] is not None

        wait_for(shadowing)
        rng = np.random.default_rng(0)
        with InferenceClient(endpoint) as client:
            for _ in range(100):
                result = client.infer("clf", {"x": rng.normal(size=(1, 4)).astype(np.float32)})
                assert result.model_version == "1"  # the shadow never answers

        server = agent._server
        assert server is not None and server.shadow.drain()
        # A copy the full queue skipped is counted, never compared.
        expected = server.shadow.stats.compared
        assert expected + server.shadow.stats.skipped == 100

        def compared() -> bool:
            rows = {v.version: v for v in admin.telemetry("clf")}
            return 2 in rows and rows[2].compared == expected

        wait_for(compared)
        rows = {v.version: v for v in admin.telemetry("clf")}
        assert rows[1].requests == 100 and rows[1].agreement is None
        shadow = rows[2]
        assert shadow.agreement is not None and 0 < shadow.agreement < 1
        assert shadow.compared_with == 1 and shadow.p50_ms > 0
        report = {v["version"]: v for v in json.loads(run("telemetry", "clf", "--json"))}
        assert report[2]["agreement"] == pytest.approx(shadow.agreement)
        assert report[2]["compared"] == shadow.compared and report[1]["agreement"] is None
        assert f"{shadow.agreement:.1%} of {shadow.compared}" in run("telemetry", "clf")

        # A/B: half the requests that name no version, the same key always on one version.
        assert "v2 on 50.0% of requests" in run("traffic", "clf", "--ab", "2=50%")
        wait_for(lambda: agent.repository.traffic("clf").slices == ((2, 0.5),))
        with InferenceClient(endpoint) as client:
            x = {"x": np.ones((1, 4), np.float32)}
            served = [client.infer("clf", x).model_version for _ in range(200)]
            assert 40 < served.count("2") < 160  # 50% of 200: beyond 8 sigma otherwise
            for key in ("cam-1", "cam-2", "cam-3"):
                assert (
                    len({client.infer("clf", x, routing_key=key).model_version for _ in range(10)})
                    == 1
                )
            assert client.infer("clf", x, version=2).model_version == "2"
        assert "the primary alone" in run("traffic", "clf", "--clear")
        wait_for(lambda: agent.repository.versions("clf") == [1])
    finally:
        agent.stop()
        admin.close()
