"""The cloud's Ed25519 manifest-signing key: made on first start, loaded afterwards."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from cloudsvc.errors import CloudError
from edgefleet.core.manifests import key_id, public_key_bytes


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as err:
            raise CloudError(
                f"cannot read the manifest signing key {path}: {err}; restore it from a backup "
                "(a new key means every device must re-enroll)"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise CloudError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    write_private(path, pem)
    return key


class ManifestSigner:
    """The signing key plus what devices need to trust it."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.public_key = public_key_bytes(key)
        self.key_id = key_id(self.public_key)

    @classmethod
    def from_file(cls, path: Path) -> ManifestSigner:
        return cls(load_or_create_signing_key(path))

    @property
    def trusted_public_keys(self) -> list[bytes]:
        return [self.public_key]
