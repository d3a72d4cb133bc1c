"""Small real ONNX models, signed artifacts and an in-memory cloud for agent unit tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from agent.state import Identity
from edgefleet.core.data import SyncAck
from edgefleet.core.errors import NotFound, Unauthenticated, Unavailable
from edgefleet.core.fleet import (
    Assignment,
    Capabilities,
    DesiredState,
    Enrollment,
    ReportedState,
    Variant,
)
from edgefleet.core.golden import GoldenRef, sample_paths, tensor_set_bytes
from edgefleet.core.manifests import (
    describe_blocks,
    iter_file_chunks,
    manifest_digest,
    public_key_bytes,
    sign_manifest,
)
from edgefleet.core.tensors import to_raw
from edgefleet.core.trust import (
    KeyRotation,
    RootKey,
    SignedDesiredState,
    TrustChain,
    fingerprint,
    rotation,
    sign_desired,
)
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import data_pb2

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


@dataclass(frozen=True)
class Golden:
    """A golden sample: the bytes of its inputs and expected outputs files."""

    inputs: bytes
    outputs: bytes
    rtol: float = 1e-5
    atol: float = 1e-5


def _golden_arrays(bias: float, off_by: float) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH) / 10
    return x, x + np.float32(bias + off_by)


def golden(bias: float, *, off_by: float = 0.0) -> Golden:
    x, y = _golden_arrays(bias, off_by)
    return Golden(tensor_set_bytes({"x": x}), tensor_set_bytes({"y": y}))


def inline_golden(bias: float) -> artifact_pb2.GoldenSample:
    """The same sample as a push carries it."""
    x, y = _golden_arrays(bias, 0.0)
    sample = artifact_pb2.GoldenSample(rtol=1e-5, atol=1e-5)
    sample.inputs.add(name="x", datatype="FP32", shape=list(x.shape), data=to_raw(x))
    sample.outputs.add(name="y", datatype="FP32", shape=list(y.shape), data=to_raw(y))
    return sample


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
    sample: Golden | None = None,
    edit: Callable[[artifact_pb2.Manifest], None] | None = None,
) -> Artifact:
    """A signed artifact of a real model; `edit` changes the manifest before it is signed
    (the attacker who holds the key, or a buggy cloud)."""
    bias = float(version) if bias is None else bias
    data = body if body is not None else model_bytes(bias)
    src = tmp / f"src-{model}-{version}-{bias}.onnx"
    src.write_bytes(data)
    entry, chunks = describe_blocks("model.onnx", iter_file_chunks(src, CHUNK))
    manifest = artifact_pb2.Manifest(
        model=model, version=version, target="onnx-cpu-fp32", format="onnx", entrypoint="model.onnx"
    )
    manifest.files.append(entry)
    sample = sample if sample is not None else golden(bias)
    inputs_path, outputs_path = sample_paths(0)
    for path, body_bytes in ((inputs_path, sample.inputs), (outputs_path, sample.outputs)):
        blocks = [body_bytes[i : i + CHUNK] for i in range(0, len(body_bytes), CHUNK)]
        file_entry, file_chunks = describe_blocks(path, blocks)
        manifest.files.append(file_entry)
        chunks += file_chunks
    ref = GoldenRef(inputs_path, outputs_path, sample.rtol, sample.atol)
    manifest.golden.add(inputs=ref.inputs, outputs=ref.outputs, rtol=ref.rtol, atol=ref.atol)
    if edit is not None:
        edit(manifest)
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
    """A CloudLink in memory; flip `down` to make every call fail as UNAVAILABLE.

    It signs desired states and manifests with its root key (`key`, rotated by `rotate`),
    as the real cloud does; an attack test replaces `desired` to answer anything."""

    keys: list[Ed25519PrivateKey] = field(default_factory=lambda: [Ed25519PrivateKey.generate()])
    rotations: list[KeyRotation] = field(default_factory=list)
    ttl_s: float = 3600.0
    # What get_desired_state answers; None: the state built from `models`, signed now.
    desired: Callable[[], SignedDesiredState] | None = None
    rollback: set[str] = field(default_factory=set)
    generation: int = 0
    models: dict[str, tuple[int, str]] = field(default_factory=dict)
    # model -> the versions served beside its primary (A/B, shadow)
    variants: dict[str, tuple[Variant, ...]] = field(default_factory=dict)
    manifests: dict[str, artifact_pb2.SignedManifest] = field(default_factory=dict)
    chunks: dict[str, bytes] = field(default_factory=dict)
    down: bool = False
    corrupt: set[str] = field(default_factory=set)
    # Break the first chunk stream that reaches this many pieces (once), to test resume.
    break_after_pieces: int | None = None
    piece_size: int = 64
    fetch_offsets: list[tuple[str, int]] = field(default_factory=list)
    reports: list[ReportedState] = field(default_factory=list)
    calls: int = 0
    enrolled: list[str] = field(default_factory=list)
    identity: Identity | None = None
    synced_telemetry: dict[int, data_pb2.TelemetryRecord] = field(default_factory=dict)
    synced_captures: dict[int, data_pb2.Capture] = field(default_factory=dict)
    dropped_through: int = 0
    _broken: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> Ed25519PrivateKey:
        return self.keys[-1]

    @property
    def root_key(self) -> str:
        """The fingerprint a device is provisioned with: the first key's."""
        return fingerprint(public_key_bytes(self.keys[0]))

    def rotate(self) -> Ed25519PrivateKey:
        new = Ed25519PrivateKey.generate()
        self.rotations.append(rotation(self.key, new, len(self.keys) + 1))
        self.keys.append(new)
        return new

    def state(self, **changes: object) -> DesiredState:
        """The desired state the cloud holds now (with `changes`), unsigned."""
        now = time.time()
        state = DesiredState(
            "dev-1",
            self.generation,
            tuple(
                Assignment(
                    name,
                    version,
                    "onnx-cpu-fp32",
                    digest,
                    name in self.rollback,
                    variants=self.variants.get(name, ()),
                )
                for name, (version, digest) in sorted(self.models.items())
            ),
            issued_at=now,
            expires_at=now + self.ttl_s,
        )
        return replace(state, **changes)  # type: ignore[arg-type]

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
            raise Unavailable("cannot reach the server: connection refused")

    def enroll(
        self,
        enroll_token: str,
        device_id: str,
        labels: dict[str, str],
        capabilities: Capabilities,
        *,
        certificate_request: bytes = b"",
        current_credential: str = "",
    ) -> Enrollment:
        self._check()
        if enroll_token != "enroll-secret" and not current_credential:
            raise Unauthenticated("enrollment token is not valid")
        self.enrolled.append(device_id or "dev-1")
        return Enrollment(
            device_id=device_id or "dev-1", device_token=f"device-token-{len(self.enrolled)}"
        )

    def get_trust(self) -> TrustChain:
        self._check()
        return TrustChain(RootKey(1, public_key_bytes(self.keys[0])), tuple(self.rotations))

    def authenticate(self, identity: Identity) -> None:
        self.identity = identity

    @property
    def device_id(self) -> str:
        return self.identity.device_id if self.identity else ""

    def sync(self, batch: bytes) -> SyncAck:
        """Rows stored once each by (stream, seq), as the cloud does."""
        self._check()
        message = data_pb2.SyncBatch.FromString(batch)
        with self._lock:
            for t in message.telemetry:
                self.synced_telemetry.setdefault(t.seq, t)
            for c in message.captures:
                self.synced_captures.setdefault(c.seq, c)
            self.dropped_through = max(self.dropped_through, message.captures_dropped_through)
            through = [max(s, default=0) for s in (self.synced_telemetry, self.synced_captures)]
        return SyncAck(through[0], max(through[1], message.captures_dropped_through))

    def get_desired_state(self) -> SignedDesiredState:
        self._check()
        if self.desired is not None:
            return self.desired()
        return sign_desired(self.state(), self.key)

    def report_state(self, report: ReportedState) -> int:
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
                and not self._broken
            ):
                self._broken.add(sha256)
                raise Unavailable("cannot reach the server: stream reset")
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
