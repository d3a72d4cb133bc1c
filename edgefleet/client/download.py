"""Download a verified artifact: the files of one model version for one target, as a device
would assemble them, plus its signed manifest, into a folder, for users who serve the model
elsewhere.

Every chunk and every file is checked against the manifest's sha256, and the manifest's
signature against the cloud's root keys: followed from a pinned fingerprint (`root_key`, as
published in the cloud's DATA_DIR/trust/root-key.txt) when one is given, otherwise taken
from the cloud as it answers (then only the hashes bind the files to what the cloud serves).
Nothing lands in the folder until everything is checked: the files are written to a
temporary folder beside it, which is renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgefleet.core.errors import AlreadyExists, InvalidArgument, ManifestError
from edgefleet.core.manifests import ChunkRef, all_chunks, file_chunks, verify_manifest
from edgefleet.core.trust import TrustChain, follow_chain, parse_fingerprint
from protos.admin.v1 import admin_pb2
from protos.artifact.v1 import artifact_pb2

# The signed manifest as the cloud signed it (a serialized SignedManifest, plain bytes).
MANIFEST_FILE = "manifest.pb"
# Chunks asked for in one FetchChunks call (the cloud takes at most 1024).
CHUNKS_PER_CALL = 256

FetchChunks = Callable[[str, list[str]], Iterable[admin_pb2.ChunkBytes]]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ArtifactDownload:
    """What `download` wrote and how it was checked."""

    model: str
    version: int
    target: str
    digest: str
    folder: str
    files: int
    bytes: int
    # The root key that signed the manifest, and whether it was pinned by the caller
    # (`root_key`) or only taken from the cloud's answer.
    key_fingerprint: str
    signature_pinned: bool


def check_destination(folder: Path, force: bool) -> None:
    """Refuse a destination that is a file, or a non-empty folder unless `force`."""
    if folder.exists() and not folder.is_dir():
        raise InvalidArgument(f"{folder} is a file; name a folder to download into")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise AlreadyExists(
            f"{folder} is not empty; pick an empty folder, or pass --force to replace it"
        )


def trusted_keys(chain: TrustChain, root_key: str | None) -> tuple[list[bytes], str, bool]:
    """The public keys to check the signature with, the newest key's fingerprint, and
    whether they are followed from a pinned fingerprint."""
    if root_key:
        keys = follow_chain(chain, parse_fingerprint(root_key))
        return [k.public_key for k in keys], keys[-1].fingerprint, True
    keys = follow_chain(chain, chain.first)
    return [k.public_key for k in keys], keys[-1].fingerprint, False


def verified_manifest(
    signed: artifact_pb2.SignedManifest,
    keys: list[bytes],
    *,
    model: str,
    version: int,
    target: str,
) -> artifact_pb2.Manifest:
    """The manifest, once its signature is checked and it is the one asked for."""
    manifest = verify_manifest(signed, keys)
    if (manifest.model, manifest.version) != (model, version) or (
        target and manifest.target != target
    ):
        raise ManifestError(
            f"the cloud answered with the manifest of {manifest.model} v{manifest.version} "
            f"({manifest.target}), not {model} v{version}; refused"
        )
    if any(f.path == MANIFEST_FILE for f in manifest.files):
        raise ManifestError(f"the artifact has a file named {MANIFEST_FILE}; it is not written")
    return manifest


def _fetch_verified(
    fetch: FetchChunks,
    digest: str,
    chunks: list[ChunkRef],
    into: Path,
    progress: Progress | None,
    total: int,
) -> None:
    """Each chunk's bytes, checked against its sha256 and size, into `into/<sha256>`."""
    done = 0
    for start in range(0, len(chunks), CHUNKS_PER_CALL):
        batch = chunks[start : start + CHUNKS_PER_CALL]
        pending: Iterator[ChunkRef] = iter(batch)
        current: ChunkRef | None = None
        written = 0
        hasher = hashlib.sha256()
        out = None
        try:
            for piece in fetch(digest, [c.sha256 for c in batch]):
                if current is None:
                    current = next(pending, None)
                    if current is None:
                        raise ManifestError("the cloud sent more chunks than were asked for")
                    written, hasher = 0, hashlib.sha256()
                    out = (into / current.sha256).open("wb")
                if (
                    piece.sha256 != current.sha256
                    or piece.offset != written
                    or piece.total_size != current.size
                ):
                    raise ManifestError(
                        f"the cloud sent chunk {piece.sha256[:12]} at byte {piece.offset} "
                        f"where chunk {current.sha256[:12]} byte {written} was due"
                    )
                written += len(piece.data)
                if written > current.size:
                    raise ManifestError(f"chunk {current.sha256[:12]} is longer than listed")
                hasher.update(piece.data)
                assert out is not None
                out.write(piece.data)
                done += len(piece.data)
                if progress:
                    progress(done, total)
                if written == current.size:
                    out.close()
                    out = None
                    if hasher.hexdigest() != current.sha256:
                        raise ManifestError(
                            f"chunk {current.sha256[:12]} does not match its sha256 (the "
                            "cloud's copy is corrupt or was altered); nothing was written"
                        )
                    current = None
        finally:
            if out is not None:
                out.close()
        if current is not None or next(pending, None) is not None:
            raise ManifestError("the cloud's chunk stream ended early; nothing was written")


def _assemble(manifest: artifact_pb2.Manifest, chunks: Path, folder: Path) -> int:
    """The manifest's files from the fetched chunks, each checked whole; their bytes."""
    size = 0
    for entry in manifest.files:
        target = folder / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        whole = hashlib.sha256()
        with target.open("wb") as out:
            for chunk in file_chunks(entry):
                data = (chunks / chunk.sha256).read_bytes()
                whole.update(data)
                out.write(data)
        if whole.hexdigest() != entry.sha256:
            raise ManifestError(
                f"{entry.path} does not match the manifest's sha256; nothing was written"
            )
        size += entry.size
    return size


def download(
    signed: artifact_pb2.SignedManifest,
    chain: TrustChain,
    fetch: FetchChunks,
    folder: str | Path,
    *,
    model: str,
    version: int,
    target: str = "",
    root_key: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ArtifactDownload:
    """Verify `signed`, fetch and check its chunks, and put the files and the signed
    manifest in `folder`, all or nothing."""
    dest = Path(folder)
    check_destination(dest, force)
    keys, key_fp, pinned = trusted_keys(chain, root_key)
    manifest = verified_manifest(signed, keys, model=model, version=version, target=target)
    digest = hashlib.sha256(signed.manifest).hexdigest()
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.download-", dir=dest.parent))
    try:
        staged, chunk_dir = work / "artifact", work / "chunks"
        staged.mkdir()
        chunk_dir.mkdir()
        chunks = all_chunks(manifest)
        total = sum(c.size for c in chunks)
        _fetch_verified(fetch, digest, chunks, chunk_dir, progress, total)
        size = _assemble(manifest, chunk_dir, staged)
        (staged / MANIFEST_FILE).write_bytes(
            artifact_pb2.SignedManifest(
                manifest=signed.manifest, signature=signed.signature, key_id=signed.key_id
            ).SerializeToString()
        )
        check_destination(dest, force)  # again: it may have changed while we fetched
        if dest.is_dir():
            old = work / "replaced"
            os.replace(dest, old)
        os.replace(staged, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ArtifactDownload(
        model=manifest.model,
        version=manifest.version,
        target=manifest.target,
        digest=digest,
        folder=str(dest),
        files=len(manifest.files),
        bytes=size,
        key_fingerprint=key_fp,
        signature_pinned=pinned,
    )
