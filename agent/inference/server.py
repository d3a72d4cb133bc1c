"""The agent's Open Inference Protocol (KServe v2) gRPC endpoint over a ModelRepository.

A thin servicer: it looks the model up, hands the request to ``validation`` and runs the
session (optionally through ``batching``, which runs requests that arrive while their model is
busy together as one batch). Existing clients (Triton's, KServe's, ``edgefleet.client.inference``) work unchanged.
gRPC health checking answers SERVING while the server is serving and a model is loaded;
reflection is on so ``grpcurl`` can list the service.

    server = start_inference_server(repository, "127.0.0.1", 0)
    print(server.port)
    ...
    server.stop(grace=2.0)
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

import edgefleet
from agent.errors import AgentError, InvalidRequest, Unavailable
from agent.inference.batching import DEFAULT_MAX_BATCH, DynamicBatcher
from agent.inference.validation import ModelPlan, decode_request, encode_response, plan_for
from agent.runtime import LoadedModel, ModelRepository
from edgefleet.core.errors import ErrorCode
from edgefleet.core.rpc import CallGuard
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVER_NAME = "edgefleet-agent"
PLATFORM = "onnxruntime_onnx"
SERVICE_NAME = "inference.GRPCInferenceService"
# Protocol extensions served beyond the core (Triton's names); none yet beyond the core.
EXTENSIONS: tuple[str, ...] = ()

_PLAN_CACHE_LIMIT = 64


@dataclass(frozen=True)
class _ModelEntry:
    plan: ModelPlan
    batcher: DynamicBatcher | None  # None when batching is off


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol over the models in a repository."""

    def __init__(
        self,
        repository: ModelRepository,
        is_serving: threading.Event,
        *,
        batching: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._repository = repository
        self._serving = is_serving
        self._batching = batching
        self._max_batch = max_batch
        # id(model) -> its plan and batcher; a plan holds its model, so an id is never reused
        # while cached.
        self._plans: dict[int, _ModelEntry] = {}
        self._live = pb.ServerLiveResponse(live=True)
        self._ready_true = pb.ServerReadyResponse(ready=True)
        self._ready_false = pb.ServerReadyResponse(ready=False)
        self._metadata = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=edgefleet.__version__, extensions=EXTENSIONS
        )

    def ready(self) -> bool:
        return self._serving.is_set() and self._repository.ready()

    def _entry(self, model: LoadedModel) -> _ModelEntry:
        entry = self._plans.get(id(model))
        if entry is None or entry.plan.model is not model:
            batcher = (
                DynamicBatcher.for_model(model, max_batch=self._max_batch)
                if self._batching
                else None
            )
            entry = _ModelEntry(plan_for(model), batcher)
            plans = self._plans if len(self._plans) < _PLAN_CACHE_LIMIT else {}
            # Replaced whole rather than mutated while other threads read it.
            self._plans = {**plans, id(model): entry}
        return entry

    def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> pb.ServerLiveResponse:
        return self._live

    def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        return self._ready_true if self.ready() else self._ready_false

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return self._metadata

    def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> pb.ModelReadyResponse:
        if not self._serving.is_set():
            return pb.ModelReadyResponse(ready=False)
        try:
            self._repository.get(request.name, request.version)
        except AgentError as err:
            if err.code is ErrorCode.NOT_FOUND:
                return pb.ModelReadyResponse(ready=False)
            raise
        return pb.ModelReadyResponse(ready=True)

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self._repository.get(request.name, request.version)
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self._repository.versions(model.name)],
            platform=PLATFORM,
            inputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.inputs],
            outputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.outputs],
        )

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        if request.parameters:
            _refuse_parameters("the request", request.parameters)
        for output in request.outputs:
            if output.parameters:
                _refuse_parameters(f"output {output.name!r}", output.parameters)
        model = self._repository.get(request.model_name, request.model_version)
        entry = self._entry(model)
        plan = entry.plan
        # Decoded (and so checked) on the request's own thread: a bad request is refused
        # here and never joins, or fails, a batch.
        decoded = decode_request(plan, request)
        if entry.batcher is None:
            results = model.run(decoded.feeds, decoded.output_names)
        else:
            results = entry.batcher.run(decoded.feeds, decoded.output_names)
        return encode_response(plan, request, decoded, results)


def _refuse_parameters(where: str, parameters: Any) -> None:
    """A parameter this server would ignore is refused, never dropped silently: a client
    asking for classification results or a sequence must know it does not get them."""
    names = ", ".join(sorted(str(k)[:64] for k in parameters)[:8])
    raise InvalidRequest(
        f"{where} sets parameter(s) {names}, which this server does not support; it "
        "supports no inference parameters yet: leave them out"
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
    ) -> None:
        self._server = server
        self.port = port
        self._servicer = servicer
        self._health = health_servicer
        self._serving = serving

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

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; running calls get `grace` seconds to finish."""
        self._serving.clear()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or `timeout` passes); True when it stopped."""
        return bool(self._server.wait_for_termination(timeout))


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Two agents on one port would split traffic silently; fail the second bind instead.
        ("grpc.so_reuseport", 0),
        ("grpc.optimization_target", "latency"),
    ]


def start_inference_server(
    repository: ModelRepository,
    host: str,
    port: int,
    *,
    max_workers: int = 8,
    max_message_bytes: int = 64 << 20,
    batching: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> InferenceServer:
    """Serve the repository's models over the Open Inference Protocol on host:port.

    Port 0 picks a free port; the returned server's ``port`` says which. Requests larger than
    `max_message_bytes` are refused with RESOURCE_EXHAUSTED and the server keeps serving.
    With `batching`, requests to a model that arrive while it is running are run together as
    one batch of at most `max_batch` rows (see ``agent.inference.batching``); a request that
    finds its model idle runs at once, so batching adds no wait. It is off by default: it pays
    where a batch of n costs much less than n runs (GPUs, multi-threaded sessions); on one CPU
    thread a small CNN costs the same per row at any batch size, and the benchmark showed no
    gain (``benchmarks/bench_inference.py --batching`` compares).
    """
    if max_batch < 1:
        raise InvalidRequest(f"max_batch must be at least 1, got {max_batch}")
    serving = threading.Event()
    serving.set()
    servicer = InferenceServicer(repository, serving, batching=batching, max_batch=max_batch)
    health_servicer = _HealthServicer(servicer.ready)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oip"),
        interceptors=[CallGuard()],
        options=server_options(max_message_bytes),
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
    log.info("inference server listening on %s (port %d)", host, bound)
    return InferenceServer(server, bound, servicer, health_servicer, serving)
