"""The root of trust between the cloud and its devices (torch-free; both sides import it).

The cloud holds a root key (Ed25519) that signs manifests and desired states. A device is
provisioned out of band with the fingerprint of one root key; it accepts that key from the
cloud only when the fingerprint matches, and a later key only through the chain of
rotations: each new key signed by the key it replaces and by itself (TUF's root rotation).
Nothing else, an enrollment answer included, ever changes what a device trusts.

A desired state is signed for one device with an issued-at and an expires-at: a device
refuses a signature it cannot verify, a state for another device, an expired state (a
freeze), and a generation lower than one it accepted (a rollback); `accept_desired` says
which, and the device keeps serving what it has.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.core.errors import FailedPrecondition, InvalidArgument
from edgefleet.core.fleet import DesiredState
from edgefleet.core.manifests import key_id, public_key_bytes, sha256_hex
from edgefleet.core.wire import from_proto, to_proto
from protos.fleet.v1 import fleet_pb2

_FINGERPRINT = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
# How far a device's clock may be behind the cloud's before a fresh state looks expired.
DEFAULT_CLOCK_SKEW_S = 300.0


class TrustError(FailedPrecondition):
    """A signature, chain or desired state that the device does not accept."""


@dataclass(frozen=True)
class RootKey:
    version: int
    public_key: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


@dataclass(frozen=True)
class KeyRotation:
    """`new_key` (a serialized RootKey) signed by the key it replaces and by itself."""

    new_key: bytes
    previous_signature: bytes
    new_signature: bytes


@dataclass(frozen=True)
class TrustChain:
    first: RootKey
    rotations: tuple[KeyRotation, ...] = ()


@dataclass(frozen=True)
class SignedDesiredState:
    """A desired state's exact bytes and the root key's signature over them."""

    state: bytes
    signature: bytes
    key_id: str


def fingerprint(public_key: bytes) -> str:
    """How a root key is named out of band: sha256 of its raw public bytes."""
    return "sha256:" + sha256_hex(public_key)


def parse_fingerprint(text: str) -> str:
    """A fingerprint as given ("sha256:…" or 64 hex characters), in canonical form."""
    found = _FINGERPRINT.match(text.strip().lower())
    if found is None:
        raise InvalidArgument(
            f"{text[:80]!r} is not a root key fingerprint: write sha256: and 64 hex "
            "characters, as `edgefleet cloud serve` prints it (data_dir/trust/root-key.txt)"
        )
    return "sha256:" + found.group(1)


def _verify(public_key: bytes, signature: bytes, body: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, body)
    except (InvalidSignature, ValueError):
        return False
    return True


# cloud side ---------------------------------------------------------------------------


def rotation(previous: Ed25519PrivateKey, new: Ed25519PrivateKey, version: int) -> KeyRotation:
    """The statement that moves trust from `previous` to `new` (root key `version`)."""
    body = to_proto(RootKey(version, public_key_bytes(new)), fleet_pb2.RootKey)
    data = body.SerializeToString(deterministic=True)
    return KeyRotation(data, previous.sign(data), new.sign(data))


def sign_desired(
    state: DesiredState, key: Ed25519PrivateKey, signer_id: str = ""
) -> SignedDesiredState:
    """`signer_id`: the key's id when the caller has it (deriving it costs a quarter of
    a signature, on every device of every deploy)."""
    body = to_proto(state, fleet_pb2.DesiredState).SerializeToString(deterministic=True)
    return SignedDesiredState(body, key.sign(body), signer_id or key_id(public_key_bytes(key)))


# device side --------------------------------------------------------------------------


def follow_chain(chain: TrustChain, anchor: RootKey | str) -> list[RootKey]:
    """The root keys trusted from `anchor` (a key already trusted, or the fingerprint
    provisioned out of band) to the newest, oldest first. Rotations before the anchor are
    not needed; every one after it must be signed by the key it replaces and by itself."""
    keys = [chain.first]
    statements = list(chain.rotations)
    for statement in statements:
        body = fleet_pb2.RootKey()
        try:
            body.ParseFromString(statement.new_key)
        except Exception:
            raise TrustError("a key rotation in the cloud's chain does not parse") from None
        keys.append(from_proto(body, RootKey))
    start = next(
        (
            n
            for n, key in enumerate(keys)
            if (key == anchor if isinstance(anchor, RootKey) else key.fingerprint == anchor)
        ),
        None,
    )
    if start is None:
        shown = anchor.fingerprint if isinstance(anchor, RootKey) else anchor
        raise TrustError(
            f"the cloud's root keys do not include the trusted one ({shown[:23]}…): this is "
            "not the cloud the device was provisioned for, or its keys were replaced"
        )
    trusted = [keys[start]]
    for n in range(start + 1, len(keys)):
        statement, previous, new = statements[n - 1], trusted[-1], keys[n]
        if new.version != previous.version + 1:
            raise TrustError(f"root key v{new.version} does not follow v{previous.version}")
        if not (
            _verify(previous.public_key, statement.previous_signature, statement.new_key)
            and _verify(new.public_key, statement.new_signature, statement.new_key)
        ):
            raise TrustError(
                f"the rotation to root key v{new.version} is not signed by v{previous.version} "
                "and by itself; refused"
            )
        trusted.append(new)
    return trusted


def accept_desired(
    signed: SignedDesiredState,
    current: RootKey,
    device_id: str,
    last_generation: int,
    last_issued_at: float,
    now: float | None = None,
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
) -> DesiredState:
    """The desired state, if the device may act on it; TrustError saying why not."""
    if signed.key_id != current.key_id:
        raise TrustError(
            f"the desired state is signed by key {signed.key_id[:16]!r}, not the trusted root "
            f"key v{current.version} ({current.key_id})"
        )
    if not _verify(current.public_key, signed.signature, signed.state):
        raise TrustError("the desired state's signature is not valid; refused")
    message = fleet_pb2.DesiredState()
    try:
        message.ParseFromString(signed.state)
    except Exception:
        raise TrustError("the signed desired state does not parse") from None
    state = from_proto(message, DesiredState)
    now = time.time() if now is None else now
    if state.device_id != device_id:
        raise TrustError(
            f"the desired state is for device {state.device_id[:64]!r}, not {device_id!r}"
        )
    if state.issued_at > now + clock_skew_s:
        # Accepted, it would set the replay floor in the future and freeze the device.
        raise TrustError(
            f"the desired state says it was issued {state.issued_at - now:.0f}s from now: "
            "the cloud's clock or this device's is wrong; refused"
        )
    if state.generation >= 1 << 62:
        raise TrustError(f"the desired state's generation {state.generation} is implausible")
    models = [a.model for a in state.assignments]
    if len(set(models)) != len(models):
        raise TrustError("the desired state assigns one model twice; refused")
    if state.expires_at + clock_skew_s < now:
        raise TrustError(
            f"the desired state expired {now - state.expires_at:.0f}s ago (issued "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(state.issued_at))} UTC): a "
            "stale state is refused; the device keeps serving what it has"
        )
    if state.generation < last_generation:
        raise TrustError(
            f"the desired state is generation {state.generation}, older than generation "
            f"{last_generation} already accepted: a rollback of the desired state is refused"
        )
    if state.generation == last_generation and state.issued_at < last_issued_at:
        raise TrustError(
            "the desired state was issued before the one already accepted: a replay is refused"
        )
    return state
