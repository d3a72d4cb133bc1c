from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cloudsvc.errors import Forbidden, NotAuthenticated, NotReady, UnknownResource
from cloudsvc.fleet import Fleet
from cloudsvc.registry import Registry
from cloudsvc.store.metadata import EnrollTokenRecord
from cloudsvc.targets_choice import TargetChoice, choose_target
from compilers.build import Build
from edgefleet.core.auth import hash_token
from edgefleet.core.fleet import (
    Capabilities,
    CpuFeatures,
    Enrollment,
    ModelPhase,
    ModelStatus,
    ReportedState,
)
from edgefleet.core.jobs import Job, JobState, TargetOutcome
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


def _artifacts(**metrics: dict[str, float]) -> list[Artifact]:
    """One artifact per target (underscores for dashes), with its compile metrics."""
    return [
        Artifact("m", 1, t.replace("_", "-"), "0" * 64, 1, 1, 1, metrics=m)
        for t, m in metrics.items()
    ]


FP32 = {"latency_p50_ms": 0.9}
INT8 = {"latency_p50_ms": 0.5, "accuracy": 0.955, "accuracy_drop": 0.004}
CPU = ("CPUExecutionProvider",)
VNNI = Capabilities(execution_providers=CPU, cpu_features=CpuFeatures(("avx512_vnni",)))
DOTPROD = Capabilities(execution_providers=CPU, cpu_features=CpuFeatures(("asimddp",)))
PLAIN_CPU = Capabilities(execution_providers=CPU, cpu_features=CpuFeatures())
UNKNOWN_CPU = Capabilities(execution_providers=CPU)


def test_a_cpu_with_int8_dot_products_runs_int8_when_it_passed_the_gate_and_is_faster() -> None:
    arts = _artifacts(onnx_cpu_fp32=FP32, onnx_cpu_int8=INT8)
    for caps in (VNNI, DOTPROD):
        choice = choose_target(arts, caps)
        assert choice is not None and choice.target == "onnx-cpu-int8"
        assert caps.cpu_features is not None
        assert f"CPU has {caps.cpu_features.int8[0]}" in choice.reason
        assert (
            "INT8 p50 0.5 ms vs FP32 0.9 ms on the cloud" in choice.reason
            and "(1.8x)" in choice.reason
        )
        assert "passed the accuracy gate (accuracy 95.50%, -0.40 pts)" in choice.reason
    # FP32's latency unknown (a pushed model): INT8 still pays on such a CPU.
    pushed = _artifacts(onnx_cpu_fp32={}, onnx_cpu_int8=INT8)
    choice = choose_target(pushed, VNNI)
    assert choice is not None and choice.target == "onnx-cpu-int8"
    assert "FP32 latency not measured" in choice.reason


def test_a_cpu_without_int8_dot_products_or_a_slower_int8_keeps_fp32() -> None:
    arts = _artifacts(onnx_cpu_fp32=FP32, onnx_cpu_int8=INT8)
    choice = choose_target(arts, PLAIN_CPU)
    assert choice == TargetChoice("onnx-cpu-fp32", "CPU has no VNNI/dotprod: INT8 would be slower")
    unheard_of = replace(PLAIN_CPU, cpu_features=CpuFeatures(("<b>turbo</b>",)))
    assert choose_target(arts, unheard_of) == choice  # only known instructions count
    choice = choose_target(arts, UNKNOWN_CPU)
    assert choice is not None and choice.target == "onnx-cpu-fp32"
    assert "did not report its CPU's int8 features" in choice.reason
    slower = _artifacts(onnx_cpu_fp32=FP32, onnx_cpu_int8={**INT8, "latency_p50_ms": 1.2})
    choice = choose_target(slower, VNNI)
    assert choice is not None and choice.target == "onnx-cpu-fp32"
    assert choice.reason == "INT8 measured slower than FP32 on the cloud (p50 1.2 ms vs 0.9 ms)"


def test_int8_refused_by_the_gate_leaves_fp32_with_the_reason() -> None:
    arts = _artifacts(onnx_cpu_fp32=FP32)  # INT8 exists only when it passed the gate
    choice = choose_target(arts, VNNI, why_not_built=lambda t: "refused by the accuracy gate")
    assert choice == TargetChoice(
        "onnx-cpu-fp32", "onnx-cpu-int8 not built: refused by the accuracy gate"
    )
    choice = choose_target(arts, VNNI)
    assert choice is not None and choice.reason.startswith("onnx-cpu-int8 not built for v1")
    # Without FP32, INT8 is what a CPU device has, whatever its instructions.
    only = choose_target(_artifacts(onnx_cpu_int8=INT8), PLAIN_CPU)
    assert only is not None and only.target == "onnx-cpu-int8"
    assert "the only CPU artifact" in only.reason


def test_gpu_targets_go_where_the_device_has_their_provider() -> None:
    plan = Artifact("m", 1, "tensorrt-fp16", "0" * 64, 1, 1, 1, format="tensorrt-plan")
    cpu_and_gpu = _artifacts(
        onnx_cpu_fp32=FP32, onnx_cpu_int8=INT8, onnx_gpu_fp16={}, onnx_cuda_fp16={}
    )
    arts = [*cpu_and_gpu, plan]
    cuda = Capabilities(execution_providers=("CUDAExecutionProvider", *CPU))
    choice = choose_target(arts, cuda)
    assert choice == TargetChoice("onnx-cuda-fp16", "the device has CUDAExecutionProvider")
    trt = replace(
        cuda, execution_providers=("TensorrtExecutionProvider", *cuda.execution_providers)
    )
    onnx_trt = [*arts, Artifact("m", 1, "tensorrt-onnx", "0" * 64, 1, 1, 1)]
    choice = choose_target(onnx_trt, trt)
    assert choice == TargetChoice("tensorrt-onnx", "the device has TensorrtExecutionProvider")
    # A TensorRT plan is not what agents run; GPU artifacts never go to a CPU-only device.
    choice = choose_target(arts, trt)
    assert choice is not None and choice.target == "onnx-cuda-fp16"
    assert choose_target(arts[2:], VNNI) is None


def test_the_operators_target_wins() -> None:
    arts = _artifacts(onnx_cpu_fp32=FP32, onnx_cpu_int8=INT8)
    assert choose_target(arts, VNNI, "onnx-cpu-fp32") == TargetChoice(
        "onnx-cpu-fp32", "chosen by the operator"
    )
    assert choose_target(arts, PLAIN_CPU, "onnx-cpu-int8") == TargetChoice(
        "onnx-cpu-int8", "chosen by the operator"
    )
    assert choose_target(arts, VNNI, "onnx-gpu-fp16") is None


def _add_int8(registry: Registry, model_path: Path, model: str, version: int) -> None:
    registry.add_target(
        model,
        version,
        Build("onnx-cpu-int8", model_path.parent, (model_path.name,), metrics=INT8),
    )


def test_deploys_keep_each_devices_target_and_why_off_the_signed_state(
    fleet: Fleet, registry: Registry, model_path: Path
) -> None:
    registry.push("clf", model_path)
    _add_int8(registry, model_path, "clf", 1)
    for device_id, caps in (("vnni", VNNI), ("old", PLAIN_CPU)):
        secret, _ = fleet.tokens.create_enroll_token(max_uses=1)
        fleet.enroll(secret, device_id, caps)
    fleet.deploy("clf", 1)
    fast = fleet.device("vnni").desired.assignment("clf")
    assert fast is not None and fast.target == "onnx-cpu-int8"
    assert fast.target_reason.startswith("CPU has avx512_vnni; FP32 latency not measured")
    old = fleet.device("old").desired.assignment("clf")
    assert old is not None and old.target == "onnx-cpu-fp32"
    assert old.target_reason == "CPU has no VNNI/dotprod: INT8 would be slower"
    # The reason is the operator's: the signed state the device gets carries none.
    state = accept_desired(fleet.signed_desired_state("vnni"), fleet.keys.current, "vnni", 0, 0.0)
    signed = state.assignment("clf")
    assert signed is not None and signed.target == "onnx-cpu-int8"
    assert signed == replace(fast, target_reason="")
    # An explicit target is the operator's choice.
    fleet.deploy("clf", 1, target="onnx-cpu-fp32")
    pinned = fleet.device("vnni").desired.assignment("clf")
    assert pinned is not None
    assert (pinned.target, pinned.target_reason) == ("onnx-cpu-fp32", "chosen by the operator")


def test_a_refusal_by_the_gate_is_the_reason_a_device_runs_fp32(
    fleet: Fleet, registry: Registry, model_path: Path
) -> None:
    registry.push("clf", model_path)
    job = fleet.metadata.create_job(Job("", "finetune", "clf", "{}"))
    refused = TargetOutcome("onnx-cpu-int8", "refused", "int8 scored 0.8, a drop of 0.1")
    fleet.metadata.update_job(
        replace(
            job,
            result_version=1,
            targets=(TargetOutcome("onnx-cpu-fp32", "built"), refused),
        )
    )
    fleet.enroll(ENROLL_TOKEN, "vnni", VNNI)
    fleet.deploy("clf", 1)
    got = fleet.device("vnni").desired.assignment("clf")
    assert got is not None and got.target == "onnx-cpu-fp32"
    assert got.target_reason == (
        f"onnx-cpu-int8 not built: refused by the accuracy gate in {job.job_id} "
        "(int8 scored 0.8, a drop of 0.1)"
    )
    # A later `edgefleet compile --target onnx-cpu-int8` that failed: the newest job says.
    request = '{"kind": "compile", "model": "clf", "version": 1, "target": "onnx-cpu-int8"}'
    compile_job = fleet.metadata.create_job(Job("", "compile", "clf", request))
    error = "no target could be built: onnx-cpu-int8: calibration data has no images"
    fleet.metadata.update_job(replace(compile_job, state=JobState.FAILED, error=error))
    fleet.deploy("clf", 1, target="onnx-cpu-fp32")
    fleet.deploy("clf", 1)
    got = fleet.device("vnni").desired.assignment("clf")
    assert got is not None and got.target_reason == (
        f"onnx-cpu-int8 not built: its compile failed in {compile_job.job_id} ({error})"
    )


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
