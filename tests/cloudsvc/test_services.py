"""AdminService and AgentService through a real gRPC server on a free loopback port."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from cloudsvc.server import CloudServer, serve
from cloudsvc.settings import CloudSettings
from edgefleet.core.auth import bearer_metadata
from edgefleet.core.manifests import file_chunks, verify_manifest
from protos.admin.v1 import admin_pb2, admin_pb2_grpc
from protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc

from .conftest import ADMIN, desired_of, enroll, secure_channel, trusted_keys

Admin = admin_pb2_grpc.AdminServiceStub
Agent = fleet_pb2_grpc.AgentServiceStub


def push_messages(
    path: Path, model: str = "clf", size: int | None = None, piece: int = 100, **header: Any
) -> Iterator[admin_pb2.PushModelRequest]:
    data = path.read_bytes()
    yield admin_pb2.PushModelRequest(
        header=admin_pb2.PushModelHeader(
            model=model,
            size=len(data) if size is None else size,
            **header,
        )
    )
    for start in range(0, len(data), piece):
        yield admin_pb2.PushModelRequest(data=data[start : start + piece])


def push(admin: Admin, path: Path, model: str = "clf", **header: Any) -> admin_pb2.ModelVersion:
    response: admin_pb2.PushModelResponse = admin.PushModel(
        push_messages(path, model, **header),
        metadata=ADMIN,
    )
    return response.version


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status a call fails with; a streaming call is read to its end."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    code: grpc.StatusCode = info.value.code()
    return code


def assert_serving(channel: grpc.Channel, admin: Admin) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    admin.ListModels(admin_pb2.ListModelsRequest(), metadata=ADMIN, timeout=5)


def test_push_list_deploy_and_fetch_end_to_end(
    cloud: CloudServer, admin: Admin, agent: Agent, channel: grpc.Channel, model_path: Path
) -> None:
    version = push(admin, model_path, description="first", metadata={"lr": "0.1"})
    assert (version.model, version.version, version.golden_sample_count) == ("clf", 1, 2)
    assert version.source_sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    models = admin.ListModels(admin_pb2.ListModelsRequest(), metadata=ADMIN).models
    assert [(m.name, m.latest_version) for m in models] == [("clf", 1)]
    versions = admin.ListVersions(admin_pb2.ListVersionsRequest(model="clf"), metadata=ADMIN)
    assert [v.version for v in versions.versions] == [1]
    assert (
        admin.GetVersion(admin_pb2.GetVersionRequest(model="clf", version=1), metadata=ADMIN)
        == version
    )

    device = enroll(channel, "cam-1", site="a")
    creds = bearer_metadata(device.device_token)
    deployed = admin.Deploy(
        admin_pb2.DeployRequest(model="clf", version=1, selector={"site": "a"}), metadata=ADMIN
    )
    assert [(d.device_id, d.generation) for d in deployed.devices] == [("cam-1", 1)]

    desired = desired_of(agent.GetDesiredState(fleet_pb2.GetDesiredStateRequest(), metadata=creds))
    assert desired.device_id == "cam-1" and desired.expires_at > desired.issued_at > 0
    [assignment] = desired.assignments
    assert (desired.generation, assignment.version) == (1, 1)
    signed = agent.GetManifest(
        fleet_pb2.GetManifestRequest(digest=assignment.manifest_digest), metadata=creds
    )
    manifest = verify_manifest(signed, trusted_keys(cloud, agent), assignment.manifest_digest)
    rebuilt = b""
    for chunk in file_chunks(manifest.files[0]):
        pieces = list(
            agent.FetchChunk(fleet_pb2.FetchChunkRequest(sha256=chunk.sha256), metadata=creds)
        )
        data = b"".join(p.data for p in pieces)
        assert hashlib.sha256(data).hexdigest() == chunk.sha256
        rebuilt += data
    assert rebuilt == model_path.read_bytes()

    reported = agent.ReportState(
        fleet_pb2.ReportedState(
            observed_generation=1,
            models=[
                fleet_pb2.ModelStatus(
                    model="clf", active_version=1, phase=fleet_pb2.MODEL_PHASE_READY
                )
            ],
            inference_endpoint="127.0.0.1:8001",
        ),
        metadata=creds,
    )
    assert reported.desired_generation == 1
    seen = admin.GetDevice(admin_pb2.GetDeviceRequest(device_id="cam-1"), metadata=ADMIN)
    assert seen.online and (seen.desired.generation, seen.reported.observed_generation) == (1, 1)
    assert seen.reported.models[0].phase == fleet_pb2.MODEL_PHASE_READY
    assert seen.reported.inference_endpoint == "127.0.0.1:8001"
    listed = admin.ListDevices(admin_pb2.ListDevicesRequest(selector={"site": "a"}), metadata=ADMIN)
    assert [d.device_id for d in listed.devices] == ["cam-1"]


def test_created_enroll_token_enrolls_with_its_labels(admin: Admin, agent: Agent) -> None:
    created = admin.CreateEnrollToken(
        admin_pb2.CreateEnrollTokenRequest(ttl_seconds=60, labels={"site": "b"}), metadata=ADMIN
    )
    assert created.expires_at > 0
    # The labels a device asks for are advisory; the token's are what it gets.
    response = agent.Enroll(
        fleet_pb2.EnrollRequest(enroll_token=created.enroll_token, labels={"site": "a"})
    )
    assert response.device_id.startswith("dev-") and response.device_token
    device = admin.GetDevice(
        admin_pb2.GetDeviceRequest(device_id=response.device_id), metadata=ADMIN
    )
    assert dict(device.labels) == {"site": "b"}


@pytest.mark.parametrize(
    "metadata", [(), bearer_metadata("adm_wrong"), (("authorization", "Basic xyz"),)]
)
def test_admin_calls_need_the_admin_token(
    admin: Admin, channel: grpc.Channel, model_path: Path, metadata: tuple[tuple[str, str], ...]
) -> None:
    assert status_of(
        lambda: admin.ListModels(admin_pb2.ListModelsRequest(), metadata=metadata)
    ) == (grpc.StatusCode.UNAUTHENTICATED)
    assert status_of(lambda: admin.PushModel(push_messages(model_path), metadata=metadata)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert_serving(channel, admin)


def test_bad_pushes_get_the_right_status(
    admin: Admin, channel: grpc.Channel, model_path: Path, tmp_path: Path
) -> None:
    def pushing(messages: Iterator[admin_pb2.PushModelRequest]) -> grpc.StatusCode:
        return status_of(lambda: admin.PushModel(messages, metadata=ADMIN))

    def data_only() -> Iterator[admin_pb2.PushModelRequest]:
        yield admin_pb2.PushModelRequest(data=b"abc")

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (70 << 10))  # the fixture's max_upload_bytes is 64 KiB
    size = model_path.stat().st_size
    cases = {
        "header missing": (data_only(), grpc.StatusCode.INVALID_ARGUMENT),
        "empty stream": (iter(()), grpc.StatusCode.INVALID_ARGUMENT),
        "announced too large": (push_messages(big), grpc.StatusCode.RESOURCE_EXHAUSTED),
        "more than announced": (
            push_messages(model_path, size=size - 10),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        "over the limit, size unannounced": (
            push_messages(big, size=0),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        "fewer than announced": (
            push_messages(model_path, size=size + 10),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "unloadable onnx": (push_messages(bad), grpc.StatusCode.INVALID_ARGUMENT),
        "bad model name": (
            push_messages(model_path, model="Bad/Name"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "unknown parent": (push_messages(model_path, parent_version=7), grpc.StatusCode.NOT_FOUND),
    }
    got = {name: pushing(messages) for name, (messages, _) in cases.items()}
    assert got == {name: code for name, (_, code) in cases.items()}
    assert admin.ListModels(admin_pb2.ListModelsRequest(), metadata=ADMIN).models == []
    assert list((tmp_path / "cloud" / "tmp").iterdir()) == []  # no upload left behind
    assert_serving(channel, admin)
    assert push(admin, model_path).version == 1


def test_unknown_things_and_unmatched_selectors(
    admin: Admin, agent: Agent, channel: grpc.Channel, model_path: Path
) -> None:
    def code(fn: Callable[[], object]) -> grpc.StatusCode:
        return status_of(fn)

    assert (
        code(
            lambda: admin.ListVersions(admin_pb2.ListVersionsRequest(model="nope"), metadata=ADMIN)
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code(
            lambda: admin.GetVersion(
                admin_pb2.GetVersionRequest(model="nope", version=1), metadata=ADMIN
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code(lambda: admin.Deploy(admin_pb2.DeployRequest(model="nope", version=1), metadata=ADMIN))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code(lambda: admin.GetDevice(admin_pb2.GetDeviceRequest(device_id="nope"), metadata=ADMIN))
        == grpc.StatusCode.NOT_FOUND
    )
    push(admin, model_path)
    assert (
        code(lambda: admin.Deploy(admin_pb2.DeployRequest(model="clf", version=1), metadata=ADMIN))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    enroll(channel, "cam-1", site="a")
    with pytest.raises(grpc.RpcError) as info:
        admin.Deploy(
            admin_pb2.DeployRequest(model="clf", version=1, selector={"site": "b"}), metadata=ADMIN
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "site=a" in str(info.value.details())
    assert (
        code(lambda: admin.Deploy(admin_pb2.DeployRequest(model="clf", version=0), metadata=ADMIN))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert_serving(channel, admin)


def test_device_credentials_are_checked(admin: Admin, agent: Agent, channel: grpc.Channel) -> None:
    mine = enroll(channel, "cam-1")
    enroll(channel, "cam-2")
    creds = bearer_metadata(mine.device_token)
    other = "cam-2"
    calls = {
        "bad enroll token": (
            lambda: agent.Enroll(fleet_pb2.EnrollRequest(enroll_token="enr_nope")),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        "bad device id": (
            lambda: agent.Enroll(
                fleet_pb2.EnrollRequest(enroll_token="enr_test-static-token", device_id="../x")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "no credential": (
            lambda: agent.GetDesiredState(fleet_pb2.GetDesiredStateRequest()),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        "wrong credential": (
            lambda: agent.GetDesiredState(
                fleet_pb2.GetDesiredStateRequest(), metadata=bearer_metadata("dev_x")
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        "other's desired state": (
            lambda: agent.GetDesiredState(
                fleet_pb2.GetDesiredStateRequest(device_id=other), metadata=creds
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        "other's report": (
            lambda: agent.ReportState(fleet_pb2.ReportedState(device_id=other), metadata=creds),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        "other's watch": (
            lambda: agent.WatchDesiredState(
                fleet_pb2.WatchDesiredStateRequest(device_id=other), metadata=creds
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        "other's chunk fetch": (
            lambda: agent.FetchChunk(
                fleet_pb2.FetchChunkRequest(device_id=other, sha256="0" * 64), metadata=creds
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        "unknown manifest": (
            lambda: agent.GetManifest(
                fleet_pb2.GetManifestRequest(digest="0" * 64), metadata=creds
            ),
            grpc.StatusCode.PERMISSION_DENIED,  # not in its desired state: nothing to say
        ),
        "malformed digest": (
            lambda: agent.GetManifest(fleet_pb2.GetManifestRequest(digest="xyz"), metadata=creds),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "unknown chunk": (
            lambda: agent.FetchChunk(fleet_pb2.FetchChunkRequest(sha256="0" * 64), metadata=creds),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    }
    got = {name: status_of(fn) for name, (fn, _) in calls.items()}
    assert got == {name: code for name, (_, code) in calls.items()}
    assert_serving(channel, admin)


def _model_with_big_weights(path: Path, floats: int) -> Path:
    w = np.arange(floats, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [floats])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [floats])],
        [helper.make_tensor("W", TensorProto.FLOAT, [floats], w.tobytes(), raw=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_fetch_chunk_streams_pieces_and_resumes_from_an_offset(
    settings: CloudSettings, tmp_path: Path
) -> None:
    big = settings.model_copy(
        update={"data_dir": tmp_path / "big", "chunk_size": 1 << 20, "max_upload_bytes": 4 << 20}
    )
    with serve(big) as cloud, secure_channel(cloud) as channel:
        admin, agent = Admin(channel), Agent(channel)
        model = _model_with_big_weights(tmp_path / "big.onnx", 150_000)  # ~600 KB
        version = push(admin, model, piece=64 << 10)
        device = enroll(channel, "cam-1")
        creds = bearer_metadata(device.device_token)
        admin.Deploy(admin_pb2.DeployRequest(model="clf", version=1), metadata=ADMIN)
        signed = agent.GetManifest(
            fleet_pb2.GetManifestRequest(digest=version.artifacts[0].manifest_digest),
            metadata=creds,
        )
        manifest = verify_manifest(signed, trusted_keys(cloud, agent))
        [chunk] = file_chunks(manifest.files[0])
        whole = list(
            agent.FetchChunk(fleet_pb2.FetchChunkRequest(sha256=chunk.sha256), metadata=creds)
        )
        assert len(whole) == 3  # 256 KiB pieces
        assert [p.offset for p in whole] == [0, 256 << 10, 512 << 10]
        assert {p.total_size for p in whole} == {chunk.size}

        # An interrupted download resumes from the last good byte.
        partial = b"".join(p.data for p in whole)[:300_000]
        rest = agent.FetchChunk(
            fleet_pb2.FetchChunkRequest(sha256=chunk.sha256, offset=len(partial)), metadata=creds
        )
        data = partial + b"".join(p.data for p in rest)
        assert hashlib.sha256(data).hexdigest() == chunk.sha256

        at_end = list(
            agent.FetchChunk(
                fleet_pb2.FetchChunkRequest(sha256=chunk.sha256, offset=chunk.size), metadata=creds
            )
        )
        assert [(p.data, p.total_size) for p in at_end] == [(b"", chunk.size)]
        beyond = status_of(
            lambda: agent.FetchChunk(
                fleet_pb2.FetchChunkRequest(sha256=chunk.sha256, offset=chunk.size + 1),
                metadata=creds,
            )
        )
        assert beyond == grpc.StatusCode.INVALID_ARGUMENT
        assert_serving(channel, admin)


def test_watch_notices_a_deploy_and_ends_when_the_server_stops(
    cloud: CloudServer, admin: Admin, agent: Agent, channel: grpc.Channel, model_path: Path
) -> None:
    push(admin, model_path)
    device = enroll(channel, "cam-1")
    stream = agent.WatchDesiredState(
        fleet_pb2.WatchDesiredStateRequest(known_generation=0),
        metadata=bearer_metadata(device.device_token),
    )
    notices = iter(stream)
    assert next(notices).generation == 0  # the first notice comes at once

    def deploy() -> None:
        admin.Deploy(admin_pb2.DeployRequest(model="clf", version=1), metadata=ADMIN)

    threading.Thread(target=deploy).start()
    assert next(notices).generation == 1
    cloud.stop(grace=2.0)
    assert list(notices) == []  # the stream ended cleanly, not with an error


def test_watchers_beyond_the_limit_are_refused_and_cancelled_ones_free_their_slot(
    admin: Admin, agent: Agent, channel: grpc.Channel
) -> None:
    device = enroll(channel, "cam-1")
    creds = bearer_metadata(device.device_token)

    def watch() -> Any:
        return agent.WatchDesiredState(fleet_pb2.WatchDesiredStateRequest(), metadata=creds)

    first, second = watch(), watch()  # the fixture allows 2 (see its max_workers)
    assert next(first).generation == next(second).generation == 0
    assert status_of(watch) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(channel, admin)
    first.cancel()
    # The cancelled stream's thread is released promptly (not after the 15 s keep-alive).
    deadline = time.monotonic() + 10
    while True:
        third = watch()
        try:
            assert next(third).generation == 0
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the cancelled watch never freed its slot"
            time.sleep(0.05)
    second.cancel()
    third.cancel()
