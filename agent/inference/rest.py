"""The KServe v2 HTTP/REST protocol on its own port, over the same DataPlane as gRPC.

    GET  /v2/health/live                 200 {"live": true}
    GET  /v2/health/ready                200 {"ready": true}, 400 {"ready": false}
    GET  /v2                             server metadata (name, version, extensions)
    GET  /v2/models/{m}[/versions/{v}]   model metadata
    GET  .../ready                       200 / 400 {"name", "ready"}
    POST .../infer                       inference: JSON tensors and the binary-data extension
    GET  .../config, .../stats, /v2/models/stats, POST /v2/repository/index   (Triton's)

A JSON tensor's ``data`` is row-major, flat or nested; an input may instead travel as binary
(``"parameters": {"binary_data_size": n}``, its bytes after the JSON header, whose length the
``Inference-Header-Content-Length`` header gives), and an output is answered in binary when
its ``binary_data`` parameter (or the request's ``binary_data_output``) is true. The request
becomes the protocol's ModelInferRequest, so validation and its messages are those of gRPC:
a tensor given as JSON data is checked as gRPC's typed contents are, a binary one as raw
contents. Errors answer ``{"error": "..."}`` with the HTTP status of their code
(``agent.errors.STATUS``: 400 where gRPC says INVALID_ARGUMENT, 404 for NOT_FOUND, 413 for
RESOURCE_EXHAUSTED, 503 for UNAVAILABLE, ...).

A float output holding NaN or an infinity, which JSON cannot carry (and which the protocol
says nothing about), is answered in binary, as if its ``binary_data`` parameter were true:
its values arrive exact and the answer stays strict JSON (clients of the binary-data
extension, tritonclient's among them, read such an output as any other; a JSON-only client
sees ``binary_data_size`` in its place). Every JSON answer is strict (no NaN, no Infinity).

The server is the standard library's threading HTTP server with HTTP/1.1 keep-alive, at most
`max_connections` connections at once and `max_connections_per_client` from one address (the
next is answered 503 and closed), a read timeout on every connection (idle keep-alive
included), a deadline for the TLS handshake, request line and headers however slowly they
trickle in (`header_timeout_s`), and a deadline for a whole body. A request is framed by one
Content-Length of ASCII digits only: a Transfer-Encoding, several Content-Lengths or any other
spelling is answered 400 and the connection closed (a proxy in front might frame it
otherwise). An inference body is refused before it is read when its model or version is not
served (404), when it is larger than the model's request limit (never more than the inference
port's max_request_bytes) or its JSON part larger than `max_json_bytes` (413: parsed JSON takes
many times its size; large tensors travel as binary data); it is read whole before it takes
one of the few large-request slots. TLS and the bearer token are those of the gRPC port;
health stays open for probes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
from google.protobuf import json_format

from agent.errors import (
    InvalidRequest,
    NotAuthorized,
    NotImplementedHere,
    RequestTooLarge,
    Unavailable,
    http_status,
)
from agent.inference.dataplane import DataPlane
from agent.inference.stats import Duration, VersionFigures
from agent.inference.validation import Array, DecodedRequest, ModelPlan, Placed, raw_view
from edgefleet.core.auth import same_secret, token_from_metadata
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.rpc import bounded
from edgefleet.core.tensors import DATATYPE_TO_NUMPY, TYPED_CONTENTS_FIELD
from protos.inference.v2 import grpc_predict_v2_pb2 as pb

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA = "binary_data"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA_OUTPUT = "binary_data_output"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
DEFAULT_MAX_JSON_BYTES = 8 << 20
DEFAULT_HEADER_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # close the connection after it (the request's body was not read)


def json_reply(status: int, payload: Any, *headers: tuple[str, str], close: bool = False) -> Reply:
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    return Reply(status, body, (("Content-Type", JSON_TYPE), *headers), close)


def _digits(value: str) -> int | None:
    """A byte count as HTTP writes it: ASCII digits only (optional spaces or tabs around
    them, which HTTP strips from any field); None for anything else ("+7", "1_0", "7\x0b",
    non-ASCII digits), which int() would take."""
    text = value.strip(" \t")
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def content_length(headers: Message) -> int | None:
    """The request's body length, read in this one place: None when it has none. Anything a
    proxy in front could frame differently is refused (InvalidRequest, and the connection
    closes): a Transfer-Encoding, more than one Content-Length, a value not all digits."""
    if "Transfer-Encoding" in headers:
        raise InvalidRequest(
            "Transfer-Encoding is not supported: send the body with a Content-Length (and no "
            "Transfer-Encoding)"
        )
    values = headers.get_all("Content-Length") or []
    if len(values) > 1:
        raise InvalidRequest("the request has more than one Content-Length header")
    if not values:
        return None
    length = _digits(str(values[0]))
    if length is None:
        raise InvalidRequest("Content-Length must be a byte count (ASCII digits only)")
    return length


def error_reply(err: EdgefleetError, *, close: bool = False) -> Reply:
    status = int(http_status(err))
    extra = (("WWW-Authenticate", "Bearer"),) if status == HTTPStatus.UNAUTHORIZED else ()
    return json_reply(status, {"error": bounded(err.message)}, *extra, close=close)


# -- JSON tensors to the protocol's request -------------------------------------------------


def _flatten(data: Any, where: str) -> list[Any]:
    """A tensor's `data`, flat (row-major); nested lists are flattened."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack: list[Iterator[Any]] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > 64:
                    raise InvalidRequest(f"{where}: data is nested more than 64 deep")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _parameter(target: Any, key: str, value: Any, where: str) -> None:
    """A JSON parameter into an InferParameter (bool, int64, double or string)."""
    slot = target[key[:256]]
    if isinstance(value, bool):
        slot.bool_param = value
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            slot.int64_param = value
        elif 0 <= value < 2**64:
            slot.uint64_param = value
        else:
            raise InvalidRequest(f"{where}: parameter {key[:64]!r} is out of range")
    elif isinstance(value, float):
        slot.double_param = value
    elif isinstance(value, str):
        slot.string_param = value
    else:
        raise InvalidRequest(
            f"{where}: parameter {key[:64]!r} must be a boolean, a number or a string"
        )


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be a JSON object")
    return value


def _count(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _json_values_to_raw(name: str, datatype: str, shape: Sequence[int], flat: list[Any]) -> bytes:
    """JSON values as the raw bytes of `datatype` (when the request also carries binary
    tensors, every tensor travels raw)."""
    need = _count(shape)
    if len(flat) != need:
        raise InvalidRequest(
            f"input {name!r} has {len(flat)} values in data but shape {list(shape)} needs {need}"
        )
    if datatype == "BYTES":
        parts = []
        for item in flat:
            data = item.encode("utf-8") if isinstance(item, str) else None
            if data is None:
                raise InvalidRequest(f"input {name!r} is BYTES: its data must be strings")
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    dtype = DATATYPE_TO_NUMPY.get(datatype)
    if dtype is None:
        return b""  # an unknown datatype: the data plane says which it takes
    if any(not isinstance(v, (int, float, bool)) for v in flat):
        raise InvalidRequest(f"input {name!r} is {datatype}: its data must be numbers")
    try:
        with np.errstate(all="raise"):
            return np.asarray(flat, dtype=dtype).tobytes()
    except (OverflowError, ValueError, FloatingPointError):
        raise InvalidRequest(f"input {name!r} has values outside the range of {datatype}") from None


def _typed(tensor: Any, name: str, datatype: str, flat: list[Any]) -> None:
    """JSON values into the typed contents of `datatype` (protobuf checks each value's type
    as it takes it: a string among numbers, a fraction among integers are refused)."""
    field = TYPED_CONTENTS_FIELD[datatype]
    values = getattr(tensor.contents, field)
    if datatype == "BYTES":
        if any(not isinstance(v, str) for v in flat):
            raise InvalidRequest(f"input {name!r} is BYTES: its data must be strings")
        values.extend(v.encode("utf-8") for v in flat)
        return
    try:
        values.extend(flat)
    except TypeError:
        kind = (
            "true or false"
            if datatype == "BOOL"
            else "integers"
            if datatype.startswith(("INT", "UINT"))
            else "numbers"
        )
        raise InvalidRequest(f"input {name!r} is {datatype}: its data must be {kind}") from None
    except (ValueError, OverflowError):
        raise InvalidRequest(f"input {name!r} has values outside the range of {datatype}") from None
    tensor.contents.SetInParent()


@dataclass(frozen=True)
class OutputChoice:
    """Which outputs the answer carries in binary."""

    default: bool
    binary: Mapping[str, bool]

    def of(self, name: str) -> bool:
        return self.binary.get(name, self.default)


def parse_infer(
    name: str, version: str, header: Any, binary: memoryview
) -> tuple[pb.ModelInferRequest, OutputChoice]:
    """A REST inference body (its JSON header and binary section) as the protocol's request,
    and the outputs to answer in binary."""
    body = _object(header, "the request body")
    request = pb.ModelInferRequest(model_name=name, model_version=version)
    request_id = body.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidRequest("the request's id must be a string")
    request.id = request_id
    binary_default = False
    for key, value in _object(body.get("parameters"), "the request's parameters").items():
        if key == BINARY_DATA_OUTPUT:
            binary_default = bool(value)
        else:
            _parameter(request.parameters, key, value, "the request")
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidRequest('the request needs "inputs": a list of tensors')
    specs: list[tuple[Any, str, str, list[int], Any, int | None]] = []
    for index, item in enumerate(inputs):
        tensor = _object(item, f"input {index}")
        tname = tensor.get("name")
        datatype = tensor.get("datatype")
        shape = tensor.get("shape")
        if not isinstance(tname, str) or not isinstance(datatype, str):
            raise InvalidRequest(f'input {index} needs a "name" and a "datatype" (strings)')
        if not isinstance(shape, list) or any(
            isinstance(d, bool) or not isinstance(d, int) for d in shape
        ):
            raise InvalidRequest(f'input {tname!r} needs a "shape": a list of integers')
        proto = request.inputs.add(name=tname, datatype=datatype)
        try:
            proto.shape.extend(shape)
        except ValueError:
            raise InvalidRequest(f"input {tname!r} has a dimension out of range") from None
        size: int | None = None
        for key, value in _object(
            tensor.get("parameters"), f"input {tname!r}'s parameters"
        ).items():
            if key == BINARY_DATA_SIZE:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise InvalidRequest(
                        f"input {tname!r}: {BINARY_DATA_SIZE} is a byte count (an integer >= 0)"
                    )
                size = value
            else:
                _parameter(proto.parameters, key, value, f"input {tname!r}")
        specs.append((proto, tname, datatype, shape, tensor.get("data"), size))
    # Tensors travel typed (as JSON data is) unless some are binary (or JSON data of a type
    # the protocol carries only raw, FP16): then every tensor travels raw.
    raw = any(
        size is not None or (data is not None and datatype not in TYPED_CONTENTS_FIELD)
        for _, _, datatype, _, data, size in specs
    )
    offset = 0
    for proto, tname, datatype, shape, data, size in specs:
        if proto.parameters:
            continue  # shared memory (or a parameter the data plane refuses)
        if size is not None:
            if data is not None:
                raise InvalidRequest(f"input {tname!r} has both data and {BINARY_DATA_SIZE}")
            if offset + size > len(binary):
                raise InvalidRequest(
                    f"input {tname!r}: {BINARY_DATA_SIZE} {size} is beyond the binary data "
                    f"after the JSON header ({len(binary) - offset} bytes left)"
                )
            request.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
            continue
        if data is None:
            raise InvalidRequest(f'input {tname!r} needs "data" (or binary data)')
        flat = _flatten(data, f"input {tname!r}")
        if raw:
            request.raw_input_contents.append(_json_values_to_raw(tname, datatype, shape, flat))
        elif datatype in TYPED_CONTENTS_FIELD:
            _typed(proto, tname, datatype, flat)
    if offset != len(binary):
        raise InvalidRequest(
            f"the body has {len(binary) - offset} bytes of binary data that no input's "
            f"{BINARY_DATA_SIZE} claims"
        )
    binary_outputs: dict[str, bool] = {}
    outputs = body.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidRequest('"outputs" must be a list')
        for index, item in enumerate(outputs):
            wanted = _object(item, f"output {index}")
            oname = wanted.get("name")
            if not isinstance(oname, str):
                raise InvalidRequest(f'output {index} needs a "name"')
            out = request.outputs.add(name=oname)
            for key, value in _object(wanted.get("parameters"), f"output {oname!r}").items():
                if key == BINARY_DATA:
                    binary_outputs[oname] = bool(value)
                else:
                    _parameter(out.parameters, key, value, f"output {oname!r}")
    return request, OutputChoice(binary_default, binary_outputs)


# -- results to the JSON (and binary) answer ------------------------------------------------


@dataclass(frozen=True)
class InferReply:
    header: bytes
    chunks: tuple[bytes | memoryview, ...]


def _json_data(datatype: str, array: Array) -> list[Any]:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [
            (item if isinstance(item, bytes) else str(item).encode()).decode("utf-8", "replace")
            for item in flat
        ]
    values: list[Any] = flat.tolist()
    return values


def _non_finite(array: Array) -> bool:
    """Whether a floating-point output holds NaN or an infinity, which JSON cannot carry."""
    return array.dtype.kind == "f" and not bool(np.isfinite(array).all())


def rest_encoder(
    choice: OutputChoice,
) -> Callable[..., InferReply]:
    """The DataPlane encoder that answers REST: JSON data or binary chunks per output."""

    def encode(
        plan: ModelPlan,
        request: pb.ModelInferRequest,
        decoded: DecodedRequest,
        results: Sequence[Array],
        datatypes: Mapping[str, str] | None = None,
        placed: Placed | None = None,
    ) -> InferReply:
        types = {**plan.output_datatypes, **(datatypes or {})}
        outputs: list[dict[str, Any]] = []
        chunks: list[bytes | memoryview] = []
        for name, array in zip(decoded.output_names, results, strict=True):
            datatype = types[name]
            out: dict[str, Any] = {
                "name": name,
                "datatype": datatype,
                "shape": [int(d) for d in array.shape],
            }
            if placed and name in placed:
                out["parameters"] = dict(placed[name])
            elif choice.of(name) or _non_finite(array):
                data = raw_view(datatype, array)
                out["parameters"] = {BINARY_DATA_SIZE: len(data)}
                chunks.append(data)
            else:
                out["data"] = _json_data(datatype, array)
            outputs.append(out)
        answer: dict[str, Any] = {"model_name": plan.model.name, "model_version": plan.version}
        if request.id:
            answer["id"] = request.id
        answer["outputs"] = outputs
        header = json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()
        return InferReply(header, tuple(chunks))

    return encode


# -- routing --------------------------------------------------------------------------------

_UNIMPLEMENTED_PREFIXES = (
    "/v2/systemsharedmemory",
    "/v2/cudasharedmemory",
    "/v2/repository/models",
    "/v2/trace",
    "/v2/logging",
)


class RestApi:
    """Routes a request (method, path, headers, body reader) to the data plane; transport
    details (sockets, TLS, keep-alive) stay in the handler."""

    def __init__(
        self,
        plane: DataPlane,
        *,
        token: str = "",
        max_request_bytes: int,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    ) -> None:
        self.plane = plane
        self._token = token
        self.max_request_bytes = max_request_bytes
        self.max_json_bytes = max_json_bytes

    def authorize(self, parts: list[str], headers: Mapping[str, str]) -> None:
        """With a token set, every endpoint but the two health probes needs it."""
        if not self._token or parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
            return
        presented = token_from_metadata(list(headers.items()))
        if presented is None or not same_secret(presented, self._token):
            raise NotAuthorized(
                "this inference port needs a bearer token: send an `Authorization: Bearer "
                "<token>` header"
            )

    def handle(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        read_body: Callable[[int], bytes],
        length: int | None = None,
    ) -> Reply:
        """The reply to one request; `headers` by lower-case name, `length` the body's
        Content-Length (None: none; the handler reads and checks it, see
        :func:`content_length`)."""
        path = urlsplit(target).path
        parts = [unquote(p) for p in path.split("/")[1:]]
        if parts and parts[-1] == "":
            parts.pop()
        try:
            self.authorize(parts, headers)
            return self._route(method, path, parts, headers, read_body, length)
        except EdgefleetError as err:
            return error_reply(err)
        except Exception as err:
            incident = secrets.token_hex(4)
            log.error(
                "unexpected error in %s %s (incident %s)",
                method,
                path[:200],
                incident,
                exc_info=err,
            )
            return json_reply(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {
                    "error": f"internal error (incident {incident}); the server's log has the details"
                },
            )

    def _route(
        self,
        method: str,
        path: str,
        parts: list[str],
        headers: Mapping[str, str],
        read_body: Callable[[int], bytes],
        length: int | None,
    ) -> Reply:
        if parts[:1] != ["v2"]:
            return _no_endpoint(path)
        if path.startswith(_UNIMPLEMENTED_PREFIXES):
            raise NotImplementedHere(
                f"{path[:80]} is not implemented by this server: system shared memory is served "
                "over gRPC only; CUDA shared memory, model load and unload, trace and log "
                "settings not at all"
            )
        route = self._find(parts[1:], length)
        if route is None:
            return _no_endpoint(path)
        allowed, call = route
        if method != allowed:
            return json_reply(
                HTTPStatus.METHOD_NOT_ALLOWED,
                {"error": f"{path[:120]} takes {allowed}, not {method[:16]}"},
                ("Allow", allowed),
            )
        return call(headers, read_body)

    def _find(
        self, rest: list[str], length: int | None
    ) -> tuple[str, Callable[[Mapping[str, str], Callable[[int], bytes]], Reply]] | None:
        plane = self.plane
        if rest == []:
            return "GET", lambda h, r: json_reply(200, server_json(plane.server_metadata()))
        if rest == ["health", "live"]:
            return "GET", lambda h, r: json_reply(200, {"live": plane.live()})
        if rest == ["health", "ready"]:
            return "GET", lambda h, r: _flag(plane.ready(), {"ready": plane.ready()})
        if rest == ["repository", "index"]:
            return "POST", lambda h, r: json_reply(200, index_json(plane.repository_index()))
        if rest == ["models", "stats"]:
            return "GET", lambda h, r: json_reply(200, stats_json(plane.model_statistics()))
        if rest[:1] != ["models"] or len(rest) < 2:
            return None
        name, version, tail = rest[1], "", rest[2:]
        if tail[:1] == ["versions"] and len(tail) >= 2:
            version, tail = tail[1], tail[2:]
        if tail == []:
            return "GET", lambda h, r: json_reply(
                200, metadata_json(plane.model_metadata(name, version))
            )
        if tail == ["ready"]:

            def ready(h: Mapping[str, str], r: Callable[[int], bytes]) -> Reply:
                answer = plane.model_ready(name, version)
                return _flag(answer, {"name": name, "ready": answer})

            return "GET", ready
        if tail == ["infer"]:
            return "POST", lambda h, r: self._infer(name, version, h, r, length)
        if tail == ["config"]:
            return "GET", lambda h, r: json_reply(
                200, config_json(plane.model_config(name, version).config)
            )
        if tail == ["stats"]:
            return "GET", lambda h, r: json_reply(
                200, stats_json(plane.model_statistics(name, version))
            )
        return None

    def _infer(
        self,
        name: str,
        version: str,
        headers: Mapping[str, str],
        read_body: Callable[[int], bytes],
        length: int | None,
    ) -> Reply:
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InvalidRequest(
                f"Content-Encoding {encoding[:32]!r} is not supported; send the body uncompressed"
            )
        if length is None:
            raise InvalidRequest(
                "an inference request needs a Content-Length header (chunked bodies are refused)"
            )
        if length > self.max_request_bytes:
            raise RequestTooLarge(
                f"the request is {length} bytes; this port takes at most {self.max_request_bytes} "
                "(max_request_bytes)"
            )
        json_end = length
        header_length = headers.get(HEADER_LENGTH.lower())
        if header_length is not None:
            json_end_given = _digits(header_length)
            if json_end_given is None:
                raise InvalidRequest(f"{HEADER_LENGTH} is not a number")
            json_end = json_end_given
            if json_end > length:
                raise InvalidRequest(
                    f"{HEADER_LENGTH} {json_end} is not within the body ({length} bytes)"
                )
        # Everything that the headers can refuse is refused before the body is read: an
        # unknown model or version (404), a body over its model's limit, JSON over its cap
        # (413). The body is then read whole (within the body deadline) before admission
        # takes one of the few large-request slots, so a slow upload holds none.
        self.plane.check_size(name, version, length)
        if json_end > self.max_json_bytes:
            raise RequestTooLarge(
                f"the request's JSON is {json_end} bytes; this port parses at most "
                f"{self.max_json_bytes} bytes of JSON (rest_max_json_bytes): send large "
                "tensors as binary data (the binary-data extension: the input's "
                f'"parameters": {{"{BINARY_DATA_SIZE}": n}}, its bytes after the JSON, and an '
                f"{HEADER_LENGTH} header)"
            )
        body = read_body(length)
        with self.plane.admit_size(name, version, length):
            view = memoryview(body)
            try:
                header = json.loads(body if json_end == length else view[:json_end].tobytes())
            except (ValueError, RecursionError) as err:
                raise InvalidRequest(f"the request's JSON does not parse: {err}") from None
            request, choice = parse_infer(name, version, header, view[json_end:])
            reply = self.plane.infer(request, encode=rest_encoder(choice))
        if reply.chunks:
            return Reply(
                200,
                b"".join([reply.header, *reply.chunks]),
                (("Content-Type", BINARY_TYPE), (HEADER_LENGTH, str(len(reply.header)))),
            )
        return Reply(200, reply.header, (("Content-Type", JSON_TYPE),))


def _flag(value: bool, payload: dict[str, Any]) -> Reply:
    """A health answer: 200 when true, 400 when false (the protocol's 4xx)."""
    return json_reply(200 if value else 400, payload)


def _no_endpoint(path: str) -> Reply:
    return json_reply(
        HTTPStatus.NOT_FOUND,
        {
            "error": f"no endpoint {path[:120]}; this server speaks the KServe v2 protocol under "
            "/v2 (health/live, health/ready, models/{name}[/versions/{v}][/ready|/infer|/config|/stats], "
            "models/stats, repository/index)"
        },
    )


def config_json(config: pb.ModelConfig) -> dict[str, Any]:
    """Triton's JSON of a ModelConfig (its HTTP answer), with dims as numbers."""
    answer: dict[str, Any] = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for key in ("input", "output"):
        for tensor in answer.get(key, []):
            tensor["dims"] = [int(d) for d in tensor.get("dims", [])]
    return answer


def stats_json(figures: Sequence[VersionFigures]) -> dict[str, Any]:
    """Triton's JSON of ModelStatistics (its HTTP answer)."""

    def duration(d: Duration) -> dict[str, int]:
        return {"count": d.count, "ns": d.ns}

    return {
        "model_stats": [
            {
                "name": f.name,
                "version": str(f.version),
                "last_inference": f.last_inference_ms,
                "inference_count": f.inference_count,
                "execution_count": f.execution_count,
                "inference_stats": {
                    "success": duration(f.success),
                    "fail": duration(f.fail),
                    "queue": duration(f.queue),
                    "compute_input": duration(f.compute_input),
                    "compute_infer": duration(f.compute_infer),
                    "compute_output": duration(f.compute_output),
                    "cache_hit": duration(Duration()),
                    "cache_miss": duration(Duration()),
                },
                "batch_stats": [],
            }
            for f in figures
        ]
    }


def index_json(index: pb.RepositoryIndexResponse) -> list[dict[str, str]]:
    return [{"name": m.name, "version": m.version, "state": m.state} for m in index.models]


def server_json(meta: pb.ServerMetadataResponse) -> dict[str, Any]:
    return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}


def metadata_json(meta: pb.ModelMetadataResponse) -> dict[str, Any]:
    def tensor(t: Any) -> dict[str, Any]:
        return {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}

    answer: dict[str, Any] = {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": [tensor(t) for t in meta.inputs],
        "outputs": [tensor(t) for t in meta.outputs],
    }
    if meta.parameters:
        answer["parameters"] = {k: v.string_param for k, v in meta.parameters.items()}
    return answer


# -- the HTTP server ------------------------------------------------------------------------


class _DeadlineReader(socket.SocketIO):
    """A connection's reads: each waits at most the idle read timeout, and never past the
    deadline when one is set (the TLS handshake, request line and headers; a body), so bytes
    trickled in one at a time cannot hold a connection open past it."""

    def __init__(self, conn: socket.socket, idle_s: float) -> None:
        super().__init__(conn, "rb")
        self._conn = conn
        self._idle_s = idle_s
        self._timeout: float | None = None
        self.deadline: float | None = None  # time.monotonic()

    def wait(self, most: float | None = None) -> None:
        """Set the socket's timeout for the next operation: the idle timeout (or `most`),
        cut to what is left before the deadline."""
        timeout = self._idle_s if most is None else most
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the connection's deadline passed")
            timeout = min(timeout, left)
        if timeout != self._timeout:
            self._conn.settimeout(timeout)
            self._timeout = timeout

    def readinto(self, b: Any) -> int | None:
        self.wait()
        return super().readinto(b)

    def disarm(self) -> None:
        self.deadline = None
        self.wait()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "edgefleet-agent"
    sys_version = ""
    wbufsize = 1 << 16  # headers and body leave in one write (then flushed)
    server: _HttpServer

    def setup(self) -> None:
        conn = self.request
        # The deadline for a new connection's TLS handshake, request line and headers runs
        # from its accept; later requests on it get theirs from their first byte.
        reader = _DeadlineReader(conn, self.server.timeout_s)
        reader.deadline = time.monotonic() + self.server.header_timeout_s
        self._reader = reader
        self._first = True
        reader.wait()
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(conn, ssl.SSLSocket):
            conn.do_handshake()  # one deadline for the whole handshake (the socket timeout)
        super().setup()
        self.rfile.close()
        self._buffered = io.BufferedReader(reader)
        self.rfile = self._buffered

    def handle_one_request(self) -> None:
        reader = self._reader
        if self._first:
            self._first = False
        else:
            # A keep-alive connection waits for its next request up to the idle timeout;
            # from its first byte the request line and headers have their deadline.
            reader.disarm()
            try:
                if not self._buffered.peek(1):
                    self.close_connection = True
                    return
            except OSError:  # TimeoutError included
                self.close_connection = True
                return
            reader.deadline = time.monotonic() + self.server.header_timeout_s
        super().handle_one_request()

    def _serve(self) -> None:
        self._reader.disarm()  # the headers are in; the answer is written under the timeout
        api = self.server.api
        try:
            length = content_length(self.headers)
        except InvalidRequest as err:
            self._send(error_reply(err, close=True))
            return
        consumed = False

        def read_body(size: int) -> bytes:
            nonlocal consumed
            consumed = True
            return self._read(size)

        headers = {key.lower(): value for key, value in self.headers.items()}
        with self.server.busy():
            reply = api.handle(self.command, self.path, headers, read_body, length)
        # Refused before its body was read: read it past (within the port's size limit, so
        # the client is not cut off mid-send and the connection stays usable), else close
        # the connection after the answer.
        if not consumed and not reply.close and not self._skip(length, api.max_request_bytes):
            reply = Reply(reply.status, reply.body, reply.headers, close=True)
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for key, value in reply.headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        if reply.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _skip(self, length: int | None, most: int) -> bool:
        """Read and drop an unread body of at most `most` bytes; False when it cannot be."""
        size = length or 0
        if size > most:
            return False
        try:
            while size:
                dropped = len(self._read(min(size, 1 << 20)))
                size -= dropped
        except Exception:
            return False
        return True

    def _read(self, size: int) -> bytes:
        """The body, within the connection's deadline for a whole body."""
        reader = self._reader
        reader.deadline = time.monotonic() + self.server.timeout_s
        chunks: list[bytes] = []
        left = size
        try:
            while left:
                try:
                    chunk = self.rfile.read1(min(left, 1 << 20))
                except TimeoutError:
                    self.close_connection = True
                    raise Unavailable(
                        f"the request body did not arrive within {self.server.timeout_s:g} s"
                    ) from None
                if not chunk:
                    self.close_connection = True
                    raise InvalidRequest(
                        f"the body ended after {size - left} of its {size} bytes (Content-Length)"
                    )
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            reader.disarm()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    do_GET = _serve
    do_POST = _serve
    do_PUT = _serve
    do_DELETE = _serve
    do_PATCH = _serve
    do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        api: RestApi,
        *,
        tls: ssl.SSLContext | None,
        max_connections: int,
        timeout_s: float,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        max_connections_per_client: int = 0,
        reuse_port: bool = False,
    ) -> None:
        self.api = api
        self._reuse_port = reuse_port
        self.timeout_s = timeout_s
        self.header_timeout_s = header_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        # One address may not take every slot (0: half of them, at least one).
        self._per_client = max_connections_per_client or max(1, max_connections // 2)
        self._tls = tls
        self._open: dict[socket.socket, str] = {}  # each connection's client address
        self._clients: dict[str, int] = {}  # connections per client address
        self._open_lock = threading.Lock()
        self.in_flight = 0  # requests being answered (not idle keep-alive connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # No SO_REUSEADDR-style sharing: a second agent on the port must fail, as with gRPC;
        # only an agent's worker processes share it (agent.inference.workers).
        if self._reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        host, port = self.socket.getsockname()[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        if self._tls is not None:
            self.socket = self._tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def process_request(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0]) if isinstance(client_address, tuple) else ""
        with self._open_lock:
            mine = self._clients.get(host, 0)
            if mine < self._per_client:
                self._clients[host] = mine + 1
        if mine >= self._per_client:
            self._refuse(request, "too many connections from this address; try again later")
            return
        if not self._slots.acquire(blocking=False):
            self._forget(host)
            self._refuse(request, "too many connections; try again later")
            return
        with self._open_lock:
            self._open[request] = host
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def _refuse(self, request: Any, message: str) -> None:
        with contextlib.suppress(OSError):
            request.settimeout(1.0)
            if not isinstance(request, ssl.SSLSocket):  # no handshake here: just close
                body = json.dumps({"error": message}, separators=(",", ":")).encode()
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
        self.shutdown_request(request)

    def _forget(self, host: str) -> None:
        with self._open_lock:
            left = self._clients.get(host, 0) - 1
            if left > 0:
                self._clients[host] = left
            else:
                self._clients.pop(host, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._open_lock:
            if request not in self._open:
                return
            host = self._open.pop(request)
        self._forget(host)
        self._slots.release()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        with self._open_lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._open_lock:
                self.in_flight -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished, timed out or failed the TLS handshake: not the server's fault.
        log.debug("REST connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class RestServer:
    """A running REST endpoint; made by :func:`start_rest_server`."""

    def __init__(self, server: _HttpServer, thread: threading.Thread, warning: str) -> None:
        self._server = server
        self._thread = thread
        self.port = server.server_port
        self.warning = warning

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting; requests in progress get `grace` seconds, then connections close."""
        self._server.shutdown()
        self._server.server_close()
        deadline = time.monotonic() + (grace or 0.0)
        while self._server.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        self._server.close_connections()
        self._thread.join(timeout=5)


def start_rest_server(
    plane: DataPlane,
    host: str,
    port: int,
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    token: str = "",
    max_request_bytes: int | None = None,
    max_connections: int = 16,
    timeout_s: float = 30.0,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    max_connections_per_client: int = 0,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    reuse_port: bool = False,
) -> RestServer:
    """Serve the KServe v2 REST protocol over `plane` on host:port (0 picks a free port).

    With `cert_file` and `key_file` the port speaks TLS only; with `token` every endpoint but
    health needs ``Authorization: Bearer <token>`` (the gRPC port's rules). `reuse_port`:
    share the port with the agent's other worker processes (SO_REUSEPORT). `timeout_s`: the
    idle read timeout and a body's deadline; `header_timeout_s`: the deadline for the TLS
    handshake, request line and headers; `max_connections_per_client`: connections one
    address may hold (0: half of `max_connections`); `max_json_bytes`: the largest JSON part
    of an inference body."""
    from agent.inference.server import InferenceSecurity, exposure_warning

    tls = None
    if cert_file is not None and key_file is not None:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(str(cert_file), str(key_file))
    api = RestApi(
        plane,
        token=token,
        max_request_bytes=max_request_bytes or plane.limits.max_request_bytes,
        max_json_bytes=max_json_bytes,
    )
    bind = host.strip("[]")
    try:
        server = _HttpServer(
            (bind, port),
            api,
            tls=tls,
            max_connections=max_connections,
            timeout_s=timeout_s,
            header_timeout_s=header_timeout_s,
            max_connections_per_client=max_connections_per_client,
            reuse_port=reuse_port,
        )
    except OSError as err:
        raise Unavailable(
            f"cannot serve REST on {host}:{port}: {err.strerror or err}; choose another "
            "rest_port (EDGEFLEET_AGENT_REST_PORT; 0 picks a free one) or rest_host"
        ) from None
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.2},
        name="edgefleet-rest",
        daemon=True,
    )
    thread.start()
    how = ", ".join(
        what for what, on in (("TLS", tls is not None), ("bearer token", bool(token))) if on
    )
    log.info(
        "REST inference listening on %s (port %d%s)",
        host,
        server.server_port,
        f"; {how}" if how else "",
    )
    warning = exposure_warning(host, InferenceSecurity(cert_file, key_file, token))
    if warning:
        log.warning(warning)
    return RestServer(server, thread, warning)
