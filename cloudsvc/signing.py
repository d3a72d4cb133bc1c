"""The cloud's root keys (Ed25519): the current one signs manifests and desired states; a
rotation makes a new one and publishes it signed by the one it replaces and by itself.

On disk (data_dir/keys, 0700): root-<n>.key (0600, PEM) for every version, and
rotation-<n>.pb for every version after the first. Losing the folder locks every device
out (they trust these keys and nothing else): back it up.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from cloudsvc.errors import CloudError
from edgefleet.core.certs import write_secret
from edgefleet.core.fleet import DesiredState
from edgefleet.core.manifests import public_key_bytes
from edgefleet.core.trust import (
    KeyRotation,
    RootKey,
    SignedDesiredState,
    TrustChain,
    rotation,
    sign_desired,
)
from edgefleet.core.wire import from_proto, to_proto
from protos.fleet.v1 import fleet_pb2

_KEY_FILE = re.compile(r"^root-(\d+)\.key$")
# What the first versions of the cloud called its one key; adopted as root key v1.
_LEGACY_KEY = "manifest-signing.key"


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (0600), atomically."""
    write_secret(path, data)


def _load(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise CloudError(
            f"cannot read the root key {path}: {err}; restore it from a backup (a new key "
            "means every device must be provisioned again)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CloudError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


class RootKeys:
    """Every root key version this cloud had, and the rotations between them."""

    def __init__(
        self,
        keys: list[Ed25519PrivateKey],
        rotations: list[KeyRotation] | None = None,
        folder: Path | None = None,
    ) -> None:
        if not keys:
            raise CloudError("a cloud needs at least one root key")
        self._keys = list(keys)
        self._rotations = list(rotations or [])
        self._folder = folder
        self._lock = threading.Lock()
        self._signer = self._describe()

    def _describe(self) -> tuple[Ed25519PrivateKey, RootKey, str]:
        # Derived once per key: every desired state of every deploy is signed with it.
        current = RootKey(len(self._keys), public_key_bytes(self._keys[-1]))
        return self._keys[-1], current, current.key_id

    @classmethod
    def generate(cls) -> RootKeys:
        """One new key, kept in memory only (tests)."""
        return cls([Ed25519PrivateKey.generate()])

    @classmethod
    def load_or_create(cls, folder: Path) -> RootKeys:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        legacy = folder / _LEGACY_KEY
        if legacy.exists() and not (folder / "root-1.key").exists():
            legacy.rename(folder / "root-1.key")
        versions = sorted(
            int(m.group(1)) for p in folder.iterdir() if (m := _KEY_FILE.match(p.name))
        )
        if not versions:
            key = Ed25519PrivateKey.generate()
            write_secret(folder / "root-1.key", _pem(key))
            return cls([key], folder=folder)
        if versions != list(range(1, len(versions) + 1)):
            raise CloudError(f"root keys in {folder} are not numbered 1..n: {versions}")
        last = versions[-1]
        if last > 1 and not (folder / f"rotation-{last}.pb").exists():
            # A rotation cut off before it was published: its key was never used.
            (folder / f"root-{last}.key").unlink()
            versions.pop()
        keys = [_load(folder / f"root-{v}.key") for v in versions]
        rotations = []
        for v in versions[1:]:
            statement = fleet_pb2.KeyRotation()
            statement.ParseFromString((folder / f"rotation-{v}.pb").read_bytes())
            rotations.append(from_proto(statement, KeyRotation))
        return cls(keys, rotations, folder)

    @property
    def key(self) -> Ed25519PrivateKey:
        """The current key: what signs from now on."""
        return self._keys[-1]

    @property
    def current(self) -> RootKey:
        return self._signer[1]

    @property
    def first(self) -> RootKey:
        return RootKey(1, public_key_bytes(self._keys[0]))

    @property
    def key_id(self) -> str:
        return self._signer[2]

    @property
    def public_keys(self) -> list[bytes]:
        """Every version's public key (a manifest signed by any of them still verifies)."""
        return [public_key_bytes(k) for k in self._keys]

    def chain(self) -> TrustChain:
        return TrustChain(self.first, tuple(self._rotations))

    def rotate(self) -> RootKey:
        """Make the next key, publish it signed by the current one and by itself, and sign
        with it from now on."""
        with self._lock:
            new = Ed25519PrivateKey.generate()
            version = len(self._keys) + 1
            statement = rotation(self.key, new, version)
            if self._folder is not None:
                # The key first: a crash between the two leaves an unused key, never a
                # published rotation whose key is lost.
                write_secret(self._folder / f"root-{version}.key", _pem(new))
                write_secret(
                    self._folder / f"rotation-{version}.pb",
                    to_proto(statement, fleet_pb2.KeyRotation).SerializeToString(
                        deterministic=True
                    ),
                )
            self._keys.append(new)
            self._rotations.append(statement)
            self._signer = self._describe()
            return self.current

    def sign_desired(self, state: DesiredState) -> SignedDesiredState:
        key, _, signer_id = self._signer  # one tuple: a rotation swaps all three at once
        return sign_desired(state, key, signer_id)
