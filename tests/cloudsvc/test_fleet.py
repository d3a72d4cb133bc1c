from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cloudsvc.errors import Forbidden, NotAuthenticated, NotReady, UnknownResource
from cloudsvc.fleet import Fleet, best_target
from cloudsvc.registry import Registry
from cloudsvc.store.metadata import EnrollTokenRecord
from edgefleet.core.auth import hash_token
from edgefleet.core.fleet import Capabilities, Enrollment, ModelPhase, ModelStatus, ReportedState
from edgefleet.core.tokens import EnrollToken
from edgefleet.core.trust import TrustError, accept_desired
from edgefleet.core.versions import Artifact

from .conftest import ENROLL_TOKEN


def join(fleet: Fleet, device_id: str = "", **labels: str) -> Enrollment:
    """Enroll a device through a single-use token granting `labels` (labels are the
    operator's: a token grants them)."""
    secret, _ = fleet.tokens.create_enroll_token(max_uses=1, labels=labels)
    return fleet.enroll(secret, device_id)


def test_enroll_with_static_and_created_tokens(fleet: Fleet) -> None:
    first = fleet.enroll(ENROLL_TOKEN)
    assert first.device_id.startswith("dev-") and len(first.device_id) == 12
    assert fleet.authenticate(first.device_token) == first.device_id
    token, record = fleet.tokens.create_enroll_token(
        ttl_seconds=60, note="line 3", labels={"site": "a"}
    )
    assert record.expires_at > time.time() and record.token_id.startswith("tok-")
    second = fleet.enroll(token, device_id="cam-7")
    assert second.device_id == "cam-7"
    # Only the hash of a device token is stored; the token's labels are the device's.
    stored = fleet.metadata.get_device("cam-7")
    assert stored is not None and stored.token_hash == hash_token(second.device_token)
    assert second.device_token not in repr(stored)
    assert stored.labels == {"site": "a"}
    # Nor is the enroll token's secret kept anywhere.
    assert token not in repr(fleet.tokens.enroll_tokens())


def test_enroll_refuses_bad_expired_used_up_and_revoked_tokens(fleet: Fleet) -> None:
    with pytest.raises(NotAuthenticated, match="not valid"):
        fleet.enroll("enr_wrong")
    with pytest.raises(NotAuthenticated, match="needs an enroll token"):
        fleet.enroll("")
    old = EnrollToken("tok-old", created_at=1.0, expires_at=time.time() - 1)
    fleet.metadata.add_enroll_token(EnrollTokenRecord(hash_token("enr_old"), old))
    with pytest.raises(NotAuthenticated, match="expired"):
        fleet.enroll("enr_old")
    twice, _ = fleet.tokens.create_enroll_token(max_uses=2)
    fleet.enroll(twice, "a")
    fleet.enroll(twice, "b")
    with pytest.raises(NotAuthenticated, match="used"):
        fleet.enroll(twice, "c")
    revoked, record = fleet.tokens.create_enroll_token()
    fleet.tokens.revoke_enroll_token(record.token_id)
    with pytest.raises(NotAuthenticated, match="revoked"):
        fleet.enroll(revoked, "d")
    assert sorted(d.device_id for d in fleet.metadata.list_devices()) == ["a", "b"]
    assert [t.uses for t in fleet.tokens.enroll_tokens() if t.max_uses == 2] == [2]


def test_an_enroll_token_cannot_take_an_enrolled_identity(fleet: Fleet) -> None:
    """The attack: enroll with an existing device id and a fleet-wide token, to lock the
    real device out and speak for it. Refused; the device keeps its credential and labels."""
    real = join(fleet, "cam-1", site="a")
    with pytest.raises(Forbidden, match="enrolled already"):
        fleet.enroll(ENROLL_TOKEN, device_id="cam-1")
    thief_token, _ = fleet.tokens.create_enroll_token(labels={"site": "evil"})
    with pytest.raises(Forbidden, match="enrolled already"):
        fleet.enroll(thief_token, device_id="cam-1")
    assert fleet.authenticate(real.device_token) == "cam-1"
    device = fleet.metadata.get_device("cam-1")
    assert device is not None and device.labels == {"site": "a"}


def test_re_enroll_with_the_current_credential_or_a_bound_token(fleet: Fleet) -> None:
    old = join(fleet, "cam-1", site="a")
    # The device itself rotates its credential by showing the current one.
    new = fleet.enroll("", device_id="cam-1", current_credential=old.device_token)
    assert fleet.authenticate(new.device_token) == "cam-1"
    with pytest.raises(NotAuthenticated):
        fleet.authenticate(old.device_token)
    device = fleet.metadata.get_device("cam-1")
    assert device is not None and device.labels == {"site": "a"}  # kept
    # After a revocation, only a re-enroll token bound to that id brings it back, once.
    fleet.revoke("cam-1")
    with pytest.raises(NotAuthenticated, match="revoked"):
        fleet.authenticate(new.device_token)
    with pytest.raises(Forbidden):
        fleet.enroll("", device_id="cam-1", current_credential=new.device_token)
    other = join(fleet, "cam-2")
    for_other, _ = fleet.tokens.create_enroll_token(device_id="cam-2")
    with pytest.raises(Forbidden, match="re-enroll token"):
        fleet.enroll(for_other, device_id="cam-1")
    with pytest.raises(Forbidden, match="for device 'cam-2' only"):
        fleet.enroll(fleet.tokens.create_enroll_token(device_id="cam-2")[0], "cam-9")
    bound, record = fleet.tokens.create_enroll_token(device_id="cam-1")
    assert record.max_uses == 1
    back = fleet.enroll(bound, device_id="cam-1")
    assert fleet.authenticate(back.device_token) == "cam-1"
    assert not fleet.device("cam-1").revoked
    with pytest.raises(NotAuthenticated, match="used"):
        fleet.enroll(bound, device_id="cam-1")
    assert fleet.authenticate(other.device_token) == "cam-2"


def test_labels_belong_to_the_operator(fleet: Fleet, registry: Registry, model_path: Path) -> None:
    """A device reporting other labels does not move into other selectors; the operator's
    relabel does, and standing deployments for the new labels apply at once."""
    registry.push("clf", model_path)
    join(fleet, "a1", site="a")
    join(fleet, "b1", site="b")
    fleet.deploy("clf", 1, {"site": "b"})
    fleet.report(ReportedState("a1", 0, labels={"site": "b"}))
    assert fleet.device("a1").labels == {"site": "a"}
    assert fleet.desired_state("a1").assignments == ()
    assert fleet.deploy("clf", 1, {"site": "b"}) == [("b1", 2)]
    fleet.label("a1", {"site": "b"})
    assert fleet.device("a1").labels == {"site": "b"}
    assert [a.version for a in fleet.desired_state("a1").assignments] == [1]
    fleet.label("a1", {}, remove=["site"])
    assert fleet.device("a1").labels == {}


def test_a_device_reads_only_models_of_its_current_or_previous_desired_state(
    fleet: Fleet, registry: Registry, model_path: Path
) -> None:
    v1 = registry.push("clf", model_path)
    v2 = registry.push("clf", model_path)
    v3 = registry.push("clf", model_path)
    other = registry.push("secret-model", model_path)
    join(fleet, "a1", site="a")
    join(fleet, "b1", site="b")
    fleet.deploy("secret-model", 1, {"site": "b"})
    digest = {v.version: v.artifacts[0].manifest_digest for v in (v1, v2, v3)}
    secret = other.artifacts[0].manifest_digest
    chunk = registry.chunks_of(secret)

    def may_read(manifest: str) -> bool:
        try:
            fleet.readable("a1", manifest)
            return True
        except Forbidden:
            return False

    assert not may_read(secret) and not may_read(digest[1])
    with pytest.raises(Forbidden):
        fleet.chunk_readable("a1", next(iter(chunk)))
    fleet.deploy("clf", 1, {"site": "a"})
    assert may_read(digest[1]) and not may_read(digest[2])
    fleet.deploy("clf", 2, {"site": "a"})
    assert may_read(digest[2]) and may_read(digest[1])  # previous: a fetch in flight finishes
    fleet.deploy("clf", 3, {"site": "a"})
    assert may_read(digest[3]) and may_read(digest[2]) and not may_read(digest[1])
    assert not may_read(secret)
    fleet.readable("b1", secret)
    for sha in registry.chunks_of(digest[3]):
        fleet.chunk_readable("a1", sha)


def test_the_desired_state_is_signed_for_its_device_and_expires(fleet: Fleet) -> None:
    join(fleet, "a1")
    signed = fleet.signed_desired_state("a1")
    state = accept_desired(signed, fleet.keys.current, "a1", 0, 0.0)
    assert state.device_id == "a1"
    assert state.expires_at - state.issued_at == pytest.approx(fleet.desired_state_ttl_s)
    with pytest.raises(TrustError, match=r"is for device .a1., not .b1."):
        accept_desired(signed, fleet.keys.current, "b1", 0, 0.0)


def test_revoked_devices_are_refused(fleet: Fleet) -> None:
    device = join(fleet, "a1")
    fleet.revoke("a1")
    with pytest.raises(NotAuthenticated):
        fleet.authenticate(device.device_token)
    with pytest.raises(NotAuthenticated):
        fleet.authenticate_id("a1")
    assert fleet.device("a1").revoked
    with pytest.raises(UnknownResource):
        fleet.revoke("nope")


def test_authorize_only_own_device() -> None:
    assert Fleet.authorize("a", "") == "a"
    assert Fleet.authorize("a", "a") == "a"
    with pytest.raises(Forbidden):
        Fleet.authorize("a", "b")


def test_deploy_bumps_only_matching_devices_and_keeps_other_models(
    fleet: Fleet, registry: Registry, model_path: Path
) -> None:
    registry.push("clf", model_path)
    registry.push("clf", model_path)
    registry.push("det", model_path)
    for name, site in [("a1", "a"), ("a2", "a"), ("b1", "b")]:
        join(fleet, name, site=site, hw="x86")
    assert sorted(fleet.deploy("det", 1)) == [("a1", 1), ("a2", 1), ("b1", 1)]
    assert sorted(fleet.deploy("clf", 1, {"site": "a"})) == [("a1", 2), ("a2", 2)]
    assert fleet.deploy("clf", 2, {"site": "a", "hw": "x86"}) == [("a1", 3), ("a2", 3)]
    a1 = fleet.desired_state("a1")
    assert a1.generation == 3
    assert [(a.model, a.version) for a in a1.assignments] == [("clf", 2), ("det", 1)]
    b1 = fleet.desired_state("b1")
    assert (b1.generation, [a.model for a in b1.assignments]) == (1, ["det"])
    digest = registry.get_version("clf", 2).artifacts[0].manifest_digest
    assert a1.assignments[0].manifest_digest == digest


def test_deploy_errors_say_what_is_missing(
    fleet: Fleet, registry: Registry, model_path: Path
) -> None:
    with pytest.raises(UnknownResource, match="no model is named"):
        fleet.deploy("clf", 1)
    registry.push("clf", model_path)
    with pytest.raises(UnknownResource, match="no version 2"):
        fleet.deploy("clf", 2)
    with pytest.raises(NotReady, match="no device is enrolled"):
        fleet.deploy("clf", 1)
    join(fleet, "a1", site="a")
    with pytest.raises(NotReady, match="site=a"):
        fleet.deploy("clf", 1, {"site": "zzz"})
    with pytest.raises(NotReady, match="no 'tensorrt-fp16' artifact"):
        fleet.deploy("clf", 1, target="tensorrt-fp16")
    assert fleet.desired_state("a1").generation == 0


def test_watch_wakes_up_on_deploy(fleet: Fleet, registry: Registry, model_path: Path) -> None:
    registry.push("clf", model_path)
    fleet.enroll(ENROLL_TOKEN, device_id="a1")
    seen: list[int | None] = []
    waiter = threading.Thread(target=lambda: seen.append(fleet.wait_for_change("a1", 0, 30.0)))
    waiter.start()
    time.sleep(0.05)
    fleet.deploy("clf", 1)
    waiter.join(timeout=10)
    assert seen == [1]
    # With nothing new, the wait ends at its timeout with the current generation.
    assert fleet.wait_for_change("a1", 1, 0.01) == 1


def test_close_ends_waiters(fleet: Fleet) -> None:
    seen: list[int | None] = []
    waiter = threading.Thread(target=lambda: seen.append(fleet.wait_for_change("x", 0, 30.0)))
    waiter.start()
    time.sleep(0.05)
    fleet.close()
    waiter.join(timeout=10)
    assert seen == [None]


def test_reports_are_stored_and_devices_listed_with_online(
    fleet: Fleet, registry: Registry, model_path: Path
) -> None:
    join(fleet, "a1", site="a")
    join(fleet, "b1", site="b")
    status = ModelStatus("clf", active_version=1, phase=ModelPhase.READY)
    caps = Capabilities(arch="aarch64", execution_providers=("CPUExecutionProvider",))
    generation = fleet.report(
        ReportedState("a1", 0, (status,), caps, last_error="", inference_endpoint="10.0.0.7:8001")
    )
    assert generation == 0
    view = fleet.device("a1")
    assert view.online and view.reported is not None
    assert view.reported.models == (status,) and view.inference_endpoint == "10.0.0.7:8001"
    assert view.capabilities == caps
    assert view.reported.reported_at > 0  # the cloud's clock, not the device's
    # A device last seen long ago is offline.
    fleet.metadata.touch_device("b1", time.time() - 3600)
    views = {v.device_id: v.online for v in fleet.devices()}
    assert views == {"a1": True, "b1": False}
    assert [v.device_id for v in fleet.devices({"site": "b"})] == ["b1"]
    with pytest.raises(UnknownResource):
        fleet.device("nope")


def test_best_target_follows_the_device_providers() -> None:
    arts = [
        Artifact("m", 1, t, "0" * 64, 1, 1, 1)
        for t in ("onnx-cpu-fp32", "onnx-cpu-int8", "tensorrt-fp16")
    ]
    cpu = Capabilities(execution_providers=("CPUExecutionProvider",))
    trt = Capabilities(execution_providers=("TensorrtExecutionProvider", "CPUExecutionProvider"))
    assert best_target(arts, cpu) == "onnx-cpu-fp32"
    assert best_target(arts, trt) == "tensorrt-fp16"
    assert best_target(arts[2:], cpu) is None


def test_device_enrolling_later_gets_what_its_labels_were_deployed(
    fleet: Fleet, registry: Registry, model_path: Path
) -> None:
    registry.push("clf", model_path)
    registry.push("clf", model_path)
    registry.push("det", model_path)
    join(fleet, "a1", site="a")
    fleet.deploy("clf", 1, {"site": "a"})
    fleet.deploy("clf", 2, {"site": "a"})  # newer deployment of the same model wins
    fleet.deploy("det", 1)  # every device
    # A replacement device at site a, and one at another site.
    join(fleet, "a2", site="a")
    join(fleet, "b1", site="b")
    a2 = fleet.desired_state("a2")
    assert [(a.model, a.version) for a in a2.assignments] == [("clf", 2), ("det", 1)]
    assert a2.generation >= 1
    assert [(a.model, a.version) for a in fleet.desired_state("b1").assignments] == [("det", 1)]
    # Re-enrolling an existing device rotates its credential and leaves its state alone.
    before = fleet.desired_state("a1")
    bound, _ = fleet.tokens.create_enroll_token(device_id="a1")
    fleet.enroll(bound, "a1")
    assert fleet.desired_state("a1") == before


def test_going_back_is_a_rollback_and_later_versions_stay_one_for_who_ran_more(
    fleet: Fleet, registry: Registry, model_path: Path
) -> None:
    for _ in range(3):
        registry.push("clf", model_path)
    join(fleet, "a1", site="a")
    fleet.deploy("clf", 3, {"site": "a"})
    with pytest.raises(NotReady, match="rollback clf --to 1"):
        fleet.deploy("clf", 1, {"site": "a"})
    fleet.deploy("clf", 1, {"site": "a"}, rollback=True)
    back = fleet.desired_state("a1").assignment("clf")
    assert back is not None and (back.version, back.rollback) == (1, True)
    # Forward again to v2: a normal deploy, still below the v3 the device was given, so it
    # is marked as a rollback for a device that never took the rollback to v1.
    fleet.deploy("clf", 2, {"site": "a"})
    assigned = fleet.desired_state("a1").assignment("clf")
    assert assigned is not None and (assigned.version, assigned.rollback) == (2, True)
    # A device enrolling later has run nothing: no rollback for it.
    join(fleet, "a2", site="a")
    later = fleet.desired_state("a2").assignment("clf")
    assert later is not None and (later.version, later.rollback) == (2, False)
