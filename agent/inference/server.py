"""The agent's Open Inference Protocol (KServe v2) gRPC endpoint over a ModelRepository.

A thin servicer over the transport-free ``dataplane`` (which looks the model up, checks the
request with ``validation``, runs the session, optionally through ``batching``, and answers).
Existing clients (Triton's, KServe's, ``edgefleet.client.inference``) work unchanged.
Beyond KServe's six methods it serves Triton's: ModelStreamInfer (each request's error in
error_message, the stream open; streams of every method share one budget below the worker
threads, and an inference stream idle for ``limits.stream_idle_s`` is closed),
ModelStatistics, ModelConfig, RepositoryIndex and the system shared-memory extension
(``shm``: regions per connection, confined to /dev/shm, closed when the connection goes);
the rest answer UNIMPLEMENTED saying so. gRPC health checking answers SERVING while the
server is serving and a model is loaded; reflection is on so ``grpcurl`` can list the
service.

    server = start_inference_server(repository, "127.0.0.1", 0)
    print(server.port)
    ...
    server.stop(grace=2.0)
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from agent.errors import (
    InvalidRequest,
    ModelNotFound,
    NotAuthorized,
    NotImplementedHere,
    RequestTooLarge,
    Unavailable,
)
from agent.inference.batching import DEFAULT_MAX_BATCH
from agent.inference.dataplane import DataPlane, RequestLimits
from agent.inference.limits import LargeRequests, MemoryStats, tune_allocator
from agent.inference.shadow import ShadowRunner
from agent.inference.shm import SHM_ROOT, SharedMemoryRegions
from agent.recorder import Recorder
from agent.runtime import ModelRepository
from edgefleet.core.auth import same_secret, token_from_metadata
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.rpc import CallGuard, bounded
from edgefleet.core.tls import server_credentials
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = [
    "BearerGate",
    "InferenceSecurity",
    "InferenceServer",
    "InferenceServicer",
    "RequestLimits",
    "exposure_warning",
    "start_inference_server",
]

SERVICE_NAME = "inference.GRPCInferenceService"
# Protocol extensions served beyond the core (Triton's names; binary_tensor_data is the REST
# port's, model_repository only its index).
EXTENSIONS: tuple[str, ...] = (
    "classification",
    "model_configuration",
    "model_repository(index)",
    "statistics",
    "system_shared_memory",
    "binary_tensor_data",
)
INFER_METHOD = f"/{SERVICE_NAME}/ModelInfer"


@dataclass(frozen=True)
class InferenceSecurity:
    """TLS for the port (certificate and key files) and the bearer token its inference calls
    must carry; neither by default (the port binds loopback by default)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    token: str = field(default="", repr=False)

    @property
    def tls(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol's gRPC methods over a DataPlane: each turns its message
    into the plane's call and back; errors reach the client through the interceptor."""

    def __init__(
        self, plane: DataPlane, *, max_streams: int = 4, stream_idle_s: float | None = None
    ) -> None:
        self.plane = plane
        self._stream_idle_s = stream_idle_s
        self._streams = threading.BoundedSemaphore(max_streams)
        self._stream_limit = max_streams
        self._live = pb.ServerLiveResponse(live=True)
        self._ready_true = pb.ServerReadyResponse(ready=True)
        self._ready_false = pb.ServerReadyResponse(ready=False)
        self._metadata = plane.server_metadata()

    @property
    def shadow(self) -> ShadowRunner:
        return self.plane.shadow

    @shadow.setter
    def shadow(self, runner: ShadowRunner) -> None:
        self.plane.shadow = runner

    @property
    def large(self) -> LargeRequests:
        return self.plane.large

    def ready(self) -> bool:
        return self.plane.ready()

    def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> pb.ServerLiveResponse:
        return self._live

    def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        return self._ready_true if self.plane.ready() else self._ready_false

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return self._metadata

    def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return self.plane.model_metadata(request.name, request.version)

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        return self.plane.infer(request, client=context.peer())

    # -- Triton's additions -----------------------------------------------------------------

    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """Triton's bidirectional stream: one answer per request, in order; a request that
        fails answers its error in error_message and the stream goes on. Each stream holds
        a server thread, so at most `max_streams` are open at once, and one that sends no
        request for `stream_idle_s` is closed with DEADLINE_EXCEEDED."""
        if not self._streams.acquire(blocking=False):
            raise RequestTooLarge(
                f"{self._stream_limit} inference streams are open already, the most this "
                "server holds; close one or use ModelInfer"
            )
        try:
            client = context.peer()
            for request in _idle_bounded(request_iterator, self._stream_idle_s, context):
                yield self._stream_one(request, client)
        except grpc.RpcError:
            return  # the client cancelled the stream or went away: no one to answer
        finally:
            self._streams.release()

    def _stream_one(
        self, request: pb.ModelInferRequest, client: str
    ) -> pb.ModelStreamInferResponse:
        plane = self.plane
        try:
            with plane.admit_size(request.model_name, request.model_version, request.ByteSize()):
                return pb.ModelStreamInferResponse(
                    infer_response=plane.infer(request, client=client)
                )
        except EdgefleetError as err:
            message = bounded(err.message)
        except Exception as err:  # the stream must outlive one request's fault
            incident = secrets.token_hex(4)
            log.error("unexpected error in ModelStreamInfer (incident %s)", incident, exc_info=err)
            message = f"internal error (incident {incident}); the server's log has the details"
        failed = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)

    def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.ServicerContext
    ) -> pb.ModelConfigResponse:
        return self.plane.model_config(request.name, request.version)

    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        return self.plane.model_statistics_response(request.name, request.version)

    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            raise ModelNotFound(
                f"this server has one model repository, unnamed; not {request.repository_name!r}"
            )
        return self.plane.repository_index(request.ready)

    def _regions(self) -> SharedMemoryRegions:
        regions = self.plane.shared_memory
        if regions is None:
            raise NotImplementedHere(
                "system shared memory is not served here (no /dev/shm); send tensors in the request"
            )
        return regions

    def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._regions().register(
            context.peer(), request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._regions().status(context.peer(), request.name):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name,
                    key=region.key,
                    offset=region.offset,
                    byte_size=region.byte_size,
                )
            )
        return response

    def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._regions().unregister(context.peer(), request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        raise _unimplemented(
            "RepositoryModelLoad", "models are loaded by the agent from its signed desired state"
        )

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        raise _unimplemented(
            "RepositoryModelUnload",
            "models are unloaded by the agent from its signed desired state",
        )

    def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        raise _unimplemented("CudaSharedMemoryStatus", _NO_CUDA_SHM)

    def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise _unimplemented("CudaSharedMemoryRegister", _NO_CUDA_SHM)

    def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        raise _unimplemented("CudaSharedMemoryUnregister", _NO_CUDA_SHM)

    def TraceSetting(
        self, request: pb.TraceSettingRequest, context: grpc.ServicerContext
    ) -> pb.TraceSettingResponse:
        raise _unimplemented("TraceSetting", "request tracing is not offered")

    def LogSettings(
        self, request: pb.LogSettingsRequest, context: grpc.ServicerContext
    ) -> pb.LogSettingsResponse:
        raise _unimplemented("LogSettings", "logging is set in the agent's settings")


_NO_CUDA_SHM = "CUDA shared memory is not offered; use system shared memory"


def _unimplemented(method: str, why: str) -> NotImplementedHere:
    return NotImplementedHere(
        f"{method} is not implemented by this server ({why}); it implements Triton's "
        f"{', '.join(EXTENSIONS)}"
    )


def reflection_pool() -> Any:
    """The descriptors reflection describes: the protocol's private pool (see
    scripts/gen_protos.py) with health checking's and reflection's own files added."""
    pool = pb.DESCRIPTOR.pool
    for module in (health_pb2, reflection_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        try:
            pool.FindFileByName(proto.name)
        except KeyError:
            pool.Add(proto)
    return pool


class _HealthServicer(health.HealthServicer):  # type: ignore[misc]
    """Health that follows readiness at the moment of each Check, not only on set_serving."""

    def __init__(self, ready: Any) -> None:
        super().__init__()
        self._ready = ready

    def refresh(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.set("", status)
        self.set(SERVICE_NAME, status)

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.refresh()
        return super().Check(request, context)


class InferenceServer:
    """A running inference endpoint; made by :func:`start_inference_server`."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        servicer: InferenceServicer,
        health_servicer: _HealthServicer,
        serving: threading.Event,
        warning: str = "",
    ) -> None:
        self.warning = warning
        self._server = server
        self.port = port
        self._servicer = servicer
        self._health = health_servicer
        self._serving = serving

    @property
    def plane(self) -> DataPlane:
        """The data plane behind the port (the REST port serves the same one)."""
        return self._servicer.plane

    def set_serving(self, serving: bool) -> None:
        """Serving (the default) answers ready once a model is loaded; not serving answers
        not ready (to drain before a stop) while live calls and inference keep working."""
        if serving:
            self._serving.set()
        else:
            self._serving.clear()
        self._health.refresh()

    def ready(self) -> bool:
        return self._servicer.ready()

    @property
    def shadow(self) -> ShadowRunner:
        """Shadow copies of requests: queued, run, skipped (queue full), failed, agreed."""
        return self._servicer.shadow

    @property
    def memory_stats(self) -> MemoryStats:
        """Large requests served, requests refused over their model's limit, heap trims."""
        return self._servicer.large.stats

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; running calls get `grace` seconds to finish."""
        self._serving.clear()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.plane.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or `timeout` passes); True when it stopped."""
        return bool(self._server.wait_for_termination(timeout))


def server_options(max_message_bytes: int, *, reuse_port: bool = False) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Two agents on one port would split traffic silently; fail the second bind instead.
        # Worker processes (agent.inference.workers) share their agent's port on purpose;
        # its control process keeps another agent off it.
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.optimization_target", "latency"),
    ]


class BearerGate:
    """The inference port's `authorize`: with a token set, every inference method needs it
    (health and reflection stay open for probes and grpcurl)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, method: str, context: grpc.ServicerContext) -> object:
        if not self._token or not method.startswith(f"/{SERVICE_NAME}/"):
            return None
        presented = token_from_metadata(context.invocation_metadata() or ())
        if presented is None or not same_secret(presented, self._token):
            raise NotAuthorized(
                "this inference port needs a bearer token: send `authorization: Bearer "
                "<token>` metadata (InferenceClient(..., token=...))"
            )
        return "client"


def exposure_warning(host: str, security: InferenceSecurity) -> str:
    """What the start-up line says when the port is reachable from the network unprotected."""
    if host in ("127.0.0.1", "::1", "localhost") or host.startswith("127."):
        return ""
    missing = [
        what
        for what, present in (("authentication", bool(security.token)), ("TLS", security.tls))
        if not present
    ]
    if not missing:
        return ""
    return (
        f"WARNING: inference is open to every host that reaches {host} without "
        f"{' or '.join(missing)}: anyone on the network can run and probe the models; set "
        "inference_token_file and inference_cert_file/inference_key_file, or bind 127.0.0.1"
    )


def stream_budget(max_workers: int) -> int:
    """How many streams, of all methods together, a server of `max_workers` threads holds
    open: at least one thread is always left for unary calls."""
    return max(min(1, max_workers - 1), max_workers - 2)


def _idle_bounded(
    requests: Iterator[Any], idle_s: float | None, context: grpc.ServicerContext
) -> Iterator[Any]:
    """The stream's requests; the call ends with DEADLINE_EXCEEDED when none comes for
    `idle_s` seconds (None: waits forever). A reader thread waits on the stream, at most one
    request ahead (gRPC's flow control holds the rest back)."""
    if idle_s is None:
        yield from requests
        return
    box: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=1)
    done = threading.Event()

    def hand(item: tuple[Any, BaseException | None]) -> bool:
        while not done.is_set():
            try:
                box.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        end: tuple[Any, BaseException | None] = (None, None)
        try:
            for request in requests:
                if not hand((request, None)):
                    return
        except BaseException as err:  # handed to the stream's thread, raised there
            end = (None, err)
        hand(end)

    threading.Thread(target=read, name="oip-stream-read", daemon=True).start()
    try:
        while True:
            try:
                request, err = box.get(timeout=idle_s)
            except queue.Empty:
                context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no request on this stream for {idle_s:g} s (inference_stream_idle_s): "
                    "it is closed; open a new one",
                )
                return  # unreachable: abort raises
            if err is not None:
                raise err
            if request is None:
                return
            yield request
    finally:
        done.set()


def start_inference_server(
    repository: ModelRepository,
    host: str,
    port: int,
    *,
    max_workers: int = 8,
    max_message_bytes: int | None = None,
    batching: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    limits: RequestLimits | None = None,
    security: InferenceSecurity | None = None,
    recorder: Recorder | None = None,
    plane_factory: Callable[..., DataPlane] = DataPlane,
    reuse_port: bool = False,
) -> InferenceServer:
    """Serve the repository's models over the Open Inference Protocol on host:port.

    Port 0 picks a free port; the returned server's ``port`` says which. A request larger
    than its model's limit (from the model's input shapes and `limits`) is refused with
    RESOURCE_EXHAUSTED before it is parsed, and the server keeps serving; at most
    ``limits.large_in_flight`` requests over 1 MiB are served at once.
    With `batching`, requests to a model that arrive while it is running are run together as
    one batch of at most `max_batch` rows (see ``agent.inference.batching``); a request that
    finds its model idle runs at once, so batching adds no wait. It is off by default: it pays
    where a batch of n costs much less than n runs (GPUs, multi-threaded sessions); on one CPU
    thread a small CNN costs the same per row at any batch size, and the benchmark showed no
    gain (``benchmarks/bench_inference.py --batching`` compares).
    `security` adds TLS and a bearer token (see InferenceSecurity).
    A worker process (``agent.inference.workers``) passes its own `plane_factory` (called as
    DataPlane is) and `reuse_port`, to share the port with the other workers.
    """
    if max_batch < 1:
        raise InvalidRequest(f"max_batch must be at least 1, got {max_batch}")
    limits = limits or RequestLimits()
    if max_message_bytes is not None:
        limits = replace(limits, max_request_bytes=max_message_bytes)
    security = security or InferenceSecurity()
    if limits.give_back_memory:
        tune_allocator()
    shared = SharedMemoryRegions() if SHM_ROOT.is_dir() else None
    plane = plane_factory(
        repository,
        batching=batching,
        max_batch=max_batch,
        limits=limits,
        recorder=recorder,
        shared_memory=shared,
        extensions=[e for e in EXTENSIONS if shared is not None or e != "system_shared_memory"],
    )
    serving = plane.serving
    # A stream (an inference stream, a health Watch, reflection) holds a worker thread for
    # its life: all of them together at most max_workers - 2 (one with 2 workers, none with
    # 1), so unary calls are always served; those without a credential (health Watch is
    # open to anyone) at most half of that, so inference streams are left room.
    streams = stream_budget(max_workers)
    servicer = InferenceServicer(
        plane, max_streams=max(1, streams), stream_idle_s=limits.stream_idle_s
    )
    health_servicer = _HealthServicer(servicer.ready)
    guard = CallGuard(
        BearerGate(security.token),
        public_streams=max(1, streams // 2),
        admit={INFER_METHOD: plane.admit},
        max_streams=streams,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oip"),
        interceptors=[guard],
        options=server_options(limits.max_request_bytes, reuse_port=reuse_port),
        maximum_concurrent_rpcs=None,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
        pool=reflection_pool(),
    )
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    fix = (
        "choose another with --inference-port (or EDGEFLEET_AGENT_INFERENCE_PORT; 0 picks a "
        "free one) and --inference-host"
    )
    try:
        if security.tls:
            assert security.cert_file is not None and security.key_file is not None
            bound = server.add_secure_port(
                address, server_credentials(security.cert_file, security.key_file)
            )
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as err:
        raise Unavailable(f"cannot serve inference on {address}: {err}; {fix}") from None
    if not bound:
        raise Unavailable(
            f"cannot serve inference on {address}: the port is taken (another agent?) or the "
            f"host is not an address of this machine; {fix}"
        )
    server.start()
    health_servicer.refresh()
    how = ", ".join(
        what for what, on in (("TLS", security.tls), ("bearer token", bool(security.token))) if on
    )
    log.info("inference server listening on %s (port %d%s)", host, bound, f"; {how}" if how else "")
    warning = exposure_warning(host, security)
    if warning:
        log.warning(warning)
    return InferenceServer(server, bound, servicer, health_servicer, serving, warning)
