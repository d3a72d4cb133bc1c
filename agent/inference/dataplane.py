"""The agent's inference data plane, free of any transport (the shape MLServer uses).

Everything the Open Inference Protocol means, whichever way a request arrives: model look-up
and readiness, admission (each model's size limit, large requests a few at a time), request
checks (``validation``), dynamic batching, A/B routing and shadow copies, the recorder's
captures and telemetry, Triton's classification and system shared-memory extensions,
metadata, Triton's model configuration, statistics and repository index. The gRPC servicer
(``server``) and the REST handler (``rest``) only turn their wire format into these calls
and the errors these calls raise (one hierarchy, ``agent.errors``) into their status, by one
table (``agent.errors.STATUS``).

The plane speaks the protocol's own message types (``ModelInferRequest`` in,
``ModelInferResponse`` out): gRPC hands them over as they arrive, so its hot path converts
nothing, and REST builds the same request from its JSON and binary body and gives
:meth:`DataPlane.infer` its own encoder for the answer.

    plane = DataPlane(repository)
    with plane.admit_size("clf", "", len(body)):
        response = plane.infer(request)
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

import edgefleet
from agent.errors import AgentError, InvalidRequest, RequestTooLarge
from agent.inference.batching import DEFAULT_MAX_BATCH, DynamicBatcher, batch_axis
from agent.inference.limits import (
    LARGE_REQUEST_BYTES,
    LargeRequests,
    over_limit,
    peek_model,
    request_limit,
)
from agent.inference.shadow import ShadowRunner
from agent.inference.shm import SharedMemoryRegions, SharedMemoryUse
from agent.inference.stats import Duration, ModelStatistics, VersionFigures, VersionStats
from agent.inference.validation import (
    Array,
    DecodedRequest,
    ExternalInput,
    InputSpec,
    ModelPlan,
    Placed,
    decode_request,
    encode_response,
    plan_for,
    raw_view,
)
from agent.recorder import Recorder
from agent.runtime import LoadedModel, ModelRepository
from edgefleet.core.errors import ErrorCode
from edgefleet.core.wire import to_proto
from protos.inference.v2 import grpc_predict_v2_pb2 as pb

SERVER_NAME = "edgefleet-agent"
PLATFORM = "onnxruntime_onnx"
# ModelMetadata's parameter holding the model's class names (a JSON list), when it has them.
CLASS_NAMES_PARAMETER = "class_names"
# Triton's file name for an output's class names (ModelConfig's label_filename).
LABEL_FILENAME = "labels.txt"

# The request parameters this server takes: the client's label for the request, kept with a
# capture of it (how captured data comes back labelled), and the key that pins a client (a
# user, a session, a camera) to one version of an A/B split.
LABEL_PARAMETER = "label"
ROUTING_PARAMETER = "routing_key"
_PARAMETERS = (LABEL_PARAMETER, ROUTING_PARAMETER)
# Triton's classification extension: an output requested with this parameter (an int64 N)
# answers, per row, the N highest scores as BYTES "score:index:label" strings.
CLASSIFICATION_PARAMETER = "classification"
# Triton's system shared-memory extension: a tensor's bytes in a registered region.
SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_BYTE_SIZE = "shared_memory_byte_size"
_SHM_PARAMETERS = (SHM_REGION, SHM_OFFSET, SHM_BYTE_SIZE)

_PLAN_CACHE_LIMIT = 64

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Encoder(Protocol[T_co]):
    """Builds a transport's answer from a request's results (default: the protocol's
    ModelInferResponse, see validation.encode_response)."""

    def __call__(
        self,
        plan: ModelPlan,
        request: pb.ModelInferRequest,
        decoded: DecodedRequest,
        results: Sequence[Array],
        datatypes: Mapping[str, str] | None = None,
        placed: Placed | None = None,
    ) -> T_co: ...


@dataclass(frozen=True)
class RequestLimits:
    """How large inference requests may be, and how many large ones run at once."""

    max_rows: int = 64  # a dynamic first dimension counts as this many rows
    max_dynamic: int = 4096  # any other dynamic dimension (a sequence length, say)
    max_request_bytes: int = 64 << 20  # no request is larger, whatever the model
    large_in_flight: int = 2  # requests over 1 MiB served at once
    stream_idle_s: float = 300.0  # an inference stream without a request this long is closed
    # Hand the memory of finished large requests back to the system (glibc). Off only to
    # measure what it saves (benchmarks/bench_inference_memory.py).
    give_back_memory: bool = True


@dataclass(frozen=True)
class _ModelEntry:
    plan: ModelPlan
    batcher: DynamicBatcher | None  # None when batching is off
    limit: int  # largest request, in bytes
    limit_detail: str
    stats: VersionStats
    max_batch_size: int  # Triton's: >0 when dimension 0 of every tensor is the batch


@dataclass(frozen=True)
class _ShmRef:
    region: str
    offset: int
    byte_size: int

    def parameters(self, written: int) -> dict[str, str | int]:
        return {SHM_REGION: self.region, SHM_BYTE_SIZE: written, SHM_OFFSET: self.offset}


class DataPlane:
    """Open Inference Protocol over the models in a repository, for any transport.
    Thread-safe: every transport calls it from its own threads."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        batching: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        limits: RequestLimits | None = None,
        recorder: Recorder | None = None,
        shadow_queue: int = 64,
        shared_memory: SharedMemoryRegions | None = None,
        extensions: Sequence[str] = ("classification",),
    ) -> None:
        if max_batch < 1:
            raise InvalidRequest(f"max_batch must be at least 1, got {max_batch}")
        self.repository = repository
        self._recorder = recorder
        self.shadow = ShadowRunner(recorder, queue_size=shadow_queue)
        # Serving (the default) answers ready once a model is loaded; cleared to drain.
        self.serving = threading.Event()
        self.serving.set()
        self._batching = batching
        self._max_batch = max_batch
        self.limits = limits or RequestLimits()
        self.large = LargeRequests(
            self.limits.large_in_flight, give_back=self.limits.give_back_memory
        )
        self.shared_memory = shared_memory
        self.statistics = ModelStatistics()
        self.extensions = tuple(extensions)
        # id(model) -> its plan and batcher; a plan holds its model, so an id is never reused
        # while cached.
        self._plans: dict[int, _ModelEntry] = {}
        # When the request being served on this thread arrived (admission) and whether it
        # holds a large-request slot: set by admit, read by infer.
        self._local = threading.local()

    # -- health and metadata --------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.serving.is_set() and self.repository.ready()

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=edgefleet.__version__, extensions=self.extensions
        )

    def model_ready(self, name: str, version: str = "") -> bool:
        if not self.serving.is_set():
            return False
        try:
            self.repository.get(name, version)
        except AgentError as err:
            if err.code is ErrorCode.NOT_FOUND:
                return False
            raise
        return True

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        model = self.repository.get(name, version)
        T = pb.ModelMetadataResponse.TensorMetadata
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self.repository.versions(model.name)],
            platform=PLATFORM,
            inputs=[to_proto(t, T) for t in model.inputs],
            outputs=[to_proto(t, T) for t in model.outputs],
        )
        if model.class_names:
            response.parameters[CLASS_NAMES_PARAMETER].string_param = json.dumps(
                list(model.class_names), ensure_ascii=False
            )
        return response

    # -- Triton's model configuration, statistics and repository index ----------------------

    def model_config(self, name: str, version: str = "") -> pb.ModelConfigResponse:
        """The model in Triton's ModelConfig shape: inputs and outputs (without the batch
        dimension when max_batch_size > 0, as Triton writes them), the batch size, dynamic
        batching when on, and the class names as a label file reference (with the names
        themselves in the "class_names" parameter, since the protocol cannot fetch files)."""
        model = self.repository.get(name, version)
        entry = self.entry(model)
        batch = entry.max_batch_size
        config = pb.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=batch,
            default_model_filename="model.onnx",
        )
        for spec in model.inputs:
            config.input.add(
                name=spec.name,
                data_type=_data_type(spec.datatype),
                dims=spec.shape[1:] if batch else spec.shape,
            )
        labelled = _labelled_output(model)
        for spec in model.outputs:
            out = config.output.add(
                name=spec.name,
                data_type=_data_type(spec.datatype),
                dims=spec.shape[1:] if batch else spec.shape,
            )
            if spec.name == labelled:
                out.label_filename = LABEL_FILENAME
        if entry.batcher is not None and entry.batcher.batchable:
            config.dynamic_batching.SetInParent()  # no queue delay: it never waits to fill
        if model.class_names:
            config.parameters[CLASS_NAMES_PARAMETER].string_value = json.dumps(
                list(model.class_names), ensure_ascii=False
            )
        return pb.ModelConfigResponse(config=config)

    def _versions(self, name: str, version: str) -> list[LoadedModel]:
        if version:
            return [self.repository.get(name, version)]
        self.repository.get(name)  # NOT_FOUND for a model not served
        models = []
        for number in self.repository.versions(name):
            try:
                models.append(self.repository.get(name, number))
            except AgentError:  # dropped in between
                continue
        return models

    def model_statistics(self, name: str = "", version: str = "") -> list[VersionFigures]:
        """The figures of one version, every version of a model (no version), or every
        version served (no name)."""
        loaded = {(n, v) for n in self.repository.names() for v in self.repository.versions(n)}
        self.statistics.keep(loaded)
        if name:
            models = self._versions(name, version)
        else:
            models = [m for n in self.repository.names() for m in self._versions(n, "")]
        figures = []
        for model in models:
            entry = self.entry(model)
            runs = entry.batcher.stats().runs if entry.batcher is not None else None
            figures.append(entry.stats.figures(executions=runs))
        return figures

    def model_statistics_response(
        self, name: str = "", version: str = ""
    ) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        for f in self.model_statistics(name, version):
            stats = response.model_stats.add(
                name=f.name,
                version=str(f.version),
                last_inference=f.last_inference_ms,
                inference_count=f.inference_count,
                execution_count=f.execution_count,
            )
            infer = stats.inference_stats
            for field_name in (
                "success",
                "fail",
                "queue",
                "compute_input",
                "compute_infer",
                "compute_output",
            ):
                duration: Duration = getattr(f, field_name)
                target = getattr(infer, field_name)
                target.count = duration.count
                target.ns = duration.ns
            for unused in ("cache_hit", "cache_miss"):
                getattr(infer, unused).SetInParent()
        return response

    def repository_index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        """Every version served, READY (this agent holds only loaded, verified versions; what
        failed to activate is in the device's report to the cloud, not here)."""
        response = pb.RepositoryIndexResponse()
        for name in self.repository.names():
            for version in self.repository.versions(name):
                response.models.add(name=name, version=str(version), state="READY")
        return response

    # -- admission --------------------------------------------------------------------------

    def entry(self, model: LoadedModel) -> _ModelEntry:
        """The plan, batcher, size limit and statistics of a loaded model, made once."""
        entry = self._plans.get(id(model))
        if entry is None or entry.plan.model is not model:
            batcher = (
                DynamicBatcher.for_model(model, max_batch=self._max_batch)
                if self._batching
                else None
            )
            plan = plan_for(model)
            lim = self.limits
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
            stats = self.statistics.of(model.name, model.version)
            max_batch_size = lim.max_rows if batch_axis(model) is not None else 0
            entry = _ModelEntry(plan, batcher, limit, detail, stats, max_batch_size)
            plans = self._plans if len(self._plans) < _PLAN_CACHE_LIMIT else {}
            # Replaced whole rather than mutated while other threads read it.
            self._plans = {**plans, id(model): entry}
        return entry

    @contextlib.contextmanager
    def admit(self, raw: bytes) -> Iterator[None]:
        """Refuse a serialized ModelInferRequest over its model's limit before it is parsed,
        and queue large ones so that only a few are in memory (parsed, run, answered) at
        once (the gRPC interceptor's admission)."""
        name, version = peek_model(raw)
        with self.admit_size(name, version, len(raw)):
            yield

    def check_size(self, name: str, version: str, size: int) -> None:
        """REST's check before a body is read (and before :meth:`admit_size` takes a
        large-request slot): ModelNotFound for a model or version not served here,
        RequestTooLarge for a body over the model's limit."""
        entry = self.entry(self.repository.get(name, version))
        self._within_limit(entry, name, size)

    def _within_limit(self, entry: _ModelEntry, name: str, size: int) -> None:
        if size > entry.limit:
            self.large.refused(size)
            raise over_limit(name, size, entry.limit, entry.limit_detail)

    @contextlib.contextmanager
    def admit_size(self, name: str, version: str, size: int) -> Iterator[None]:
        """Admission of a request of `size` bytes to model `name` (REST: the body's length;
        streams: each message's)."""
        arrived = time.perf_counter_ns()
        if name:
            try:
                entry = self.entry(self.repository.get(name, version))
            except AgentError:
                entry = None  # the full parse and look-up answer properly
            if entry is not None:
                self._within_limit(entry, name, size)
        local = self._local
        with self.large.admit(size):
            local.arrived = arrived
            local.large = size > LARGE_REQUEST_BYTES
            try:
                yield
            finally:
                local.arrived = 0
                local.large = False

    # -- inference --------------------------------------------------------------------------

    def infer(
        self,
        request: pb.ModelInferRequest,
        *,
        client: str | None = None,
        encode: Encoder[T] | None = None,
    ) -> T:
        """Run one request and answer it (by `encode`; default: a ModelInferResponse).

        `client` names the connection the request came on: the owner of the shared-memory
        regions it may use (None: a transport without shared memory)."""
        started = time.perf_counter_ns()
        arrived = getattr(self._local, "arrived", 0) or started
        label, routing_key = request_parameters(request.parameters)
        shm_inputs: dict[int, _ShmRef] = {}
        for index, tensor in enumerate(request.inputs):
            if tensor.parameters:
                shm_inputs[index] = _input_parameters(tensor.name, tensor.parameters)
        classify: dict[str, int] = {}
        shm_outputs: dict[str, _ShmRef] = {}
        for output in request.outputs:
            if output.parameters:
                count, ref = _output_parameters(output.name, output.parameters)
                if count:
                    classify[output.name] = count
                if ref is not None:
                    shm_outputs[output.name] = ref
        shadow = None
        if request.model_version:
            model = self.repository.get(request.model_name, request.model_version)
        else:
            model, shadow = self.repository.route(request.model_name, routing_key)
        entry = self.entry(model)
        plan = entry.plan
        recorder = self._recorder
        shm = self._shm_use(client) if (shm_inputs or shm_outputs) else None
        try:
            with contextlib.ExitStack() as held:
                if shm is not None:
                    held.callback(shm.close)
                    self._admit_shared(shm_inputs, model, entry, held)
                t_input = time.perf_counter_ns()
                # Decoded (and so checked) on the request's own thread: a bad request is
                # refused here and never joins, or fails, a batch.
                external = (
                    {i: _reader(shm, ref, entry) for i, ref in shm_inputs.items()}
                    if shm is not None
                    else None
                )
                decoded = decode_request(plan, request, external)
                t_infer = time.perf_counter_ns()
                if entry.batcher is None:
                    results = model.run(decoded.feeds, decoded.output_names)
                else:
                    results = entry.batcher.run(decoded.feeds, decoded.output_names)
                t_output = time.perf_counter_ns()
                datatypes: dict[str, str] | None = None
                if classify:
                    results, datatypes = classified(model, decoded.output_names, results, classify)
                placed: dict[str, Mapping[str, str | int]] | None = None
                if shm_outputs:
                    assert shm is not None
                    placed = _place_outputs(
                        shm, shm_outputs, plan, decoded.output_names, results, datatypes
                    )
                make: Encoder[Any] = encode if encode is not None else encode_response
                answer: T = make(plan, request, decoded, results, datatypes, placed)
        except AgentError:
            entry.stats.failed(time.perf_counter_ns() - arrived)
            if recorder is not None:
                recorder.failed(model.name, model.version)
            raise
        done = time.perf_counter_ns()
        rows = 1
        if entry.max_batch_size and decoded.feeds:
            first = next(iter(decoded.feeds.values()))
            rows = int(first.shape[0]) if first.ndim else 1
        entry.stats.succeeded(
            rows=rows,
            queue_ns=t_input - arrived,
            input_ns=t_infer - t_input,
            infer_ns=t_output - t_infer,
            output_ns=done - t_output,
            total_ns=done - arrived,
        )
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
                started / 1e9,
                request_id=request.id,
                label=label,
            )
        return answer

    def _admit_shared(
        self,
        refs: Mapping[int, _ShmRef],
        model: LoadedModel,
        entry: _ModelEntry,
        held: contextlib.ExitStack,
    ) -> None:
        """Inputs in shared memory count against the model's size limit and, when large,
        take a large-request slot (unless the request's own bytes took one)."""
        size = sum(ref.byte_size for ref in refs.values())
        if size > entry.limit:
            self.large.refused(0)
            raise over_limit(model.name, size, entry.limit, entry.limit_detail)
        if size > LARGE_REQUEST_BYTES and not getattr(self._local, "large", False):
            held.enter_context(self.large.admit(size))

    def _shm_use(self, client: str | None) -> SharedMemoryUse:
        if self.shared_memory is None or client is None:
            raise InvalidRequest(
                "this request names a shared-memory region, which only the gRPC port serves "
                "(SystemSharedMemoryRegister, then the shared_memory_* parameters); send the "
                "tensor in the request instead"
            )
        return self.shared_memory.use(client)

    def stop(self) -> None:
        self.serving.clear()
        self.shadow.stop()
        if self.shared_memory is not None:
            self.shared_memory.close()


def _data_type(datatype: str) -> int:
    """ModelConfig's DataType of a protocol datatype (BYTES is Triton's TYPE_STRING)."""
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    try:
        return int(pb.DataType.Value(name))
    except ValueError:
        return int(pb.TYPE_INVALID)


def _labelled_output(model: LoadedModel) -> str:
    """The output the model's class names label: the first whose last dimension is their
    count (else the first output); "" without class names."""
    if not model.class_names or not model.outputs:
        return ""
    count = len(model.class_names)
    for spec in model.outputs:
        if spec.shape and spec.shape[-1] == count:
            return spec.name
    return model.outputs[0].name


def _reader(shm: SharedMemoryUse, ref: _ShmRef, entry: _ModelEntry) -> ExternalInput:
    def read(spec: InputSpec, shape: tuple[int, ...], expected: int) -> bytearray:
        if expected >= 0 and ref.byte_size != expected:
            raise InvalidRequest(
                f"input {spec.name!r}: {SHM_BYTE_SIZE} is {ref.byte_size} but {spec.datatype} "
                f"of shape {list(shape)} needs {expected} bytes"
            )
        if ref.byte_size > entry.limit:
            raise RequestTooLarge(
                f"input {spec.name!r}: {ref.byte_size} bytes of shared memory is over the "
                f"model's request limit of {entry.limit} bytes"
            )
        return shm.read(ref.region, ref.offset, ref.byte_size)

    return read


def _place_outputs(
    shm: SharedMemoryUse,
    refs: Mapping[str, _ShmRef],
    plan: ModelPlan,
    names: Sequence[str],
    results: Sequence[Array],
    datatypes: Mapping[str, str] | None,
) -> dict[str, Mapping[str, str | int]]:
    """Write the outputs asked for in shared memory there; their parameters for the answer."""
    types = {**plan.output_datatypes, **(datatypes or {})}
    placed: dict[str, Mapping[str, str | int]] = {}
    missing = sorted(set(refs) - set(names))
    if missing:
        raise InvalidRequest(f"shared memory was given for unknown output(s) {missing[:4]}")
    for name, array in zip(names, results, strict=True):
        ref = refs.get(name)
        if ref is None:
            continue
        datatype = types[name]
        data = raw_view(datatype, array)
        if len(data) > ref.byte_size:
            raise InvalidRequest(
                f"output {name!r} is {len(data)} bytes ({datatype} of shape "
                f"{list(array.shape)}) but its {SHM_BYTE_SIZE} is {ref.byte_size}; give it "
                "at least that many bytes"
            )
        shm.write(ref.region, ref.offset, data)
        placed[name] = ref.parameters(len(data))
    return placed


def request_parameters(parameters: Any) -> tuple[str, str]:
    """The request's "label" and "routing_key" parameters ("" when not given); any other
    parameter is refused."""
    others = [k for k in parameters if k not in _PARAMETERS]
    if others:
        _refuse_parameters("the request", others)
    return _string(parameters, LABEL_PARAMETER), _string(parameters, ROUTING_PARAMETER)


def _string(parameters: Any, name: str) -> str:
    if name not in parameters:
        return ""
    value = parameters[name]
    if value.WhichOneof("parameter_choice") != "string_param" or len(value.string_param) > 256:
        raise InvalidRequest(
            f"the request's {name} parameter is a string of at most 256 characters"
        )
    return str(value.string_param)


def _integer(parameters: Any, name: str, where: str, *, minimum: int) -> int | None:
    if name not in parameters:
        return None
    value = parameters[name]
    kind = value.WhichOneof("parameter_choice")
    number = value.int64_param if kind == "int64_param" else value.uint64_param
    if kind not in ("int64_param", "uint64_param") or number < minimum:
        raise InvalidRequest(f"{where}: the {name!r} parameter is an integer of at least {minimum}")
    return int(number)


def _shm_reference(where: str, parameters: Any) -> _ShmRef | None:
    if SHM_REGION not in parameters:
        if any(k in parameters for k in _SHM_PARAMETERS):
            raise InvalidRequest(f"{where}: shared memory needs the {SHM_REGION!r} parameter")
        return None
    value = parameters[SHM_REGION]
    if value.WhichOneof("parameter_choice") != "string_param" or not value.string_param:
        raise InvalidRequest(f"{where}: {SHM_REGION!r} is the name of a registered region")
    size = _integer(parameters, SHM_BYTE_SIZE, where, minimum=0)
    if size is None:
        raise InvalidRequest(f"{where}: shared memory needs the {SHM_BYTE_SIZE!r} parameter")
    offset = _integer(parameters, SHM_OFFSET, where, minimum=0) or 0
    return _ShmRef(str(value.string_param)[:256], offset, size)


def _input_parameters(name: str, parameters: Any) -> _ShmRef:
    """An input's parameters: only shared memory is taken; anything else is refused."""
    where = f"input {name[:64]!r}"
    others = [k for k in parameters if k not in _SHM_PARAMETERS]
    if others:
        _refuse_parameters(where, others)
    ref = _shm_reference(where, parameters)
    assert ref is not None  # parameters is not empty and holds only shared-memory keys
    return ref


def _output_parameters(name: str, parameters: Any) -> tuple[int, _ShmRef | None]:
    """An output's classification count (0: none) and shared-memory place (None: none)."""
    where = f"output {name[:64]!r}"
    others = [k for k in parameters if k not in (CLASSIFICATION_PARAMETER, *_SHM_PARAMETERS)]
    if others:
        _refuse_parameters(where, others)
    count = 0
    if CLASSIFICATION_PARAMETER in parameters:
        count = classification_count(name, parameters)
    return count, _shm_reference(where, parameters)


def classification_count(output: str, parameters: Any) -> int:
    """The N of an output's "classification" parameter; other parameters than shared
    memory's are refused."""
    where = f"output {output[:64]!r}"
    others = [k for k in parameters if k not in (CLASSIFICATION_PARAMETER, *_SHM_PARAMETERS)]
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
        f"an output's {CLASSIFICATION_PARAMETER!r} (an int64: the top N classes), and a "
        f"tensor's {SHM_REGION!r}, {SHM_OFFSET!r} and {SHM_BYTE_SIZE!r} (system shared memory)"
    )
