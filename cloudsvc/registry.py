"""The model registry: immutable, numbered versions with lineage, and their artifacts.

A push verifies the file loads in ONNX Runtime, reads its signature, makes golden samples
when none came with it, cuts it into content-addressed chunks, and records a signed
manifest. Chunks shared with earlier versions are stored once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from cloudsvc.errors import (
    BadModel,
    BlobCorrupt,
    Conflict,
    InvalidRequest,
    NotReady,
    UnknownResource,
)
from cloudsvc.golden import GOLDEN_BYTES_BUDGET, make_golden_samples, pair_bytes
from cloudsvc.sessions import open_session
from cloudsvc.signing import RootKeys
from cloudsvc.store.blobs import BlobStore
from cloudsvc.store.metadata import MetadataStore
from compilers.build import Build
from edgefleet.core.data import InputStats
from edgefleet.core.errors import EdgefleetError, ManifestError
from edgefleet.core.golden import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    Arrays,
    GoldenRef,
    inline_arrays,
    sample_paths,
    tensor_set_bytes,
)
from edgefleet.core.manifests import (
    DEFAULT_CHUNK_SIZE,
    MANIFEST_SCHEMA_VERSION,
    NAME_PATTERN,
    check_manifest,
    compress,
    describe_blocks,
    file_chunks,
    iter_file_chunks,
    sha256_hex,
    sign_manifest,
)
from edgefleet.core.tensors import ORT_TO_DATATYPE
from edgefleet.core.versions import (
    Artifact,
    Evaluation,
    Lineage,
    Model,
    ModelVersion,
    TensorSpec,
)
from edgefleet.core.wire import to_proto
from protos.artifact.v1 import artifact_pb2

log = logging.getLogger(__name__)

DEFAULT_TARGET = "onnx-cpu-fp32"
# The most chunks one FetchChunks call may ask for (a manifest lists 1 MiB chunks).
MAX_CHUNKS_PER_CALL = 1024
# Compressed manifests kept for devices' fetches (a rollout asks for the same few).
WIRE_CACHE = 256
ENTRYPOINT = "model.onnx"
# Target name of the kept export a fine-tuned version was compiled from (never deployed),
# and the version metadata key that names its manifest.
SOURCE_TARGET = "source"
SOURCE_KEY = "source_manifest"


def check_name(kind: str, name: str) -> str:
    """`name`, when it is a valid model or target name; InvalidRequest otherwise."""
    if not NAME_PATTERN.match(name):
        raise InvalidRequest(
            f"{kind} name {name[:80]!r} is not valid: use 1-63 characters of a-z, 0-9, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name


def _dims(shape: Sequence[object]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


Sample = tuple[Arrays, Arrays, float, float]
"""A golden sample before it becomes files: inputs, expected outputs, rtol, atol."""


def _specs_from_session(
    path: Path,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], list[Sample]]:
    session = open_session(path)
    inputs = tuple(
        TensorSpec(i.name, ORT_TO_DATATYPE.get(i.type, "BYTES"), _dims(i.shape))
        for i in session.get_inputs()
    )
    outputs = tuple(
        TensorSpec(o.name, ORT_TO_DATATYPE.get(o.type, "BYTES"), _dims(o.shape))
        for o in session.get_outputs()
    )
    made = [(i, o, DEFAULT_RTOL, DEFAULT_ATOL) for i, o in make_golden_samples(session)]
    return inputs, outputs, made


# ONNX TensorProto element types -> Open Inference Protocol names (for unverified pushes).
_ONNX_ELEM_TO_DATATYPE = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}


def _specs_from_graph(
    path: Path,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The signature read from the graph alone, for files ONNX Runtime is not asked to load."""
    import onnx  # the cloud extra has onnx; imported here so the agent never pulls it in

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise BadModel(f"the uploaded file is not an ONNX model: {err}") from None
    initializers = {i.name for i in model.graph.initializer}

    def spec(value: object) -> TensorSpec:
        tensor = value.type.tensor_type  # type: ignore[attr-defined]
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        name: str = value.name  # type: ignore[attr-defined]
        return TensorSpec(name, _ONNX_ELEM_TO_DATATYPE.get(tensor.elem_type, "BYTES"), dims)

    inputs = tuple(spec(i) for i in model.graph.input if i.name not in initializers)
    return inputs, tuple(spec(o) for o in model.graph.output)


def _inline_samples(samples: Sequence[artifact_pb2.GoldenSample]) -> list[Sample]:
    """Golden samples a push carried, checked."""
    checked: list[Sample] = []
    for n, sample in enumerate(samples):
        if not sample.inputs or not sample.outputs:
            raise InvalidRequest(f"golden sample {n} needs at least one input and one output")
        try:
            inputs, outputs = inline_arrays(sample)
        except EdgefleetError as err:
            raise InvalidRequest(f"golden sample {n}: {err}") from None
        rtol, atol = sample.rtol, sample.atol
        if rtol == 0 and atol == 0:
            # proto3 cannot tell "exact" from "unset"; exact float equality across
            # execution providers is never what anyone wants.
            rtol, atol = DEFAULT_RTOL, DEFAULT_ATOL
        checked.append((inputs, outputs, rtol, atol))
    total = sum(pair_bytes(i, o) for i, o, _, _ in checked)
    if total > GOLDEN_BYTES_BUDGET:
        raise InvalidRequest(
            f"the golden samples hold {total} bytes; keep them under {GOLDEN_BYTES_BUDGET} "
            "(every device downloads them): send fewer or smaller samples"
        )
    return checked


def _specs(specs: Sequence[TensorSpec]) -> list[artifact_pb2.TensorSpec]:
    return [to_proto(s, artifact_pb2.TensorSpec) for s in specs]


class Registry:
    def __init__(
        self,
        metadata: MetadataStore,
        blobs: BlobStore,
        keys: RootKeys,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self.keys = keys
        self.chunk_size = chunk_size
        # Numbering a version and recording it must not interleave with another push.
        self._push_lock = threading.Lock()
        self._wire: dict[str, artifact_pb2.SignedManifest] = {}
        self._chunks: dict[str, frozenset[str]] = {}
        self._wire_lock = threading.Lock()

    def push(
        self,
        model: str,
        path: Path,
        description: str = "",
        target: str = "",
        golden_samples: Sequence[artifact_pb2.GoldenSample] = (),
        metadata: Mapping[str, str] | None = None,
        skip_verify: bool = False,
        parent_version: int = 0,
        created_by: str = "",
    ) -> ModelVersion:
        """Record `path` as the next version of `model`; the new version's record."""
        check_name("model", model)
        target = check_name("target", target or DEFAULT_TARGET)
        if not path.is_file():
            raise InvalidRequest(f"{path} is not a file; give the path of an .onnx model")
        if path.stat().st_size == 0:
            raise BadModel("the uploaded file is empty; push a complete .onnx file")
        if parent_version and self.metadata.get_version(model, parent_version) is None:
            raise UnknownResource(
                f"parent version {parent_version} of {model} does not exist; "
                f"see `edgefleet models versions {model}`"
            )
        samples = _inline_samples(golden_samples)
        if skip_verify:
            inputs, outputs = _specs_from_graph(path)
        else:
            inputs, outputs, made = _specs_from_session(path)
            if not samples:
                samples = made

        entry = self._store_file(path, ENTRYPOINT)
        golden, golden_files = self._store_golden(samples)
        with self._push_lock:
            number = self._next_number(model)
            artifact = self._sign_and_store(
                artifact_pb2.Manifest(
                    model=model,
                    version=number,
                    target=target,
                    format="onnx",
                    entrypoint=ENTRYPOINT,
                    files=[entry, *golden_files],
                    inputs=_specs(inputs),
                    outputs=_specs(outputs),
                    golden=[to_proto(g, artifact_pb2.GoldenRef) for g in golden],
                    metadata=dict(metadata or {}),
                )
            )
            record = ModelVersion(
                model=model,
                version=number,
                description=description,
                created_at=artifact.created_at,
                source_sha256=entry.sha256,
                parent_version=parent_version,
                metadata=dict(metadata or {}),
                inputs=inputs,
                outputs=outputs,
                golden_sample_count=len(samples),
                created_by=created_by,
                artifacts=(artifact,),
            )
            self.metadata.add_version(record)
        log.info(
            "pushed %s v%d (%s, %d bytes, %d chunks, %d golden samples)",
            model,
            number,
            target,
            entry.size,
            artifact.chunk_count,
            len(samples),
        )
        return record

    def add_build(
        self,
        model: str,
        builds: Sequence[Build],
        *,
        source: Build,
        description: str = "",
        parent_version: int = 0,
        lineage: Lineage | None = None,
        evaluation: Evaluation | None = None,
        test: Evaluation | None = None,
        baseline: tuple[InputStats, ...] = (),
        metadata: Mapping[str, str] | None = None,
        created_by: str = "",
    ) -> ModelVersion:
        """Record compiled builds (one per target) as the next version of `model`.

        `source` is the parity-checked export they were compiled from, with its evaluation
        data: kept (content-addressed like any artifact, never deployed) so that
        `compile` can build more targets for this version later.
        """
        check_name("model", model)
        if not builds:
            raise InvalidRequest("a version needs at least one compiled artifact")
        if parent_version and self.metadata.get_version(model, parent_version) is None:
            raise UnknownResource(f"parent version {parent_version} of {model} does not exist")
        inputs, outputs = _specs_from_graph(source.entrypoint)
        entries = {b.target: self._store_files(b) for b in (*builds, source)}
        with self._push_lock:
            number = self._next_number(model)
            parent = self.metadata.get_version(model, parent_version) if parent_version else None
            artifacts = tuple(
                self._sign_and_store(
                    self._build_manifest(model, number, b, entries[b.target]), b, parent
                )
                for b in builds
            )
            kept = self._sign_and_store(
                self._build_manifest(model, number, source, entries[source.target]), source
            )
            record = ModelVersion(
                model=model,
                version=number,
                description=description,
                created_at=artifacts[0].created_at,
                source_sha256=entries[source.target][0].sha256,
                parent_version=parent_version,
                metadata={**dict(metadata or {}), SOURCE_KEY: kept.manifest_digest},
                inputs=inputs,
                outputs=outputs,
                golden_sample_count=max(len(b.golden) for b in builds),
                created_by=created_by,
                artifacts=artifacts,
                lineage=lineage,
                evaluation=evaluation,
                test=test,
                baseline=baseline,
            )
            self.metadata.add_version(record)
        log.info(
            "registered %s v%d: %s",
            model,
            number,
            ", ".join(
                f"{a.target} ({a.size_bytes} bytes, {a.file_count} files)" for a in artifacts
            ),
        )
        return record

    def add_target(self, model: str, version: int, build: Build) -> Artifact:
        """Another target's artifact for an existing version; Conflict if it has one."""
        record = self.get_version(model, version)
        if record.artifact(build.target) is not None:
            raise Conflict(f"{model} v{version} already has a {build.target} artifact")
        artifact = self._sign_and_store(
            self._build_manifest(model, version, build, self._store_files(build)), build
        )
        self.metadata.add_artifact(artifact)
        return artifact

    def source_digest(self, model: str, version: int) -> str:
        """The manifest digest of what a new target of this version is compiled from: the
        kept source of a fine-tuned version, else the pushed ONNX file."""
        record = self.get_version(model, version)
        if SOURCE_KEY in record.metadata:
            return record.metadata[SOURCE_KEY]
        pushed = record.artifact(DEFAULT_TARGET)
        if pushed is None or pushed.format != "onnx":
            raise NotReady(
                f"{model} v{version} has no {DEFAULT_TARGET} artifact to compile from; push "
                "the ONNX model as a new version first"
            )
        return pushed.manifest_digest

    def golden_inputs(self, model: str, version: int) -> list[bytes]:
        """The golden input files of a version's artifacts (of its first artifact that has
        any), for a child version to re-use."""
        record = self.get_version(model, version)
        for artifact in record.artifacts:
            if not self.blobs.has(artifact.manifest_digest):
                continue
            manifest = artifact_pb2.Manifest()
            manifest.ParseFromString(self.blobs.get(artifact.manifest_digest))
            files = {f.path: f for f in manifest.files}
            found = [
                b"".join(self.blobs.get(c.sha256) for c in file_chunks(files[g.inputs]))
                for g in manifest.golden
                if g.inputs in files
            ]
            if found:
                return found
        return []

    def materialize(self, digest: str, folder: Path) -> artifact_pb2.Manifest:
        """Write the files of the stored manifest `digest` into `folder`, each checked."""
        if not self.blobs.has(digest):
            raise UnknownResource(f"no manifest has digest {digest[:80]!r}")
        manifest = artifact_pb2.Manifest()
        manifest.ParseFromString(self.blobs.get(digest))
        for entry in manifest.files:
            target = folder / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            whole = hashlib.sha256()
            with target.open("wb") as out:
                for chunk in file_chunks(entry):
                    data = self.blobs.get(chunk.sha256)
                    whole.update(data)
                    out.write(data)
            if whole.hexdigest() != entry.sha256:
                raise BlobCorrupt(
                    f"{entry.path} of manifest {digest[:12]} does not match its digest"
                )
        return manifest

    # internals ----------------------------------------------------------------------------
    def _next_number(self, model: str) -> int:
        current = self.metadata.get_model(model)
        return (current.latest_version if current else 0) + 1

    def _store_files(self, build: Build) -> list[artifact_pb2.ArtifactFile]:
        missing = [f for f in build.files if not (build.folder / f).is_file()]
        if missing:
            raise InvalidRequest(f"the {build.target} build lacks files {missing[:5]}")
        return [self._store_file(build.folder / name, name) for name in build.files]

    def _store_golden(
        self, samples: Sequence[Sample]
    ) -> tuple[list[GoldenRef], list[artifact_pb2.ArtifactFile]]:
        refs: list[GoldenRef] = []
        entries: list[artifact_pb2.ArtifactFile] = []
        for index, (inputs, outputs, rtol, atol) in enumerate(samples):
            inputs_path, outputs_path = sample_paths(index)
            entries.append(self._store_bytes(inputs_path, tensor_set_bytes(inputs)))
            entries.append(self._store_bytes(outputs_path, tensor_set_bytes(outputs)))
            refs.append(GoldenRef(inputs_path, outputs_path, rtol, atol))
        return refs, entries

    def _build_manifest(
        self, model: str, version: int, build: Build, files: list[artifact_pb2.ArtifactFile]
    ) -> artifact_pb2.Manifest:
        inputs, outputs = (
            _specs_from_graph(build.entrypoint) if build.format == "onnx" else ((), ())
        )
        return artifact_pb2.Manifest(
            model=model,
            version=version,
            target=build.target,
            format=build.format,
            entrypoint=build.files[0],
            files=files,
            inputs=_specs(inputs),
            outputs=_specs(outputs),
            golden=[to_proto(g, artifact_pb2.GoldenRef) for g in build.golden],
            preprocessing=artifact_pb2.Preprocessing(params=dict(build.preprocessing)),
            metadata=dict(build.metadata),
        )

    def _sign_and_store(
        self,
        manifest: artifact_pb2.Manifest,
        build: Build | None = None,
        parent: ModelVersion | None = None,
    ) -> Artifact:
        manifest.created_at = int(time.time())
        manifest.schema_version = MANIFEST_SCHEMA_VERSION
        try:
            # What a device would refuse is never signed.
            check_manifest(manifest)
        except ManifestError as err:
            raise InvalidRequest(f"the artifact cannot be shipped: {err.message}") from None
        signed = sign_manifest(manifest, self.keys.key)
        digest = sha256_hex(signed.manifest)
        self.blobs.put(digest, signed.manifest)
        metrics = dict(build.metrics) if build else {}
        previous = parent.artifact(manifest.target) if parent else None
        if previous is not None and self.blobs.has(previous.manifest_digest):
            # What a device running the parent downloads to move here: the manifest and the
            # chunks it does not hold yet (content addressing makes the rest a no-op).
            held = artifact_pb2.Manifest()
            held.ParseFromString(self.blobs.get(previous.manifest_digest))
            have = {c.sha256 for f in held.files for c in file_chunks(f)}
            new = {
                c.sha256: c.size
                for f in manifest.files
                for c in file_chunks(f)
                if c.sha256 not in have
            }
            metrics["update_bytes"] = float(len(signed.manifest) + sum(new.values()))
        return Artifact(
            model=manifest.model,
            version=manifest.version,
            target=manifest.target,
            manifest_digest=digest,
            size_bytes=sum(f.size for f in manifest.files),
            chunk_count=len({c.sha256 for f in manifest.files for c in file_chunks(f)}),
            created_at=manifest.created_at,
            signature_hex=signed.signature.hex(),
            key_id=signed.key_id,
            metrics=metrics,
            steps=tuple(build.steps) if build else (),
            format=manifest.format,
            file_count=len(manifest.files),
        )

    def _store_file(self, path: Path, name: str) -> artifact_pb2.ArtifactFile:
        # Streamed chunk by chunk so a 2 GiB model never sits in memory whole.
        return self._store_blocks(name, iter_file_chunks(path, self.chunk_size))

    def _store_bytes(self, name: str, data: bytes) -> artifact_pb2.ArtifactFile:
        blocks = (data[i : i + self.chunk_size] for i in range(0, len(data), self.chunk_size))
        return self._store_blocks(name, blocks)

    def _store_blocks(self, name: str, blocks: Iterable[bytes]) -> artifact_pb2.ArtifactFile:
        def stored() -> Iterator[bytes]:
            for block in blocks:
                self.blobs.put(sha256_hex(block), block)
                yield block

        entry, _ = describe_blocks(name, stored())
        return entry

    # reads -------------------------------------------------------------------------------
    def list_models(self) -> list[Model]:
        return self.metadata.list_models()

    def list_versions(self, model: str) -> list[ModelVersion]:
        if self.metadata.get_model(model) is None:
            raise self._unknown_model(model)
        return self.metadata.list_versions(model)

    def get_version(self, model: str, version: int) -> ModelVersion:
        record = self.metadata.get_version(model, version)
        if record is None:
            if self.metadata.get_model(model) is None:
                raise self._unknown_model(model)
            raise UnknownResource(
                f"{model} has no version {version}; see `edgefleet models versions {model}`"
            )
        return record

    def signed_manifest(self, digest: str) -> artifact_pb2.SignedManifest:
        """The SignedManifest whose manifest bytes hash to `digest`."""
        artifact = self.metadata.find_artifact(digest)
        if artifact is None or not self.blobs.has(digest):
            raise UnknownResource(f"no manifest has digest {digest[:80]!r}")
        return artifact_pb2.SignedManifest(
            manifest=self.blobs.get(digest),
            signature=bytes.fromhex(artifact.signature_hex),
            key_id=artifact.key_id,
        )

    def artifact_manifest(
        self, model: str, version: int, target: str = ""
    ) -> artifact_pb2.SignedManifest:
        """The signed manifest of `model` v`version` compiled for `target` (default: the
        pushed onnx-cpu-fp32), with plain manifest bytes."""
        record = self.get_version(model, version)
        target = check_name("target", target or DEFAULT_TARGET)
        artifact = record.artifact(target)
        if artifact is None:
            have = ", ".join(a.target for a in record.artifacts) or "none"
            raise UnknownResource(
                f"{model} v{version} has no {target} artifact (it has: {have}); compile it "
                "with `edgefleet jobs compile` or pick one of those with --target"
            )
        return self.signed_manifest(artifact.manifest_digest)

    def check_chunk_request(self, digest: str, sha256s: Sequence[str]) -> list[str]:
        """`sha256s`, once each is a chunk the stored manifest `digest` names: an operator
        reads an artifact's bytes, never any other blob."""
        if len(sha256s) > MAX_CHUNKS_PER_CALL:
            raise InvalidRequest(
                f"{len(sha256s)} chunks asked at once; ask at most {MAX_CHUNKS_PER_CALL} a call"
            )
        named = self.chunks_of(digest)
        if not named:
            raise UnknownResource(f"no manifest has digest {digest[:80]!r}")
        unknown = [s for s in sha256s if s not in named]
        if unknown:
            raise InvalidRequest(
                f"{len(unknown)} of the chunks asked (first {unknown[0][:80]!r}) are not named by "
                f"manifest {digest[:12]}; ask only for chunks its files list"
            )
        return list(sha256s)

    def chunks_of(self, digest: str) -> frozenset[str]:
        """The chunk digests a stored manifest names (cached: manifests never change)."""
        with self._wire_lock:
            cached = self._chunks.get(digest)
        if cached is None:
            if not self.blobs.has(digest):
                return frozenset()
            manifest = artifact_pb2.Manifest()
            manifest.ParseFromString(self.blobs.get(digest))
            cached = frozenset(c.sha256 for f in manifest.files for c in file_chunks(f))
            with self._wire_lock:
                if len(self._chunks) >= WIRE_CACHE:
                    self._chunks.pop(next(iter(self._chunks)))
                self._chunks[digest] = cached
        return cached

    def wire_manifest(self, digest: str) -> artifact_pb2.SignedManifest:
        """The signed manifest as devices fetch it (compressed); the same bytes for every
        device, so each is compressed once."""
        with self._wire_lock:
            cached = self._wire.get(digest)
        if cached is None:
            cached = compress(self.signed_manifest(digest))
            with self._wire_lock:
                if len(self._wire) >= WIRE_CACHE:
                    self._wire.pop(next(iter(self._wire)))
                self._wire[digest] = cached
        return cached

    def _unknown_model(self, model: str) -> UnknownResource:
        known = ", ".join(m.name for m in self.metadata.list_models()[:20]) or "none yet"
        return UnknownResource(f"no model is named {model!r} (known: {known}); push it first")
