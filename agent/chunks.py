"""Content-addressed chunk store: `data_dir/chunks/<sha256>`.

A download in progress lives in `<sha256>.part` and resumes from that file's size. A chunk
enters the store only after its sha256 matched and its bytes were fsynced, through one
rename, so a chunk file that exists is always whole and correct (even after a kill).
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ArtifactRejected, ChunkCorrupt, ChunkIncomplete, DiskFull
from agent.ratelimit import RateLimiter
from edgefleet.core.manifests import ChunkRef, all_chunks
from protos.artifact.v1 import artifact_pb2

# Read in this size when hashing files already on disk.
_READ_BLOCK = 1 << 20

# Yields a chunk's bytes from the given offset on; the cloud link provides it.
PieceSource = Callable[[str, int], Iterator[bytes]]


@dataclass
class TransferStats:
    """What downloads cost: bytes over the wire versus bytes already held."""

    bytes_fetched: int = 0
    bytes_skipped: int = 0
    bytes_resumed: int = 0
    chunks_fetched: int = 0
    chunks_skipped: int = 0
    manifest_bytes: int = 0  # signed manifests as they travelled (compressed)


def disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class ChunkStore:
    def __init__(self, root: Path, rate_limit: RateLimiter | None = None) -> None:
        self.root = root
        self.rate_limit = rate_limit or RateLimiter(0)
        root.mkdir(parents=True, exist_ok=True)
        self.stats = TransferStats()
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ArtifactRejected(f"chunk name {sha256!r} is not a lowercase sha256 hex digest")
        return self.root / sha256

    def part_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.part"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def missing(self, manifest: artifact_pb2.Manifest) -> list[ChunkRef]:
        """The manifest's chunks this store does not hold yet, in file order."""
        return [c for c in all_chunks(manifest) if not self.has(c.sha256)]

    def partial_bytes(self, refs: Iterable[ChunkRef]) -> int:
        """Bytes of these chunks already downloaded into .part files."""
        total = 0
        for ref in refs:
            part = self.part_path(ref.sha256)
            if part.is_file():
                total += min(part.stat().st_size, ref.size)
        return total

    def count_manifest(self, size: int) -> None:
        with self._lock:
            self.stats.manifest_bytes += size

    def count_skipped(self, refs: Iterable[ChunkRef]) -> None:
        with self._lock:
            for ref in refs:
                self.stats.bytes_skipped += ref.size
                self.stats.chunks_skipped += 1

    def fetch(self, ref: ChunkRef, source: PieceSource) -> Path:
        """Download one chunk, resuming its .part file; verify; move into place.

        A wrong digest or size deletes the part file, so the next try starts clean.
        """
        final = self.path(ref.sha256)
        if final.is_file():
            return final
        part = self.part_path(ref.sha256)
        offset = part.stat().st_size if part.is_file() else 0
        if offset > ref.size:  # cannot be a prefix of this chunk
            part.unlink()
            offset = 0
        if offset:
            with self._lock:
                self.stats.bytes_resumed += offset
        if offset < ref.size:
            try:
                with part.open("ab") as out:
                    for data in source(ref.sha256, offset):
                        self.rate_limit.acquire(len(data))
                        out.write(data)
                        offset += len(data)
                        with self._lock:
                            self.stats.bytes_fetched += len(data)
                        if offset > ref.size:
                            break
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as err:
                if not disk_full(err):
                    raise
                # Nothing half-written stays behind on a full disk: the space is needed more.
                part.unlink(missing_ok=True)
                raise DiskFull(
                    f"the disk filled up while downloading chunk {ref.sha256[:12]} ({offset} of "
                    f"{ref.size} bytes); the partial download was deleted and what runs keeps "
                    f"running: free space under {self.root.parent} and it is fetched again"
                ) from None
        size = part.stat().st_size
        if size != ref.size:
            if size > ref.size:
                part.unlink()
                raise ChunkCorrupt(
                    f"chunk {ref.sha256[:12]} came with {size} bytes, expected {ref.size}; "
                    "the part file was deleted and will be fetched again"
                )
            raise ChunkIncomplete(
                f"chunk {ref.sha256[:12]} stream ended at {size} of {ref.size} bytes; "
                "the download resumes from there on the next try"
            )
        actual = file_sha256(part)
        if actual != ref.sha256:
            part.unlink()
            raise ChunkCorrupt(
                f"chunk {ref.sha256[:12]} has sha256 {actual[:12]} after download; the corrupt "
                "bytes were deleted and will be fetched again"
            )
        os.replace(part, final)
        fsync_dir(self.root)
        with self._lock:
            self.stats.chunks_fetched += 1
        return final

    def drop_corrupt(self, refs: Iterable[ChunkRef]) -> list[str]:
        """Re-hash held chunks and delete those whose bytes no longer match their name."""
        dropped = []
        for ref in refs:
            path = self.path(ref.sha256)
            if path.is_file() and file_sha256(path) != ref.sha256:
                path.unlink()
                dropped.append(ref.sha256)
        return dropped

    def clean_orphans(self, keep: set[str]) -> int:
        """Delete chunks (and parts) not in `keep`; returns bytes freed."""
        freed = 0
        for entry in self.root.iterdir():
            # Parts of chunks still needed stay, so an interrupted download resumes.
            if entry.name.removesuffix(".part") in keep:
                continue
            freed += entry.stat().st_size
            entry.unlink()
        return freed
