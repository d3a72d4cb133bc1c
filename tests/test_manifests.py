"""Signed manifests as devices fetch them: compressed on the wire, verified over the plain
bytes, and bounded when inflated."""

from __future__ import annotations

import zlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.core.errors import ManifestError
from edgefleet.core.manifests import (
    compress,
    expand,
    manifest_digest,
    public_key_bytes,
    sign_manifest,
    verify_manifest,
)
from protos.artifact.v1 import artifact_pb2


def _signed(key: Ed25519PrivateKey) -> artifact_pb2.SignedManifest:
    manifest = artifact_pb2.Manifest(model="m", version=1, entrypoint="model.onnx")
    manifest.files.add(path="model.onnx", size=3, sha256="ab" * 32)
    return sign_manifest(manifest, key)


def test_compressed_manifests_verify_over_their_plain_bytes() -> None:
    key = Ed25519PrivateKey.generate()
    signed = _signed(key)
    wire = compress(signed)
    assert not wire.manifest and wire.manifest_zlib
    assert expand(wire) == signed
    manifest = verify_manifest(wire, [public_key_bytes(key)], manifest_digest(signed))
    assert manifest.model == "m"


def test_a_decompression_bomb_or_garbage_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    signed = _signed(key)
    bomb = artifact_pb2.SignedManifest(
        manifest_zlib=zlib.compress(b"\0" * (80 << 20)), signature=signed.signature
    )
    assert len(bomb.manifest_zlib) < 100_000
    with pytest.raises(ManifestError, match="inflates past"):
        expand(bomb)
    with pytest.raises(ManifestError, match="does not inflate"):
        expand(artifact_pb2.SignedManifest(manifest_zlib=b"not zlib at all"))
    both = artifact_pb2.SignedManifest(manifest=b"x", manifest_zlib=zlib.compress(b"x"))
    with pytest.raises(ManifestError, match="both"):
        expand(both)
    cut = artifact_pb2.SignedManifest(manifest_zlib=zlib.compress(signed.manifest)[:-6])
    with pytest.raises(ManifestError):
        expand(cut)
