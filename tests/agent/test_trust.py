"""What a device trusts, tried as an attacker on its link would: every desired state and key
a device acts on is signed by the root key it was provisioned with (or a successor that key
signed), is for it, is fresh and moves forward. Each refusal keeps the running model serving
and says why."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.core.errors import EdgefleetError, Unauthenticated
from edgefleet.core.trust import (
    KeyRotation,
    SignedDesiredState,
    TrustError,
    rotation,
    sign_desired,
)
from tests.agent.conftest import Rig
from tests.agent.fakes import FakeCloud, build_artifact


def serving_v1(rig: Rig, tmp_path: Path) -> None:
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    assert rig.reconciler.reconcile_once().converged
    assert rig.repository.default_version("m") == 1


def refused(rig: Rig, match: str) -> EdgefleetError:
    """One pass that must be refused with `match` in its message, v1 still serving."""
    with pytest.raises(EdgefleetError, match=match) as info:
        rig.reconciler.reconcile_once()
    assert rig.repository.default_version("m") == 1
    assert rig.reconciler.device_error  # what `edgefleet devices` shows as its error
    return info.value


def test_a_desired_state_signed_by_another_key_is_refused(rig: Rig, tmp_path: Path) -> None:
    serving_v1(rig, tmp_path)
    attacker = Ed25519PrivateKey.generate()
    rig.cloud.assign(build_artifact(tmp_path, attacker, "m", 2))
    rig.cloud.desired = lambda: sign_desired(rig.cloud.state(), attacker)
    refused(rig, "not the trusted root key")
    # Even passing off its key id as the trusted one: the signature does not verify.
    rig.cloud.desired = lambda: replace(
        sign_desired(rig.cloud.state(), attacker),
        key_id=sign_desired(rig.cloud.state(), rig.cloud.key).key_id,
    )
    refused(rig, "signature is not valid")


def test_an_unsigned_or_altered_desired_state_is_refused(rig: Rig, tmp_path: Path) -> None:
    serving_v1(rig, tmp_path)
    good = sign_desired(rig.cloud.state(), rig.cloud.key)
    rig.cloud.desired = lambda: replace(good, signature=b"")
    refused(rig, "signature is not valid")
    empty = sign_desired(rig.cloud.state(assignments=()), rig.cloud.key)
    # The attacker's empty state (stop serving) under the real state's signature.
    rig.cloud.desired = lambda: replace(good, state=empty.state)
    refused(rig, "signature is not valid")


def test_an_expired_desired_state_is_refused_a_freeze(rig: Rig, tmp_path: Path) -> None:
    serving_v1(rig, tmp_path)
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 2))
    old = time.time() - 30 * 86_400
    stale = sign_desired(rig.cloud.state(issued_at=old, expires_at=old + 3600), rig.cloud.key)
    rig.cloud.desired = lambda: stale
    refused(rig, "expired")
    # Within the clock skew allowed, a state just past its expiry is still taken.
    rig.cloud.desired = lambda: sign_desired(
        rig.cloud.state(expires_at=time.time() - 10), rig.cloud.key
    )
    assert rig.reconciler.reconcile_once().converged


def test_a_lower_generation_or_a_replay_is_refused(rig: Rig, tmp_path: Path) -> None:
    serving_v1(rig, tmp_path)
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 2))
    assert rig.reconciler.reconcile_once().converged  # generation 2
    older = sign_desired(rig.cloud.state(generation=1), rig.cloud.key)
    rig.cloud.desired = lambda: older
    with pytest.raises(TrustError, match="older than generation 2"):
        rig.reconciler.reconcile_once()
    assert rig.repository.default_version("m") == 2
    # The same generation issued before the one accepted: a replay.
    replayed = sign_desired(
        rig.cloud.state(issued_at=time.time() - 3600, expires_at=time.time() + 3600),
        rig.cloud.key,
    )
    rig.cloud.desired = lambda: replayed
    with pytest.raises(TrustError, match="replay"):
        rig.reconciler.reconcile_once()
    assert rig.repository.default_version("m") == 2


def test_a_desired_state_for_another_device_is_refused(rig: Rig, tmp_path: Path) -> None:
    serving_v1(rig, tmp_path)
    rig.cloud.desired = lambda: sign_desired(
        rig.cloud.state(device_id="dev-2", assignments=()), rig.cloud.key
    )
    refused(rig, "is for device 'dev-2'")


def test_going_below_the_version_floor_needs_an_operators_rollback(
    rig: Rig, tmp_path: Path
) -> None:
    v1 = build_artifact(tmp_path, rig.cloud.key, "m", 1)
    rig.cloud.assign(v1)
    rig.reconciler.reconcile_once()
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 2))
    rig.reconciler.reconcile_once()
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 3))
    rig.reconciler.reconcile_once()
    # A signed state assigning v1 again, not marked as a rollback: refused before download.
    rig.cloud.assign(v1)
    fetched = len(rig.cloud.fetch_offsets)
    result = rig.reconciler.reconcile_once()
    assert not result.converged and "older than v3" in result.errors[0]
    assert rig.repository.default_version("m") == 3
    assert len(rig.cloud.fetch_offsets) == fetched
    # The operator's rollback (`edgefleet rollback m --to 1`) is taken, and lowers the floor.
    rig.cloud.rollback.add("m")
    rig.cloud.generation += 1
    assert rig.reconciler.reconcile_once().converged
    assert rig.repository.default_version("m") == 1
    assert rig.state.floor("m") == 1


def test_unauthenticated_answers_never_drop_the_identity(rig: Rig, tmp_path: Path) -> None:
    """The attack the review found: answer one call with UNAUTHENTICATED and hand out new
    keys in the re-enrollment that followed. The agent now neither re-enrolls on its own
    nor takes keys from an enrollment."""
    serving_v1(rig, tmp_path)
    identity = rig.state.identity()
    enrollments = len(rig.cloud.enrolled)
    original = rig.cloud.get_desired_state

    def refuse() -> SignedDesiredState:
        raise Unauthenticated("the device credential is not valid")

    rig.cloud.get_desired_state = refuse  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(EdgefleetError):
            rig.reconciler.reconcile_once()
    assert "edgefleet agent reenroll" in rig.reconciler.device_error
    assert rig.state.identity() == identity and len(rig.cloud.enrolled) == enrollments
    assert rig.repository.default_version("m") == 1
    rig.cloud.get_desired_state = original  # type: ignore[method-assign]
    assert rig.reconciler.reconcile_once().converged


def test_keys_rotate_without_re_enrolling_and_only_along_the_signed_chain(
    rig: Rig, tmp_path: Path
) -> None:
    serving_v1(rig, tmp_path)
    identity = rig.state.identity()
    new = rig.cloud.rotate()
    rig.cloud.assign(build_artifact(tmp_path, new, "m", 2))  # manifest signed by the new key
    assert rig.reconciler.reconcile_once().converged
    assert rig.repository.default_version("m") == 2
    assert [k.version for k in rig.state.root_keys()] == [1, 2]
    assert rig.state.identity() == identity  # no re-enrollment
    # An attacker's "rotation" to its own key, signed by itself only: refused.
    attacker = Ed25519PrivateKey.generate()
    forged = rotation(attacker, attacker, 3)
    rig.cloud.rotations.append(forged)
    rig.cloud.keys.append(attacker)
    rig.cloud.assign(build_artifact(tmp_path, attacker, "m", 3))
    with pytest.raises(TrustError, match="not signed by v2"):
        rig.reconciler.reconcile_once()
    assert rig.repository.default_version("m") == 2
    assert [k.version for k in rig.state.root_keys()] == [1, 2]


def test_a_device_trusts_only_the_cloud_it_was_provisioned_for(
    settings: object, tmp_path: Path
) -> None:
    """On first contact the chain must start from the provisioned fingerprint: another
    cloud (or one whose keys were swapped) is refused before enrollment."""
    from agent.settings import AgentSettings

    assert isinstance(settings, AgentSettings)
    impostor = FakeCloud()
    rig = Rig(settings, impostor)  # settings pin the fixture cloud's key, not this one's
    try:
        with pytest.raises(TrustError, match="do not include the trusted one"):
            rig.reconciler.reconcile_once()
        assert impostor.enrolled == [] and rig.state.identity() is None
        assert rig.state.root_keys() == []
    finally:
        rig.state.close()


def test_a_chain_that_skips_a_version_or_does_not_parse_is_refused(
    rig: Rig, tmp_path: Path
) -> None:
    serving_v1(rig, tmp_path)
    first = rig.cloud.keys[0]
    leap = Ed25519PrivateKey.generate()
    rig.cloud.rotations.append(rotation(first, leap, 5))
    rig.cloud.keys.append(leap)
    rig.cloud.assign(build_artifact(tmp_path, leap, "m", 2))
    with pytest.raises(TrustError, match="does not follow v1"):
        rig.reconciler.reconcile_once()
    rig.cloud.rotations[-1] = KeyRotation(b"\xff\xff", b"", b"")
    with pytest.raises(TrustError, match="does not parse"):
        rig.reconciler.reconcile_once()
    assert rig.repository.default_version("m") == 1


def test_an_expired_manifest_is_refused(rig: Rig, tmp_path: Path) -> None:
    serving_v1(rig, tmp_path)

    def expire(m: object) -> None:
        m.expires_at = int(time.time()) - 86_400 * 365 * 5  # type: ignore[attr-defined]

    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 2, edit=expire))
    result = rig.reconciler.reconcile_once()
    assert not result.converged and "expired" in result.errors[0]
    assert rig.repository.default_version("m") == 1


def test_offline_for_weeks_a_device_keeps_serving_its_last_good_state(
    rig: Rig, tmp_path: Path
) -> None:
    serving_v1(rig, tmp_path)
    rig.cloud.down = True
    rig.reopen()  # a reboot, weeks later, with no cloud
    rig.reconciler.restore()
    assert rig.repository.default_version("m") == 1


def test_a_fast_forward_with_a_stolen_key_is_undone_by_rotating_the_key(
    rig: Rig, tmp_path: Path
) -> None:
    """TUF's fast-forward: whoever stole the root key signs generation 2^40; every honest
    state after it looks like a rollback. Rotating the root key starts the floor over."""
    serving_v1(rig, tmp_path)
    stolen = rig.cloud.key
    rig.cloud.desired = lambda: sign_desired(rig.cloud.state(generation=1 << 40), stolen)
    rig.reconciler.reconcile_once()
    rig.cloud.desired = None
    refused(rig, "rollback of the desired state")
    new = rig.cloud.rotate()
    rig.cloud.assign(build_artifact(tmp_path, new, "m", 2))
    assert rig.reconciler.reconcile_once().converged
    assert rig.repository.default_version("m") == 2
    # The old key is no use to the thief any more.
    rig.cloud.desired = lambda: sign_desired(rig.cloud.state(generation=1 << 41), stolen)
    with pytest.raises(TrustError, match="not the trusted root key"):
        rig.reconciler.reconcile_once()
    assert rig.repository.default_version("m") == 2


def test_a_state_from_the_future_or_naming_a_model_twice_is_refused(
    rig: Rig, tmp_path: Path
) -> None:
    serving_v1(rig, tmp_path)
    ahead = time.time() + 7 * 86_400
    rig.cloud.desired = lambda: sign_desired(
        rig.cloud.state(issued_at=ahead, expires_at=ahead + 3600), rig.cloud.key
    )
    refused(rig, "from now")
    twice = rig.cloud.state()
    twice = replace(twice, assignments=twice.assignments * 2)
    rig.cloud.desired = lambda: sign_desired(twice, rig.cloud.key)
    refused(rig, "one model twice")


def test_a_manifest_for_another_target_is_refused(rig: Rig, tmp_path: Path) -> None:
    serving_v1(rig, tmp_path)

    def retarget(m: object) -> None:
        m.target = "tensorrt-fp16"  # type: ignore[attr-defined]

    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 2, edit=retarget))
    result = rig.reconciler.reconcile_once()
    assert not result.converged and "built for 'tensorrt-fp16'" in result.errors[0]
    assert rig.repository.default_version("m") == 1
