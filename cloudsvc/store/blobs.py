"""Content-addressed bytes: artifact chunks and signed manifests, named by their sha256.

``FolderBlobStore`` is the embedded default; an S3 store implements the same interface.
Every implementation passes tests/cloudsvc/test_blob_store.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from cloudsvc.errors import BlobCorrupt, InvalidRequest, UnknownResource

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_digest(sha256: str) -> str:
    """The digest, if it is 64 lowercase hex characters; InvalidRequest otherwise."""
    if not _SHA256.match(sha256):
        raise InvalidRequest(
            f"{sha256[:80]!r} is not a sha256 digest; expected 64 lowercase hex characters"
        )
    return sha256


class BlobStore(ABC):
    @abstractmethod
    def put(self, sha256: str, data: bytes) -> bool:
        """Store bytes under their digest, checked first; True if they were new."""

    @abstractmethod
    def has(self, sha256: str) -> bool: ...

    @abstractmethod
    def size(self, sha256: str) -> int:
        """Byte size; UnknownResource when absent."""

    @abstractmethod
    def open(self, sha256: str) -> BinaryIO:
        """A readable, seekable stream of the blob; UnknownResource when absent."""

    def read(self, sha256: str, offset: int = 0, length: int = -1) -> bytes:
        """`length` bytes from `offset` (all the rest when length < 0); fewer at the end."""
        if offset < 0:
            raise InvalidRequest(f"offset {offset} is negative")
        with self.open(sha256) as f:
            f.seek(offset)
            return f.read(length) if length >= 0 else f.read()

    def get(self, sha256: str) -> bytes:
        return self.read(sha256)

    @staticmethod
    def _verify(sha256: str, data: bytes) -> None:
        check_digest(sha256)
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise InvalidRequest(
                f"bytes hash to {actual[:12]}…, not the {sha256[:12]}… they were stored under"
            )


class MemoryBlobStore(BlobStore):
    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, sha256: str, data: bytes) -> bool:
        self._verify(sha256, data)
        with self._lock:
            new = sha256 not in self._blobs
            self._blobs[sha256] = bytes(data)
            return new

    def has(self, sha256: str) -> bool:
        return sha256 in self._blobs

    def _bytes(self, sha256: str) -> bytes:
        try:
            return self._blobs[sha256]
        except KeyError:
            raise UnknownResource(f"no blob {sha256[:12]}… is stored") from None

    def size(self, sha256: str) -> int:
        return len(self._bytes(sha256))

    def open(self, sha256: str) -> BinaryIO:
        return io.BytesIO(self._bytes(sha256))


def remove_leftovers(paths: Iterable[Path]) -> int:
    """Delete the files and folders given; the bytes freed."""
    freed = 0
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            freed += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            freed += path.lstat().st_size
            path.unlink(missing_ok=True)
    return freed


class FolderBlobStore(BlobStore):
    """Blobs as files `root/ab/cdef…`; written to a temp file, fsynced, then renamed, so a
    crash never leaves half a blob under a final name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        check_digest(sha256)
        return self.root / sha256[:2] / sha256[2:]

    def put(self, sha256: str, data: bytes) -> bool:
        self._verify(sha256, data)
        final = self.path(sha256)
        if final.exists():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def clean_incoming(self) -> int:
        """Delete half-written blobs a killed process left (`.incoming-*`); bytes freed.
        Only at start, before any writer runs."""
        return remove_leftovers(self.root.glob("*/.incoming-*"))

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise UnknownResource(f"no blob {sha256[:12]}… is stored") from None

    def open(self, sha256: str) -> BinaryIO:
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise UnknownResource(f"no blob {sha256[:12]}… is stored") from None

    def verify(self, sha256: str) -> None:
        """Re-hash a stored blob; BlobCorrupt when the disk no longer holds those bytes."""
        digest = hashlib.sha256()
        with self.open(sha256) as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != sha256:
            raise BlobCorrupt(f"blob {self.path(sha256)} is corrupt; delete it and push again")
