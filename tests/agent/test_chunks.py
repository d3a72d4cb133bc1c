from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.artifacts import ArtifactStore, verify_files
from agent.chunks import ChunkStore
from agent.errors import ArtifactRejected, ChunkCorrupt, ChunkIncomplete, DiskFull
from edgefleet.core.manifests import ChunkRef
from tests.agent.fakes import build_artifact


def source_of(data: bytes, calls: list[int], piece: int = 100) -> object:
    def fetch(sha256: str, offset: int) -> Iterator[bytes]:
        calls.append(offset)
        for start in range(offset, len(data), piece):
            yield data[start : start + piece]

    return fetch


def ref_of(data: bytes) -> ChunkRef:
    return ChunkRef(hashlib.sha256(data).hexdigest(), len(data))


def test_fetch_resumes_from_the_part_file(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    data = bytes(range(256)) * 4
    ref = ref_of(data)
    store.part_path(ref.sha256).write_bytes(data[:300])
    calls: list[int] = []
    path = store.fetch(ref, source_of(data, calls))  # type: ignore[arg-type]
    assert calls == [300]
    assert path.read_bytes() == data
    assert not store.part_path(ref.sha256).exists()
    assert (store.stats.bytes_fetched, store.stats.bytes_resumed) == (len(data) - 300, 300)


def test_corrupt_chunk_is_rejected_and_deleted(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    data = b"a" * 500
    ref = ref_of(data)
    with pytest.raises(ChunkCorrupt, match="sha256"):
        store.fetch(ref, source_of(b"b" * 500, []))  # type: ignore[arg-type]
    assert not store.has(ref.sha256)
    assert not store.part_path(ref.sha256).exists()


def test_oversized_stream_is_rejected(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    ref = ref_of(b"x" * 100)
    with pytest.raises(ChunkCorrupt, match="expected 100"):
        store.fetch(ref, source_of(b"x" * 400, []))  # type: ignore[arg-type]
    assert not store.part_path(ref.sha256).exists()


def test_short_stream_keeps_the_part_for_resume(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    data = b"y" * 1000
    ref = ref_of(data)
    with pytest.raises(ChunkIncomplete, match="resumes"):
        store.fetch(ref, source_of(data[:400], []))  # type: ignore[arg-type]
    assert store.part_path(ref.sha256).stat().st_size == 400
    calls: list[int] = []
    store.fetch(ref, source_of(data, calls))  # type: ignore[arg-type]
    assert calls == [400] and store.has(ref.sha256)


def test_chunk_names_must_be_sha256(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    with pytest.raises(ArtifactRejected, match="sha256"):
        store.path("../../etc/passwd")


def _filled(tmp_path: Path, version: int = 1) -> tuple[ArtifactStore, object]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    art = build_artifact(tmp_path, Ed25519PrivateKey.generate(), "m", version)
    chunks = ChunkStore(tmp_path / "data" / "chunks")
    for sha, data in art.chunks.items():
        chunks.path(sha).write_bytes(data)
    return ArtifactStore(tmp_path / "data", chunks), art


def test_assemble_and_verify(tmp_path: Path) -> None:
    store, art = _filled(tmp_path)
    folder = store.assemble("m", art.digest, art.manifest)  # type: ignore[attr-defined]
    assert folder.name == art.digest  # type: ignore[attr-defined]
    assert not folder.with_name(folder.name + ".staging").exists()
    assert store.chunks.missing(art.manifest) == []  # type: ignore[attr-defined]
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactRejected, match="sha256"):
        verify_files(folder, art.manifest)  # type: ignore[attr-defined]


def test_assemble_refuses_a_missing_chunk(tmp_path: Path) -> None:
    store, art = _filled(tmp_path)
    first = next(iter(art.chunks))  # type: ignore[attr-defined]
    store.chunks.path(first).unlink()
    with pytest.raises(ArtifactRejected, match="not downloaded"):
        store.assemble("m", art.digest, art.manifest)  # type: ignore[attr-defined]


def test_gc_keeps_only_referenced_versions_and_chunks(tmp_path: Path) -> None:
    store, art = _filled(tmp_path)
    store.assemble("m", art.digest, art.manifest)  # type: ignore[attr-defined]
    stray = store.chunks.root / ("f" * 64)
    stray.write_bytes(b"stray")
    old = store.models_dir / "m" / ("0" * 64)
    old.mkdir()
    freed = store.gc({"m": {art.digest}}, [art.manifest])  # type: ignore[attr-defined]
    assert freed >= 5
    assert not stray.exists() and not old.exists()
    assert store.installed("m", art.digest)  # type: ignore[attr-defined]
    assert store.chunks.missing(art.manifest) == []  # type: ignore[attr-defined]


def test_preflight_fails_with_numbers_when_the_disk_is_short(tmp_path: Path) -> None:
    store, art = _filled(tmp_path)
    with pytest.raises(DiskFull, match=r"needs \d+ bytes .* only \d+ are free"):
        store.preflight(art.manifest, reserve=1 << 62)  # type: ignore[attr-defined]
    assert store.preflight(art.manifest, reserve=0).needed > 0  # type: ignore[attr-defined]
