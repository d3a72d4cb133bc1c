"""One suite, run against every BlobStore implementation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cloudsvc.errors import InvalidRequest, UnknownResource
from cloudsvc.store.blobs import BlobStore, FolderBlobStore, MemoryBlobStore

DATA = bytes(range(256)) * 40
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(params=["memory", "folder"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    return MemoryBlobStore() if request.param == "memory" else FolderBlobStore(tmp_path / "blobs")


def test_put_then_read_whole_and_ranges(blobs: BlobStore) -> None:
    assert not blobs.has(SHA)
    assert blobs.put(SHA, DATA) is True
    assert blobs.put(SHA, DATA) is False  # content-addressed: stored once
    assert blobs.has(SHA) and blobs.size(SHA) == len(DATA)
    assert blobs.get(SHA) == DATA
    assert blobs.read(SHA, 100, 50) == DATA[100:150]
    assert blobs.read(SHA, len(DATA) - 10, 100) == DATA[-10:]
    assert blobs.read(SHA, len(DATA)) == b""
    with blobs.open(SHA) as f:
        f.seek(1000)
        assert f.read(3) == DATA[1000:1003]


def test_put_refuses_bytes_that_do_not_match_their_name(blobs: BlobStore) -> None:
    with pytest.raises(InvalidRequest, match="hash to"):
        blobs.put(SHA, DATA + b"x")
    assert not blobs.has(SHA)
    with pytest.raises(InvalidRequest, match="not a sha256"):
        blobs.put("../../etc/passwd", DATA)


def test_missing_blob_is_unknown(blobs: BlobStore) -> None:
    missing = "0" * 64
    with pytest.raises(UnknownResource):
        blobs.size(missing)
    with pytest.raises(UnknownResource):
        blobs.read(missing)


def test_empty_blob(blobs: BlobStore) -> None:
    empty = hashlib.sha256(b"").hexdigest()
    blobs.put(empty, b"")
    assert blobs.size(empty) == 0 and blobs.get(empty) == b""


def test_folder_layout_leaves_no_temp_files(tmp_path: Path) -> None:
    store = FolderBlobStore(tmp_path / "blobs")
    store.put(SHA, DATA)
    files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert files == [tmp_path / "blobs" / SHA[:2] / SHA[2:]]
    store.verify(SHA)
