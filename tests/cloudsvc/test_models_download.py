"""`edgefleet models download` / AdminClient.download against a real cloud on loopback: the
verified artifact, served elsewhere, gives the original's outputs; a tampered chunk, an
unknown version, a wrong root key or a non-empty folder are refused and leave it untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner, Result

from cloudsvc.server import CloudServer
from edgefleet.cli import cli
from edgefleet.client.admin import AdminClient
from edgefleet.client.download import MANIFEST_FILE
from edgefleet.core.errors import AlreadyExists, ManifestError, NotFound, PermissionDenied
from edgefleet.core.manifests import verify_manifest
from edgefleet.core.tokens import Role
from edgefleet.core.trust import TrustError
from protos.artifact.v1 import artifact_pb2
from tests.cloudsvc.conftest import ADMIN_TOKEN, write_linear_model


@pytest.fixture
def client(cloud: CloudServer) -> AdminClient:
    return AdminClient(cloud.address, ADMIN_TOKEN, ca_file=cloud.trust_dir / "ca.pem")


@pytest.fixture
def pushed(client: AdminClient, tmp_path: Path) -> Path:
    path = write_linear_model(tmp_path / "model.onnx", features=64, classes=16)
    client.push_model("clf", path)
    return path


def root_key(cloud: CloudServer) -> str:
    return (cloud.trust_dir / "root-key.txt").read_text().strip()


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def run_cli(cloud: CloudServer, *args: str) -> Result:
    env = {
        "EDGEFLEET_CLOUD": cloud.address,
        "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN,
        "EDGEFLEET_CA_FILE": str(cloud.trust_dir / "ca.pem"),
        "COLUMNS": "200",
    }
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_download_gives_the_same_outputs_and_a_verifiable_manifest(
    cloud: CloudServer, client: AdminClient, pushed: Path, tmp_path: Path
) -> None:
    seen: list[tuple[int, int]] = []
    out = tmp_path / "served"
    result = client.download(
        "clf", 1, out, root_key=root_key(cloud), progress=lambda d, t: seen.append((d, t))
    )
    assert result.signature_pinned and result.files >= 2 and result.target == "onnx-cpu-fp32"
    assert seen and seen[-1][0] == seen[-1][1]
    signed = artifact_pb2.SignedManifest.FromString((out / MANIFEST_FILE).read_bytes())
    keys = [cloud.keys.current.public_key]
    manifest = verify_manifest(signed, keys, result.digest)
    assert {f.path for f in manifest.files} | {MANIFEST_FILE} == {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
    }
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_array_equal(outputs(out / manifest.entrypoint, x), outputs(pushed, x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_download_refuses_a_full_folder_then_replaces_it_with_force(
    cloud: CloudServer, pushed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "served"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = run_cli(cloud, "models", "download", "clf", "--version", "1", str(out))
    assert refused.exit_code != 0 and "not empty" in refused.output
    assert (out / "keep.txt").read_text() == "mine"
    done = run_cli(
        cloud, "models", "download", "clf", "--version", "1", str(out), "--force",
        "--root-key", root_key(cloud),
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "downloaded clf v1 (onnx-cpu-fp32)" in done.output and "pinned" in done.output
    assert not (out / "keep.txt").exists() and (out / MANIFEST_FILE).exists()
    as_json = run_cli(
        cloud, "models", "download", "clf", "--version", "1", str(tmp_path / "j"), "--json"
    )
    assert as_json.exit_code == 0, as_json.output
    row = json.loads(as_json.stdout)
    assert row["model"] == "clf" and row["signature_pinned"] is False and row["files"] >= 2


def test_a_tampered_chunk_is_refused_and_the_folder_left_untouched(
    cloud: CloudServer, client: AdminClient, pushed: Path, tmp_path: Path
) -> None:
    version = client.version("clf", 1)
    digest = version.artifacts[0].manifest_digest
    chunk = sorted(cloud.registry.chunks_of(digest))[0]
    blob = cloud.blobs.path(chunk)
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    out = tmp_path / "served"
    out.mkdir()
    with pytest.raises(ManifestError, match="does not match its sha256"):
        client.download("clf", 1, out)
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud", "model.onnx", "served"]


def test_unknown_version_wrong_key_and_viewer_are_refused(
    cloud: CloudServer, client: AdminClient, pushed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "served"
    with pytest.raises(NotFound, match="clf has no version 7"):
        client.download("clf", 7, out)
    with pytest.raises(NotFound, match="no onnx-cpu-int8 artifact"):
        client.download("clf", 1, out, target="onnx-cpu-int8")
    with pytest.raises(TrustError, match="do not include the trusted one"):
        client.download("clf", 1, out, root_key="sha256:" + "0" * 64)
    assert not out.exists()
    cli_err = run_cli(cloud, "models", "download", "clf", "--version", "7", str(out))
    assert cli_err.exit_code != 0 and "no version 7" in cli_err.output
    viewer, _ = client.create_admin_token("viewer", Role.VIEWER.value)
    with (
        AdminClient(cloud.address, viewer, ca_file=cloud.trust_dir / "ca.pem") as v,
        pytest.raises(PermissionDenied, match="operator"),
    ):
        v.download("clf", 1, out)
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(AlreadyExists):
        client.download("clf", 1, out)
