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

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

import edgefleet
from agent.errors import AgentError, InvalidRequest, NotAuthorized, Unavailable
from agent.inference.batching import DEFAULT_MAX_BATCH, DynamicBatcher
from agent.inference.limits import (
    LargeRequests,
    MemoryStats,
    over_limit,
    peek_model,
    request_limit,
    tune_allocator,
)
from agent.inference.shadow import ShadowRunner
from agent.inference.validation import ModelPlan, decode_request, encode_response, plan_for
from agent.recorder import Recorder
from agent.runtime import LoadedModel, ModelRepository
from edgefleet.core.auth import same_secret, token_from_metadata
from edgefleet.core.errors import ErrorCode
from edgefleet.core.rpc import CallGuard
from edgefleet.core.tls import server_credentials
from edgefleet.core.wire import to_proto
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVER_NAME = "edgefleet-agent"
PLATFORM = "onnxruntime_onnx"
SERVICE_NAME = "inference.GRPCInferenceService"
# Protocol extensions served beyond the core (Triton's names).
EXTENSIONS: tuple[str, ...] = ("classification",)
# ModelMetadata's parameter holding the model's class names (a JSON list), when it has them.
CLASS_NAMES_PARAMETER = "class_names"

_PLAN_CACHE_LIMIT = 64
INFER_METHOD = f"/{SERVICE_NAME}/ModelInfer"


@dataclass(frozen=True)
class RequestLimits:
    """How large inference requests may be, and how many large ones run at once."""

    max_rows: int = 64  # a dynamic first dimension counts as this many rows
    max_dynamic: int = 4096  # any other dynamic dimension (a sequence length, say)
    max_request_bytes: int = 64 << 20  # no request is larger, whatever the model
    large_in_flight: int = 2  # requests over 1 MiB served at once
    # Hand the memory of finished large requests back to the system (glibc). Off only to
    # measure what it saves (benchmarks/bench_inference_memory.py).
    give_back_memory: bool = True


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


@dataclass(frozen=True)
class _ModelEntry:
    plan: ModelPlan
    batcher: DynamicBatcher | None  # None when batching is off
    limit: int  # largest request, in bytes
    limit_detail: str


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol over the models in a repository."""

    def __init__(
        self,
        repository: ModelRepository,
        is_serving: threading.Event,
        *,
        batching: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        limits: RequestLimits | None = None,
        recorder: Recorder | None = None,
        shadow_queue: int = 64,
    ) -> None:
        self._repository = repository
        self._recorder = recorder
        self.shadow = ShadowRunner(recorder, queue_size=shadow_queue)
        self._serving = is_serving
        self._batching = batching
        self._max_batch = max_batch
        self._limits = limits or RequestLimits()
        self.large = LargeRequests(
            self._limits.large_in_flight, give_back=self._limits.give_back_memory
        )
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
            plan = plan_for(model)
            lim = self._limits
            limit = request_limit(
                model.inputs,
                [spec.dtype.itemsize for spec in plan.inputs.values()],
                max_rows=lim.max_rows,
                max_dynamic=lim.max_dynamic,
                ceiling=lim.max_request_bytes,
            )
            detail = (
                f"{', '.join(str(t) for t in model.inputs)[:300]} with at most {lim.max_rows} "
                f"rows and {lim.max_dynamic} per other dynamic dimension"
            )
            entry = _ModelEntry(plan, batcher, limit, detail)
            plans = self._plans if len(self._plans) < _PLAN_CACHE_LIMIT else {}
            # Replaced whole rather than mutated while other threads read it.
            self._plans = {**plans, id(model): entry}
        return entry

    @contextlib.contextmanager
    def admit(self, raw: bytes) -> Iterator[None]:
        """Refuse a request over its model's limit before it is parsed, and queue large
        ones so that only a few are in memory (parsed, run, answered) at once."""
        name, version = peek_model(raw)
        if name:
            try:
                entry = self._entry(self._repository.get(name, version))
            except AgentError:
                entry = None  # the full parse and look-up answer properly
            if entry is not None and len(raw) > entry.limit:
                self.large.refused(len(raw))
                raise over_limit(name, len(raw), entry.limit, entry.limit_detail)
        with self.large.admit(len(raw)):
            yield

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
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self._repository.versions(model.name)],
            platform=PLATFORM,
            inputs=[to_proto(t, T) for t in model.inputs],
            outputs=[to_proto(t, T) for t in model.outputs],
        )
        if model.class_names:
            response.parameters[CLASS_NAMES_PARAMETER].string_param = json.dumps(
                list(model.class_names), ensure_ascii=False
            )
        return response

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        label, routing_key = request_parameters(request.parameters)
        for tensor in request.inputs:
            if tensor.parameters:
                _refuse_parameters(f"input {tensor.name[:64]!r}", tensor.parameters)
        classify = {
            output.name: classification_count(output.name, output.parameters)
            for output in request.outputs
            if output.parameters
        }
        shadow = None
        if request.model_version:
            model = self._repository.get(request.model_name, request.model_version)
        else:
            model, shadow = self._repository.route(request.model_name, routing_key)
        entry = self._entry(model)
        plan = entry.plan
        recorder = self._recorder
        try:
            # Decoded (and so checked) on the request's own thread: a bad request is refused
            # here and never joins, or fails, a batch.
            decoded = decode_request(plan, request)
            if entry.batcher is None:
                results = model.run(decoded.feeds, decoded.output_names)
            else:
                results = entry.batcher.run(decoded.feeds, decoded.output_names)
        except AgentError:
            if recorder is not None:
                recorder.failed(model.name, model.version)
            raise
        if classify:
            answered, datatypes = classified(model, decoded.output_names, results, classify)
            response = encode_response(plan, request, decoded, answered, datatypes)
        else:
            response = encode_response(plan, request, decoded, results)
        names = decoded.output_names or tuple(o.name for o in model.outputs)
        if shadow is not None:
            # Queued only: the shadow runs on its own thread and its outputs go nowhere.
            self.shadow.submit(shadow, model.version, decoded.feeds, names, results)
        if recorder is not None:
            recorder.observe(
                model.name,
                model.version,
                decoded.feeds,
                names,
                results,
                started,
                request_id=request.id,
                label=label,
            )
        return response


# The request parameters this server takes: the client's label for the request, kept with a
# capture of it (how captured data comes back labelled), and the key that pins a client (a
# user, a session, a camera) to one version of an A/B split.
LABEL_PARAMETER = "label"
ROUTING_PARAMETER = "routing_key"
_PARAMETERS = (LABEL_PARAMETER, ROUTING_PARAMETER)


def request_parameters(parameters: Any) -> tuple[str, str]:
    """The request's "label" and "routing_key" parameters ("" when not given); any other
    parameter is refused."""
    others = [k for k in parameters if k not in _PARAMETERS]
    if others:
        _refuse_parameters("the request", others)
    return _string(parameters, LABEL_PARAMETER), _string(parameters, ROUTING_PARAMETER)


def request_label(parameters: Any) -> str:
    """The request's "label" parameter ("" without one); unknown parameters are refused."""
    return request_parameters(parameters)[0]


def _string(parameters: Any, name: str) -> str:
    if name not in parameters:
        return ""
    value = parameters[name]
    if value.WhichOneof("parameter_choice") != "string_param" or len(value.string_param) > 256:
        raise InvalidRequest(
            f"the request's {name} parameter is a string of at most 256 characters"
        )
    return str(value.string_param)


# Triton's classification extension: an output requested with this parameter (an int64 N)
# answers, per row, the N highest scores as BYTES "score:index:label" strings.
CLASSIFICATION_PARAMETER = "classification"


def classification_count(output: str, parameters: Any) -> int:
    """The N of an output's "classification" parameter; any other parameter is refused."""
    where = f"output {output[:64]!r}"
    others = [k for k in parameters if k != CLASSIFICATION_PARAMETER]
    if others:
        _refuse_parameters(where, others)
    value = parameters[CLASSIFICATION_PARAMETER]
    kind = value.WhichOneof("parameter_choice")
    count = value.int64_param if kind == "int64_param" else value.uint64_param
    if kind not in ("int64_param", "uint64_param") or count < 1:
        raise InvalidRequest(
            f"{where}: the {CLASSIFICATION_PARAMETER!r} parameter is the number of top classes "
            "to answer, an integer of at least 1"
        )
    return int(count)


def classified(
    model: LoadedModel,
    names: Sequence[str],
    results: Sequence[Any],
    counts: dict[str, int],
) -> tuple[list[Any], dict[str, str]]:
    """The results with each output in `counts` replaced by its top-N classes along the last
    axis, as BYTES "score:index:label" (label: the model's class name, else the index)."""
    names = list(names) or [o.name for o in model.outputs]
    missing = sorted(set(counts) - set(names))
    if missing:
        raise InvalidRequest(f"classification asked for unknown output(s) {missing[:4]}")
    labels = model.class_names
    answered = list(results)
    for i, name in enumerate(names):
        count = counts.get(name)
        if count is None:
            continue
        scores = np.asarray(results[i])
        if scores.ndim == 0 or scores.dtype.kind not in "fiub":
            raise InvalidRequest(
                f"output {name!r} is not a vector of numeric scores, so it cannot answer "
                "classification"
            )
        classes = scores.shape[-1]
        if count > classes:
            raise InvalidRequest(
                f"output {name!r} has {classes} classes; classification asked for the top "
                f"{count} (1 to {classes})"
            )
        order = np.argsort(-scores.astype(np.float64), axis=-1, kind="stable")[..., :count]
        top = np.take_along_axis(scores, order, axis=-1)
        out = np.empty(order.shape, dtype=object)
        for at in np.ndindex(order.shape):
            index = int(order[at])
            label = labels[index] if index < len(labels) else str(index)
            out[at] = f"{float(top[at]):f}:{index}:{label}".encode()
        answered[i] = out
    return answered, dict.fromkeys(counts, "BYTES")


def _refuse_parameters(where: str, parameters: Any) -> None:
    """A parameter this server would ignore is refused, never dropped silently: a client
    asking for classification results or a sequence must know it does not get them."""
    names = ", ".join(sorted(str(k)[:64] for k in parameters)[:8])
    raise InvalidRequest(
        f"{where} sets parameter(s) {names}, which this server does not support; it takes the "
        f"request's {LABEL_PARAMETER!r} (a string kept with a capture) and "
        f"{ROUTING_PARAMETER!r} (a string that keeps a client on one version of an A/B split), "
        f"and an output's {CLASSIFICATION_PARAMETER!r} (an int64: the top N classes)"
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
        self._servicer.shadow.stop()

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
    """
    if max_batch < 1:
        raise InvalidRequest(f"max_batch must be at least 1, got {max_batch}")
    limits = limits or RequestLimits()
    if max_message_bytes is not None:
        limits = replace(limits, max_request_bytes=max_message_bytes)
    security = security or InferenceSecurity()
    if limits.give_back_memory:
        tune_allocator()
    serving = threading.Event()
    serving.set()
    servicer = InferenceServicer(
        repository,
        serving,
        batching=batching,
        max_batch=max_batch,
        limits=limits,
        recorder=recorder,
    )
    health_servicer = _HealthServicer(servicer.ready)
    # Each open health Watch (open to anyone, token or not) holds a worker thread: at most
    # half of them, so that inference is always served.
    guard = CallGuard(
        BearerGate(security.token),
        public_streams=max(1, max_workers // 2),
        admit={INFER_METHOD: servicer.admit},
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oip"),
        interceptors=[guard],
        options=server_options(limits.max_request_bytes),
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
