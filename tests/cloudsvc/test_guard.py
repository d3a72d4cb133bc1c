"""What the cloud's one interceptor guarantees on every method of every service, tried over
a real gRPC server on loopback: no method answers without the right credential, bytes that
are no message are INVALID_ARGUMENT, an unexpected exception is a fixed INTERNAL message,
and no status message echoes unbounded client input."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudsvc.access import ROLES
from cloudsvc.server import SERVICES, CloudServer, clean_interrupted_writes
from cloudsvc.settings import CloudSettings
from edgefleet.client import AdminClient
from edgefleet.core import errors
from edgefleet.core.auth import bearer_metadata
from edgefleet.core.tokens import Role
from protos.admin.v1 import admin_pb2, admin_pb2_grpc, jobs_pb2
from protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc

from .conftest import ADMIN, ADMIN_TOKEN, enroll

DESCRIPTORS = {
    "edgefleet.admin.v1.AdminService": admin_pb2.DESCRIPTOR,
    "edgefleet.admin.v1.JobService": jobs_pb2.DESCRIPTOR,
    "edgefleet.fleet.v1.AgentService": fleet_pb2.DESCRIPTOR,
}


def _methods(service: str) -> list[tuple[str, bool, bool]]:
    """(full method path, client streams, server streams) of every method of a service."""
    descriptor = DESCRIPTORS[service].services_by_name[service.rsplit(".", 1)[1]]
    return [
        (f"/{service}/{m.name}", m.client_streaming, m.server_streaming) for m in descriptor.methods
    ]


def _call_raw(
    channel: grpc.Channel,
    path: str,
    client_streams: bool,
    server_streams: bool,
    body: bytes,
    metadata: tuple[tuple[str, str], ...] = (),
) -> grpc.StatusCode:
    """Send `body` as the request bytes of any method; the status it ends with."""
    kwargs: Any = {"timeout": 10, "metadata": metadata}
    try:
        if client_streams and server_streams:
            list(channel.stream_stream(path)(iter([body]), **kwargs))  # type: ignore[arg-type]
        elif client_streams:
            channel.stream_unary(path)(iter([body]), **kwargs)  # type: ignore[arg-type]
        elif server_streams:
            list(channel.unary_stream(path)(body, **kwargs))  # type: ignore[arg-type]
        else:
            channel.unary_unary(path)(body, **kwargs)  # type: ignore[arg-type]
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def test_every_admin_and_job_method_needs_the_admin_token(channel: grpc.Channel) -> None:
    wrong = bearer_metadata("adm_wrong")
    for service in ("edgefleet.admin.v1.AdminService", "edgefleet.admin.v1.JobService"):
        for path, cs, ss in _methods(service):
            assert _call_raw(channel, path, cs, ss, b"") == grpc.StatusCode.UNAUTHENTICATED, path
            got = _call_raw(channel, path, cs, ss, b"", wrong)
            assert got == grpc.StatusCode.UNAUTHENTICATED, path


def test_every_agent_method_but_enroll_and_trust_needs_a_device_credential(
    channel: grpc.Channel,
) -> None:
    for path, cs, ss in _methods("edgefleet.fleet.v1.AgentService"):
        if path.endswith("/GetTrust"):
            # Public keys, pinned by the fingerprint each device is provisioned with.
            assert _call_raw(channel, path, cs, ss, b"") == grpc.StatusCode.OK
            continue
        # Without a credential, and with the admin token, which is no device credential
        # (nor an enroll token: Enroll refuses it).
        for metadata in ((), ADMIN):
            got = _call_raw(channel, path, cs, ss, b"", metadata)
            assert got == grpc.StatusCode.UNAUTHENTICATED, (path, metadata)


def _role_token(channel: grpc.Channel, role: str) -> tuple[tuple[str, str], ...]:
    created = admin_pb2_grpc.AdminServiceStub(channel).CreateAdminToken(
        admin_pb2.CreateAdminTokenRequest(name=f"t-{role}", role=role), metadata=ADMIN
    )
    return bearer_metadata(created.admin_token)


def test_every_admin_method_states_a_role_and_smaller_roles_are_denied(
    channel: grpc.Channel,
) -> None:
    """One table gives every admin and job method the role it needs; a token with a
    smaller role gets PERMISSION_DENIED before the method runs, on every method."""
    tokens = {role: _role_token(channel, role.value) for role in Role}
    for service in ("edgefleet.admin.v1.AdminService", "edgefleet.admin.v1.JobService"):
        for path, cs, ss in _methods(service):
            assert path in ROLES, f"{path} states no role: add it to cloudsvc.access.ROLES"
            needed = ROLES[path]
            for role, metadata in tokens.items():
                got = _call_raw(channel, path, cs, ss, b"", metadata)
                if role.allows(needed):
                    assert got != grpc.StatusCode.PERMISSION_DENIED, (path, role)
                else:
                    assert got == grpc.StatusCode.PERMISSION_DENIED, (path, role)


def test_revoked_admin_tokens_and_roles_end_to_end(cloud: CloudServer) -> None:
    ca = cloud.trust_dir / "ca.pem"
    with AdminClient(cloud.address, ADMIN_TOKEN, ca_file=ca) as root:
        secret, record = root.create_admin_token("viewer-1", "viewer")
        assert record.role is Role.VIEWER and secret not in repr(root.admin_tokens())
        with AdminClient(cloud.address, secret, ca_file=ca) as viewer:
            assert viewer.models() == []
            with pytest.raises(errors.PermissionDenied, match="needs the operator role"):
                viewer.deploy("m", 1)
            root.revoke_admin_token(record.token_id)
            with pytest.raises(errors.Unauthenticated, match="revoked"):
                viewer.models()


def test_undecodable_bytes_are_invalid_argument_on_every_method(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    device = enroll(channel, "cam-1")
    garbage = b"\xff\xff\xff\xff\x0f"  # a varint that never ends: no message parses it
    with caplog.at_level(logging.ERROR):
        for service in DESCRIPTORS:
            creds = ADMIN if "admin" in service else bearer_metadata(device.device_token)
            for path, cs, ss in _methods(service):
                got = _call_raw(channel, path, cs, ss, garbage, creds)
                assert got == grpc.StatusCode.INVALID_ARGUMENT, path
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged per request"


def fleet_pb2_grpc_stub(channel: grpc.Channel) -> fleet_pb2_grpc.AgentServiceStub:
    return fleet_pb2_grpc.AgentServiceStub(channel)


def test_health_answers_for_every_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", *SERVICES):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


def test_an_unexpected_error_is_a_fixed_internal_message(
    cloud: CloudServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> list[object]:
        raise RuntimeError("/srv/secret/path and a password")

    monkeypatch.setattr(cloud.registry, "list_models", broken)
    with (
        AdminClient(cloud.address, ADMIN_TOKEN, ca_file=cloud.trust_dir / "ca.pem") as client,
        caplog.at_level(logging.ERROR),
        pytest.raises(errors.Internal) as info,
    ):
        client.models()
    assert "secret" not in info.value.message and "RuntimeError" not in info.value.message
    assert "incident" in info.value.message
    incident = info.value.message.split("incident ")[1].split(")")[0]
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the details are in the log only


def test_client_errors_are_typed_and_bounded(cloud: CloudServer) -> None:
    with AdminClient(cloud.address, ADMIN_TOKEN, ca_file=cloud.trust_dir / "ca.pem") as client:
        # A 20 KB name used to turn NOT_FOUND into a transport error (the echo overflowed
        # the status trailer); now it is NOT_FOUND with a bounded message.
        with pytest.raises(errors.NotFound) as info:
            client.version("x" * 20_000, 1)
        assert len(info.value.message) <= 1000
        with pytest.raises(errors.InvalidArgument, match="10 years"):
            client.create_enroll_token(ttl_seconds=10**15)
        with pytest.raises(errors.NotFound, match="no model is named 'nothing-here'"):
            client.deploy("nothing-here", 1)


def test_label_counts_are_bounded(channel: grpc.Channel) -> None:
    enroll(channel, "d1")
    labels = {f"k{n}": "v" for n in range(65)}
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        admin.LabelDevice(admin_pb2.LabelDeviceRequest(device_id="d1", set=labels), metadata=ADMIN)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 64" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        admin.CreateEnrollToken(admin_pb2.CreateEnrollTokenRequest(labels=labels), metadata=ADMIN)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_leftovers_of_interrupted_writes_are_removed_at_start(
    settings: CloudSettings, tmp_path: Path
) -> None:
    from cloudsvc.jobs.uploads import UploadStore
    from cloudsvc.store.blobs import FolderBlobStore

    blobs = FolderBlobStore(settings.blobs_dir)
    blobs.put("2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae", b"foo")
    (settings.blobs_dir / "2c" / ".incoming-x1").write_bytes(b"half a blob")
    settings.uploads_dir.mkdir(parents=True)
    (settings.uploads_dir / ".incoming-y").write_bytes(b"x" * 1000)
    (settings.uploads_dir / ".staging-z").mkdir()
    (settings.uploads_dir / ".staging-z" / "part").write_bytes(b"y" * 10)
    settings.tmp_dir.mkdir(parents=True)
    (settings.tmp_dir / "push-abc.onnx").write_bytes(b"z" * 100)
    (settings.tmp_dir / "keep-me").write_bytes(b"not ours")
    freed = clean_interrupted_writes(settings, blobs, UploadStore(settings.uploads_dir, 1 << 20))
    assert freed == len(b"half a blob") + 1000 + 10 + 100
    assert sorted(p.name for p in settings.tmp_dir.iterdir()) == ["keep-me"]
    assert list(settings.uploads_dir.iterdir()) == []
    assert blobs.has("2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")
    assert not (settings.blobs_dir / "2c" / ".incoming-x1").exists()


def test_a_service_without_a_rule_is_refused_outright() -> None:
    from cloudsvc.access import Access, access_of

    assert access_of("/edgefleet.admin.v1.AdminService/AnyNewMethod") is Access.ADMIN
    assert "/edgefleet.admin.v1.AdminService/AnyNewMethod" not in ROLES  # so: refused
    assert access_of("/edgefleet.fleet.v1.AgentService/Enroll") is Access.ENROLL
    assert access_of("/some.Other/Method") is None  # the Gate answers PERMISSION_DENIED
