"""JobService: fine-tune, compile and evaluate jobs over gRPC. Converts messages and calls the
JobManager and the UploadStore; nothing else (access is decided in cloudsvc.access)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from cloudsvc.errors import InvalidRequest
from cloudsvc.jobs.manager import JobManager
from cloudsvc.jobs.spec import CompileSpec, EvaluateSpec, FineTuneSpec, parse_spec
from cloudsvc.jobs.uploads import UploadKind, UploadStore
from edgefleet.core.jobs import Job
from edgefleet.core.wire import to_proto
from protos.admin.v1 import jobs_pb2, jobs_pb2_grpc

_UPLOAD_KINDS = {
    jobs_pb2.UPLOAD_KIND_FILE: UploadKind.FILE,
    jobs_pb2.UPLOAD_KIND_FOLDER_TAR: UploadKind.FOLDER_TAR,
}


def _data_options(options: jobs_pb2.DataOptions) -> dict[str, Any]:
    out: dict[str, Any] = {"limit": options.limit}
    if options.label_column:
        out["label_column"] = options.label_column
    if options.text_column:
        out["text_column"] = options.text_column
    return out


_FROM_PARENT = {
    jobs_pb2.WARM_START_AUTO: "auto",
    jobs_pb2.WARM_START_PARENT: "parent",
    jobs_pb2.WARM_START_BASE: "base",
}


def finetune_spec(request: jobs_pb2.FineTuneRequest) -> FineTuneSpec:
    data: dict[str, Any] = {
        "model": request.model,
        "base": request.base,
        "data": request.data,
        "data_options": _data_options(request.data_options),
        "params": dict(request.params),
        "search": [(axis.name, tuple(axis.values)) for axis in request.search],
        "targets": tuple(request.targets),
        "description": request.description,
        "parent_version": request.parent_version,
        "test_data": request.test_data,
        "test_fraction": request.test_fraction,
        "final": request.final,
        "from_parent": _FROM_PARENT.get(request.warm_start, "unknown"),
        "seeds": request.seeds or 1,
    }
    if request.max_trials:
        data["max_trials"] = request.max_trials
    if request.HasField("max_accuracy_drop"):
        data["max_accuracy_drop"] = request.max_accuracy_drop
    spec = parse_spec(FineTuneSpec, data)
    assert isinstance(spec, FineTuneSpec)
    return spec


def compile_spec(request: jobs_pb2.CompileRequest) -> CompileSpec:
    data: dict[str, Any] = {
        "model": request.model,
        "version": request.version,
        "target": request.target,
        "data": request.data,
        "data_options": _data_options(request.data_options),
    }
    if request.HasField("max_accuracy_drop"):
        data["max_accuracy_drop"] = request.max_accuracy_drop
    spec = parse_spec(CompileSpec, data)
    assert isinstance(spec, CompileSpec)
    return spec


def evaluate_spec(request: jobs_pb2.EvaluateRequest) -> EvaluateSpec:
    data: dict[str, Any] = {
        "model": request.model,
        "version": request.version,
        "target": request.target,
        "data": request.data,
        "data_options": _data_options(request.data_options),
    }
    if request.sample:
        data["sample"] = request.sample
    spec = parse_spec(EvaluateSpec, data)
    assert isinstance(spec, EvaluateSpec)
    return spec


def _job(job: Job) -> jobs_pb2.Job:
    return to_proto(job, jobs_pb2.Job)


class JobService(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: JobManager, uploads: UploadStore) -> None:
        self.jobs = jobs
        self.uploads = uploads

    def Upload(
        self, request_iterator: Iterator[jobs_pb2.UploadRequest], context: grpc.ServicerContext
    ) -> jobs_pb2.UploadResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidRequest("the first Upload message must be the header, then the bytes")
        header = first.header
        if header.kind not in _UPLOAD_KINDS:
            raise InvalidRequest("say whether the upload is a file or a folder (tar)")

        def pieces() -> Iterator[bytes]:
            for message in request_iterator:
                if message.WhichOneof("part") != "data":
                    raise InvalidRequest("only one header may be sent, before the data")
                yield message.data

        upload = self.uploads.receive(
            header.name, _UPLOAD_KINDS[header.kind], header.size, pieces()
        )
        return jobs_pb2.UploadResponse(
            reference=upload.reference,
            sha256=upload.sha256,
            size=upload.size,
            existed=upload.existed,
        )

    def SubmitFineTune(
        self, request: jobs_pb2.FineTuneRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        return _job(self.jobs.submit(finetune_spec(request)))

    def SubmitCompile(
        self, request: jobs_pb2.CompileRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        return _job(self.jobs.submit(compile_spec(request)))

    def SubmitEvaluate(
        self, request: jobs_pb2.EvaluateRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        return _job(self.jobs.submit(evaluate_spec(request)))

    def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        jobs = self.jobs.list(request.model, request.active_only, request.limit)
        return jobs_pb2.ListJobsResponse(jobs=[_job(j) for j in jobs])

    def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        return _job(self.jobs.get(request.job_id))

    def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[jobs_pb2.JobEvent]:
        for event in self.jobs.watch(
            request.job_id, request.after_seq, request.follow, alive=context.is_active
        ):
            yield to_proto(event, jobs_pb2.JobEvent)

    def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        return _job(self.jobs.cancel(request.job_id))

    def RetryJob(
        self, request: jobs_pb2.RetryJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.Job:
        return _job(self.jobs.retry(request.job_id))
