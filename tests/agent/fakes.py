"""Small real ONNX models, signed artifacts and an in-memory cloud for agent unit tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from agent.state import Identity
from edgefleet.core.errors import EdgefleetError, ErrorCode, NotFound, Unauthenticated
from edgefleet.core.manifests import describe_file, manifest_digest, public_key_bytes, sign_manifest
from edgefleet.core.tensors import to_raw
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import fleet_pb2

WIDTH = 64
CHUNK = 256  # small chunks, so that every model is several of them


def model_bytes(bias: float) -> bytes:
    """y = x + bias (a 1x64 float initializer), a real ONNX graph."""
    b = numpy_helper.from_array(np.full((1, WIDTH), bias, dtype=np.float32), name="bias")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "add_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, WIDTH])],
        initializer=[b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def golden(bias: float, *, off_by: float = 0.0) -> artifact_pb2.GoldenSample:
    x = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH) / 10
    y = x + np.float32(bias + off_by)
    return artifact_pb2.GoldenSample(
        inputs=[
            artifact_pb2.TensorValue(name="x", datatype="FP32", shape=[2, WIDTH], data=to_raw(x))
        ],
        outputs=[
            artifact_pb2.TensorValue(name="y", datatype="FP32", shape=[2, WIDTH], data=to_raw(y))
        ],
        rtol=1e-5,
        atol=1e-5,
    )


@dataclass
class Artifact:
    model: str
    version: int
    signed: artifact_pb2.SignedManifest
    digest: str
    chunks: dict[str, bytes]
    manifest: artifact_pb2.Manifest


def build_artifact(
    tmp: Path,
    key: Ed25519PrivateKey,
    model: str,
    version: int,
    *,
    bias: float | None = None,
    body: bytes | None = None,
    sample: artifact_pb2.GoldenSample | None = None,
) -> Artifact:
    bias = float(version) if bias is None else bias
    data = body if body is not None else model_bytes(bias)
    src = tmp / f"src-{model}-{version}-{bias}.onnx"
    src.write_bytes(data)
    entry, chunks = describe_file(src, "model.onnx", chunk_size=CHUNK)
    manifest = artifact_pb2.Manifest(
        model=model, version=version, target="onnx-cpu-fp32", format="onnx", entrypoint="model.onnx"
    )
    manifest.files.append(entry)
    manifest.golden_samples.append(sample if sample is not None else golden(bias))
    signed = sign_manifest(manifest, key)
    parsed = artifact_pb2.Manifest()
    parsed.ParseFromString(signed.manifest)
    return Artifact(
        model, version, signed, manifest_digest(signed), {r.sha256: b for r, b in chunks}, parsed
    )


def load_onnx_ok(data: bytes) -> bool:
    onnx.checker.check_model(onnx.load_from_string(data))
    return True


@dataclass
class FakeCloud:
    """A CloudLink in memory; flip `down` to make every call fail as UNAVAILABLE."""

    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    generation: int = 0
    models: dict[str, tuple[int, str]] = field(default_factory=dict)
    manifests: dict[str, artifact_pb2.SignedManifest] = field(default_factory=dict)
    chunks: dict[str, bytes] = field(default_factory=dict)
    down: bool = False
    corrupt: set[str] = field(default_factory=set)
    # Break a chunk stream after this many pieces (once per chunk), to test resume.
    break_after_pieces: int | None = None
    piece_size: int = 64
    fetch_offsets: list[tuple[str, int]] = field(default_factory=list)
    reports: list[fleet_pb2.ReportStateRequest] = field(default_factory=list)
    calls: int = 0
    enrolled: list[str] = field(default_factory=list)
    identity: Identity | None = None
    _broken: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: threading.Event = field(default_factory=threading.Event)

    def publish(self, artifact: Artifact) -> None:
        self.manifests[artifact.digest] = artifact.signed
        self.chunks.update(artifact.chunks)

    def assign(self, artifact: Artifact) -> None:
        self.publish(artifact)
        self.models[artifact.model] = (artifact.version, artifact.digest)
        self.generation += 1

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise EdgefleetError(
                "cannot reach the server: connection refused", code=ErrorCode.UNAVAILABLE
            )

    def enroll(
        self,
        enroll_token: str,
        device_id: str,
        labels: dict[str, str],
        capabilities: fleet_pb2.Capabilities,
    ) -> fleet_pb2.EnrollResponse:
        self._check()
        if enroll_token != "enroll-secret":
            raise Unauthenticated("enrollment token is not valid")
        self.enrolled.append(device_id or "dev-1")
        return fleet_pb2.EnrollResponse(
            device_id=device_id or "dev-1",
            device_token="device-token",
            manifest_public_keys=[public_key_bytes(self.key)],
        )

    def authenticate(self, identity: Identity) -> None:
        self.identity = identity

    def get_desired_state(self) -> fleet_pb2.DesiredState:
        self._check()
        state = fleet_pb2.DesiredState(device_id="dev-1", generation=self.generation)
        for name, (version, digest) in sorted(self.models.items()):
            state.models.add(
                model=name, version=version, target="onnx-cpu-fp32", manifest_digest=digest
            )
        return state

    def report_state(self, report: fleet_pb2.ReportStateRequest) -> int:
        self._check()
        with self._lock:
            self.reports.append(report)
        return self.generation

    def get_manifest(self, digest: str) -> artifact_pb2.SignedManifest:
        self._check()
        if digest not in self.manifests:
            raise NotFound(f"no manifest {digest}")
        return self.manifests[digest]

    def fetch_chunk(self, sha256: str, offset: int) -> Iterator[bytes]:
        self._check()
        self.fetch_offsets.append((sha256, offset))
        data = self.chunks[sha256]
        if sha256 in self.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        for pieces, start in enumerate(range(offset, len(data), self.piece_size)):
            if (
                self.break_after_pieces is not None
                and pieces >= self.break_after_pieces
                and sha256 not in self._broken
            ):
                self._broken.add(sha256)
                raise EdgefleetError(
                    "cannot reach the server: stream reset", code=ErrorCode.UNAVAILABLE
                )
            yield data[start : start + self.piece_size]

    def watch(self, known_generation: int) -> Iterator[int]:
        self._check()
        last = self.generation
        yield last
        while not self._closed.wait(0.05):
            if self.down:
                return
            if self.generation != last:
                last = self.generation
                yield last

    def cancel_watch(self) -> None:
        self._closed.set()

    def close(self) -> None:
        self._closed.set()
