"""Artifact manifests: cut files into content-addressed chunks, sign, verify, check.

The cloud builds and signs manifests; the agent verifies them, and checks that they make
sense (sizes that add up, paths inside the artifact, an entrypoint among the files), before
a byte they name is downloaded, and verifies every byte before anything is served.
Torch-free: both sides import this.
"""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgefleet.core.errors import ManifestError
from edgefleet.core.golden import GoldenRef
from edgefleet.core.wire import from_proto
from protos.artifact.v1 import artifact_pb2

# 2: golden samples are files (GoldenRef), single-chunk files list no chunks. Schema 1
# (golden samples inside) is still read, so versions installed before keep serving.
MANIFEST_SCHEMA_VERSION = 2
OLDEST_SCHEMA_READ = 1
# 1 MiB: small enough that a resumed download loses little, large enough that a model of a
# few hundred MB is a few hundred chunks.
DEFAULT_CHUNK_SIZE = 1 << 20
# What a device accepts at most, whatever a manifest claims: one chunk, and one file.
MAX_CHUNK_BYTES = 64 << 20
MAX_FILE_BYTES = 64 << 30
MAX_FILES = 100_000
# The largest manifest a device expands from the wire; a compressed bomb stops here.
MAX_MANIFEST_BYTES = 64 << 20
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PATH_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class ChunkRef:
    sha256: str
    size: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_file_chunks(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(chunk_size):
            yield block


def describe_blocks(
    name: str, blocks: Iterable[bytes]
) -> tuple[artifact_pb2.ArtifactFile, list[tuple[ChunkRef, bytes]]]:
    """The manifest entry of a file made of `blocks`, and its chunks' bytes (to store by
    content). A single-chunk file lists no chunks: the file's own digest names its chunk."""
    whole = hashlib.sha256()
    entry = artifact_pb2.ArtifactFile(path=name)
    chunks: list[tuple[ChunkRef, bytes]] = []
    for block in blocks:
        whole.update(block)
        chunks.append((ChunkRef(sha256_hex(block), len(block)), block))
    entry.size = sum(ref.size for ref, _ in chunks)
    entry.sha256 = whole.hexdigest()
    if len(chunks) > 1:
        for ref, _ in chunks:
            entry.chunks.add(sha256=ref.sha256, size=ref.size)
    return entry, chunks


def file_chunks(entry: artifact_pb2.ArtifactFile) -> list[ChunkRef]:
    """The chunks whose bytes, in order, make the file."""
    if not entry.chunks:
        return [ChunkRef(entry.sha256, entry.size)] if entry.size else []
    return [ChunkRef(c.sha256, c.size) for c in entry.chunks]


def golden_refs(manifest: artifact_pb2.Manifest) -> tuple[GoldenRef, ...]:
    return tuple(from_proto(g, GoldenRef) for g in manifest.golden)


def manifest_bytes(manifest: artifact_pb2.Manifest) -> bytes:
    """Deterministic bytes: the digest and signature are taken over exactly these."""
    if not manifest.created_at:
        manifest.created_at = int(time.time())
    if not manifest.schema_version:
        manifest.schema_version = MANIFEST_SCHEMA_VERSION
    return manifest.SerializeToString(deterministic=True)


def key_id(public_key: bytes) -> str:
    return sha256_hex(public_key)[:16]


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_manifest(
    manifest: artifact_pb2.Manifest, key: Ed25519PrivateKey
) -> artifact_pb2.SignedManifest:
    body = manifest_bytes(manifest)
    return artifact_pb2.SignedManifest(
        manifest=body, signature=key.sign(body), key_id=key_id(public_key_bytes(key))
    )


def manifest_digest(signed: artifact_pb2.SignedManifest) -> str:
    return sha256_hex(signed.manifest)


def compress(signed: artifact_pb2.SignedManifest) -> artifact_pb2.SignedManifest:
    """The signed manifest as it travels to devices: its bytes zlib-compressed."""
    return artifact_pb2.SignedManifest(
        manifest_zlib=zlib.compress(signed.manifest, 9),
        signature=signed.signature,
        key_id=signed.key_id,
    )


def expand(
    signed: artifact_pb2.SignedManifest, max_bytes: int = MAX_MANIFEST_BYTES
) -> artifact_pb2.SignedManifest:
    """The signed manifest with plain bytes, from a compressed one; at most `max_bytes`."""
    if not signed.manifest_zlib:
        return signed
    if signed.manifest:
        raise ManifestError("a signed manifest carries both plain and compressed bytes")
    inflate = zlib.decompressobj()
    try:
        body = inflate.decompress(signed.manifest_zlib, max_bytes)
    except zlib.error as err:
        raise ManifestError(f"the compressed manifest does not inflate: {err}") from None
    if inflate.unconsumed_tail or not inflate.eof:
        raise ManifestError(
            f"the compressed manifest inflates past {max_bytes} bytes, or is cut short"
        )
    return artifact_pb2.SignedManifest(
        manifest=body, signature=signed.signature, key_id=signed.key_id
    )


def verify_manifest(
    signed: artifact_pb2.SignedManifest,
    trusted_keys: Iterable[bytes],
    expected_digest: str | None = None,
) -> artifact_pb2.Manifest:
    """The manifest, once its digest and its signature by a trusted key are checked."""
    signed = expand(signed)
    digest = manifest_digest(signed)
    if expected_digest is not None and digest != expected_digest:
        raise ManifestError(
            f"manifest digest {digest[:12]} does not match the expected {expected_digest[:12]}"
        )
    keys = {key_id(k): k for k in trusted_keys}
    raw = keys.get(signed.key_id)
    if raw is None:
        raise ManifestError(
            f"manifest is signed by unknown key {signed.key_id!r}; re-enroll the device to fetch current keys"
        )
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signed.signature, signed.manifest)
    except InvalidSignature:
        raise ManifestError(f"manifest {digest[:12]} has an invalid signature") from None
    manifest = artifact_pb2.Manifest()
    try:
        manifest.ParseFromString(signed.manifest)
    except Exception:  # DecodeError, or a nested message that does not parse
        raise ManifestError(f"manifest {digest[:12]} does not parse as a manifest") from None
    if not OLDEST_SCHEMA_READ <= manifest.schema_version <= MANIFEST_SCHEMA_VERSION:
        newer = manifest.schema_version > MANIFEST_SCHEMA_VERSION
        raise ManifestError(
            f"manifest schema {manifest.schema_version} is "
            + ("newer than this agent understands; upgrade the agent" if newer else "too old")
            + f" (this agent reads schemas {OLDEST_SCHEMA_READ} to {MANIFEST_SCHEMA_VERSION})"
        )
    check_manifest(manifest)
    return manifest


def check_manifest(manifest: artifact_pb2.Manifest) -> None:
    """A signed manifest must still make sense before a byte it names is downloaded: a valid
    model name and version, relative and unique paths, chunk sizes that add up to each
    file's size and stay within bounds, an entrypoint and golden files among its files."""
    label = f"manifest of {manifest.model[:64]!r} v{manifest.version}"
    if not NAME_PATTERN.match(manifest.model) or manifest.version < 1:
        raise ManifestError(f"{label} names no valid model and version")
    if len(manifest.files) > MAX_FILES:
        raise ManifestError(f"{label} lists {len(manifest.files)} files, over {MAX_FILES}")
    paths: set[str] = set()
    folded: set[str] = set()  # case-insensitive file systems see these as one name
    sizes: dict[str, int] = {}
    for entry in manifest.files:
        check_path(entry.path, label)
        if entry.path.casefold() in folded:
            raise ManifestError(f"{label} lists {entry.path!r} twice (letter case aside)")
        paths.add(entry.path)
        folded.add(entry.path.casefold())
        if not _SHA256.match(entry.sha256):
            raise ManifestError(f"{label}: {entry.path} has no valid sha256")
        if entry.size > MAX_FILE_BYTES:
            raise ManifestError(f"{label}: {entry.path} claims {entry.size} bytes")
        chunks = file_chunks(entry)
        for chunk in chunks:
            if not _SHA256.match(chunk.sha256) or not 0 < chunk.size <= MAX_CHUNK_BYTES:
                raise ManifestError(
                    f"{label}: {entry.path} names a chunk with an invalid digest or a size "
                    f"outside 1..{MAX_CHUNK_BYTES} bytes"
                )
        for chunk in chunks:
            if sizes.setdefault(chunk.sha256, chunk.size) != chunk.size:
                raise ManifestError(f"{label} gives chunk {chunk.sha256[:12]} two sizes")
        total = sum(c.size for c in chunks)
        if total != entry.size:
            raise ManifestError(
                f"{label}: the chunks of {entry.path} add up to {total} bytes, but the file "
                f"is {entry.size}"
            )
    for path in paths:
        parent = PurePosixPath(path).parent
        while str(parent) != ".":
            if str(parent).casefold() in folded:
                raise ManifestError(f"{label} uses {str(parent)!r} as a file and as a folder")
            parent = parent.parent
    if manifest.entrypoint not in paths:
        raise ManifestError(
            f"{label}: its entrypoint {manifest.entrypoint[:200]!r} is not one of its files"
        )
    for ref in manifest.golden:
        if ref.inputs not in paths or ref.outputs not in paths:
            raise ManifestError(f"{label}: a golden sample names a file it does not list")


def check_path(path: str, label: str = "manifest") -> PurePosixPath:
    """A file path of an artifact: relative, '/'-separated, no '..', plain characters."""
    rel = PurePosixPath(path)
    if (
        not path
        or len(path) > 1024
        or rel.is_absolute()
        or "\\" in path
        or any(not _PATH_PART.match(part) for part in rel.parts)
        or str(rel) != path
    ):
        raise ManifestError(
            f"{label} names file {path[:200]!r}, which is not a relative path inside the artifact"
        )
    return rel


def all_chunks(manifest: artifact_pb2.Manifest) -> list[ChunkRef]:
    """Every distinct chunk the manifest names, in file order."""
    seen: dict[str, ChunkRef] = {}
    for f in manifest.files:
        for chunk in file_chunks(f):
            seen.setdefault(chunk.sha256, chunk)
    return list(seen.values())
