"""AdminService: the operator's API. Checks the admin token, converts, calls the logic."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc

from cloudsvc import convert
from cloudsvc.errors import InvalidRequest, NotAuthenticated, TooLarge
from cloudsvc.fleet import Fleet
from cloudsvc.registry import Registry, check_name
from edgefleet.core.auth import same_secret, token_from_metadata
from edgefleet.core.rpc import grpc_method
from protos.admin.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)


def require_admin(context: grpc.ServicerContext, admin_token: str) -> None:
    """NotAuthenticated unless the call carries the admin token."""
    token = token_from_metadata(context.invocation_metadata())
    if not token:
        raise NotAuthenticated(
            "admin calls need `authorization: Bearer <admin token>` metadata; the token is "
            "in the cloud's data_dir/admin-token or EDGEFLEET_ADMIN_TOKEN"
        )
    if not same_secret(token, admin_token):
        raise NotAuthenticated("the admin token is wrong; check EDGEFLEET_ADMIN_TOKEN")


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        registry: Registry,
        fleet: Fleet,
        admin_token: str,
        tmp_dir: Path,
        max_upload_bytes: int,
    ) -> None:
        self.registry = registry
        self.fleet = fleet
        self._admin_token = admin_token
        self.tmp_dir = tmp_dir
        self.max_upload_bytes = max_upload_bytes

    def _require_admin(self, context: grpc.ServicerContext) -> None:
        require_admin(context, self._admin_token)

    @grpc_method
    def PushModel(
        self, request_iterator: Iterator[admin_pb2.PushModelRequest], context: grpc.ServicerContext
    ) -> admin_pb2.PushModelResponse:
        self._require_admin(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidRequest(
                "the first PushModel message must be the header (model, size, ...), "
                "then the file's bytes"
            )
        header = first.header
        if header.size > self.max_upload_bytes:
            raise TooLarge(
                f"the model is {header.size} bytes; this cloud accepts at most "
                f"{self.max_upload_bytes} (max_upload_bytes)"
            )
        # Check the name before accepting gigabytes for it.
        check_name("model", header.model)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="push-", suffix=".onnx")
        tmp = Path(tmp_name)
        try:
            received = 0
            limit = min(header.size, self.max_upload_bytes)
            with os.fdopen(fd, "wb") as f:
                for message in request_iterator:
                    if message.WhichOneof("part") != "data":
                        raise InvalidRequest("only one header may be sent, before the data")
                    received += len(message.data)
                    if received > limit:
                        raise TooLarge(
                            f"more bytes arrived than announced: over {limit} "
                            f"(header size {header.size}, max_upload_bytes "
                            f"{self.max_upload_bytes}); send the file's exact size"
                        )
                    f.write(message.data)
            if received < header.size:
                raise InvalidRequest(
                    f"the upload ended after {received} of {header.size} announced bytes; "
                    "push the whole file again"
                )
            version = self.registry.push(
                model=header.model,
                path=tmp,
                description=header.description,
                target=header.target,
                golden_samples=list(header.golden_samples),
                metadata=dict(header.metadata),
                skip_verify=header.skip_verify,
                parent_version=header.parent_version,
                created_by="admin",
            )
        finally:
            tmp.unlink(missing_ok=True)
        return admin_pb2.PushModelResponse(version=convert.version_to_proto(version))

    @grpc_method
    def ListModels(
        self, request: admin_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListModelsResponse:
        self._require_admin(context)
        return admin_pb2.ListModelsResponse(
            models=[convert.model_to_proto(m) for m in self.registry.list_models()]
        )

    @grpc_method
    def ListVersions(
        self, request: admin_pb2.ListVersionsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListVersionsResponse:
        self._require_admin(context)
        versions = self.registry.list_versions(request.model)
        return admin_pb2.ListVersionsResponse(
            versions=[convert.version_to_proto(v) for v in versions]
        )

    @grpc_method
    def GetVersion(
        self, request: admin_pb2.GetVersionRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ModelVersion:
        self._require_admin(context)
        return convert.version_to_proto(self.registry.get_version(request.model, request.version))

    @grpc_method
    def Deploy(
        self, request: admin_pb2.DeployRequest, context: grpc.ServicerContext
    ) -> admin_pb2.DeployResponse:
        self._require_admin(context)
        if request.version == 0:
            raise InvalidRequest("deploy needs a version number (1 or more)")
        results = self.fleet.deploy(
            request.model, request.version, dict(request.selector), request.target
        )
        return admin_pb2.DeployResponse(
            devices=[admin_pb2.DeviceGeneration(device_id=d, generation=g) for d, g in results]
        )

    @grpc_method
    def ListDevices(
        self, request: admin_pb2.ListDevicesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListDevicesResponse:
        self._require_admin(context)
        views = self.fleet.devices(dict(request.selector))
        return admin_pb2.ListDevicesResponse(devices=[convert.device_to_proto(v) for v in views])

    @grpc_method
    def GetDevice(
        self, request: admin_pb2.GetDeviceRequest, context: grpc.ServicerContext
    ) -> admin_pb2.Device:
        self._require_admin(context)
        return convert.device_to_proto(self.fleet.device(request.device_id))

    @grpc_method
    def CreateEnrollToken(
        self, request: admin_pb2.CreateEnrollTokenRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CreateEnrollTokenResponse:
        self._require_admin(context)
        token, expires_at = self.fleet.create_enroll_token(request.ttl_seconds, request.note)
        return admin_pb2.CreateEnrollTokenResponse(enroll_token=token, expires_at=expires_at)
