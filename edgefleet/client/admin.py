"""A typed client for the cloud's admin API: what the CLI uses, and what a notebook or a CI
pipeline uses to drive everything the CLI can.

    from edgefleet.client import AdminClient
    with AdminClient("127.0.0.1:50051", token_file="admin-token", ca_file="ca.pem") as cloud:
        v = cloud.push_model("defect-classifier", "model.onnx")
        cloud.deploy("defect-classifier", v.version, selector={"site": "plant-1"})
        for d in cloud.devices():
            print(d.device_id, d.online, d.models)
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from edgefleet.client.download import ArtifactDownload
from edgefleet.client.download import download as download_artifact
from edgefleet.core.auth import bearer_metadata, read_secret
from edgefleet.core.data import Capture, CapturePolicy, DataSet, DriftReport, VersionTelemetry
from edgefleet.core.errors import InvalidArgument, Unavailable
from edgefleet.core.fleet import Deployment, Device, TrafficVariant
from edgefleet.core.jobs import Job, JobEvent
from edgefleet.core.loop import Loop, LoopConfig
from edgefleet.core.rollouts import Rollout, RolloutSpec
from edgefleet.core.rpc import error_from_rpc
from edgefleet.core.tls import ClientSecurity
from edgefleet.core.tokens import AdminToken, EnrollToken
from edgefleet.core.trust import RootKey, TrustChain
from edgefleet.core.versions import Model, ModelVersion
from edgefleet.core.wire import from_proto, to_proto
from protos.admin.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    loop_pb2,
    rollout_pb2,
)
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import data_pb2, fleet_pb2, fleet_pb2_grpc

# 1 MiB pieces: well under gRPC's default 4 MiB message limit.
UPLOAD_PIECE = 1 << 20
MAX_MESSAGE = 64 << 20

T = TypeVar("T")
_WARM_START = {
    "auto": jobs_pb2.WARM_START_AUTO,
    "parent": jobs_pb2.WARM_START_PARENT,
    "base": jobs_pb2.WARM_START_BASE,
}


class AdminClient:
    """Blocking client for `edgefleet.admin.v1.AdminService`.

    Failed calls raise `edgefleet.core.errors.EdgefleetError` whose `.code` says what kind of
    failure it was and whose message says what to fix.
    """

    def __init__(
        self,
        address: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        insecure: bool | None = None,
    ) -> None:
        """Connect to the cloud at `address` (EDGEFLEET_CLOUD, default 127.0.0.1:50051).

        The admin token comes from `token`, `token_file`, EDGEFLEET_ADMIN_TOKEN or
        EDGEFLEET_ADMIN_TOKEN_FILE; the server is verified against `ca_file`
        (EDGEFLEET_CA_FILE), and plain text needs `insecure` (EDGEFLEET_INSECURE=1).
        """
        address = address or os.environ.get("EDGEFLEET_CLOUD") or "127.0.0.1:50051"
        token_path = token_file or os.environ.get("EDGEFLEET_ADMIN_TOKEN_FILE")
        if not token and token_path:
            token = read_secret(Path(token_path), "the admin token")
        token = token or os.environ.get("EDGEFLEET_ADMIN_TOKEN")
        if not token:
            raise InvalidArgument(
                "no admin token: pass --token-file or set EDGEFLEET_ADMIN_TOKEN_FILE (the cloud "
                "prints where it keeps its first token when it starts)"
            )
        if insecure is None:
            insecure = os.environ.get("EDGEFLEET_INSECURE", "").lower() in ("1", "true", "yes")
        ca = ca_file or os.environ.get("EDGEFLEET_CA_FILE") or None
        security = ClientSecurity(ca_file=Path(ca) if ca else None, insecure=insecure)
        security.check("the admin client")
        self.address = address
        self.timeout = timeout
        self._metadata = bearer_metadata(token)
        self._channel = security.channel(
            address,
            [
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ],
        )
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        try:
            return method(request, metadata=self._metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    # models ---------------------------------------------------------------------------

    def push_model(
        self,
        model: str,
        path: str | Path,
        *,
        description: str = "",
        target: str = "",
        metadata: Mapping[str, str] | None = None,
        golden_samples: Sequence[artifact_pb2.GoldenSample] = (),
        skip_verify: bool = False,
        parent_version: int = 0,
        progress: Callable[[int, int], None] | None = None,
    ) -> ModelVersion:
        """Upload an ONNX file as the next version of `model`, streamed in 1 MiB pieces.

        `progress(sent, total)` is called after each piece.
        """
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"{path} is not a file; give the path of an .onnx model")
        total = path.stat().st_size
        header = admin_pb2.PushModelHeader(
            model=model,
            description=description,
            target=target,
            size=total,
            golden_samples=list(golden_samples),
            metadata=dict(metadata or {}),
            skip_verify=skip_verify,
            parent_version=parent_version,
        )

        def requests() -> Iterator[admin_pb2.PushModelRequest]:
            yield admin_pb2.PushModelRequest(header=header)
            sent = 0
            with path.open("rb") as f:
                while piece := f.read(UPLOAD_PIECE):
                    sent += len(piece)
                    yield admin_pb2.PushModelRequest(data=piece)
                    if progress:
                        progress(sent, total)

        response: admin_pb2.PushModelResponse = self._call(
            self._stub.PushModel, requests(), timeout=max(self.timeout, 600.0)
        )
        return from_proto(response.version, ModelVersion)

    def models(self) -> list[Model]:
        response = self._call(self._stub.ListModels, admin_pb2.ListModelsRequest())
        return [from_proto(m, Model) for m in response.models]

    def versions(self, model: str) -> list[ModelVersion]:
        response = self._call(self._stub.ListVersions, admin_pb2.ListVersionsRequest(model=model))
        return [from_proto(v, ModelVersion) for v in response.versions]

    def version(self, model: str, version: int) -> ModelVersion:
        request = admin_pb2.GetVersionRequest(model=model, version=version)
        return from_proto(self._call(self._stub.GetVersion, request), ModelVersion)

    # fleet ----------------------------------------------------------------------------

    def deploy(
        self,
        model: str,
        version: int,
        *,
        selector: Mapping[str, str] | None = None,
        target: str = "",
    ) -> dict[str, int]:
        """Set `model` to `version` on every device matching `selector`; device -> generation."""
        response = self._call(
            self._stub.Deploy,
            admin_pb2.DeployRequest(
                model=model, version=version, selector=dict(selector or {}), target=target
            ),
        )
        return {d.device_id: d.generation for d in response.devices}

    def deployments(self) -> list[Deployment]:
        """Standing deployments (what devices matching each selector run), oldest first."""
        response = self._call(self._stub.ListDeployments, admin_pb2.ListDeploymentsRequest())
        return [from_proto(d, Deployment) for d in response.deployments]

    def devices(self, selector: Mapping[str, str] | None = None) -> list[Device]:
        response = self._call(
            self._stub.ListDevices, admin_pb2.ListDevicesRequest(selector=dict(selector or {}))
        )
        return [from_proto(d, Device) for d in response.devices]

    def device(self, device_id: str) -> Device:
        request = admin_pb2.GetDeviceRequest(device_id=device_id)
        return from_proto(self._call(self._stub.GetDevice, request), Device)

    def rollback(
        self,
        model: str,
        version: int,
        *,
        selector: Mapping[str, str] | None = None,
        target: str = "",
    ) -> dict[str, int]:
        """Take `model` back to an older `version` on the devices matching `selector`: the
        only way a device moves below the newest version it has run (its version floor)."""
        response = self._call(
            self._stub.Rollback,
            admin_pb2.RollbackRequest(
                model=model, version=version, selector=dict(selector or {}), target=target
            ),
        )
        return {d.device_id: d.generation for d in response.devices}

    def label_device(
        self,
        device_id: str,
        set_labels: Mapping[str, str] | None = None,
        remove: Sequence[str] = (),
    ) -> Device:
        """Set and remove a device's labels (the ones deployments select by)."""
        request = admin_pb2.LabelDeviceRequest(
            device_id=device_id, set=dict(set_labels or {}), remove=list(remove)
        )
        return from_proto(self._call(self._stub.LabelDevice, request), Device)

    def revoke_device(self, device_id: str) -> Device:
        """Refuse every later call of the device until it re-enrolls with a re-enroll token."""
        request = admin_pb2.RevokeDeviceRequest(device_id=device_id)
        return from_proto(self._call(self._stub.RevokeDevice, request), Device)

    # tokens and keys ------------------------------------------------------------------

    def create_enroll_token(
        self,
        *,
        ttl_seconds: int = 0,
        note: str = "",
        max_uses: int = 0,
        labels: Mapping[str, str] | None = None,
        reenroll: str = "",
    ) -> tuple[str, EnrollToken]:
        """A new enrollment token (the secret, shown once) and its record. With `reenroll`,
        a token only that enrolled device may use, once, to take a new credential."""
        response = self._call(
            self._stub.CreateEnrollToken,
            admin_pb2.CreateEnrollTokenRequest(
                ttl_seconds=ttl_seconds,
                note=note,
                max_uses=max_uses,
                labels=dict(labels or {}),
                device_id=reenroll,
            ),
        )
        return response.enroll_token, from_proto(response.token, EnrollToken)

    def enroll_tokens(self) -> list[EnrollToken]:
        response = self._call(self._stub.ListEnrollTokens, admin_pb2.ListEnrollTokensRequest())
        return [from_proto(t, EnrollToken) for t in response.tokens]

    def revoke_enroll_token(self, token_id: str) -> EnrollToken:
        request = admin_pb2.RevokeEnrollTokenRequest(token_id=token_id)
        return from_proto(self._call(self._stub.RevokeEnrollToken, request), EnrollToken)

    def create_admin_token(self, name: str, role: str) -> tuple[str, AdminToken]:
        """A new admin token for a person or a pipeline (viewer, operator or admin)."""
        response = self._call(
            self._stub.CreateAdminToken, admin_pb2.CreateAdminTokenRequest(name=name, role=role)
        )
        return response.admin_token, from_proto(response.token, AdminToken)

    def admin_tokens(self) -> list[AdminToken]:
        response = self._call(self._stub.ListAdminTokens, admin_pb2.ListAdminTokensRequest())
        return [from_proto(t, AdminToken) for t in response.tokens]

    def revoke_admin_token(self, token_id: str) -> AdminToken:
        request = admin_pb2.RevokeAdminTokenRequest(token_id=token_id)
        return from_proto(self._call(self._stub.RevokeAdminToken, request), AdminToken)

    def download(
        self,
        model: str,
        version: int,
        folder: str | Path,
        *,
        target: str = "",
        root_key: str | None = None,
        force: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> ArtifactDownload:
        """Write `model` v`version`'s artifact for `target` (default onnx-cpu-fp32) into
        `folder`: its files as a device assembles them plus `manifest.pb`, the signed
        manifest, every byte checked against it and its signature against the cloud's root
        key (pinned by `root_key`, a "sha256:..." fingerprint, when given). All or nothing;
        a non-empty `folder` is refused unless `force`. `progress(done, total)` counts bytes."""
        signed = self._call(
            self._stub.GetManifest,
            admin_pb2.GetManifestRequest(model=model, version=version, target=target),
        )
        chain = from_proto(
            self._call(
                fleet_pb2_grpc.AgentServiceStub(self._channel).GetTrust,
                fleet_pb2.GetTrustRequest(),
            ),
            TrustChain,
        )

        def fetch(digest: str, sha256s: list[str]) -> Iterator[admin_pb2.ChunkBytes]:
            request = admin_pb2.FetchChunksRequest(digest=digest, sha256s=sha256s)
            try:
                yield from self._stub.FetchChunks(
                    request, metadata=self._metadata, timeout=max(self.timeout, 3600.0)
                )
            except grpc.RpcError as err:
                raise error_from_rpc(err) from None

        return download_artifact(
            signed,
            chain,
            fetch,
            folder,
            model=model,
            version=version,
            target=target,
            root_key=root_key,
            force=force,
            progress=progress,
        )

    def rotate_root_key(self) -> RootKey:
        """Make a new root key, signed by the current one; devices follow without
        re-enrolling."""
        return from_proto(
            self._call(self._stub.RotateRootKey, admin_pb2.RotateRootKeyRequest()), RootKey
        )

    # what comes back --------------------------------------------------------------------

    def set_capture_policy(
        self,
        model: str,
        *,
        sample_rate: float = 0.0,
        below_confidence: float = 0.0,
        max_row_bytes: int = 0,
    ) -> dict[str, int]:
        """What devices capture of `model`'s inferences; device -> its new generation."""
        policy = CapturePolicy(sample_rate, below_confidence, max_row_bytes)
        response = self._call(
            self._stub.SetCapturePolicy,
            admin_pb2.SetCapturePolicyRequest(
                model=model, policy=to_proto(policy, data_pb2.CapturePolicy)
            ),
        )
        return {d.device_id: d.generation for d in response.devices}

    def set_traffic(
        self,
        model: str,
        variants: Sequence[TrafficVariant] = (),
        *,
        selector: Mapping[str, str] | None = None,
    ) -> dict[str, int]:
        """Serve `variants` (an A/B share or a shadow) beside `model`'s primary on the devices
        of `selector` that run it; no variants clears the split. Device -> new generation."""
        response = self._call(
            self._stub.SetTraffic,
            admin_pb2.SetTrafficRequest(
                model=model,
                selector=dict(selector or {}),
                variants=[to_proto(v, admin_pb2.TrafficVariant) for v in variants],
            ),
        )
        return {d.device_id: d.generation for d in response.devices}

    def data_sets(self) -> list[DataSet]:
        response = self._call(self._stub.ListDataSets, admin_pb2.ListDataSetsRequest())
        return [from_proto(d, DataSet) for d in response.data_sets]

    def export_captures(
        self,
        model: str,
        *,
        version: int = 0,
        since: float = 0.0,
        labelled_only: bool = False,
        label: str = "",
        limit: int = 0,
    ) -> Iterator[Capture]:
        """Captured rows of `model`, oldest first, as they stream in."""
        request = admin_pb2.ExportCapturesRequest(
            model=model,
            version=version,
            since=since,
            labelled_only=labelled_only,
            label=label,
            limit=limit,
        )
        try:
            for row in self._stub.ExportCaptures(
                request, metadata=self._metadata, timeout=max(self.timeout, 3600.0)
            ):
                yield from_proto(row, Capture)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def label_captures(self, labels: Mapping[int, str]) -> tuple[int, int]:
        """Set labels by capture id (as an export gives it): (labelled, unknown ids)."""
        items = [admin_pb2.CaptureLabel(capture_id=i, label=v) for i, v in labels.items()]
        response = self._call(self._stub.LabelCaptures, iter(items), timeout=600.0)
        return int(response.labelled), int(response.unknown)

    def telemetry(
        self, model: str, *, since: float = 0.0, selector: Mapping[str, str] | None = None
    ) -> list[VersionTelemetry]:
        """The model's serving across the fleet, per version (newest first)."""
        request = admin_pb2.GetTelemetryRequest(
            model=model, since=since, selector=dict(selector or {})
        )
        response = self._call(self._stub.GetTelemetry, request)
        return [from_proto(v, VersionTelemetry) for v in response.versions]

    def drift(self, model: str, *, version: int = 0, window_s: float = 0.0) -> DriftReport:
        """How far devices' inputs moved from each baselined version's training inputs (or
        `version`'s alone) over the last `window_s` seconds (0: the cloud's drift.window_s):
        PSI and KS per channel, per device and for the fleet."""
        request = admin_pb2.GetDriftRequest(model=model, version=version, since_s=window_s)
        return from_proto(self._call(self._stub.GetDrift, request), DriftReport)

    # the closed loop ------------------------------------------------------------------

    def enable_loop(self, config: LoopConfig) -> Loop:
        """Turn on (or change) a model's closed loop: drift, or `run_loop`, starts a
        warm-started fine-tune on its labelled captures, rolled out only if it beats the
        running version on held-out rows."""
        request = loop_pb2.EnableLoopRequest(config=to_proto(config, loop_pb2.LoopConfig))
        return from_proto(self._call(self._stub.EnableLoop, request), Loop)

    def disable_loop(self, model: str, reason: str = "") -> Loop:
        """Off: a run under way stops (its fine-tune cancelled) and starts no rollout."""
        request = loop_pb2.LoopActionRequest(model=model, reason=reason)
        return from_proto(self._call(self._stub.DisableLoop, request), Loop)

    def run_loop(self, model: str, reason: str = "") -> Loop:
        """Start a run of the model's loop now, without waiting for drift."""
        request = loop_pb2.LoopActionRequest(model=model, reason=reason)
        return from_proto(self._call(self._stub.RunLoop, request), Loop)

    def loop(self, model: str, runs: int = 20) -> Loop:
        """A model's loop: its settings and its last `runs` runs, newest first."""
        request = loop_pb2.GetLoopRequest(model=model, runs=runs)
        return from_proto(self._call(self._stub.GetLoop, request), Loop)

    def loops(self) -> list[Loop]:
        """Every model's loop, each with its latest run."""
        response = self._call(self._stub.ListLoops, loop_pb2.ListLoopsRequest())
        return [from_proto(item, Loop) for item in response.loops]

    # rollouts -------------------------------------------------------------------------

    def start_rollout(self, spec: RolloutSpec) -> Rollout:
        """Start moving `spec.model` to `spec.version` in waves; the rollout as it began."""
        return from_proto(
            self._call(self._stub.StartRollout, to_proto(spec, rollout_pb2.RolloutSpec)), Rollout
        )

    def rollout(self, rollout_id: str) -> Rollout:
        request = rollout_pb2.GetRolloutRequest(rollout_id=rollout_id)
        return from_proto(self._call(self._stub.GetRollout, request), Rollout)

    def rollouts(self, model: str = "") -> list[Rollout]:
        response = self._call(self._stub.ListRollouts, rollout_pb2.ListRolloutsRequest(model=model))
        return [from_proto(r, Rollout) for r in response.rollouts]

    def pause_rollout(self, rollout_id: str, reason: str = "") -> Rollout:
        return self._rollout_action(self._stub.PauseRollout, rollout_id, reason)

    def resume_rollout(self, rollout_id: str, reason: str = "") -> Rollout:
        return self._rollout_action(self._stub.ResumeRollout, rollout_id, reason)

    def abort_rollout(self, rollout_id: str, reason: str = "") -> Rollout:
        """Stop and send every moved device back to the version it ran."""
        return self._rollout_action(self._stub.AbortRollout, rollout_id, reason)

    def _rollout_action(self, method: Any, rollout_id: str, reason: str) -> Rollout:
        request = rollout_pb2.RolloutActionRequest(rollout_id=rollout_id, reason=reason)
        return from_proto(self._call(method, request), Rollout)

    # jobs -----------------------------------------------------------------------------

    def upload(
        self, path: str | Path, *, progress: Callable[[int, int], None] | None = None
    ) -> str:
        """Send a local file or folder to the cloud for jobs; its `upload:` reference.

        A folder travels as a tar of its contents. The same bytes get the same reference,
        so uploading again costs the transfer only.
        """
        path = Path(path)
        if not path.exists():
            raise InvalidArgument(f"{path} does not exist")
        with tempfile.TemporaryDirectory(prefix="edgefleet-upload-") as scratch:
            if path.is_dir():
                source = Path(scratch) / "folder.tar"
                with tarfile.open(source, "w") as tar:
                    for item in sorted(path.iterdir()):
                        tar.add(item, arcname=item.name)
                kind = jobs_pb2.UPLOAD_KIND_FOLDER_TAR
            else:
                source, kind = path, jobs_pb2.UPLOAD_KIND_FILE
            total = source.stat().st_size
            header = jobs_pb2.UploadHeader(name=path.name, kind=kind, size=total)

            def requests() -> Iterator[jobs_pb2.UploadRequest]:
                yield jobs_pb2.UploadRequest(header=header)
                sent = 0
                with source.open("rb") as f:
                    while piece := f.read(UPLOAD_PIECE):
                        sent += len(piece)
                        yield jobs_pb2.UploadRequest(data=piece)
                        if progress:
                            progress(sent, total)

            response: jobs_pb2.UploadResponse = self._call(
                self._jobs.Upload, requests(), timeout=max(self.timeout, 3600.0)
            )
        return response.reference

    def finetune(
        self,
        model: str,
        *,
        base: str,
        data: str,
        params: Mapping[str, object] | None = None,
        search: Mapping[str, Sequence[object]] | None = None,
        max_trials: int = 0,
        targets: Sequence[str] = (),
        description: str = "",
        parent_version: int = 0,
        label_column: str = "",
        text_column: str = "",
        limit: int = 0,
        max_accuracy_drop: float | None = None,
        test_data: str = "",
        test_fraction: float = 0.0,
        final: bool = False,
        from_parent: str = "auto",
        seeds: int = 1,
    ) -> Job:
        """Submit a fine-tune job; the queued job. `data`, `test_data` and `base` are names
        the cloud knows or references from `upload()`. `from_parent`: auto, parent or base."""
        request = jobs_pb2.FineTuneRequest(
            model=model,
            base=base,
            data=data,
            data_options=jobs_pb2.DataOptions(
                label_column=label_column, text_column=text_column, limit=limit
            ),
            params={k: str(v) for k, v in (params or {}).items()},
            search=[
                jobs_pb2.SearchAxis(name=k, values=[str(v) for v in values])
                for k, values in (search or {}).items()
            ],
            max_trials=max_trials,
            targets=list(targets),
            description=description,
            parent_version=parent_version,
            max_accuracy_drop=max_accuracy_drop,
            test_data=test_data,
            test_fraction=test_fraction,
            final=final,
            warm_start=_WARM_START[from_parent],
            seeds=seeds,
        )
        return _job(self._call(self._jobs.SubmitFineTune, request))

    def compile(
        self,
        model: str,
        version: int,
        target: str,
        *,
        data: str = "",
        limit: int = 0,
        max_accuracy_drop: float | None = None,
    ) -> Job:
        """Submit a job that builds `target` for an existing version."""
        request = jobs_pb2.CompileRequest(
            model=model,
            version=version,
            target=target,
            data=data,
            data_options=jobs_pb2.DataOptions(limit=limit),
            max_accuracy_drop=max_accuracy_drop,
        )
        return _job(self._call(self._jobs.SubmitCompile, request))

    def evaluate(
        self,
        model: str,
        version: int,
        *,
        data: str,
        target: str = "",
        sample: int = 0,
        label_column: str = "",
        text_column: str = "",
        limit: int = 0,
    ) -> Job:
        """Submit a job that scores `version`'s `target` artifact (default: onnx-cpu-fp32
        where it has one, else its first) on labelled `data`, a stratified sample of at most
        `sample` examples (0: 2000); the result is recorded with the version (its
        `evaluations`)."""
        request = jobs_pb2.EvaluateRequest(
            model=model,
            version=version,
            target=target,
            data=data,
            data_options=jobs_pb2.DataOptions(
                label_column=label_column, text_column=text_column, limit=limit
            ),
            sample=sample,
        )
        return _job(self._call(self._jobs.SubmitEvaluate, request))

    def jobs(self, model: str = "", *, active_only: bool = False, limit: int = 0) -> list[Job]:
        response = self._call(
            self._jobs.ListJobs,
            jobs_pb2.ListJobsRequest(model=model, active_only=active_only, limit=limit),
        )
        return [_job(j) for j in response.jobs]

    def job(self, job_id: str) -> Job:
        return _job(self._call(self._jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id)))

    def cancel_job(self, job_id: str) -> Job:
        return _job(self._call(self._jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id)))

    def retry_job(self, job_id: str) -> Job:
        return _job(self._call(self._jobs.RetryJob, jobs_pb2.RetryJobRequest(job_id=job_id)))

    def watch_job(
        self, job_id: str, *, after_seq: int = 0, follow: bool = True
    ) -> Iterator[JobEvent]:
        """The job's events from `after_seq` on; with `follow`, live until the job ends."""
        stream = self._jobs.WatchJob(
            jobs_pb2.WatchJobRequest(job_id=job_id, after_seq=after_seq, follow=follow),
            metadata=self._metadata,
            timeout=None if follow else self.timeout,
        )
        try:
            for event in stream:
                yield from_proto(event, JobEvent)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            stream.cancel()

    def wait_job(
        self,
        job_id: str,
        *,
        on_event: Callable[[JobEvent], None] | None = None,
        timeout: float | None = None,
    ) -> Job:
        """Follow the job until it ends; the finished job. Raises Unavailable on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seq = 0
        while True:
            for event in self.watch_job(job_id, after_seq=seq):
                seq = event.seq
                if on_event:
                    on_event(event)
                if deadline is not None and time.monotonic() > deadline:
                    raise Unavailable(f"{job_id} did not finish within {timeout:.0f}s")
            job = self.job(job_id)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise Unavailable(f"{job_id} did not finish within {timeout:.0f}s")

    def wait_converged(
        self,
        model: str,
        version: int,
        device_ids: Sequence[str],
        *,
        timeout: float = 120.0,
        poll: float = 0.2,
        on_change: Callable[[list[Device]], None] | None = None,
    ) -> list[Device]:
        """Block until every named device runs `version` of `model`; the final device list.

        Raises `Unavailable` on timeout, naming the devices that did not converge and why.
        """
        deadline = time.monotonic() + timeout
        wanted = set(device_ids)
        last: list[Device] = []
        seen: tuple[tuple[str, int, str], ...] = ()
        while True:
            last = [d for d in self.devices() if d.device_id in wanted]
            state = tuple(
                (
                    d.device_id,
                    d.running(model),
                    next((m.phase.value for m in d.models if m.model == model), ""),
                )
                for d in last
            )
            if on_change and state != seen:
                on_change(last)
                seen = state
            if len(last) == len(wanted) and all(
                d.running(model) == version and d.converged for d in last
            ):
                return last
            if time.monotonic() > deadline:
                behind = [
                    f"{d.device_id} (runs v{d.running(model)}, error: {'; '.join(d.errors) or 'none'})"
                    for d in last
                    if d.running(model) != version
                ]
                raise Unavailable(
                    f"not converged to {model} v{version} within {timeout:.0f}s: {', '.join(behind)}"
                )
            time.sleep(poll)


def _job(message: jobs_pb2.Job) -> Job:
    return from_proto(message, Job)
