"""AdminService: the operator's API. Converts messages and calls the logic; who may call is
decided before any method runs (cloudsvc.access)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc

from cloudsvc.drift import DriftMonitor
from cloudsvc.errors import InvalidRequest, NotReady, TooLarge
from cloudsvc.fleet import Fleet
from cloudsvc.loop import ClosedLoop
from cloudsvc.registry import Registry, check_name
from cloudsvc.rollouts import RolloutEngine
from cloudsvc.settings import DriftSettings
from cloudsvc.store.blobs import check_digest
from cloudsvc.store.data import CaptureQuery, DataStore
from cloudsvc.telemetry import aggregate
from cloudsvc.tokens import Tokens
from edgefleet.core.data import CaptureLabel, CapturePolicy
from edgefleet.core.fleet import TrafficVariant
from edgefleet.core.loop import LoopConfig
from edgefleet.core.rollouts import RolloutSpec
from edgefleet.core.tokens import Role
from edgefleet.core.wire import from_proto, to_proto
from protos.admin.v1 import admin_pb2, admin_pb2_grpc, loop_pb2, rollout_pb2
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import data_pb2, fleet_pb2

log = logging.getLogger(__name__)

MAX_SELECTOR = 64
MAX_REASON = 500

MAX_LABEL = 256
MAX_LABELS_AT_ONCE = 1_000_000
# Where pushes are received; names that a crash may leave behind (cleaned at start).
PUSH_PREFIX = "push-"
# Bytes of a chunk per FetchChunks message: well under gRPC's 4 MiB message limit.
CHUNK_PIECE_BYTES = 256 << 10


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        registry: Registry,
        fleet: Fleet,
        tokens: Tokens,
        tmp_dir: Path,
        max_upload_bytes: int,
        data: DataStore,
        rollouts: RolloutEngine,
        drift: DriftMonitor | None = None,
        loop: ClosedLoop | None = None,
    ) -> None:
        self.loop = loop
        self.rollouts = rollouts
        # Reports are computed on demand; without the running monitor, with the defaults.
        self.drift = drift or DriftMonitor(registry.metadata, data, DriftSettings())
        self.registry = registry
        self.fleet = fleet
        self.tokens = tokens
        self.data = data
        self.tmp_dir = tmp_dir
        self.max_upload_bytes = max_upload_bytes

    def PushModel(
        self, request_iterator: Iterator[admin_pb2.PushModelRequest], context: grpc.ServicerContext
    ) -> admin_pb2.PushModelResponse:
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
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix=PUSH_PREFIX, suffix=".onnx")
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
        return admin_pb2.PushModelResponse(version=to_proto(version, admin_pb2.ModelVersion))

    def ListModels(
        self, request: admin_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListModelsResponse:
        return admin_pb2.ListModelsResponse(
            models=[to_proto(m, admin_pb2.Model) for m in self.registry.list_models()]
        )

    def ListVersions(
        self, request: admin_pb2.ListVersionsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListVersionsResponse:
        versions = self.registry.list_versions(request.model)
        return admin_pb2.ListVersionsResponse(
            versions=[to_proto(v, admin_pb2.ModelVersion) for v in versions]
        )

    def GetVersion(
        self, request: admin_pb2.GetVersionRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ModelVersion:
        return to_proto(
            self.registry.get_version(request.model, request.version), admin_pb2.ModelVersion
        )

    def GetManifest(
        self, request: admin_pb2.GetManifestRequest, context: grpc.ServicerContext
    ) -> artifact_pb2.SignedManifest:
        return self.registry.artifact_manifest(request.model, request.version, request.target)

    def FetchChunks(
        self, request: admin_pb2.FetchChunksRequest, context: grpc.ServicerContext
    ) -> Iterator[admin_pb2.ChunkBytes]:
        digest = check_digest(request.digest)
        wanted = self.registry.check_chunk_request(
            digest, [check_digest(s) for s in request.sha256s]
        )
        blobs = self.registry.blobs
        for sha in wanted:
            total = blobs.size(sha)
            offset = 0
            with blobs.open(sha) as f:
                while offset < total and context.is_active():
                    data = f.read(CHUNK_PIECE_BYTES)
                    if not data:
                        break
                    yield admin_pb2.ChunkBytes(
                        sha256=sha, offset=offset, data=data, total_size=total
                    )
                    offset += len(data)

    def Deploy(
        self, request: admin_pb2.DeployRequest, context: grpc.ServicerContext
    ) -> admin_pb2.DeployResponse:
        if request.version == 0:
            raise InvalidRequest("deploy needs a version number (1 or more)")
        results = self.fleet.deploy(
            request.model, request.version, dict(request.selector), request.target
        )
        return admin_pb2.DeployResponse(
            devices=[admin_pb2.DeviceGeneration(device_id=d, generation=g) for d, g in results]
        )

    def ListDeployments(
        self, request: admin_pb2.ListDeploymentsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListDeploymentsResponse:
        return admin_pb2.ListDeploymentsResponse(
            deployments=[to_proto(d, admin_pb2.Deployment) for d in self.fleet.deployments()]
        )

    def ListDevices(
        self, request: admin_pb2.ListDevicesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListDevicesResponse:
        views = self.fleet.devices(dict(request.selector))
        return admin_pb2.ListDevicesResponse(devices=[to_proto(v, admin_pb2.Device) for v in views])

    def GetDevice(
        self, request: admin_pb2.GetDeviceRequest, context: grpc.ServicerContext
    ) -> admin_pb2.Device:
        return to_proto(self.fleet.device(request.device_id), admin_pb2.Device)

    def Rollback(
        self, request: admin_pb2.RollbackRequest, context: grpc.ServicerContext
    ) -> admin_pb2.DeployResponse:
        if request.version == 0:
            raise InvalidRequest("rollback needs the version to go back to (--to N)")
        results = self.fleet.deploy(
            request.model, request.version, dict(request.selector), request.target, rollback=True
        )
        return admin_pb2.DeployResponse(
            devices=[admin_pb2.DeviceGeneration(device_id=d, generation=g) for d, g in results]
        )

    def LabelDevice(
        self, request: admin_pb2.LabelDeviceRequest, context: grpc.ServicerContext
    ) -> admin_pb2.Device:
        device = self.fleet.label(request.device_id, dict(request.set), list(request.remove))
        return to_proto(device, admin_pb2.Device)

    def RevokeDevice(
        self, request: admin_pb2.RevokeDeviceRequest, context: grpc.ServicerContext
    ) -> admin_pb2.Device:
        return to_proto(self.fleet.revoke(request.device_id), admin_pb2.Device)

    def CreateEnrollToken(
        self, request: admin_pb2.CreateEnrollTokenRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CreateEnrollTokenResponse:
        secret, token = self.tokens.create_enroll_token(
            request.ttl_seconds,
            request.note,
            request.max_uses,
            dict(request.labels),
            request.device_id,
        )
        return admin_pb2.CreateEnrollTokenResponse(
            enroll_token=secret,
            expires_at=int(token.expires_at),
            token=to_proto(token, admin_pb2.EnrollToken),
        )

    def ListEnrollTokens(
        self, request: admin_pb2.ListEnrollTokensRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListEnrollTokensResponse:
        return admin_pb2.ListEnrollTokensResponse(
            tokens=[to_proto(t, admin_pb2.EnrollToken) for t in self.tokens.enroll_tokens()]
        )

    def RevokeEnrollToken(
        self, request: admin_pb2.RevokeEnrollTokenRequest, context: grpc.ServicerContext
    ) -> admin_pb2.EnrollToken:
        return to_proto(self.tokens.revoke_enroll_token(request.token_id), admin_pb2.EnrollToken)

    def CreateAdminToken(
        self, request: admin_pb2.CreateAdminTokenRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CreateAdminTokenResponse:
        try:
            role = Role(request.role)
        except ValueError:
            raise InvalidRequest(
                f"role {request.role[:40]!r} is not one of {', '.join(r.value for r in Role)}"
            ) from None
        secret, token = self.tokens.create_admin_token(request.name, role)
        return admin_pb2.CreateAdminTokenResponse(
            admin_token=secret, token=to_proto(token, admin_pb2.AdminToken)
        )

    def ListAdminTokens(
        self, request: admin_pb2.ListAdminTokensRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListAdminTokensResponse:
        return admin_pb2.ListAdminTokensResponse(
            tokens=[to_proto(t, admin_pb2.AdminToken) for t in self.tokens.admin_tokens()]
        )

    def RevokeAdminToken(
        self, request: admin_pb2.RevokeAdminTokenRequest, context: grpc.ServicerContext
    ) -> admin_pb2.AdminToken:
        return to_proto(self.tokens.revoke_admin_token(request.token_id), admin_pb2.AdminToken)

    def RotateRootKey(
        self, request: admin_pb2.RotateRootKeyRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.RootKey:
        key = self.fleet.keys.rotate()
        log.warning("root key rotated to v%d (%s)", key.version, key.fingerprint)
        return to_proto(key, fleet_pb2.RootKey)

    # what comes back ---------------------------------------------------------------------
    def SetCapturePolicy(
        self, request: admin_pb2.SetCapturePolicyRequest, context: grpc.ServicerContext
    ) -> admin_pb2.SetCapturePolicyResponse:
        results = self.fleet.set_capture_policy(
            request.model, from_proto(request.policy, CapturePolicy)
        )
        return admin_pb2.SetCapturePolicyResponse(
            devices=[admin_pb2.DeviceGeneration(device_id=d, generation=g) for d, g in results]
        )

    def SetTraffic(
        self, request: admin_pb2.SetTrafficRequest, context: grpc.ServicerContext
    ) -> admin_pb2.SetTrafficResponse:
        results = self.fleet.set_traffic(
            request.model,
            dict(request.selector),
            [from_proto(v, TrafficVariant) for v in request.variants],
        )
        return admin_pb2.SetTrafficResponse(
            devices=[admin_pb2.DeviceGeneration(device_id=d, generation=g) for d, g in results]
        )

    def ListDataSets(
        self, request: admin_pb2.ListDataSetsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListDataSetsResponse:
        return admin_pb2.ListDataSetsResponse(
            data_sets=[to_proto(d, admin_pb2.DataSet) for d in self.data.data_sets()]
        )

    def ExportCaptures(
        self, request: admin_pb2.ExportCapturesRequest, context: grpc.ServicerContext
    ) -> Iterator[data_pb2.Capture]:
        check_name("model", request.model)
        query = CaptureQuery(
            request.model,
            request.version,
            request.since,
            request.labelled_only,
            request.label,
            request.limit,
        )
        for row in self.data.captures(query):
            if not context.is_active():
                return
            yield to_proto(row, data_pb2.Capture)

    def LabelCaptures(
        self, request_iterator: Iterator[admin_pb2.CaptureLabel], context: grpc.ServicerContext
    ) -> admin_pb2.LabelCapturesResponse:
        labels = []
        for item in request_iterator:
            if len(item.label) > MAX_LABEL or item.capture_id < 1:
                raise InvalidRequest(
                    f"a label is 1-{MAX_LABEL} characters for a capture id from an export"
                )
            labels.append(CaptureLabel(item.capture_id, item.label))
            if len(labels) > MAX_LABELS_AT_ONCE:
                raise TooLarge(f"label at most {MAX_LABELS_AT_ONCE} captures in one call")
        labelled, unknown = self.data.label(labels)
        return admin_pb2.LabelCapturesResponse(labelled=labelled, unknown=unknown)

    # rollouts ------------------------------------------------------------------------------
    def StartRollout(
        self, request: rollout_pb2.RolloutSpec, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        check_name("model", request.model)
        if len(request.selector) > MAX_SELECTOR:
            raise InvalidRequest(f"a selector has at most {MAX_SELECTOR} labels")
        spec = from_proto(request, RolloutSpec)
        return to_proto(self.rollouts.start_rollout(spec), rollout_pb2.Rollout)

    def GetRollout(
        self, request: rollout_pb2.GetRolloutRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return to_proto(self.rollouts.get(request.rollout_id), rollout_pb2.Rollout)

    def ListRollouts(
        self, request: rollout_pb2.ListRolloutsRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.ListRolloutsResponse:
        if request.model:
            check_name("model", request.model)
        return rollout_pb2.ListRolloutsResponse(
            rollouts=[to_proto(r, rollout_pb2.Rollout) for r in self.rollouts.list(request.model)]
        )

    def PauseRollout(
        self, request: rollout_pb2.RolloutActionRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return to_proto(
            self.rollouts.pause(request.rollout_id, request.reason[:MAX_REASON]),
            rollout_pb2.Rollout,
        )

    def ResumeRollout(
        self, request: rollout_pb2.RolloutActionRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return to_proto(
            self.rollouts.resume(request.rollout_id, request.reason[:MAX_REASON]),
            rollout_pb2.Rollout,
        )

    def AbortRollout(
        self, request: rollout_pb2.RolloutActionRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return to_proto(
            self.rollouts.abort(request.rollout_id, request.reason[:MAX_REASON]),
            rollout_pb2.Rollout,
        )

    def GetTelemetry(
        self, request: admin_pb2.GetTelemetryRequest, context: grpc.ServicerContext
    ) -> admin_pb2.TelemetryReport:
        check_name("model", request.model)
        devices = None
        if request.selector:
            devices = {d.device_id for d in self.fleet.devices(dict(request.selector))}
        records = self.data.telemetry(request.model, request.since, devices)
        return admin_pb2.TelemetryReport(
            versions=[to_proto(v, admin_pb2.VersionTelemetry) for v in aggregate(records)]
        )

    def GetDrift(
        self, request: admin_pb2.GetDriftRequest, context: grpc.ServicerContext
    ) -> admin_pb2.DriftReport:
        report = self.drift.report(request.model, request.version, request.since_s)
        return to_proto(report, admin_pb2.DriftReport)

    # the closed loop ----------------------------------------------------------------------
    def _closed_loop(self) -> ClosedLoop:
        if self.loop is None:
            raise NotReady("this cloud runs no closed loop (started without its job manager)")
        return self.loop

    def EnableLoop(
        self, request: loop_pb2.EnableLoopRequest, context: grpc.ServicerContext
    ) -> loop_pb2.Loop:
        loop = self._closed_loop().enable(from_proto(request.config, LoopConfig))
        return to_proto(loop, loop_pb2.Loop)

    def DisableLoop(
        self, request: loop_pb2.LoopActionRequest, context: grpc.ServicerContext
    ) -> loop_pb2.Loop:
        loop = self._closed_loop().disable(request.model, request.reason[:MAX_REASON])
        return to_proto(loop, loop_pb2.Loop)

    def RunLoop(
        self, request: loop_pb2.LoopActionRequest, context: grpc.ServicerContext
    ) -> loop_pb2.Loop:
        loop = self._closed_loop().run_now(request.model, request.reason[:MAX_REASON])
        return to_proto(loop, loop_pb2.Loop)

    def GetLoop(
        self, request: loop_pb2.GetLoopRequest, context: grpc.ServicerContext
    ) -> loop_pb2.Loop:
        loop = self._closed_loop().get(request.model, min(request.runs, 1000))
        return to_proto(loop, loop_pb2.Loop)

    def ListLoops(
        self, request: loop_pb2.ListLoopsRequest, context: grpc.ServicerContext
    ) -> loop_pb2.ListLoopsResponse:
        loops = self._closed_loop().loops()
        return loop_pb2.ListLoopsResponse(loops=[to_proto(loop, loop_pb2.Loop) for loop in loops])
