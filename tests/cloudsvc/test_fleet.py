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
from edgefleet.core.fleet import Capabilities, ModelPhase, ModelStatus, ReportedState
from edgefleet.core.versions import Artifact

from .conftest import ENROLL_TOKEN


def test_enroll_with_static_and_created_tokens(fleet: Fleet, signer: object) -> None:
    first = fleet.enroll(ENROLL_TOKEN, labels={"site": "a"})
    assert first.device_id.startswith("dev-") and len(first.device_id) == 12
    assert fleet.authenticate(first.device_token) == first.device_id
    token, expires = fleet.create_enroll_token(ttl_seconds=60, note="line 3")
    assert expires > time.time()
    second = fleet.enroll(token, device_id="cam-7")
    assert second.device_id == "cam-7"
    assert list(second.manifest_public_keys) == fleet.trusted_keys
    # Only the hash of a device token is stored.
    stored = fleet.metadata.get_device("cam-7")
    assert stored is not None and stored.token_hash == hash_token(second.device_token)
    assert second.device_token not in repr(stored)


def test_enroll_refuses_bad_and_expired_tokens(fleet: Fleet) -> None:
    with pytest.raises(NotAuthenticated, match="not valid"):
        fleet.enroll("enr_wrong")
    with pytest.raises(NotAuthenticated, match="needs an enroll token"):
        fleet.enroll("")
    fleet.metadata.add_enroll_token(
        EnrollTokenRecord(hash_token("enr_old"), 1, expires_at=int(time.time()) - 1)
    )
    with pytest.raises(NotAuthenticated, match="expired"):
        fleet.enroll("enr_old")
    assert fleet.metadata.list_devices() == []


def test_re_enroll_rotates_the_credential(fleet: Fleet) -> None:
    old = fleet.enroll(ENROLL_TOKEN, device_id="cam-1", labels={"site": "a"})
    new = fleet.enroll(ENROLL_TOKEN, device_id="cam-1")
    assert fleet.authenticate(new.device_token) == "cam-1"
    with pytest.raises(NotAuthenticated):
        fleet.authenticate(old.device_token)
    device = fleet.metadata.get_device("cam-1")
    assert device is not None and device.labels == {"site": "a"}  # kept when none are given


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
        fleet.enroll(ENROLL_TOKEN, device_id=name, labels={"site": site, "hw": "x86"})
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
    fleet.enroll(ENROLL_TOKEN, device_id="a1", labels={"site": "a"})
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
    fleet.enroll(ENROLL_TOKEN, device_id="a1", labels={"site": "a"})
    fleet.enroll(ENROLL_TOKEN, device_id="b1", labels={"site": "b"})
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
    fleet.enroll(ENROLL_TOKEN, device_id="a1", labels={"site": "a"})
    fleet.deploy("clf", 1, {"site": "a"})
    fleet.deploy("clf", 2, {"site": "a"})  # newer deployment of the same model wins
    fleet.deploy("det", 1)  # every device
    # A replacement device at site a, and one at another site.
    fleet.enroll(ENROLL_TOKEN, device_id="a2", labels={"site": "a"})
    fleet.enroll(ENROLL_TOKEN, device_id="b1", labels={"site": "b"})
    a2 = fleet.desired_state("a2")
    assert [(a.model, a.version) for a in a2.assignments] == [("clf", 2), ("det", 1)]
    assert a2.generation >= 1
    assert [(a.model, a.version) for a in fleet.desired_state("b1").assignments] == [("det", 1)]
    # Re-enrolling an existing device rotates its credential and leaves its state alone.
    before = fleet.desired_state("a1")
    fleet.enroll(ENROLL_TOKEN, device_id="a1", labels={"site": "a"})
    assert fleet.desired_state("a1") == before
