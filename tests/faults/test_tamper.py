"""Tamper suite: TUF's named attacks on a device's update path, each refused before a byte of
the tampered delivery is served, while the device keeps serving what it had.

Every case starts from a device serving v1 of "m" (y = x + 1), then the cloud honestly
assigns a newer version, an attacker tampers with its delivery, and one reconcile pass
runs. The case then checks what a user would: the device still serves (and answers with)
the version it had, the pass was refused with a message naming the reason (a check, not
an unexpected exception), no folder of the tampered version is on disk and the pass wrote
nothing anywhere but the device's chunk store and state, nothing unverified entered the
chunk store, nothing was downloaded at all when the refusal came before the download, and
a restarted agent serves the same version from disk. Then the tamper goes and the same
device converges to the honest version, so the refusal was the tamper's doing.

Two kinds of attacker:
- on the wire, WITHOUT the root key (the GrpcMitm in front of the cloud): strips, flips,
  re-signs with its own key, replays, swaps responses, lies in chunk streams;
- a compromised blob store or a buggy cloud: manifests signed with the REAL root key that
  describe nonsense. For such a manifest's digest to be the one assigned, the desired state
  is re-signed with the real key too (`Scene.serve_signed`); the device must still refuse.
  These cases' names start with "signed-".
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.artifacts import ArtifactStore
from agent.chunks import ChunkStore
from agent.reconciler import PassResult, Reconciler
from agent.runtime import ModelRepository
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.fleet import Assignment, DesiredState
from edgefleet.core.manifests import (
    MAX_CHUNK_BYTES,
    MAX_FILE_BYTES,
    MAX_FILES,
    compress,
    key_id,
    public_key_bytes,
    sign_manifest,
)
from edgefleet.core.trust import rotation, sign_desired
from edgefleet.core.wire import from_proto, to_proto
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import fleet_pb2
from tests.faults import figures
from tests.faults.mitm import Metadata, Refuse
from tests.faults.rig import Device, Stage, model_file

MODEL = "m"
# The attacker's key: a valid Ed25519 key the device has no reason to trust.
ATTACKER = Ed25519PrivateKey.generate()
PIECE = 256 << 10


class Where(Enum):
    """Where the refusal must come: before anything of the new version is downloaded (its
    desired state or its manifest), during the download, or at activation (after the
    bytes verified: load or smoke test)."""

    STATE = "state"
    MANIFEST = "manifest"
    DOWNLOAD = "download"
    ACTIVATE = "activate"


STATE, MANIFEST, DOWNLOAD, ACTIVATE = Where


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pieces(data: bytes, offset: int = 0, size: int = PIECE) -> list[fleet_pb2.ChunkPiece]:
    """The honest stream of a chunk from `offset`: what the cloud sends."""
    total = len(data)
    out = [
        fleet_pb2.ChunkPiece(offset=o, data=data[o : o + size], total_size=total)
        for o in range(offset, total, size)
    ]
    return out or [fleet_pb2.ChunkPiece(offset=offset, data=b"", total_size=total)]


ChunkTamper = Callable[[bytes, int], list[fleet_pb2.ChunkPiece]]


class Scene:
    """One case's world: a device serving `held`, the cloud assigning `new`, and the
    attacker's tools (what it serves in place of the cloud, and how it rewrites)."""

    def __init__(self, world: Stage, device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
        self.world = world
        self.device = device
        self.monkeypatch = monkeypatch
        self.retired: Ed25519PrivateKey | None = None  # a root key the cloud rotated away from
        self.held = 0
        self.new = 0
        self.states: list[bytes] = []  # signed desired states that reached the device
        self.manifests: dict[str, bytes] = {}  # digest -> SignedManifest the attacker serves
        self.chunks: dict[str, bytes] = {}  # sha256 -> bytes the attacker serves
        self.chunk_tamper: ChunkTamper | None = None
        self.compressed = True  # serve manifests compressed, as the cloud does

    # what the registry holds -------------------------------------------------------------
    @property
    def key(self) -> Ed25519PrivateKey:
        """The cloud's real root key: only for the compromised-blob-store / buggy-cloud cases."""
        return self.world.cloud.keys.key

    def digest(self, version: int, model: str = MODEL) -> str:
        record = self.world.cloud.registry.get_version(model, version)
        return record.artifacts[0].manifest_digest

    def signed(self, version: int, model: str = MODEL) -> artifact_pb2.SignedManifest:
        return self.world.cloud.registry.signed_manifest(self.digest(version, model))

    def manifest(self, version: int, model: str = MODEL) -> artifact_pb2.Manifest:
        return artifact_pb2.Manifest.FromString(self.signed(version, model).manifest)

    def blob(self, sha256: str) -> bytes:
        return self.chunks.get(sha256) or self.world.cloud.blobs.get(sha256)

    def entry(self, manifest: artifact_pb2.Manifest, path: str) -> artifact_pb2.ArtifactFile:
        return next(f for f in manifest.files if f.path == path)

    # the attacker without the key ----------------------------------------------------------
    def on_state(self, change: Callable[[fleet_pb2.SignedDesiredState], None]) -> None:
        """Rewrite the signed desired state on its way (bytes, signature, key id)."""

        def hook(raw: bytes) -> bytes:
            signed = fleet_pb2.SignedDesiredState.FromString(raw)
            change(signed)
            return signed.SerializeToString()

        self.world.mitm.on_response["GetDesiredState"] = hook

    def on_state_body(self, change: Callable[[fleet_pb2.DesiredState], None]) -> None:
        """Rewrite the desired state's bytes and keep the cloud's signature."""

        def body(signed: fleet_pb2.SignedDesiredState) -> None:
            state = fleet_pb2.DesiredState.FromString(signed.state)
            change(state)
            signed.state = state.SerializeToString()

        self.on_state(body)

    def answer_state(self, raw: bytes) -> None:
        self.world.mitm.answer["GetDesiredState"] = lambda _req, _meta: raw

    def on_manifest(self, change: Callable[[artifact_pb2.SignedManifest], None]) -> None:
        def hook(raw: bytes) -> bytes:
            signed = artifact_pb2.SignedManifest.FromString(raw)
            change(signed)
            return signed.SerializeToString()

        self.world.mitm.on_response["GetManifest"] = hook

    def on_chunks(self, tamper: ChunkTamper) -> None:
        """Answer every chunk download with `tamper(genuine bytes, offset)`."""
        self.chunk_tamper = tamper
        self._answer_chunks()

    # the attacker with the key (a compromised blob store or a buggy cloud) ------------------
    def resign_state(
        self, change: Callable[[DesiredState], DesiredState], key: Ed25519PrivateKey | None = None
    ) -> None:
        """Rewrite the cloud's desired state and sign it again (the real key by default)."""
        signer = key or self.key

        def hook(raw: bytes) -> bytes:
            signed = fleet_pb2.SignedDesiredState.FromString(raw)
            state = from_proto(fleet_pb2.DesiredState.FromString(signed.state), DesiredState)
            again = sign_desired(change(state), signer)
            return to_proto(again, fleet_pb2.SignedDesiredState).SerializeToString()

        self.world.mitm.on_response["GetDesiredState"] = hook

    def reassign(self, *, extra: tuple[Assignment, ...] = (), **changes: Any) -> None:
        """The new version's assignment changed as `changes` say, signed by the real key."""

        def change(state: DesiredState) -> DesiredState:
            kept = tuple(
                replace(a, **changes) if a.model == MODEL else a for a in state.assignments
            )
            return replace(state, assignments=kept + extra)

        self.resign_state(change)

    def serve(self, signed: artifact_pb2.SignedManifest, digest: str) -> None:
        """Answer GetManifest for `digest` with `signed` (compressed, as the cloud sends),
        and every chunk download from the attacker's chunks or the registry's blobs."""
        wire = compress(signed) if signed.manifest and self.compressed else signed
        self.manifests[digest] = wire.SerializeToString()

        def answer(raw: bytes, metadata: Metadata) -> bytes:
            request = fleet_pb2.GetManifestRequest.FromString(raw)
            held = self.manifests.get(request.digest)
            if held is not None:
                return held
            return self.world.mitm.forward_unary("GetManifest", raw, metadata)

        self.world.mitm.answer["GetManifest"] = answer
        self._answer_chunks()

    def serve_signed(self, body: bytes | artifact_pb2.Manifest, **assign: Any) -> str:
        """Sign a manifest (or raw bytes) with the real key, serve it, and re-sign the desired
        state so the new version's assignment names its digest (with `assign` changes)."""
        if isinstance(body, artifact_pb2.Manifest):
            signed = sign_manifest(body, self.key)
        else:
            signed = artifact_pb2.SignedManifest(
                manifest=body,
                signature=self.key.sign(body),
                key_id=key_id(public_key_bytes(self.key)),
            )
        digest = sha(signed.manifest)
        self.serve(signed, digest)
        self.reassign(manifest_digest=digest, **assign)
        return digest

    def variant(self, change: Callable[[artifact_pb2.Manifest], object], **assign: Any) -> str:
        """The new version's manifest changed by `change`, signed with the real key, served
        and assigned."""
        manifest = self.manifest(self.new)
        change(manifest)
        return self.serve_signed(manifest, **assign)

    def _answer_chunks(self) -> None:
        def answer(raw: bytes, metadata: Metadata) -> list[bytes]:
            request = fleet_pb2.FetchChunkRequest.FromString(raw)
            if request.sha256 in self.chunks or self.world.cloud.blobs.has(request.sha256):
                data = self.blob(request.sha256)
            else:
                raise Refuse(grpc.StatusCode.NOT_FOUND, f"no chunk {request.sha256[:12]}")
            tamper = self.chunk_tamper or (lambda d, o: pieces(d, o))
            return [p.SerializeToString() for p in tamper(data, request.offset)]

        self.world.mitm.answer["FetchChunk"] = answer

    def untamper(self) -> None:
        mitm = self.world.mitm
        mitm.answer.clear()
        mitm.on_response.clear()
        mitm.on_request.clear()
        self.chunk_tamper = None


Install = Callable[[Scene], object]


@dataclass(frozen=True)
class Case:
    attack: str
    name: str
    install: Install
    says: str  # a fragment (regex) of the refusal
    stage: Where
    prelude: Install | None = None  # before the new version is pushed
    # A download cut off may leave its genuine prefix in a .part file, to resume from;
    # otherwise bytes that failed a check are deleted and no .part is left.
    resumes: bool = False

    @property
    def id(self) -> str:
        return f"{self.attack.replace(' ', '-')}:{self.name}"


# attack names (TUF's, plus what the device adds) -----------------------------------------
ARBITRARY = "arbitrary software"
WRONG_KEY = "wrong key"
ROLLBACK = "rollback"
FREEZE = "indefinite freeze"
ENDLESS = "endless data"
MIX = "mix-and-match"
EXTRANEOUS = "extraneous files"
FAST_FORWARD = "fast-forward"
SIZES = "mismatched sizes"
PATHS = "path escape"
MALFORMED = "malformed metadata"


# installers: small named functions so each case reads as one line ------------------------
def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _other_key_id(signed: fleet_pb2.SignedDesiredState) -> None:
    again = sign_desired(
        from_proto(fleet_pb2.DesiredState.FromString(signed.state), DesiredState), ATTACKER
    )
    signed.signature, signed.key_id = again.signature, again.key_id


def _attacker_signature(signed: fleet_pb2.SignedDesiredState) -> None:
    signed.signature = ATTACKER.sign(signed.state)  # the real key's id kept


def _attacker_chain(scene: Scene, chain: fleet_pb2.TrustChain) -> None:
    """Answer GetTrust with `chain` and sign the desired state with the attacker's key."""
    scene.world.mitm.answer["GetTrust"] = lambda _req, _meta: chain.SerializeToString()
    scene.on_state(_other_key_id)


def _chain_of_attacker(scene: Scene) -> None:
    first = fleet_pb2.RootKey(version=1, public_key=public_key_bytes(ATTACKER))
    _attacker_chain(scene, fleet_pb2.TrustChain(first=first))


def _forged_rotation(scene: Scene, version: int = 2) -> None:
    real = to_proto(scene.world.cloud.keys.chain(), fleet_pb2.TrustChain)
    forged = rotation(ATTACKER, ATTACKER, version)  # "signed by v1": by the attacker, really
    real.rotations.append(to_proto(forged, fleet_pb2.KeyRotation))
    _attacker_chain(scene, real)


def _rotate_then_replay_retired(scene: Scene) -> None:
    """Prelude: the cloud rotates its root key and the device follows; the retired key is
    then stolen."""
    retired = scene.world.cloud.keys.key
    scene.world.admin.rotate_root_key()
    result = scene.device.converge()
    assert isinstance(result, PassResult) and result.converged, result
    assert len(scene.device.state.root_keys()) == 2
    scene.retired = retired


def _signed_by_retired_key(scene: Scene) -> None:
    """The cloud's honest state, signed by the retired root key (which the attacker stole)."""
    assert scene.retired is not None
    scene.resign_state(lambda state: state, key=scene.retired)


def _state_flip_digest(scene: Scene) -> None:
    """Point the new version's assignment at another digest, the cloud's signature kept."""
    target = scene.digest(scene.new).encode()
    evil = sha(b"attacker").encode()
    scene.on_state(lambda s: setattr(s, "state", s.state.replace(target, evil)))


def _set_assignment(**fields: object) -> Callable[[fleet_pb2.DesiredState], None]:
    def change(state: fleet_pb2.DesiredState) -> None:
        for a in state.assignments:
            if a.model == MODEL:
                for k, v in fields.items():
                    setattr(a, k, v)

    return change


def _unknown_field(signed: fleet_pb2.SignedDesiredState) -> None:
    # field 99, length-delimited: a parser keeps it as an unknown field
    signed.state += b"\x9a\x06\x04evil"


def _capture_states(scene: Scene) -> None:
    scene.states.extend(scene.world.mitm.seen.get("GetDesiredState", []))


def _prelude_higher_generation(scene: Scene) -> None:
    """Keep the state that assigned v1 (generation 1), then the cloud re-deploys v1
    (generation 2) and the device accepts that."""
    _capture_states(scene)
    scene.world.admin.deploy(MODEL, 1, selector={"site": "a"})
    result = scene.device.converge()
    assert isinstance(result, PassResult) and result.generation == 2, result


def _prelude_same_generation(scene: Scene) -> None:
    """Keep the state that assigned v1, then the device fetches a fresher copy of it."""
    _capture_states(scene)
    result = scene.device.converge()
    assert isinstance(result, PassResult) and result.converged, result


def _prelude_ran_v2(scene: Scene) -> None:
    """The device moves on to v2 (its floor becomes 2); the new version is then v3."""
    assert scene.world.push(2.0) == 2
    scene.world.admin.deploy(MODEL, 2, selector={"site": "a"})
    result = scene.device.converge()
    assert isinstance(result, PassResult) and result.converged, result
    assert scene.device.serving() == 2


def _other_device_state(scene: Scene) -> None:
    other = scene.world.device()  # same labels: the deploy of the new version reaches it too
    signed = scene.world.cloud.fleet.signed_desired_state(other.name)
    scene.answer_state(to_proto(signed, fleet_pb2.SignedDesiredState).SerializeToString())


def _replay_first(scene: Scene) -> None:
    scene.answer_state(scene.states[0])


def _clock_forward_replay(scene: Scene) -> None:
    """Two hours pass (for the cloud and the device alike); the attacker replays the state
    it recorded before, whose hour of validity is over."""
    _capture_states(scene)
    recorded = scene.states[-1]
    real = time.time
    scene.monkeypatch.setattr(time, "time", lambda: real() + 7200)
    scene.answer_state(recorded)


def _stale_state(issued_ago: float, expired_ago: float) -> Install:
    """A state the cloud really signed (the real key), issued and expired in the past: what
    an attacker that recorded it long ago replays."""

    def install(scene: Scene) -> None:
        now = time.time()
        scene.resign_state(
            lambda s: replace(s, issued_at=now - issued_ago, expires_at=now - expired_ago)
        )

    return install


def _manifest_of(scene: Scene, version: int, model: str = MODEL) -> None:
    """Answer GetManifest with another manifest (the cloud's own, real signature)."""
    wire = compress(scene.signed(version, model)).SerializeToString()
    scene.world.mitm.answer["GetManifest"] = lambda _req, _meta: wire


def _rewritten_manifest(scene: Scene, change: Callable[[artifact_pb2.Manifest], None]) -> None:
    """Change the manifest on the wire, recompress it, keep the real signature."""

    def hook(signed: artifact_pb2.SignedManifest) -> None:
        manifest = artifact_pb2.Manifest.FromString(zlib.decompress(signed.manifest_zlib))
        change(manifest)
        signed.manifest_zlib = zlib.compress(manifest.SerializeToString(deterministic=True))

    scene.on_manifest(hook)


def _add_evil_file(manifest: artifact_pb2.Manifest) -> None:
    manifest.files.add(path="evil.sh", size=3, sha256=sha(b"rm\n"))


def _attacker_graph(scene: Scene) -> bytes:
    """A graph computing x + 9, the attacker's payload."""
    path = model_file(scene.world.root / "attacker.onnx", 9.0)
    return path.read_bytes()


def _own_manifest(scene: Scene) -> None:
    """The attacker's manifest naming its graph, signed by its own key, served for the
    assigned digest."""
    graph = _attacker_graph(scene)
    manifest = scene.manifest(scene.new)
    entry = scene.entry(manifest, "model.onnx")
    entry.sha256, entry.size = sha(graph), len(graph)
    scene.chunks[sha(graph)] = graph
    signed = sign_manifest(manifest, ATTACKER)
    scene.serve(signed, scene.digest(scene.new))


def _foreign_graph_signed(scene: Scene) -> None:
    graph = _attacker_graph(scene)
    scene.chunks[sha(graph)] = graph

    def change(m: artifact_pb2.Manifest) -> None:
        entry = scene.entry(m, "model.onnx")
        entry.sha256, entry.size = sha(graph), len(graph)

    scene.variant(change)


def _v1_file_in_v2(path: str) -> Install:
    """The new version's manifest, one file of it taken from v1 (real key)."""

    def install(scene: Scene) -> None:
        old = scene.entry(scene.manifest(1), path)

        def change(m: artifact_pb2.Manifest) -> None:
            scene.entry(m, path).CopyFrom(old)

        scene.variant(change)

    return install


def _file_bytes(path: str, data: bytes) -> Install:
    """The new version's manifest with `path` made of `data` (real key)."""

    def install(scene: Scene) -> None:
        scene.chunks[sha(data)] = data

        def change(m: artifact_pb2.Manifest) -> None:
            entry = scene.entry(m, path)
            entry.sha256, entry.size = sha(data), len(data)
            del entry.chunks[:]

        scene.variant(change)

    return install


def _extra_file(path: str) -> Install:
    """The new version's manifest with one more file at `path` (the graph's bytes again)."""

    def install(scene: Scene) -> None:
        def change(m: artifact_pb2.Manifest) -> None:
            extra = m.files.add()
            extra.CopyFrom(scene.entry(m, "model.onnx"))
            extra.path = path

        scene.variant(change)

    return install


def _manifest_field(**fields: object) -> Install:
    def install(scene: Scene) -> None:
        def change(m: artifact_pb2.Manifest) -> None:
            for k, v in fields.items():
                setattr(m, k, v)

        scene.variant(change)

    return install


def _graph_entry(change: Callable[[artifact_pb2.ArtifactFile], None]) -> Install:
    def install(scene: Scene) -> None:
        scene.variant(lambda m: change(scene.entry(m, "model.onnx")))

    return install


def _size_by(delta: int) -> Callable[[artifact_pb2.ArtifactFile], None]:
    def change(entry: artifact_pb2.ArtifactFile) -> None:
        entry.size += delta

    return change


def _listed_chunks(*chunks: tuple[str, int]) -> Callable[[artifact_pb2.ArtifactFile], None]:
    def change(entry: artifact_pb2.ArtifactFile) -> None:
        del entry.chunks[:]
        for digest, size in chunks:
            entry.chunks.add(sha256=digest, size=size)
        entry.size = sum(size for _, size in chunks)

    return change


def _chunks_not_adding_up(entry: artifact_pb2.ArtifactFile) -> None:
    entry.chunks.add(sha256=entry.sha256, size=entry.size)
    entry.size += 1


def _zero_chunk(entry: artifact_pb2.ArtifactFile) -> None:
    entry.chunks.add(sha256=sha(b""), size=0)
    entry.chunks.add(sha256=entry.sha256, size=entry.size)


def _chunk_two_sizes(scene: Scene) -> None:
    def change(m: artifact_pb2.Manifest) -> None:
        graph = scene.entry(m, "model.onnx")
        m.files.add(path="copy.onnx", sha256=graph.sha256, size=graph.size + 1)

    scene.variant(change)


def _split_graph_wrong_sum(scene: Scene) -> None:
    """The graph as two chunks the attacker serves, which are right, while the file's own
    sha256 is v1's graph's: every chunk verifies, the assembled file does not."""
    graph = scene.blob(scene.entry(scene.manifest(scene.new), "model.onnx").sha256)
    head, tail = graph[:100], graph[100:]
    scene.chunks.update({sha(head): head, sha(tail): tail})
    v1_sha = scene.entry(scene.manifest(1), "model.onnx").sha256

    def change(m: artifact_pb2.Manifest) -> None:
        entry = scene.entry(m, "model.onnx")
        _listed_chunks((sha(head), len(head)), (sha(tail), len(tail)))(entry)
        entry.sha256 = v1_sha

    scene.variant(change)


def _terabytes(scene: Scene) -> None:
    """32 files of 64 GiB each (one set of 64 MiB chunks, named 32 times): within every
    per-file bound, and far beyond any disk (2 TiB to assemble)."""

    def change(m: artifact_pb2.Manifest) -> None:
        per_file = MAX_FILE_BYTES // MAX_CHUNK_BYTES
        huge = artifact_pb2.ArtifactFile(sha256=sha(b"huge"), size=per_file * MAX_CHUNK_BYTES)
        for k in range(per_file):
            huge.chunks.add(sha256=sha(b"%d" % k), size=MAX_CHUNK_BYTES)
        for n in range(32):
            entry = m.files.add()
            entry.CopyFrom(huge)
            entry.path = f"huge/{n}.bin"

    scene.compressed = False  # a few MB: plain is quicker to make, and devices read both
    scene.variant(change)


def _many_files(scene: Scene) -> None:
    """The new version's manifest with MAX_FILES more tiny files appended as raw bytes."""
    body = scene.signed(scene.new).manifest
    one = artifact_pb2.ArtifactFile(path="f", size=1, sha256=sha(b"f")).SerializeToString()
    entry = b"\x3a" + bytes([len(one)]) + one  # field 7 (files), length-delimited
    scene.serve_signed(body + entry * MAX_FILES)


def _golden_path(field: str, path: str) -> Install:
    def install(scene: Scene) -> None:
        scene.variant(lambda m: setattr(m.golden[0], field, path))

    return install


def _duplicate(path: str) -> Install:
    return _extra_file(path)


def _file_and_folder(scene: Scene) -> None:
    _extra_file("model.onnx/weights.bin")(scene)


def _version_lie(version: int) -> Install:
    """The new version's manifest claiming another version number (real key)."""
    return _manifest_field(version=version)


def _another_model_assigned(scene: Scene) -> None:
    """Model "n" exists too; the signed state points m's new assignment at n's manifest."""
    scene.world.push(5.0, model="n")
    digest = scene.digest(1, "n")
    scene.serve(scene.signed(1, "n"), digest)
    scene.reassign(manifest_digest=digest)


def _another_model_swapped(scene: Scene) -> None:
    scene.world.push(5.0, model="n")
    _manifest_of(scene, 1, "n")


def _older_below_floor(scene: Scene) -> None:
    scene.serve(scene.signed(1), scene.digest(1))
    scene.reassign(version=1, manifest_digest=scene.digest(1), rollback=False)


def _relabelled(version: Callable[[Scene], int]) -> Install:
    """The new version's assignment names an older version's real manifest (real key)."""

    def install(scene: Scene) -> None:
        digest = scene.digest(version(scene))
        scene.serve(scene.signed(version(scene)), digest)
        scene.reassign(manifest_digest=digest)

    return install


def _digest_is_a_path(scene: Scene) -> None:
    path = "../../agent.db"
    scene.serve(scene.signed(scene.new), path)
    scene.reassign(manifest_digest=path)


def _model_name_is_a_path(scene: Scene) -> None:
    manifest = scene.manifest(scene.new)
    manifest.model = "../m"
    signed = sign_manifest(manifest, scene.key)
    digest = sha(signed.manifest)
    scene.serve(signed, digest)
    held = scene.digest(scene.held)
    evil = Assignment("../m", scene.new, "onnx-cpu-fp32", digest)
    # m stays on what it runs (the state names it still); the extra model is refused
    scene.reassign(version=scene.held, manifest_digest=held, extra=(evil,))


def _unparsable_state(scene: Scene) -> None:
    body = b"\xff\xff\xff\xff"
    signed = fleet_pb2.SignedDesiredState(
        state=body, signature=scene.key.sign(body), key_id=scene.world.cloud.keys.key_id
    )
    scene.answer_state(signed.SerializeToString())


def _garbage(method: str) -> Install:
    def install(scene: Scene) -> None:
        scene.world.mitm.answer[method] = lambda _req, _meta: b"\xff\xff\xff\xff"

    return install


def _zlib_bomb(scene: Scene) -> None:
    bomb = zlib.compress(b"\0" * (65 << 20), 1)
    scene.on_manifest(lambda s: setattr(s, "manifest_zlib", bomb))


def _both_forms(signed: artifact_pb2.SignedManifest) -> None:
    signed.manifest = zlib.decompress(signed.manifest_zlib)


# chunk streams ------------------------------------------------------------------------------
def _twice(data: bytes, offset: int) -> list[fleet_pb2.ChunkPiece]:
    return pieces(data + data, offset)


def _one_more_byte(data: bytes, offset: int) -> list[fleet_pb2.ChunkPiece]:
    return pieces(data + b"\0", offset)


def _many_more_pieces(data: bytes, offset: int) -> list[fleet_pb2.ChunkPiece]:
    honest = pieces(data, offset)
    end = len(data)
    more = [
        fleet_pb2.ChunkPiece(offset=end + n * 4096, data=b"\0" * 4096, total_size=len(data))
        for n in range(256)
    ]
    return honest + more


def _lying_total(data: bytes, offset: int) -> list[fleet_pb2.ChunkPiece]:
    out = pieces(data + os.urandom(64 << 10), offset, size=16 << 10)
    for piece in out:
        piece.total_size = 1 << 40
    return out


def _cut_short(data: bytes, offset: int) -> list[fleet_pb2.ChunkPiece]:
    return pieces(data[: len(data) // 2], offset)


def _skips_ahead(data: bytes, offset: int) -> list[fleet_pb2.ChunkPiece]:
    return [
        fleet_pb2.ChunkPiece(offset=offset + 10, data=data[offset + 10 :], total_size=len(data))
    ]


def _overlaps(data: bytes, offset: int) -> list[fleet_pb2.ChunkPiece]:
    half = (len(data) - offset) // 2
    first = fleet_pb2.ChunkPiece(
        offset=offset, data=data[offset : offset + half], total_size=len(data)
    )
    again = fleet_pb2.ChunkPiece(offset=offset, data=data[offset:], total_size=len(data))
    return [first, again]


def _bit_flipped(data: bytes, offset: int) -> list[fleet_pb2.ChunkPiece]:
    return pieces(_flip(data, len(data) // 2), offset)


def _graph_replaced(scene: Scene) -> None:
    graph = _attacker_graph(scene)
    honest = scene.blob(scene.entry(scene.manifest(scene.new), "model.onnx").sha256)
    assert len(graph) == len(honest)  # same size: only the digest can tell
    scene.on_chunks(lambda data, offset: pieces(graph if data == honest else data, offset))


def _other_chunk(scene: Scene) -> None:
    """Every chunk asked for is answered with v1's graph, a genuine chunk of the registry."""
    v1_graph = scene.blob(scene.entry(scene.manifest(1), "model.onnx").sha256)
    scene.on_chunks(lambda _data, offset: pieces(v1_graph, offset))


def _chunks(tamper: ChunkTamper) -> Install:
    return lambda scene: scene.on_chunks(tamper)


# the table ----------------------------------------------------------------------------------
_NOT_SIGNED = r"signature is not valid"
_NOT_TRUSTED = r"not the trusted root key"
_DIGEST = r"does not match the expected"
_CHUNK_SHA = r"has sha256 \w+ after download"
_LONGER = r"came with \d+ bytes, expected \d+"
_OUTSIDE = r"not a relative path inside the artifact"

CASES: list[Case] = [
    # arbitrary software: the attacker's bytes in place of the cloud's --------------------
    Case(ARBITRARY, "state-points-at-another-digest", _state_flip_digest, _NOT_SIGNED, STATE),
    Case(ARBITRARY, "own-manifest-own-key", _own_manifest, _DIGEST, MANIFEST),
    Case(
        ARBITRARY,
        "manifest-rewritten-signature-kept",
        lambda s: _rewritten_manifest(s, lambda m: setattr(m, "entrypoint", "golden/0.inputs.pb")),
        _DIGEST,
        MANIFEST,
    ),
    Case(ARBITRARY, "graph-chunk-replaced", _graph_replaced, _CHUNK_SHA, DOWNLOAD),
    Case(ARBITRARY, "chunk-bit-flipped", _chunks(_bit_flipped), _CHUNK_SHA, DOWNLOAD),
    Case(
        ARBITRARY,
        "signed-foreign-graph",
        _foreign_graph_signed,
        r"golden sample 0 output 'y' differs from the expected value",
        ACTIVATE,
    ),
    Case(
        ARBITRARY,
        "signed-graph-not-onnx",
        _file_bytes("model.onnx", b"#!/bin/sh\nrm -rf /\n"),
        r"ONNX Runtime cannot load model.onnx",
        ACTIVATE,
    ),
    Case(
        ARBITRARY,
        "signed-entrypoint-a-data-file",
        _manifest_field(entrypoint="golden/0.inputs.pb"),
        r"ONNX Runtime cannot load 0.inputs.pb",
        ACTIVATE,
    ),
    Case(
        ARBITRARY,
        "signed-format-not-onnx",
        _manifest_field(format="tensorrt"),
        r"has format 'tensorrt'; this agent runs onnx",
        ACTIVATE,
    ),
    # wrong key: signatures that are not the trusted root key's ---------------------------
    Case(
        WRONG_KEY,
        "state-signature-stripped",
        lambda s: s.on_state(lambda d: setattr(d, "signature", b"")),
        _NOT_SIGNED,
        STATE,
    ),
    Case(
        WRONG_KEY,
        "state-signature-bit-flipped",
        lambda s: s.on_state(lambda d: setattr(d, "signature", _flip(d.signature, 5))),
        _NOT_SIGNED,
        STATE,
    ),
    Case(
        WRONG_KEY,
        "state-signed-by-attacker-key",
        lambda s: s.on_state(_other_key_id),
        _NOT_TRUSTED,
        STATE,
    ),
    Case(
        WRONG_KEY,
        "state-attacker-signature-real-key-id",
        lambda s: s.on_state(_attacker_signature),
        _NOT_SIGNED,
        STATE,
    ),
    Case(
        WRONG_KEY,
        "state-signature-of-another-state",
        lambda s: s.on_state(
            lambda d: setattr(
                d, "signature", fleet_pb2.SignedDesiredState.FromString(s.states[0]).signature
            )
        ),
        _NOT_SIGNED,
        STATE,
        prelude=_capture_states,
    ),
    Case(
        WRONG_KEY,
        "trust-chain-of-attacker-root",
        _chain_of_attacker,
        r"do not include the trusted one",
        STATE,
    ),
    Case(
        WRONG_KEY,
        "trust-chain-forged-rotation",
        _forged_rotation,
        r"rotation to root key v2 is not signed by v1 and by itself",
        STATE,
    ),
    Case(
        WRONG_KEY,
        "trust-chain-rotation-skips-a-version",
        lambda s: _forged_rotation(s, version=5),
        r"root key v5 does not follow v1",
        STATE,
    ),
    Case(
        WRONG_KEY,
        "state-signed-by-stolen-retired-key",
        _signed_by_retired_key,
        r"not the trusted root key v2",
        STATE,
        prelude=_rotate_then_replay_retired,
    ),
    Case(
        WRONG_KEY,
        "manifest-signature-stripped",
        lambda s: s.on_manifest(lambda m: setattr(m, "signature", b"")),
        r"has an invalid signature",
        MANIFEST,
    ),
    Case(
        WRONG_KEY,
        "manifest-resigned-attacker-key",
        lambda s: s.on_manifest(
            lambda m: m.CopyFrom(compress(sign_manifest(s.manifest(s.new), ATTACKER)))
        ),
        r"signed by unknown key",
        MANIFEST,
    ),
    Case(
        WRONG_KEY,
        "manifest-attacker-signature-real-key-id",
        lambda s: s.on_manifest(
            lambda m: setattr(m, "signature", ATTACKER.sign(zlib.decompress(m.manifest_zlib)))
        ),
        r"has an invalid signature",
        MANIFEST,
    ),
    Case(
        WRONG_KEY,
        "manifest-key-id-stripped",
        lambda s: s.on_manifest(lambda m: setattr(m, "key_id", "")),
        r"signed by unknown key ''",
        MANIFEST,
    ),
    # rollback: back to what the device ran before ------------------------------------------
    Case(
        ROLLBACK,
        "replayed-older-generation",
        _replay_first,
        r"generation 1, older than generation 2 already accepted",
        STATE,
        prelude=_prelude_higher_generation,
    ),
    Case(
        ROLLBACK,
        "generation-lowered-on-the-wire",
        lambda s: s.on_state_body(lambda d: setattr(d, "generation", 1)),
        _NOT_SIGNED,
        STATE,
    ),
    Case(
        ROLLBACK,
        "v1-manifest-for-the-new-digest",
        lambda s: _manifest_of(s, 1),
        _DIGEST,
        MANIFEST,
    ),
    Case(
        ROLLBACK,
        "rollback-flag-set-on-the-wire",
        lambda s: s.on_state_body(
            _set_assignment(version=1, manifest_digest=s.digest(1), rollback=True)
        ),
        _NOT_SIGNED,
        STATE,
        prelude=_prelude_ran_v2,
    ),
    Case(
        ROLLBACK,
        "signed-downgrade-below-floor",
        _older_below_floor,
        r"m v1 is older than v2, the newest this device has run",
        MANIFEST,
        prelude=_prelude_ran_v2,
    ),
    Case(
        ROLLBACK,
        "signed-downgrade-relabelled-as-new",
        _relabelled(lambda s: 1),
        r"describes m v1, but the desired state assigns m v3",
        MANIFEST,
        prelude=_prelude_ran_v2,
    ),
    Case(
        ROLLBACK,
        "signed-manifest-claims-older-version",
        _version_lie(1),
        r"describes m v1, but the desired state assigns m v2",
        MANIFEST,
    ),
    # indefinite freeze: a stale view of the cloud -------------------------------------------
    Case(
        FREEZE,
        "replayed-state-same-generation-issued-earlier",
        _replay_first,
        r"issued before the one already accepted: a replay is refused",
        STATE,
        prelude=_prelude_same_generation,
    ),
    Case(
        FREEZE,
        "replayed-state-after-it-expired",
        _clock_forward_replay,
        r"the desired state expired \d+s ago",
        STATE,
    ),
    Case(
        FREEZE,
        "signed-state-expired-an-hour-ago",
        _stale_state(7200, 3600),
        r"the desired state expired 3[56]\d\ds ago",
        STATE,
    ),
    Case(
        FREEZE,
        "signed-state-expired-just-beyond-clock-skew",
        _stale_state(3600, 300 + 30),
        r"the desired state expired 33\ds ago",
        STATE,
    ),
    Case(
        FREEZE,
        "expiry-extended-on-the-wire",
        lambda s: s.on_state_body(lambda d: setattr(d, "expires_at", d.expires_at + 10**9)),
        _NOT_SIGNED,
        STATE,
    ),
    Case(
        FREEZE,
        "signed-manifest-expired",
        _manifest_field(expires_at=int(time.time()) - 60),
        r"m v2's manifest expired at",
        MANIFEST,
    ),
    # endless data: more bytes than what was asked for ----------------------------------------
    Case(ENDLESS, "chunk-stream-twice-as-long", _chunks(_twice), _LONGER, DOWNLOAD),
    Case(ENDLESS, "chunk-stream-keeps-going", _chunks(_many_more_pieces), _LONGER, DOWNLOAD),
    Case(ENDLESS, "total-size-lies-stream-longer", _chunks(_lying_total), _LONGER, DOWNLOAD),
    Case(
        ENDLESS,
        "manifest-zlib-bomb",
        _zlib_bomb,
        r"inflates past 67108864 bytes",
        MANIFEST,
    ),
    Case(ENDLESS, "signed-manifest-naming-terabytes", _terabytes, r"not enough disk", MANIFEST),
    Case(
        ENDLESS,
        "signed-file-over-max-size",
        _graph_entry(lambda e: setattr(e, "size", MAX_FILE_BYTES + 1)),
        rf"model.onnx claims {MAX_FILE_BYTES + 1} bytes",
        MANIFEST,
    ),
    Case(
        ENDLESS,
        "signed-chunk-over-max-size",
        _graph_entry(_listed_chunks((sha(b"big"), MAX_CHUNK_BYTES + 1))),
        rf"a size outside 1..{MAX_CHUNK_BYTES} bytes",
        MANIFEST,
    ),
    Case(
        ENDLESS,
        "signed-manifest-over-max-files",
        _many_files,
        rf"lists {MAX_FILES + 5} files, over {MAX_FILES}",
        MANIFEST,
    ),
    # mix-and-match: real pieces that do not belong together ---------------------------------
    Case(MIX, "another-models-manifest-swapped-in", _another_model_swapped, _DIGEST, MANIFEST),
    Case(
        MIX,
        "signed-state-assigns-another-models-manifest",
        _another_model_assigned,
        r"describes n v1, but the desired state assigns m v2",
        MANIFEST,
    ),
    Case(
        MIX,
        "signed-manifest-claims-another-model",
        _manifest_field(model="n"),
        r"describes n v2, but the desired state assigns m v2",
        MANIFEST,
    ),
    Case(
        MIX,
        "signed-state-relabels-the-held-manifest-as-new",
        _relabelled(lambda s: s.held),
        r"describes m v1, but the desired state assigns m v2",
        MANIFEST,
    ),
    Case(MIX, "chunk-of-another-file", _other_chunk, _CHUNK_SHA, DOWNLOAD),
    Case(
        MIX,
        "state-of-another-device",
        _other_device_state,
        r"the desired state is for device 'd2', not 'd1'",
        STATE,
    ),
    Case(
        MIX,
        "signed-new-manifest-with-v1-graph",
        _v1_file_in_v2("model.onnx"),
        r"golden sample \d output 'y' differs from the expected value",
        ACTIVATE,
    ),
    Case(
        MIX,
        "signed-new-manifest-with-v1-golden-outputs",
        _v1_file_in_v2("golden/0.outputs.pb"),
        r"golden sample 0 output 'y' differs from the expected value",
        ACTIVATE,
    ),
    # extraneous files and bytes ---------------------------------------------------------------
    Case(
        EXTRANEOUS,
        "unknown-field-appended-to-state",
        lambda s: s.on_state(_unknown_field),
        _NOT_SIGNED,
        STATE,
    ),
    Case(
        EXTRANEOUS,
        "file-added-to-manifest-on-the-wire",
        lambda s: _rewritten_manifest(s, _add_evil_file),
        _DIGEST,
        MANIFEST,
    ),
    Case(EXTRANEOUS, "one-trailing-byte-after-a-chunk", _chunks(_one_more_byte), _LONGER, DOWNLOAD),
    Case(
        EXTRANEOUS,
        "signed-golden-outputs-not-listed",
        _golden_path("outputs", "golden/9.outputs.pb"),
        r"a golden sample names a file it does not list",
        MANIFEST,
    ),
    Case(
        EXTRANEOUS,
        "signed-entrypoint-not-listed",
        _manifest_field(entrypoint="other.onnx"),
        r"its entrypoint 'other.onnx' is not one of its files",
        MANIFEST,
    ),
    Case(
        EXTRANEOUS,
        "signed-entrypoint-empty",
        _manifest_field(entrypoint=""),
        r"its entrypoint '' is not one of its files",
        MANIFEST,
    ),
    # fast-forward: numbers pushed ahead ------------------------------------------------------
    Case(
        FAST_FORWARD,
        "generation-raised-on-the-wire",
        lambda s: s.on_state_body(lambda d: setattr(d, "generation", 1 << 60)),
        _NOT_SIGNED,
        STATE,
    ),
    Case(
        FAST_FORWARD,
        "assigned-version-raised-on-the-wire",
        lambda s: s.on_state_body(_set_assignment(version=99)),
        _NOT_SIGNED,
        STATE,
    ),
    Case(
        FAST_FORWARD,
        "signed-manifest-claims-newer-version",
        _version_lie(99),
        r"describes m v99, but the desired state assigns m v2",
        MANIFEST,
    ),
    Case(
        FAST_FORWARD,
        "signed-manifest-schema-from-the-future",
        _manifest_field(schema_version=99),
        r"manifest schema 99 is newer than this agent understands",
        MANIFEST,
    ),
    # mismatched sizes -------------------------------------------------------------------------
    Case(
        SIZES,
        "chunk-stream-cut-short",
        _chunks(_cut_short),
        r"stream ended at \d+ of \d+ bytes",
        DOWNLOAD,
        resumes=True,
    ),
    Case(
        SIZES,
        "piece-offset-skips-ahead",
        _chunks(_skips_ahead),
        r"sent bytes from offset 10, expected 0",
        DOWNLOAD,
        resumes=True,
    ),
    Case(
        SIZES,
        "piece-overlaps-the-previous",
        _chunks(_overlaps),
        r"sent bytes from offset 0, expected \d+",
        DOWNLOAD,
        resumes=True,
    ),
    Case(
        SIZES,
        "signed-chunks-do-not-add-up",
        _graph_entry(_chunks_not_adding_up),
        r"the chunks of model.onnx add up to \d+ bytes, but the file is \d+",
        MANIFEST,
    ),
    Case(
        SIZES,
        "signed-chunk-given-two-sizes",
        _chunk_two_sizes,
        r"gives chunk \w+ two sizes",
        MANIFEST,
    ),
    Case(
        SIZES,
        "signed-chunk-of-zero-bytes",
        _graph_entry(_zero_chunk),
        rf"a size outside 1..{MAX_CHUNK_BYTES} bytes",
        MANIFEST,
    ),
    Case(
        SIZES,
        "signed-file-larger-than-its-bytes",
        _graph_entry(_size_by(+1)),
        r"stream ended at (\d+) of \d+ bytes",
        DOWNLOAD,
        resumes=True,
    ),
    Case(
        SIZES,
        "signed-file-smaller-than-its-bytes",
        _graph_entry(_size_by(-1)),
        _LONGER,
        DOWNLOAD,
    ),
    Case(
        SIZES,
        "signed-file-digest-not-its-chunks",
        _split_graph_wrong_sum,
        r"file model.onnx has sha256 \w+, the manifest says \w+",
        ACTIVATE,
    ),
    # path escapes: names that would land outside the version's folder ------------------------
    *(
        Case(PATHS, f"signed-file-{name}", _extra_file(path), _OUTSIDE, MANIFEST)
        for name, path in [
            ("dot-dot", "../model.onnx"),
            ("dot-dot-inside", "golden/../../model.onnx"),
            ("absolute", "/tmp/model.onnx"),
            ("backslashes", "golden\\..\\..\\model.onnx"),
            ("nul-byte", "model.onnx\x00.txt"),
            ("empty", ""),
            ("dot-slash", "./model.onnx"),
            ("double-slash", "golden//model.onnx"),
            ("trailing-slash", "golden/"),
            ("hidden-dotfile", ".bashrc"),
            ("non-ascii-lookalike", "mоdel.onnx"),
            ("over-long", "/".join(["a" * 100] * 11)),
            ("over-long-part", "a" * 201),
        ]
    ),
    Case(
        PATHS,
        "signed-duplicate-path",
        _duplicate("model.onnx"),
        r"lists 'model.onnx' twice",
        MANIFEST,
    ),
    Case(
        PATHS,
        "signed-case-twin",
        _duplicate("MODEL.onnx"),
        r"lists 'MODEL.onnx' twice \(letter case aside\)",
        MANIFEST,
    ),
    Case(
        PATHS,
        "signed-file-and-folder",
        _file_and_folder,
        r"uses 'model.onnx' as a file and as a folder",
        MANIFEST,
    ),
    Case(
        PATHS,
        "signed-entrypoint-escapes",
        _manifest_field(entrypoint="../model.onnx"),
        r"its entrypoint '../model.onnx' is not one of its files",
        MANIFEST,
    ),
    Case(
        PATHS,
        "signed-golden-inputs-escape",
        _golden_path("inputs", "../../agent.db"),
        r"a golden sample names a file it does not list",
        MANIFEST,
    ),
    Case(
        PATHS,
        "signed-chunk-name-is-a-path",
        _graph_entry(_listed_chunks(("../../agent.db", 100))),
        r"names a chunk with an invalid digest",
        MANIFEST,
    ),
    Case(
        PATHS,
        "signed-file-digest-is-a-path",
        _graph_entry(lambda e: setattr(e, "sha256", "../../agent.db")),
        r"model.onnx has no valid sha256",
        MANIFEST,
    ),
    Case(
        PATHS,
        "signed-assignment-digest-is-a-path",
        _digest_is_a_path,
        r"does not match the expected \.\./\.\./agent",
        MANIFEST,
    ),
    Case(
        PATHS,
        "signed-model-name-is-a-path",
        _model_name_is_a_path,
        r"manifest of '\.\./m' v2 names no valid model and version",
        MANIFEST,
    ),
    # malformed metadata: what does not parse -------------------------------------------------
    Case(
        MALFORMED,
        "signed-state-does-not-parse",
        _unparsable_state,
        r"the signed desired state does not parse",
        STATE,
    ),
    Case(
        MALFORMED,
        "signed-manifest-does-not-parse",
        lambda s: s.serve_signed(b"\xff\xff\xff\xff"),
        r"does not parse as a manifest",
        MANIFEST,
    ),
    Case(
        MALFORMED,
        "signed-manifest-version-zero",
        _manifest_field(version=0),
        r"v0 names no valid model and version",
        MANIFEST,
    ),
    Case(
        MALFORMED,
        "signed-golden-file-malformed",
        _file_bytes("golden/0.outputs.pb", b"\xff" * 64),
        r"golden sample 0 is malformed",
        ACTIVATE,
    ),
    Case(
        MALFORMED,
        "state-response-not-protobuf",
        _garbage("GetDesiredState"),
        r"deserializ",
        STATE,
    ),
    Case(
        MALFORMED,
        "manifest-response-not-protobuf",
        _garbage("GetManifest"),
        r"deserializ",
        MANIFEST,
    ),
    Case(
        MALFORMED,
        "compressed-manifest-bit-flipped",
        lambda s: s.on_manifest(
            lambda m: setattr(m, "manifest_zlib", _flip(m.manifest_zlib, len(m.manifest_zlib) - 1))
        ),
        r"the compressed manifest does not inflate",
        MANIFEST,
    ),
    Case(
        MALFORMED,
        "compressed-manifest-cut-short",
        lambda s: s.on_manifest(
            lambda m: setattr(m, "manifest_zlib", m.manifest_zlib[: len(m.manifest_zlib) // 2])
        ),
        r"or is cut short",
        MANIFEST,
    ),
    Case(
        MALFORMED,
        "manifest-plain-and-compressed",
        lambda s: s.on_manifest(_both_forms),
        r"carries both plain and compressed bytes",
        MANIFEST,
    ),
]


# the checks ---------------------------------------------------------------------------------
def refusal(result: PassResult | EdgefleetError, stage: Where) -> str:
    """The refusal's message; the pass must not have converged."""
    if isinstance(result, EdgefleetError):
        assert stage is STATE, f"the desired state itself was refused: {result.message}"
        return result.message
    assert not result.converged and result.errors, f"the tampered pass converged: {result}"
    assert stage is not STATE, f"the desired state was accepted: {result}"
    return "; ".join(result.errors)


def disk(device: Device) -> tuple[set[str], set[str], dict[str, bytes]]:
    """Version folders of m, verified chunk names, and .part files with their bytes."""
    models = device.settings.data_dir / "models" / MODEL
    folders = {p.name for p in models.iterdir()} if models.is_dir() else set()
    chunks, parts = set(), {}
    for path in (device.settings.data_dir / "chunks").iterdir():
        if path.name.endswith(".part"):
            parts[path.name.removesuffix(".part")] = path.read_bytes()
        else:
            chunks.add(path.name)
    return folders, chunks, parts


def check_nothing_of_it(scene: Scene, case: Case, before: tuple[set[str], set[str]]) -> None:
    folders, chunks, parts = disk(scene.device)
    folders_before, chunks_before = before
    assert folders <= folders_before, f"a version folder was written: {folders - folders_before}"
    assert scene.digest(scene.new) not in folders
    for name in chunks:
        data = (scene.device.settings.data_dir / "chunks" / name).read_bytes()
        assert sha(data) == name, f"an unverified chunk entered the store: {name[:12]}"
    if case.stage in (STATE, MANIFEST):
        assert chunks <= chunks_before, "a chunk was downloaded before the refusal"
        assert not parts, f"a download started before the refusal: {list(parts)}"
    if not case.resumes:
        assert not parts, f"bytes that failed a check were kept: {list(parts)}"
    for name, data in parts.items():
        genuine = scene.blob(name)
        assert genuine.startswith(data), f"part {name[:12]} holds bytes that are not genuine"


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def check_written_only_chunks(scene: Scene, before: set[Path]) -> None:
    """Of everything the tampered pass wrote anywhere under the test's folder (the cloud's
    aside), only the device's state database and its chunk store remain: no file of the
    tampered version, inside or outside the device's data folder."""
    data_dir = scene.device.settings.data_dir
    cloud = scene.world.root / "cloud"
    for path in files_under(scene.world.root) - before:
        if path.is_relative_to(cloud) or path.parent == data_dir / "chunks":
            continue
        assert path.parent == data_dir and path.name.startswith("agent.db"), (
            f"the tampered pass left {path.relative_to(scene.world.root)}"
        )


def restarted(device: Device) -> ModelRepository:
    """What a restarted agent serves from this device's disk, before any cloud call."""
    repository = ModelRepository()
    chunks = ChunkStore(device.settings.data_dir / "chunks")
    artifacts = ArtifactStore(device.settings.data_dir, chunks)
    Reconciler(device.settings, device.state, chunks, artifacts, device.link, repository).restore()
    return repository


def serves(device: Device, version: int) -> None:
    assert device.serving() == version
    assert device.infer() == float(version)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tampered_delivery_is_refused_and_the_held_version_keeps_serving(
    world: Stage, case: Case, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="agent.reconciler")
    device = world.device()
    scene = Scene(world, device, monkeypatch)
    assert world.push(1.0) == 1
    world.admin.deploy(MODEL, 1, selector={"site": "a"})
    first = device.converge()
    assert isinstance(first, PassResult) and first.converged, first
    serves(device, 1)
    if case.prelude is not None:
        case.prelude(scene)
    scene.held = device.serving() or 0
    scene.new = scene.held + 1
    assert world.push(float(scene.new)) == scene.new
    world.admin.deploy(MODEL, scene.new, selector={"site": "a"})
    folders, chunks, _ = disk(device)

    case.install(scene)
    everything = files_under(world.root)
    result = device.converge()

    message = refusal(result, case.stage)
    assert re.search(case.says, message), f"refused, but not for the expected reason: {message}"
    assert not [r for r in caplog.records if "unexpected failure" in r.getMessage()], (
        "the refusal was an unexpected exception, not a check"
    )
    serves(device, scene.held)
    with pytest.raises(EdgefleetError):
        device.repository.get(MODEL, scene.new)
    check_nothing_of_it(scene, case, (folders, chunks))
    check_written_only_chunks(scene, everything)
    assert restarted(device).default_version(MODEL) == scene.held
    figures.add("tamper cases refused", case.attack)

    # Without the tamper the same device takes the honest version: the refusal was its doing.
    scene.untamper()
    healed = device.converge()
    assert isinstance(healed, PassResult) and healed.converged, healed
    serves(device, scene.new)
    assert device.serving("n") is None and device.serving("../m") is None


def test_the_table_names_each_case_once_and_covers_both_attackers() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 60
    assert {c.attack for c in CASES} == {
        ARBITRARY,
        WRONG_KEY,
        ROLLBACK,
        FREEZE,
        ENDLESS,
        MIX,
        EXTRANEOUS,
        FAST_FORWARD,
        SIZES,
        PATHS,
        MALFORMED,
    }
    keyed = sum(c.name.startswith("signed-") for c in CASES)
    assert 25 <= keyed <= len(CASES) - 25
