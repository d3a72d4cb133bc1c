"""Artifact manifests: cut files into content-addressed chunks, sign, verify.

The cloud builds and signs manifests; the agent verifies them and every byte they name
before anything is served. Torch-free: both sides import this.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgefleet.core.errors import EdgefleetError, ErrorCode
from protos.artifact.v1 import artifact_pb2

MANIFEST_SCHEMA_VERSION = 1
# 1 MiB: small enough that a resumed download loses little, large enough that a model of a
# few hundred MB is a few hundred chunks.
DEFAULT_CHUNK_SIZE = 1 << 20


class ManifestError(EdgefleetError):
    code = ErrorCode.FAILED_PRECONDITION


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


def describe_file(
    path: Path, name: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[artifact_pb2.ArtifactFile, list[tuple[ChunkRef, bytes]]]:
    """The manifest entry of one file and its chunks' bytes (to store content-addressed)."""
    whole = hashlib.sha256()
    entry = artifact_pb2.ArtifactFile(path=name)
    chunks: list[tuple[ChunkRef, bytes]] = []
    for block in iter_file_chunks(path, chunk_size):
        whole.update(block)
        ref = ChunkRef(sha256_hex(block), len(block))
        entry.chunks.add(sha256=ref.sha256, size=ref.size)
        chunks.append((ref, block))
    entry.size = sum(c.size for c in entry.chunks)
    entry.sha256 = whole.hexdigest()
    return entry, chunks


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


def verify_manifest(
    signed: artifact_pb2.SignedManifest,
    trusted_keys: Iterable[bytes],
    expected_digest: str | None = None,
) -> artifact_pb2.Manifest:
    """The manifest, once its digest and its signature by a trusted key are checked."""
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
    manifest.ParseFromString(signed.manifest)
    if manifest.schema_version > MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"manifest schema {manifest.schema_version} is newer than this agent understands "
            f"({MANIFEST_SCHEMA_VERSION}); upgrade the agent"
        )
    return manifest


def all_chunks(manifest: artifact_pb2.Manifest) -> list[ChunkRef]:
    """Every distinct chunk the manifest names, in file order."""
    seen: dict[str, ChunkRef] = {}
    for f in manifest.files:
        for c in f.chunks:
            seen.setdefault(c.sha256, ChunkRef(c.sha256, c.size))
    return list(seen.values())


def artifact_size(manifest: artifact_pb2.Manifest) -> int:
    return sum(c.size for c in all_chunks(manifest))
