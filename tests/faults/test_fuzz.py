"""Malformed input on every gRPC method of the cloud (AdminService, JobService, AgentService,
health) and of the agent's inference port (the Open Inference Protocol, health).

What is sent, to each method:

- with hypothesis: arbitrary messages of the method's request type (bounded nesting;
  strings from empty to 80 KB with NUL, control and non-ASCII characters; extreme integers;
  NaN and infinite floats; oneofs, maps, repeated fields), valid requests with a field or
  two redrawn, near-valid streams and inference requests, and junk bytes (random, truncated
  messages, fields with the wrong wire type, invalid UTF-8, unterminated groups); each with
  no credential, a wrong one, a token of too small a role, or the right one. Client streams
  (PushModel, Upload) get 0-3 messages;
- a boundary sweep: every field of a valid request (nested ones too) set in turn to each
  edge value of its type, the rest left valid;
- the inputs that once ended INTERNAL (`_regressions`), every run, as explicit examples.

The property, for every call:

- it ends within its deadline: no hang. Long-lived watches (WatchDesiredState, WatchJob,
  health Watch) legitimately stay open while there is no news; they are read for WATCH_S
  and cut by the deadline, and DEADLINE_EXCEEDED is accepted for those methods only, and
  only for an authorized, decodable call (anything else must be refused at once);
- never INTERNAL or UNKNOWN, and a status that fits what was sent (`expected`): a gated
  method without a valid credential is UNAUTHENTICATED, a token with too small a role
  PERMISSION_DENIED (both before the bytes are decoded), bytes that are no message
  INVALID_ARGUMENT, and an authorized, decodable request one of the codes RULES lists for
  its method, with the reason;
- an OK answer decodes as the declared response type; an error's message is bounded;
- nothing is logged at ERROR, and no traceback;

and after each method's run, both servers still answer a health check and a real request
(an admin listing, a device's desired state, an inference with the right numbers).
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.inference.server import InferenceSecurity, InferenceServer, start_inference_server
from agent.runtime import ModelRepository
from cloudsvc.access import ROLES, Access, access_of
from cloudsvc.server import SERVICES, CloudServer, serve
from cloudsvc.settings import CloudSettings
from edgefleet.client import AdminClient
from edgefleet.core.auth import bearer_metadata
from edgefleet.core.rpc import MAX_MESSAGE_BYTES
from edgefleet.core.tensors import DATATYPE_TO_NUMPY, TYPED_CONTENTS_FIELD
from edgefleet.core.tls import ClientSecurity
from edgefleet.core.tokens import Role
from protos.admin.v1 import admin_pb2, jobs_pb2
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import fleet_pb2
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from tests.agent.inference.conftest import IDENTITY_TYPES, affine_model, identity_model, load
from tests.cloudsvc.conftest import ADMIN_TOKEN, ENROLL_TOKEN, enroll, write_linear_model
from tests.faults import figures

C = grpc.StatusCode
OK, IA, NF, FP = C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION
PD, RE, UA, DE = C.PERMISSION_DENIED, C.RESOURCE_EXHAUSTED, C.UNAUTHENTICATED, C.DEADLINE_EXCEEDED
AE, UI = C.ALREADY_EXISTS, C.UNIMPLEMENTED

CALL_DEADLINE_S = 10.0  # no call that should end may take longer: that would be a hang
WATCH_S = 0.25  # how long a watch that stays open is read before its deadline cuts it
EXAMPLES = 50  # hypothesis examples per method with the right credential and a message
MAX_DEPTH = 4  # nesting of generated messages
SWEEP_DEPTH = 4  # nesting the boundary sweep descends into
MAX_REPEATED = 3  # entries of a generated repeated field or map
INFER_TOKEN = "inference-fuzz-token"
MAX_UPLOAD = 1 << 20
ESCAPE_NAME = "escaped-by-fuzz"  # what a hostile tar tries to write outside its folder
M = TypeVar("M", bound=Message)

# ------------------------------------------------------------------------ the methods


@dataclass(frozen=True)
class Method:
    server: Literal["cloud", "inference"]
    path: str  # /package.Service/Method
    request: Descriptor
    response: Descriptor
    client_streams: bool
    server_streams: bool

    @property
    def label(self) -> str:
        """Its key in the figures (health is served on both ports)."""
        return f"{self.path} ({self.server})" if "health" in self.path else self.path


_SERVICES: list[tuple[Literal["cloud", "inference"], ServiceDescriptor]] = [
    ("cloud", admin_pb2.DESCRIPTOR.services_by_name["AdminService"]),
    ("cloud", jobs_pb2.DESCRIPTOR.services_by_name["JobService"]),
    ("cloud", fleet_pb2.DESCRIPTOR.services_by_name["AgentService"]),
    ("cloud", health_pb2.DESCRIPTOR.services_by_name["Health"]),
    ("inference", pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]),
    ("inference", health_pb2.DESCRIPTOR.services_by_name["Health"]),
]
METHODS = [
    Method(
        server,
        f"/{service.full_name}/{m.name}",
        m.input_type,
        m.output_type,
        m.client_streaming,
        m.server_streaming,
    )
    for server, service in _SERVICES
    for m in service.methods
]

# ------------------------------------------------------------ what each method may answer


@dataclass(frozen=True)
class Rule:
    """What an authorized, decodable request may end with, and why."""

    ok: frozenset[grpc.StatusCode]
    why: str
    watch: bool = False  # stays open while it has no news: DEADLINE_EXCEEDED is no hang
    junk_extra: frozenset[grpc.StatusCode] = frozenset()  # beside INVALID_ARGUMENT, for junk
    examples: int = EXAMPLES
    sweep: bool = True  # False where every variant would stay open for WATCH_S


def _rule(*codes: grpc.StatusCode, why: str, **kw: Any) -> Rule:
    return Rule(frozenset(codes), why, **kw)


_A = "/edgefleet.admin.v1.AdminService/"
_J = "/edgefleet.admin.v1.JobService/"
_F = "/edgefleet.fleet.v1.AgentService/"
_OIP = "/inference.GRPCInferenceService/"
_H = "/grpc.health.v1.Health/"
_EMPTY = "its request has no fields: any message that decodes is the one request there is"
_WATCHING = "a watch stays open until there is news: cut by the deadline, it is no hang"

RULES: dict[str, Rule] = {
    _A + "PushModel": _rule(
        OK,
        IA,
        NF,
        RE,
        why="OK for a whole ONNX file under a valid name; INVALID_ARGUMENT for no header "
        "first, a second header, a bad name or target, too few bytes, a file that is no model "
        "or bad golden samples; NOT_FOUND for a parent version that does not exist; "
        "RESOURCE_EXHAUSTED for a size over max_upload_bytes or more bytes than announced",
        examples=80,
    ),
    _A + "ListModels": _rule(OK, why=_EMPTY),
    _A + "ListVersions": _rule(OK, NF, why="NOT_FOUND for a model that does not exist"),
    _A + "GetVersion": _rule(OK, NF, why="NOT_FOUND for an unknown model or version"),
    _A + "GetManifest": _rule(
        OK,
        IA,
        NF,
        why="INVALID_ARGUMENT for a bad target name; NOT_FOUND for an unknown model, version "
        "or target",
    ),
    _A + "FetchChunks": _rule(
        OK,
        IA,
        NF,
        why="INVALID_ARGUMENT for a digest that is no sha256, over 1024 chunks or a chunk the "
        "manifest does not name; NOT_FOUND for an unknown manifest",
    ),
    _A + "Deploy": _rule(
        OK,
        IA,
        NF,
        FP,
        why="INVALID_ARGUMENT for version 0; NOT_FOUND for an unknown model or version; "
        "FAILED_PRECONDITION when no device matches the selector or no artifact is for the "
        "target",
    ),
    _A + "ListDeployments": _rule(OK, why=_EMPTY),
    _A + "Rollback": _rule(OK, IA, NF, FP, why="as Deploy"),
    _A + "ListDevices": _rule(OK, why="any selector is a filter; no match is an empty list"),
    _A + "GetDevice": _rule(OK, NF, why="NOT_FOUND for a device that is not enrolled"),
    _A + "LabelDevice": _rule(
        OK, IA, NF, why="NOT_FOUND for an unknown device; INVALID_ARGUMENT for bad labels"
    ),
    _A + "RevokeDevice": _rule(OK, NF, why="NOT_FOUND for a device that is not enrolled"),
    _A + "CreateEnrollToken": _rule(
        OK,
        IA,
        NF,
        why="INVALID_ARGUMENT for a lifetime over 10 years, a long note or bad labels; "
        "NOT_FOUND for a re-enroll token of a device that is not enrolled",
    ),
    _A + "ListEnrollTokens": _rule(OK, why=_EMPTY),
    _A + "RevokeEnrollToken": _rule(OK, NF, why="NOT_FOUND for an unknown token id"),
    _A + "CreateAdminToken": _rule(OK, IA, why="INVALID_ARGUMENT for a bad name or role"),
    _A + "ListAdminTokens": _rule(OK, why=_EMPTY),
    _A + "RevokeAdminToken": _rule(OK, NF, why="NOT_FOUND for an unknown token id"),
    _A + "RotateRootKey": _rule(OK, why=_EMPTY),
    _A + "SetCapturePolicy": _rule(
        OK, IA, NF, why="NOT_FOUND for an unknown model; INVALID_ARGUMENT for rates outside 0-1"
    ),
    _A + "ListDataSets": _rule(OK, why=_EMPTY),
    _A + "ExportCaptures": _rule(
        OK, IA, why="INVALID_ARGUMENT for a bad model name; any filter is a filter"
    ),
    _A + "LabelCaptures": _rule(
        OK, IA, RE, why="INVALID_ARGUMENT for a bad id or label; unknown ids are counted"
    ),
    _A + "GetTelemetry": _rule(
        OK, IA, why="INVALID_ARGUMENT for a bad model name; no telemetry is an empty report"
    ),
    _A + "GetDrift": _rule(
        OK,
        IA,
        NF,
        FP,
        why="INVALID_ARGUMENT for a bad model name or a window that is negative, not finite or "
        "over a year; NOT_FOUND for an unknown model or version; FAILED_PRECONDITION for a "
        "version without a training baseline; no telemetry is a report of empty rows",
    ),
    _A + "StartRollout": _rule(
        OK,
        IA,
        NF,
        FP,
        C.ALREADY_EXISTS,
        why="INVALID_ARGUMENT for waves that do not grow to 100%, a failure share outside "
        "0-1, a gate on an unknown metric or operator, a bad name; NOT_FOUND for an unknown "
        "model or version; FAILED_PRECONDITION when no device matches or one has no artifact "
        "it runs or is ahead; ALREADY_EXISTS when another rollout holds these devices",
    ),
    _A + "GetRollout": _rule(OK, NF, why="NOT_FOUND for an unknown rollout id"),
    _A + "ListRollouts": _rule(OK, IA, why="INVALID_ARGUMENT for a bad model name"),
    _A + "PauseRollout": _rule(
        OK, NF, FP, why="NOT_FOUND for an unknown id; FAILED_PRECONDITION if not running"
    ),
    _A + "ResumeRollout": _rule(
        OK, NF, FP, why="NOT_FOUND for an unknown id; FAILED_PRECONDITION if not paused"
    ),
    _A + "AbortRollout": _rule(
        OK, NF, FP, why="NOT_FOUND for an unknown id; FAILED_PRECONDITION once it finished"
    ),
    _A + "SetTraffic": _rule(
        OK,
        IA,
        NF,
        FP,
        why="INVALID_ARGUMENT for weights outside [0, 1), a second variant, a weighted shadow "
        "or the primary as its own variant; NOT_FOUND for an unknown model or version; "
        "FAILED_PRECONDITION when no device of the selector runs the model or no artifact fits",
    ),
    _A + "EnableLoop": _rule(
        OK,
        IA,
        NF,
        why="INVALID_ARGUMENT for a bad name, data that is no captures: reference, a holdout "
        "outside (0, 50%], min_new_rows 0, a margin, cooldown or bake out of range, bad waves "
        "or gates; NOT_FOUND for an unknown model",
    ),
    _A + "DisableLoop": _rule(
        OK, IA, NF, why="INVALID_ARGUMENT for a bad model name; NOT_FOUND for a model with no loop"
    ),
    _A + "RunLoop": _rule(
        OK,
        IA,
        NF,
        FP,
        C.ALREADY_EXISTS,
        why="as DisableLoop; FAILED_PRECONDITION when the loop is disabled; ALREADY_EXISTS "
        "while a run is under way",
    ),
    _A + "GetLoop": _rule(
        OK, IA, NF, why="INVALID_ARGUMENT for a bad model name; NOT_FOUND for a model with no loop"
    ),
    _A + "ListLoops": _rule(OK, why=_EMPTY),
    _J + "Upload": _rule(
        OK,
        IA,
        RE,
        why="OK for a header and exactly its bytes; INVALID_ARGUMENT for no header first, no "
        "kind, a name with no usable character, too few bytes or a folder that is no safe tar; "
        "RESOURCE_EXHAUSTED for a size over max_upload_bytes or more bytes than announced",
        examples=80,
    ),
    _J + "SubmitFineTune": _rule(
        OK,
        IA,
        NF,
        FP,
        PD,
        why="OK queues it (this cloud has no slot: it never runs); INVALID_ARGUMENT for bad "
        "names, params or search; NOT_FOUND for an unknown base, data set or parent; "
        "FAILED_PRECONDITION for GPU work on a cloud without a GPU, or data not installed; "
        "PERMISSION_DENIED for a path outside jobs.data_roots",
    ),
    _J + "SubmitCompile": _rule(OK, IA, NF, FP, PD, why="as SubmitFineTune"),
    _J + "SubmitEvaluate": _rule(
        OK, IA, NF, FP, PD, why="as SubmitCompile: an unknown version or target is NOT_FOUND"
    ),
    _J + "ListJobs": _rule(OK, why="any filter is a filter; no match is an empty list"),
    _J + "GetJob": _rule(OK, NF, why="NOT_FOUND for an unknown job"),
    _J + "WatchJob": _rule(
        OK,
        NF,
        why=f"NOT_FOUND for an unknown job; OK once the events are read out; {_WATCHING}",
        watch=True,
    ),
    _J + "CancelJob": _rule(
        OK, IA, NF, why="NOT_FOUND for an unknown job; INVALID_ARGUMENT for an ended one"
    ),
    _J + "RetryJob": _rule(
        OK,
        IA,
        NF,
        FP,
        why="NOT_FOUND for an unknown job; INVALID_ARGUMENT for one not ended; a retry submits "
        "the job again, so also what SubmitFineTune answers",
    ),
    _F + "Enroll": _rule(
        OK,
        IA,
        UA,
        PD,
        why="the enroll token is in the request: UNAUTHENTICATED for a wrong or used-up one; "
        "INVALID_ARGUMENT for a bad device id; PERMISSION_DENIED for the id of another "
        "enrolled device; OK enrolls a device",
    ),
    _F + "GetTrust": _rule(OK, why="public keys; " + _EMPTY),
    _F + "GetDesiredState": _rule(
        OK, PD, why="PERMISSION_DENIED when the request names another device"
    ),
    _F + "WatchDesiredState": _rule(
        OK,
        PD,
        RE,
        why="PERMISSION_DENIED for another device; RESOURCE_EXHAUSTED past the limit of "
        f"watchers; {_WATCHING}",
        watch=True,
        examples=16,
        sweep=False,
    ),
    _F + "ReportState": _rule(
        OK,
        IA,
        PD,
        why="PERMISSION_DENIED for another device; INVALID_ARGUMENT for bad labels, too many "
        "models or a generation past any the cloud issues",
    ),
    _F + "GetManifest": _rule(
        OK,
        IA,
        NF,
        PD,
        why="INVALID_ARGUMENT for a digest that is no sha256; PERMISSION_DENIED for another "
        "device or a manifest not in its desired state; NOT_FOUND for one that is gone",
    ),
    _F + "FetchChunk": _rule(
        OK, IA, NF, PD, why="as GetManifest; INVALID_ARGUMENT also for an offset past the end"
    ),
    _F + "Sync": _rule(
        OK,
        IA,
        PD,
        FP,
        why="INVALID_ARGUMENT for a bad spool id, field or order; PERMISSION_DENIED for a "
        "model the device never ran or another device; FAILED_PRECONDITION for a gap",
    ),
    _OIP + "ServerLive": _rule(OK, why=_EMPTY),
    _OIP + "ServerReady": _rule(OK, why=_EMPTY),
    _OIP + "ServerMetadata": _rule(OK, why=_EMPTY),
    _OIP + "ModelReady": _rule(OK, why="an unknown model or version is ready=false, no error"),
    _OIP + "ModelMetadata": _rule(OK, NF, why="NOT_FOUND for an unknown model or version"),
    _OIP + "ModelInfer": _rule(
        OK,
        IA,
        NF,
        RE,
        why="NOT_FOUND for an unknown model or version; INVALID_ARGUMENT for inputs that do "
        "not fit the model (names, datatypes, shapes, sizes, parameters, outputs); "
        "RESOURCE_EXHAUSTED for a request over its model's size limit, which is checked on "
        "the raw bytes before they are parsed, so junk that names a model can get it too",
        junk_extra=frozenset({RE}),
        examples=80,
    ),
    _OIP + "ModelStreamInfer": _rule(
        OK,
        RE,
        why="each request's own error answers in the stream's error_message (OK); "
        "RESOURCE_EXHAUSTED past the port's open streams (each holds a thread)",
        examples=40,
    ),
    _OIP + "ModelConfig": _rule(OK, NF, why="NOT_FOUND for an unknown model or version"),
    _OIP + "ModelStatistics": _rule(OK, NF, why="NOT_FOUND for an unknown model or version"),
    _OIP + "RepositoryIndex": _rule(
        OK, NF, why="NOT_FOUND for a repository name (the agent has one, unnamed)"
    ),
    _OIP + "SystemSharedMemoryStatus": _rule(OK, NF, why="NOT_FOUND for an unknown region"),
    _OIP + "SystemSharedMemoryRegister": _rule(
        OK,
        IA,
        NF,
        PD,
        AE,
        RE,
        why="INVALID_ARGUMENT for a bad name, key, size or a region beyond its object; "
        "NOT_FOUND for no such object in /dev/shm; PERMISSION_DENIED for a link, another "
        "user's object or a remote client; ALREADY_EXISTS for a name registered already; "
        "RESOURCE_EXHAUSTED past the per-client caps; OK for an object that exists",
    ),
    _OIP + "SystemSharedMemoryUnregister": _rule(OK, why="an unknown region is no error"),
    **{
        _OIP + name: _rule(UI, why="not implemented here; the message says so")
        for name in (
            "RepositoryModelLoad",
            "RepositoryModelUnload",
            "CudaSharedMemoryStatus",
            "CudaSharedMemoryRegister",
            "CudaSharedMemoryUnregister",
            "TraceSetting",
            "LogSettings",
        )
    },
    _H + "Check": _rule(OK, NF, why="NOT_FOUND for a service the server does not know"),
    _H + "Watch": _rule(
        OK,
        RE,
        why="RESOURCE_EXHAUSTED past the cloud's limit of streams without a credential; "
        + _WATCHING,
        watch=True,
        examples=10,
        sweep=False,
    ),
}

Gate = Literal["admin", "device", "enroll", "public", "bearer"]


def gate_of(method: Method) -> Gate:
    """Who may call: the cloud's own table (cloudsvc.access); on the inference port, the
    bearer token for the protocol's methods (health stays open)."""
    if method.server == "inference":
        return "bearer" if method.path.startswith(_OIP) else "public"
    access = access_of(method.path)
    assert access is not None, method.path
    gates: dict[Access, Gate] = {
        Access.ADMIN: "admin",
        Access.DEVICE: "device",
        Access.ENROLL: "enroll",
        Access.PUBLIC: "public",
    }
    return gates[access]


# ----------------------------------------------------------------- values and messages


class HintTable(dict[str, Sequence[Any]]):
    """Values worth trying per field name, beside arbitrary ones: names that exist on the
    server, so that fuzzing gets past the look-ups. "name*" lists whole lists or maps for a
    repeated or map field; "name.key" and "name.value" the keys and values of a map. A
    short repr, for hypothesis' reports."""

    def __init__(self, name: str, values: Mapping[str, Sequence[Any]]) -> None:
        super().__init__(values)
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name} hints>"


Hints = Mapping[str, Sequence[Any]]

_INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_EDGE_INTS = (0, 1, -1, 64, 65, 2**31 - 1, 2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63)
_EDGE_STRINGS = (
    "",
    "\x00",
    "a\x00b",
    "\t\r\n\x1b[31m\x7f",
    "\u202eevil\ufeff",
    "😀\U0010ffff",
    "../../../etc/passwd",
    "%s%n%x' OR 1=1; --",
    "a" * 64,
    "a" * 300,  # over a file name's 255 bytes
    "a/" * 2100,  # over a path's 4096 bytes
    "x" * 70_000,
    "é" * 40_000,
)
_EDGE_BYTES = (b"", b"\x00" * 16, b"\xff" * 4096, bytes(range(256)))
_EDGE_DOUBLES = (math.nan, math.inf, -math.inf, -0.0, -1.0, 5e-324, 1.7976931348623157e308)
_EDGE_FLOATS = (math.nan, math.inf, -math.inf, -0.0, -1.0, 3.4028234663852886e38)
_PYTHON_TYPE: dict[int, type] = {
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BYTES: bytes,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_DOUBLE: float,
    FieldDescriptor.TYPE_FLOAT: float,
}  # the rest take ints


def _int_edges(lo: int, hi: int) -> list[int]:
    return sorted({v for v in (*_EDGE_INTS, lo, hi) if lo <= v <= hi})


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers in [lo, hi]; the edges (0, the type's ends, 2^31, 2^63...) half the time."""
    edges = st.sampled_from(_int_edges(lo, hi))
    return st.one_of(edges, edges, st.integers(lo, hi), st.integers(max(lo, -3), min(hi, 70)))


STRINGS = st.one_of(
    st.sampled_from(_EDGE_STRINGS),
    st.text(max_size=24),  # any code point but surrogates: protobuf strings are UTF-8
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),
)
BYTES = st.one_of(st.binary(max_size=64), st.sampled_from(_EDGE_BYTES))
DOUBLES = st.one_of(st.floats(), st.sampled_from(_EDGE_DOUBLES))
FLOATS = st.one_of(st.floats(width=32), st.sampled_from(_EDGE_FLOATS))


def _hinted(fd: FieldDescriptor, hints: Hints, key: str) -> list[Any]:
    """The hints for `key` of the field's own type ("data" is a string in one message and
    bytes in another)."""
    kind = _PYTHON_TYPE.get(fd.type, int)
    return [v for v in hints.get(key, ()) if type(v) is kind]


def _scalar(fd: FieldDescriptor, hints: Hints, key: str) -> st.SearchStrategy[Any]:
    t = fd.type
    base: st.SearchStrategy[Any]
    if t == FieldDescriptor.TYPE_STRING:
        base = STRINGS
    elif t == FieldDescriptor.TYPE_BYTES:
        base = BYTES
    elif t == FieldDescriptor.TYPE_BOOL:
        base = st.booleans()
    elif t == FieldDescriptor.TYPE_DOUBLE:
        base = DOUBLES
    elif t == FieldDescriptor.TYPE_FLOAT:
        base = FLOATS
    elif t == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        known = [v.number for v in fd.enum_type.values]
        base = st.one_of(st.sampled_from(known), integers(-(2**31), 2**31 - 1))  # open enums
    else:
        base = integers(*_INT_BOUNDS[t])
    hinted = _hinted(fd, hints, key)
    return st.one_of(st.sampled_from(hinted), base) if hinted else base


def _fields(message: Message) -> list[FieldDescriptor]:
    # The stubs type DESCRIPTOR as the pure-Python or the upb class; both have these.
    return cast(list[FieldDescriptor], list(message.DESCRIPTOR.fields))


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _set(draw: st.DrawFn, message: Message, fd: FieldDescriptor, hints: Hints, depth: int) -> None:
    """Give the field of `message` an arbitrary value (nothing for a message field past
    MAX_DEPTH)."""
    name, sub = fd.name, fd.message_type
    deeper = depth + 1 < MAX_DEPTH
    if _is_map(fd):
        assert sub is not None
        key_fd, value_fd = sub.fields_by_name["key"], sub.fields_by_name["value"]
        value_sub = value_fd.message_type
        if value_sub is not None and not deeper:
            return
        values: st.SearchStrategy[Any] = (
            messages(value_sub, hints, depth + 1)
            if value_sub is not None
            else _scalar(value_fd, hints, f"{name}.value")
        )
        entries: st.SearchStrategy[dict[Any, Any]] = st.dictionaries(
            _scalar(key_fd, hints, f"{name}.key"), values, max_size=MAX_REPEATED
        )
        if hints.get(name + "*"):
            entries = st.one_of(st.sampled_from(list(hints[name + "*"])), entries)
        container = getattr(message, name)
        for k, v in draw(entries).items():
            if value_sub is not None:
                container[k].CopyFrom(v)
            else:
                container[k] = v
    elif fd.is_repeated and sub is not None:
        if deeper:
            items = draw(st.lists(messages(sub, hints, depth + 1), max_size=MAX_REPEATED))
            getattr(message, name).extend(items)
    elif fd.is_repeated:
        lists: st.SearchStrategy[list[Any]] = st.lists(
            _scalar(fd, hints, name), max_size=MAX_REPEATED
        )
        if hints.get(name + "*"):
            lists = st.one_of(st.sampled_from(list(hints[name + "*"])), lists)
        getattr(message, name).extend(draw(lists))
    elif sub is not None:
        if deeper:
            target = getattr(message, name)
            target.SetInParent()
            target.MergeFrom(draw(messages(sub, hints, depth + 1)))
    else:
        setattr(message, name, draw(_scalar(fd, hints, name)))


@st.composite
def messages(
    draw: st.DrawFn, descriptor: Descriptor, hints: Hints | None = None, depth: int = 0
) -> Message:
    """An arbitrary message of `descriptor`: each field set or not, at most one field of
    each oneof (proto3 `optional` included), nesting cut at MAX_DEPTH."""
    hints = hints or {}
    message = message_factory.GetMessageClass(descriptor)()
    in_oneof: set[str] = set()
    for oneof in descriptor.oneofs:
        choices = list(oneof.fields)
        in_oneof.update(f.name for f in choices)
        pick = draw(st.sampled_from([None, *choices]))
        if pick is not None:
            _set(draw, message, pick, hints, depth)
    for fd in descriptor.fields:
        if fd.name not in in_oneof and draw(st.booleans()):
            _set(draw, message, fd, hints, depth)
    return message


def _copy(message: M) -> M:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


@st.composite
def mutants(draw: st.DrawFn, exemplar: Message, hints: Hints, depth: int = 0) -> Message:
    """A valid request with one field (now and then two) redrawn, cleared, or mutated
    inside when it is a message: it passes the look-ups the exemplar passes, so the
    fuzzing reaches the code behind them."""
    message = _copy(exemplar)
    fields = _fields(message)
    chosen = [draw(st.sampled_from(fields))]
    if not draw(st.integers(0, 3)):
        chosen.append(draw(st.sampled_from(fields)))
    for fd in chosen:
        inside = (
            fd.message_type is not None
            and not fd.is_repeated
            and message.HasField(fd.name)
            and depth + 1 < MAX_DEPTH
        )
        if inside and draw(st.booleans()):
            target = getattr(message, fd.name)
            target.CopyFrom(draw(mutants(target, hints, depth + 1)))
            continue
        message.ClearField(fd.name)
        if draw(st.integers(0, 4)):  # mostly redrawn, now and then just cleared
            _set(draw, message, fd, hints, depth)
    return message


# ------------------------------------------------------------------------ junk bytes


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


_WIRE = {
    FieldDescriptor.TYPE_DOUBLE: 1,
    FieldDescriptor.TYPE_FIXED64: 1,
    FieldDescriptor.TYPE_SFIXED64: 1,
    FieldDescriptor.TYPE_FLOAT: 5,
    FieldDescriptor.TYPE_FIXED32: 5,
    FieldDescriptor.TYPE_SFIXED32: 5,
    FieldDescriptor.TYPE_STRING: 2,
    FieldDescriptor.TYPE_BYTES: 2,
    FieldDescriptor.TYPE_MESSAGE: 2,
}  # the rest are varints (0)
_BAD_UTF8 = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82")
_PATTERNS = (
    b"\xff" * 10 + b"\x01",  # a varint key of 11 bytes
    b"\x80",  # a key cut inside its varint
    b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\x7f",  # field 1, length 2^63 - 1
    b"\x0a\x05ab",  # a length past the end
    b"\x0b" * 200,  # start-group 200 deep, never ended
    b"\x0c",  # an end-group with no start
    b"\x00\x00",  # field number 0
    b"\x0f",  # wire type 7
    b"\x0e\x00",  # wire type 6
)


@st.composite
def _wrong_wire(draw: st.DrawFn, descriptor: Descriptor) -> bytes:
    """A field sent with another wire type than its own, or with a broken payload."""
    fields = list(descriptor.fields)
    number = draw(st.sampled_from([f.number for f in fields] or [1]))
    own = next((_WIRE.get(f.type, 0) for f in fields if f.number == number), 0)
    wire = draw(st.sampled_from([w for w in (0, 1, 2, 3, 5) if w != own]))
    if wire == 0:
        payload = _varint(draw(integers(0, 2**64 - 1)))
    elif wire in (1, 5):
        size = 8 if wire == 1 else 4
        payload = draw(st.binary(min_size=size, max_size=size))
    elif wire == 3:
        payload = draw(st.sampled_from([b"", _key(number, 4), b"\x08\x01" + _key(number, 4)]))
    else:
        body = draw(st.binary(max_size=24))
        payload = _varint(draw(st.sampled_from([len(body), len(body) + 7, 2**32]))) + body
    return _key(number, wire) + payload


@st.composite
def _bad_utf8(draw: st.DrawFn, descriptor: Descriptor) -> bytes:
    strings = [f.number for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING]
    if not strings:
        return draw(st.binary(min_size=1, max_size=32))
    data = draw(st.sampled_from(_BAD_UTF8))
    return _key(draw(st.sampled_from(strings)), 2) + _varint(len(data)) + data


@st.composite
def _truncated(draw: st.DrawFn, descriptor: Descriptor, hints: Hints) -> bytes:
    data = draw(messages(descriptor, hints)).SerializeToString()
    if len(data) < 2:
        return data + b"\x80"
    return data[: draw(st.integers(1, len(data) - 1))]


def junk(descriptor: Descriptor, hints: Hints) -> st.SearchStrategy[bytes]:
    """Bytes that are mostly no message of `descriptor`. Some happen to decode: `decodes`
    says which, with the server's own protobuf library."""
    valid = messages(descriptor, hints).map(lambda m: m.SerializeToString())
    return st.one_of(
        st.binary(min_size=1, max_size=64),
        _truncated(descriptor, hints),
        _wrong_wire(descriptor),
        _bad_utf8(descriptor),
        st.sampled_from(_PATTERNS),
        st.tuples(valid, st.sampled_from(_PATTERNS)).map(lambda p: p[0] + p[1]),
    )


def decodes(descriptor: Descriptor, data: bytes) -> bool:
    try:
        message_factory.GetMessageClass(descriptor).FromString(data)
    except (DecodeError, ValueError, RuntimeError):  # what the server's CallGuard catches
        return False
    return True


# ------------------------------------------------------------------- boundary sweep


def edge_values(fd: FieldDescriptor, hints: Hints, key: str) -> list[Any]:
    """The hints and every edge value of the field's type."""
    t = fd.type
    base: Sequence[Any]
    if t == FieldDescriptor.TYPE_STRING:
        base = _EDGE_STRINGS
    elif t == FieldDescriptor.TYPE_BYTES:
        base = _EDGE_BYTES
    elif t == FieldDescriptor.TYPE_BOOL:
        base = (False, True)
    elif t == FieldDescriptor.TYPE_DOUBLE:
        base = _EDGE_DOUBLES
    elif t == FieldDescriptor.TYPE_FLOAT:
        base = _EDGE_FLOATS
    elif t == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        base = [*(v.number for v in fd.enum_type.values), -1, 99, 2**31 - 1]
    else:
        base = _int_edges(*_INT_BOUNDS[t])
    return [*_hinted(fd, hints, key), *base]


def variants(message: Message, hints: Hints, depth: int = 0) -> Iterator[Message]:
    """Copies of `message`, each with one field (nested ones too, down to SWEEP_DEPTH) set
    to one edge value: the rest stays as valid as the exemplar."""
    for fd in _fields(message):
        name, sub = fd.name, fd.message_type
        deeper = depth + 1 < SWEEP_DEPTH
        if _is_map(fd):
            assert sub is not None
            key_fd, value_fd = sub.fields_by_name["key"], sub.fields_by_name["value"]
            if value_fd.message_type is not None:
                continue
            k0, v0 = next(iter(getattr(message, name).items()), ("k", "v"))
            changes: list[dict[Any, Any]] = [
                *({k: v0} for k in edge_values(key_fd, hints, f"{name}.key")),
                *({k0: v} for v in edge_values(value_fd, hints, f"{name}.value")),
                *hints.get(name + "*", ()),
            ]
            for entries in changes:
                copy = _copy(message)
                copy.ClearField(name)
                getattr(copy, name).update(entries)
                yield copy
        elif fd.is_repeated and sub is not None:
            copy = _copy(message)
            copy.ClearField(name)
            yield copy
            if getattr(message, name) and deeper:
                for inner in variants(getattr(message, name)[0], hints, depth + 1):
                    copy = _copy(message)
                    getattr(copy, name)[0].CopyFrom(inner)
                    yield copy
        elif fd.is_repeated:
            lists = [[v] for v in edge_values(fd, hints, name)]
            for values in [[], *lists, *hints.get(name + "*", ())]:
                copy = _copy(message)
                copy.ClearField(name)
                getattr(copy, name).extend(values)
                yield copy
        elif sub is not None:
            copy = _copy(message)
            copy.ClearField(name)
            yield copy
            if message.HasField(name) and deeper:
                for inner in variants(getattr(message, name), hints, depth + 1):
                    copy = _copy(message)
                    getattr(copy, name).SetInParent()
                    getattr(copy, name).CopyFrom(inner)
                    yield copy
        else:
            for value in edge_values(fd, hints, name):
                copy = _copy(message)
                setattr(copy, name, value)
                yield copy


# ---------------------------------------------------------- near-valid streams and infers


def _often(draw: st.DrawFn, percent: int) -> bool:
    return draw(st.integers(0, 99)) < percent


def _pieces(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    edges = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


_SHAPES: tuple[list[int], ...] = (
    [],
    [0],
    [1],
    [0, 4],
    [1, 4],
    [65, 4],
    [-1],
    [-1, 4],
    [2**32, 2**32],
    [2**62, 2**62],
    [2**63 - 1],
    [2**63 - 1, 0],
    [1, 1, 1, 1, 1],
)


@st.composite
def _tensor_values(draw: st.DrawFn, name: str) -> artifact_pb2.TensorValue:
    """A golden sample's tensor: mostly the model's own name, any datatype, a shape from
    the small to the absurd, bytes that fit the shape or not."""
    datatype = draw(st.sampled_from([*DATATYPE_TO_NUMPY, "", "FP8"]))
    shape = draw(st.one_of(st.sampled_from([[1, 4], [1, 3], [2, 4]]), st.sampled_from(_SHAPES)))
    itemsize = DATATYPE_TO_NUMPY[datatype].itemsize if datatype in DATATYPE_TO_NUMPY else 4
    fits = math.prod(shape) * itemsize if all(0 <= d < 64 for d in shape) else 0
    data = draw(st.one_of(st.just(bytes(fits)), st.binary(max_size=32)))
    tensor_name = draw(st.one_of(st.just(name), STRINGS))
    return artifact_pb2.TensorValue(name=tensor_name, datatype=datatype, shape=shape, data=data)


@st.composite
def _golden_samples(draw: st.DrawFn) -> artifact_pb2.GoldenSample:
    return artifact_pb2.GoldenSample(
        inputs=draw(st.lists(_tensor_values("x"), min_size=1, max_size=2)),
        outputs=draw(st.lists(_tensor_values("probs"), min_size=1, max_size=2)),
        rtol=draw(DOUBLES),
        atol=draw(DOUBLES),
    )


@st.composite
def _push_streams(draw: st.DrawFn, hints: Hints, model_file: bytes) -> tuple[bytes, ...]:
    """A push that is nearly right, so that it gets past the name and size checks: golden
    samples of every shape, a header field redrawn, the real file or a cut or foreign one,
    its size mostly announced right, now and then a second header."""
    header = admin_pb2.PushModelHeader(model="m")
    if _often(draw, 60):
        header.golden_samples.extend(draw(st.lists(_golden_samples(), min_size=1, max_size=2)))
    if _often(draw, 50):
        header.CopyFrom(cast(admin_pb2.PushModelHeader, draw(mutants(header, hints))))
    data = draw(st.sampled_from([model_file, model_file, model_file[:100], b"not onnx"]))
    header.size = len(data)
    if _often(draw, 20):
        header.size = draw(st.sampled_from([0, len(data) + 1, MAX_UPLOAD + 1, 2**64 - 1]))
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=2))
    parts = [admin_pb2.PushModelRequest(header=header)]
    parts += [admin_pb2.PushModelRequest(data=p) for p in _pieces(data, cuts)]
    if _often(draw, 15):
        parts.insert(draw(st.integers(1, len(parts))), admin_pb2.PushModelRequest(header=header))
    return tuple(p.SerializeToString() for p in parts)


def _tar(members: Sequence[tuple[str, bytes | str]]) -> bytes:
    """A tar archive: (name, bytes) files, (name, "->target") symbolic links."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content.removeprefix("->")
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


_TARS = (
    _tar([("data.csv", b"a,label\n1,0\n")]),
    _tar([(f"../{ESCAPE_NAME}", b"x")]),
    _tar([(f"/tmp/{ESCAPE_NAME}", b"x")]),
    _tar([("link", "->/etc/passwd"), ("link/x", b"x")]),
    _tar([("up", "->.."), (f"up/{ESCAPE_NAME}", b"x")]),
    b"\x00" * 1024,
    b"not a tar at all",
)


@st.composite
def _upload_streams(draw: st.DrawFn) -> tuple[bytes, ...]:
    """An upload that is nearly right: a fuzzed name and kind over real bytes (hostile tar
    archives among them), the size mostly announced right."""
    data = draw(st.one_of(st.sampled_from(_TARS), st.binary(max_size=64)))
    kind = draw(st.sampled_from([1, 2, 2, 0, 7]))
    name = draw(st.one_of(st.sampled_from(["data", "d.csv", "..", "/abs/x", "a\\b"]), STRINGS))
    size = len(data) if _often(draw, 80) else draw(st.sampled_from([len(data) + 1, 2**64 - 1]))
    header = jobs_pb2.UploadHeader(name=name, kind=kind, size=size)  # type: ignore[arg-type]
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=2))
    parts = [jobs_pb2.UploadRequest(header=header)]
    parts += [jobs_pb2.UploadRequest(data=p) for p in _pieces(data, cuts)]
    return tuple(p.SerializeToString() for p in parts)


# The inference port's models: name -> its inputs: name -> (datatype, shape; -1 dynamic).
INFER_MODELS: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {
    "affine": {"x": ("FP32", (-1, 4)), "b": ("FP32", (4,))},
    **{f"id-{dt.lower()}": {"in": (dt, (-1,))} for dt in IDENTITY_TYPES},
}


def _values(datatype: str, count: int) -> st.SearchStrategy[list[Any]]:
    """`count` typed values for `datatype`, out of its range now and then."""
    element: st.SearchStrategy[Any]
    if datatype == "BOOL":
        element = st.booleans()
    elif datatype == "BYTES":
        element = st.binary(max_size=8)
    elif datatype in ("FP32", "FP16"):
        element = FLOATS
    elif datatype == "FP64":
        element = DOUBLES
    elif datatype == "UINT64":
        element = integers(0, 2**64 - 1)
    elif datatype == "INT64":
        element = integers(-(2**63), 2**63 - 1)
    elif datatype.startswith("UINT"):
        element = integers(0, 2**32 - 1)
    else:
        element = integers(-(2**31), 2**31 - 1)
    return st.lists(element, min_size=count, max_size=count)


@st.composite
def _raw(draw: st.DrawFn, datatype: str, count: int) -> bytes:
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=8), min_size=count, max_size=count))
        return b"".join(len(i).to_bytes(4, "little") + i for i in items)
    size = count * DATATYPE_TO_NUMPY[datatype].itemsize
    if datatype == "BOOL":
        return bytes(draw(st.lists(st.integers(0, 1), min_size=size, max_size=size)))
    return draw(st.binary(min_size=size, max_size=size))  # NaN, infinities: legal values


_INFER_MUTATIONS = (
    "shape",
    "datatype",
    "drop-input",
    "repeat-input",
    "extra-raw",
    "drop-raw",
    "typed-and-raw",
    "wrong-typed-field",
    "parameters",
    "outputs",
    "version",
    "cut-raw",
    "bad-bytes-prefix",
    "unknown-input",
    "huge-id",
)


@st.composite
def _infer_requests(draw: st.DrawFn, hints: Hints) -> tuple[bytes, ...]:
    """A valid inference request for one of the models (raw or typed contents, 0-3 rows),
    then up to two things wrong with it."""
    model = draw(st.sampled_from(sorted(INFER_MODELS)))
    rows = draw(st.integers(0, 3))
    typed = draw(st.booleans())
    request = pb.ModelInferRequest(model_name=model, id=draw(st.text(max_size=8)))
    for name, (datatype, shape) in INFER_MODELS[model].items():
        dims = [rows if d < 0 else d for d in shape]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=dims)
        if typed and datatype in TYPED_CONTENTS_FIELD:
            values = draw(_values(datatype, math.prod(dims)))
            getattr(tensor.contents, TYPED_CONTENTS_FIELD[datatype]).extend(values)
        else:
            typed = False
    if not typed:
        for tensor in request.inputs:
            tensor.ClearField("contents")
            request.raw_input_contents.append(draw(_raw(tensor.datatype, math.prod(tensor.shape))))
    for mutation in draw(st.lists(st.sampled_from(_INFER_MUTATIONS), max_size=2)):
        if not request.inputs:  # dropped already
            request.inputs.add(name="x", datatype="FP32", shape=[1])
        tensor = request.inputs[draw(st.integers(0, len(request.inputs) - 1))]
        if mutation == "shape":
            del tensor.shape[:]
            tensor.shape.extend(draw(st.sampled_from(_SHAPES)))
        elif mutation == "datatype":
            tensor.datatype = draw(st.sampled_from([*DATATYPE_TO_NUMPY, "", "fp32", "FP8"]))
        elif mutation == "drop-input":
            del request.inputs[0]
        elif mutation == "repeat-input":
            request.inputs.add().CopyFrom(tensor)
        elif mutation == "extra-raw":
            request.raw_input_contents.append(draw(BYTES))
        elif mutation == "drop-raw":
            request.ClearField("raw_input_contents")
        elif mutation == "typed-and-raw":
            tensor.contents.fp32_contents.append(1.0)
            request.raw_input_contents.append(bytes(4))
        elif mutation == "wrong-typed-field":
            field_name = draw(st.sampled_from(sorted(set(TYPED_CONTENTS_FIELD.values()))))
            kind = "BYTES" if field_name == "bytes_contents" else "INT32"
            getattr(tensor.contents, field_name).extend(draw(_values(kind, 2)))
        elif mutation == "parameters":
            where = draw(st.sampled_from(["request", "input", "output"]))
            if where == "request":
                params = request.parameters
            elif where == "input":
                params = tensor.parameters
            else:
                params = request.outputs.add(name="y").parameters
            parameter = draw(messages(pb.InferParameter.DESCRIPTOR, hints))
            params[draw(STRINGS)].CopyFrom(cast(pb.InferParameter, parameter))
        elif mutation == "outputs":
            for name in draw(st.lists(st.sampled_from(["y", "total", "out", "", "x"]), max_size=3)):
                request.outputs.add(name=name)
        elif mutation == "version":
            versions = st.sampled_from(["1", "2", "3", "0", "-1", " 2", "٣", "9" * 5000])
            request.model_version = draw(st.one_of(versions, STRINGS))
        elif mutation == "cut-raw" and request.raw_input_contents:
            request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
        elif mutation == "bad-bytes-prefix":
            request.raw_input_contents.append(b"\xff\xff\xff\x7fab")
        elif mutation == "unknown-input":
            request.inputs.add(name=draw(STRINGS), datatype="FP32", shape=[1])
        elif mutation == "huge-id":  # over the model's size limit: refused before parsing
            request.id = "x" * 200_000
    return (request.SerializeToString(),)


# --------------------------------------------------------------------------- the rig


class ErrorLog(logging.Handler):
    """What anything in the process logs at ERROR, or with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)

    def take(self) -> list[str]:
        taken = [f"{r.name}: {r.getMessage()}" for r in self.records]
        self.records.clear()
        return taken


Kind = Literal["none", "wrong", "viewer", "valid"]


@dataclass(frozen=True)
class Credential:
    kind: Kind
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Case:
    bodies: tuple[bytes, ...]  # one request, or a client stream's messages
    credential: Credential


# A valid request to start mutating from: the message, and what a stream sends after it.
Exemplar = tuple[Message, tuple[bytes, ...]]


@dataclass
class Rig:
    root: Path
    cloud: CloudServer
    inference: InferenceServer
    channels: dict[str, grpc.Channel]
    secrets: dict[str, str]  # which token -> its value
    hints: dict[str, HintTable]  # per group of methods (see _hint_set)
    exemplars: dict[str, Exemplar]
    near_valid: dict[str, st.SearchStrategy[tuple[bytes, ...]]]
    regressions: dict[str, list[tuple[bytes, ...]]]
    log: ErrorLog


def _hints(p: Mapping[str, Any]) -> dict[str, HintTable]:
    labels65 = {f"k{n}": "v" for n in range(65)}
    long_paths = ["a" * 300, "a/" * 2100, f"upload:{'a' * 300}/x"]
    admin: dict[str, Sequence[Any]] = {
        "model": ["m", "ft", "nothing-here"],
        "version": [0, 1, 2, 99],
        "parent_version": [0, 1, 99],
        "target": ["", "onnx-cpu-fp32", "onnx-cpu-int8", "onnx-gpu-fp16", "tensorrt-fp16"],
        "targets": ["onnx-cpu-fp32", "onnx-gpu-fp16", "ONNX-CPU-FP32 "],
        "selector.key": ["site"],
        "selector.value": ["fuzz", "victim"],
        "selector*": [{}, {"site": "fuzz"}, {"site": "victim"}, labels65],
        "set*": [{"site": "victim"}, labels65, {"": "x"}, {"k": "v" * 256}],
        "labels*": [{"site": "a"}, labels65],
        "device_id": ["victim", "gone", "nobody", "-dash"],  # never fuzz-dev: it must live
        "role": ["viewer", "operator", "admin", "root", "Admin"],
        "token_id": [p["enroll-token-id"], p["admin-token-id"], "static", "tok-"],
        "job_id": ["job-1", "job-2", "job-3", "job-0", "job-99"],
        "base": ["small-cnn", "minilm-l6", "upload:0123456789abcdef/none", *long_paths],
        "data": ["synthetic", "synthetic:10", "fashion-mnist", "/etc/passwd", *long_paths],
        "params.key": ["epochs", "lr", "device", "strategy", "batch_size", "image_size", "x"],
        "params.value": ["0", "1", "-1", "nan", "inf", "1e999", "cuda", "auto", "full"],
        "name": ["epochs", "lr", "device", "strategy", "data.csv"],
        "values": ["1", "2", "0", "nan", "cuda"],
        "datatype": ["FP32", "FP16", "BYTES", "INT64", "BOOL", "", "X"],
        "shape*": _SHAPES,
    }
    agent = {
        **admin,
        "device_id": ["", "fuzz-dev", "victim", "new-1"],
        "enroll_token": [ENROLL_TOKEN, p["enroll-token"], "", "enr_wrong"],
        "digest": [p["digest"], "0" * 64, "A" * 64],
        "sha256": [*p["chunks"][:3], "0" * 64],
        "offset": [0, 1, 1024, 1025],
        "labels*": [{"site": "fuzz"}, labels65],
    }
    # Enroll never names fuzz-dev: re-enrolling it with its credential would rotate it.
    enrolling = {**agent, "device_id": ["", "self-enroll", "victim", "gone", "new-1"]}
    names = [*sorted(INFER_MODELS), "x", "b", "in", "y", "total", "out"]
    inference = {
        "model_name": sorted(INFER_MODELS),
        "name": names,
        "model_version": ["", "1", "2", "3", "-1"],
        "version": ["", "1", "2", "3", "-1", "9" * 5000],
        "datatype": [*DATATYPE_TO_NUMPY, "", "FP8"],
        "shape*": _SHAPES,
    }
    health = {"service": ["", *SERVICES, "inference.GRPCInferenceService", "nothing"]}
    tables: dict[str, Mapping[str, Sequence[Any]]] = {
        "admin": admin,
        "agent": agent,
        "enroll": enrolling,
        "inference": inference,
        "health": health,
    }
    return {name: HintTable(name, values) for name, values in tables.items()}


def _hint_set(method: Method) -> str:
    if "health" in method.path:
        return "health"
    if method.server == "inference":
        return "inference"
    if method.path == _F + "Enroll":
        return "enroll"
    return "agent" if method.path.startswith(_F) else "admin"


def _exemplars(p: Mapping[str, Any], model_file: bytes) -> dict[str, Exemplar]:
    """A request per method that the servers take, for mutants and the sweep."""
    ad, jb, fl = admin_pb2, jobs_pb2, fleet_pb2
    me = "fuzz-dev"
    caps = fl.Capabilities(arch="x86_64", os="linux", execution_providers=["CPUExecutionProvider"])
    status = fl.ModelStatus(model="m", active_version=1, phase=fl.MODEL_PHASE_READY)
    empty = artifact_pb2.TensorValue(name="x", datatype="FP32", shape=[0, 4])
    none_out = artifact_pb2.TensorValue(name="probs", datatype="FP32", shape=[0, 3])
    golden = artifact_pb2.GoldenSample(inputs=[empty], outputs=[none_out])
    push = ad.PushModelHeader(model="m", size=len(model_file), golden_samples=[golden])
    tar = _TARS[0]
    upload = jb.UploadHeader(name="d", kind=jb.UPLOAD_KIND_FOLDER_TAR, size=len(tar))
    unary: dict[str, Message] = {
        _A + "ListVersions": ad.ListVersionsRequest(model="m"),
        _A + "GetVersion": ad.GetVersionRequest(model="m", version=1),
        _A + "Deploy": ad.DeployRequest(model="m", version=1, selector={"site": "fuzz"}),
        _A + "Rollback": ad.RollbackRequest(model="m", version=1, selector={"site": "fuzz"}),
        _A + "ListDevices": ad.ListDevicesRequest(selector={"site": "fuzz"}),
        _A + "GetDevice": ad.GetDeviceRequest(device_id="victim"),
        _A + "LabelDevice": ad.LabelDeviceRequest(
            device_id="victim", set={"site": "victim", "rack": "2"}, remove=["rack"]
        ),
        _A + "RevokeDevice": ad.RevokeDeviceRequest(device_id="victim"),
        _A + "CreateEnrollToken": ad.CreateEnrollTokenRequest(
            ttl_seconds=3600, note="fuzz", max_uses=1, labels={"site": "victim"}
        ),
        _A + "RevokeEnrollToken": ad.RevokeEnrollTokenRequest(token_id=p["enroll-token-id"]),
        _A + "CreateAdminToken": ad.CreateAdminTokenRequest(name="ci", role="viewer"),
        _A + "RevokeAdminToken": ad.RevokeAdminTokenRequest(token_id=p["admin-token-id"]),
        _J + "SubmitFineTune": jb.FineTuneRequest(
            model="ft",
            base="small-cnn",
            data="synthetic",
            data_options=jb.DataOptions(limit=10),
            params={"epochs": "1"},
            search=[jb.SearchAxis(name="lr", values=["0.1", "0.01"])],
            max_trials=2,
            targets=["onnx-cpu-fp32"],
            test_fraction=0.2,
            seeds=2,
            warm_start=jb.WARM_START_BASE,
        ),
        _J + "SubmitEvaluate": jb.EvaluateRequest(
            model="m", version=1, target="onnx-cpu-fp32", data="synthetic", sample=100
        ),
        _J + "SubmitCompile": jb.CompileRequest(
            model="m", version=1, target="onnx-cpu-int8", data="synthetic"
        ),
        _J + "ListJobs": jb.ListJobsRequest(model="ft", active_only=True, limit=5),
        _J + "GetJob": jb.GetJobRequest(job_id="job-1"),
        _J + "WatchJob": jb.WatchJobRequest(job_id="job-1", follow=False),
        _J + "CancelJob": jb.CancelJobRequest(job_id="job-1"),
        _J + "RetryJob": jb.RetryJobRequest(job_id="job-1"),
        _F + "Enroll": fl.EnrollRequest(enroll_token=ENROLL_TOKEN, capabilities=caps),
        _F + "GetDesiredState": fl.GetDesiredStateRequest(device_id=me),
        _F + "WatchDesiredState": fl.WatchDesiredStateRequest(device_id=me, known_generation=1),
        _F + "ReportState": fl.ReportedState(
            device_id=me,
            observed_generation=1,
            models=[status],
            capabilities=caps,
            labels={"site": "fuzz"},
            inference_endpoint="127.0.0.1:8001",
        ),
        _F + "GetManifest": fl.GetManifestRequest(device_id=me, digest=p["digest"]),
        _F + "FetchChunk": fl.FetchChunkRequest(device_id=me, sha256=p["chunks"][0]),
        _OIP + "ModelReady": pb.ModelReadyRequest(name="affine", version="1"),
        _OIP + "ModelMetadata": pb.ModelMetadataRequest(name="affine", version="2"),
        _H + "Check": health_pb2.HealthCheckRequest(service=""),
        _H + "Watch": health_pb2.HealthCheckRequest(service=""),
    }
    streams: dict[str, Exemplar] = {
        _A + "PushModel": (
            ad.PushModelRequest(header=push),
            (ad.PushModelRequest(data=model_file).SerializeToString(),),
        ),
        _J + "Upload": (
            jb.UploadRequest(header=upload),
            (jb.UploadRequest(data=tar).SerializeToString(),),
        ),
    }
    return {**{path: (m, ()) for path, m in unary.items()}, **streams}


# What the fuzzing found, each an INTERNAL with a traceback in the log before its fix; sent
# every run, whatever hypothesis draws.
def _regressions(model_file: bytes) -> dict[str, list[tuple[bytes, ...]]]:
    def golden(*shape: int) -> tuple[bytes, ...]:
        # edgefleet.core.tensors.from_raw counted the elements in numpy's int64, which
        # wrapped to 0 so that b"" "fit", and then reshape raised ValueError.
        tensor = artifact_pb2.TensorValue(name="x", datatype="FP32", shape=shape)
        out = artifact_pb2.TensorValue(name="probs", datatype="FP32", shape=[1], data=bytes(4))
        sample = artifact_pb2.GoldenSample(inputs=[tensor], outputs=[out])
        header = admin_pb2.PushModelHeader(model="m", size=len(model_file), golden_samples=[sample])
        return (
            admin_pb2.PushModelRequest(header=header).SerializeToString(),
            admin_pb2.PushModelRequest(data=model_file).SerializeToString(),
        )

    def finetune(**fields: str) -> tuple[bytes, ...]:
        request = jobs_pb2.FineTuneRequest(model="ft", base="small-cnn", data="synthetic")
        for name, value in fields.items():
            setattr(request, name, value)
        return (request.SerializeToString(),)

    return {
        _A + "PushModel": [golden(2**32, 2**32), golden(0, 2**63 - 1), golden(2**62, 2**62)],
        # cloudsvc.jobs.spec: Path.exists raised ENAMETOOLONG for a name over 255 bytes.
        _J + "SubmitFineTune": [
            finetune(data="a" * 300),
            finetune(data="a/" * 2100),
            finetune(base=f"upload:{'a' * 300}/x"),
        ],
        # A uint64 past SQLite's signed 64-bit integers, bound as a query parameter.
        _J + "WatchJob": [
            (jobs_pb2.WatchJobRequest(job_id="job-1", after_seq=2**64 - 1).SerializeToString(),)
        ],
        _F + "ReportState": [
            (fleet_pb2.ReportedState(observed_generation=2**64 - 1).SerializeToString(),),
            (fleet_pb2.ReportedState(observed_generation=2**63).SerializeToString(),),
        ],
    }


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One cloud (TLS, SQLite, as in production; no job slot, so that no fuzzed job runs)
    with a model deployed to a device, and one inference port with a bearer token."""
    root = tmp_path_factory.mktemp("fuzz")
    log = ErrorLog()
    logging.getLogger().addHandler(log)
    settings = CloudSettings.load(
        None,
        data_dir=root / "cloud",
        port=0,
        admin_token=ADMIN_TOKEN,
        enroll_tokens=[ENROLL_TOKEN],
        max_upload_bytes=MAX_UPLOAD,
        chunk_size=1024,
        max_workers=32,
        # No slot at all: a fuzzed job that passes its checks is queued and never runs.
        jobs={"cpu_slots": 0, "gpus": 0, "fashion_mnist_dir": str(root / "no-fashion-mnist")},
    )
    cloud = serve(settings)
    channel = ClientSecurity(ca_file=cloud.trust_dir / "ca.pem").channel(cloud.address)

    repository = ModelRepository()
    repository.publish(load("affine", 1, affine_model(root / "affine1.onnx", 2.0)))
    repository.publish(load("affine", 2, affine_model(root / "affine2.onnx", 3.0)), keep=[1])
    for datatype, elem_type in IDENTITY_TYPES.items():
        path = identity_model(root / f"id-{datatype}.onnx", elem_type)
        repository.publish(load(f"id-{datatype.lower()}", 1, path))
    inference = start_inference_server(
        repository, "127.0.0.1", 0, max_workers=8, security=InferenceSecurity(token=INFER_TOKEN)
    )
    inference_channel = grpc.insecure_channel(f"127.0.0.1:{inference.port}")

    model_path = write_linear_model(root / "m.onnx")
    with AdminClient(cloud.address, ADMIN_TOKEN, ca_file=cloud.trust_dir / "ca.pem") as admin:
        version = admin.push_model("m", model_path)
        device = enroll(channel, "fuzz-dev", site="fuzz")
        enroll(channel, "victim", site="victim")
        enroller = enroll(channel, "self-enroll")
        gone = enroll(channel, "gone")
        admin.revoke_device("gone")
        admin.deploy("m", 1, selector={"site": "fuzz"})
        viewer, _ = admin.create_admin_token("fuzz-viewer", "viewer")
        revoked, record = admin.create_admin_token("fuzz-revoked", "operator")
        admin.revoke_admin_token(record.token_id)
        _, victim_admin = admin.create_admin_token("victim-admin", "viewer")
        enroll_secret, enroll_record = admin.create_enroll_token(max_uses=1)
        job = admin.finetune("ft", base="small-cnn", data="synthetic")
        assert job.job_id == "job-1", job
    digest = version.artifacts[0].manifest_digest
    parts = {
        "digest": digest,
        "chunks": sorted(cloud.registry.chunks_of(digest)),
        "enroll-token": enroll_secret,
        "enroll-token-id": enroll_record.token_id,
        "admin-token-id": victim_admin.token_id,
    }
    hints = _hints(parts)
    model_file = model_path.read_bytes()
    made = Rig(
        root=root,
        cloud=cloud,
        inference=inference,
        channels={"cloud": channel, "inference": inference_channel},
        secrets={
            "admin": ADMIN_TOKEN,
            "viewer": viewer,
            "device": device.device_token,
            "enroller": enroller.device_token,
            "revoked-device": gone.device_token,
            "revoked-admin": revoked,
            "enroll": ENROLL_TOKEN,
        },
        hints=hints,
        exemplars=_exemplars(parts, model_file),
        near_valid={
            _A + "PushModel": _push_streams(hints["admin"], model_file),
            _J + "Upload": _upload_streams(),
            _OIP + "ModelInfer": _infer_requests(hints["inference"]),
        },
        regressions=_regressions(model_file),
        log=log,
    )
    try:
        yield made
    finally:
        channel.close()
        inference_channel.close()
        inference.stop(None)
        cloud.stop(grace=1.0)
        logging.getLogger().removeHandler(log)


# ----------------------------------------------------------------- calls and answers


def right_token(method: Method, rig: Rig) -> str:
    """The credential a method needs. Enroll's is a device's current one, to re-enroll
    itself: a device of its own, as fuzzing rotates it. Public methods need none and get
    a device's, which changes nothing."""
    s = rig.secrets
    tokens = {"admin": s["admin"], "device": s["device"], "bearer": INFER_TOKEN}
    return tokens.get(gate_of(method), s["enroller"])


def credentials(method: Method, rig: Rig, kind: Kind) -> st.SearchStrategy[Credential]:
    """No credential; a wrong one (made up, another kind's, revoked, badly written); a
    token of too small a role (admin methods); the right one."""
    s = rig.secrets
    right = right_token(method, rig)
    if kind == "none":
        return st.just(Credential("none", ()))
    if kind == "valid":
        return st.just(Credential("valid", bearer_metadata(right)))
    if kind == "viewer":
        return st.just(Credential("viewer", bearer_metadata(s["viewer"])))
    others = {
        "admin": [s["device"], s["enroll"], s["revoked-admin"], INFER_TOKEN],
        "device": [s["admin"], s["enroll"], s["revoked-device"], INFER_TOKEN],
        "bearer": [s["admin"], s["device"], INFER_TOKEN.upper(), INFER_TOKEN + "x"],
    }.get(gate_of(method), [s["admin"], s["revoked-device"]])
    odd: list[tuple[tuple[str, str], ...]] = [
        (("authorization", "Bearer"),),
        (("authorization", f"Basic {right}"),),
        (("authorization", right),),  # no scheme
        (("authorization", "Bearer wrong"), ("authorization", f"Bearer {right}")),  # 1st wins
        (("x-authorization", f"Bearer {right}"),),
    ]
    token_chars = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
    return st.one_of(
        st.text(token_chars, min_size=1, max_size=64).map(bearer_metadata),
        st.sampled_from([bearer_metadata(t) for t in others]),
        st.sampled_from(odd),
    ).map(lambda md: Credential("wrong", md))


Bodies = Literal["messages", "junk", "any"]


def bodies(method: Method, rig: Rig, which: Bodies) -> st.SearchStrategy[tuple[bytes, ...]]:
    """Request bytes: messages (arbitrary, mutants of the exemplar, near-valid ones), junk
    (at least one part of a stream), or either."""
    if which == "any":
        return st.one_of(bodies(method, rig, "messages"), bodies(method, rig, "junk"))
    hints = rig.hints[_hint_set(method)]
    message = messages(method.request, hints).map(lambda m: m.SerializeToString())
    if which == "junk":
        bad = junk(method.request, hints)
        if not method.client_streams:
            return bad.map(lambda b: (b,))
        return st.tuples(st.lists(message, max_size=2), bad, st.integers(0, 2)).map(
            lambda t: (*t[0][: t[2]], t[1], *t[0][t[2] :])
        )
    options = [
        st.lists(message, max_size=3).map(tuple)
        if method.client_streams
        else message.map(lambda b: (b,))
    ]
    if method.path in rig.exemplars:
        first, rest = rig.exemplars[method.path]
        options.append(mutants(first, hints).map(lambda m: (m.SerializeToString(), *rest)))
    if method.path in rig.near_valid:
        options.append(rig.near_valid[method.path])
    return st.one_of(*options)


def plan(method: Method) -> list[tuple[Kind, Bodies, int]]:
    """Examples per credential and kind of bytes: most with the right credential, where
    the method's own code runs; a few without, where the gate must refuse before decoding."""
    n = RULES[method.path].examples
    gated = gate_of(method) in ("admin", "device", "bearer")
    runs: list[tuple[Kind, Bodies, int]] = [
        ("valid", "messages", n),
        ("valid", "junk", max(6, n // 5)),
        ("wrong", "any", 6 if gated else 3),  # the credential changes nothing ungated
        ("none", "any", 3 if gated else 2),
    ]
    if gate_of(method) == "admin":
        runs.append(("viewer", "any", 4))
    return runs


def expected(method: Method, case: Case) -> frozenset[grpc.StatusCode]:
    """The statuses this call may end with (see the module's docstring)."""
    rule = RULES[method.path]
    kind = case.credential.kind
    if gate_of(method) in ("admin", "device", "bearer") and kind in ("none", "wrong"):
        return frozenset({UA})  # refused before the bytes are even decoded
    if kind == "viewer" and not Role.VIEWER.allows(ROLES[method.path]):
        return frozenset({PD})
    decoded = [decodes(method.request, b) for b in case.bodies]
    if not all(decoded):
        if method.client_streams and decoded[0]:
            # The method reads the good first message and may refuse it before the bad one.
            return (rule.ok - {OK}) | {IA}
        return frozenset({IA}) | rule.junk_extra
    return rule.ok | ({DE} if rule.watch else frozenset())


def call(rig: Rig, method: Method, case: Case, deadline: float) -> tuple[grpc.StatusCode, str]:
    """Send the case's bytes to the method and read all it answers; the status and its
    message. Every answer of an OK call must decode as the declared response type."""
    channel = rig.channels[method.server]
    answers: list[bytes] = []
    kwargs: Any = {"timeout": deadline, "metadata": case.credential.metadata}
    try:
        if method.client_streams and method.server_streams:
            both: Any = channel.stream_stream(method.path)  # ModelStreamInfer
            answers.extend(both(iter(case.bodies), **kwargs))
        elif method.client_streams:
            stream: Any = channel.stream_unary(method.path)  # bytes in, bytes out
            answers.append(stream(iter(case.bodies), **kwargs))
        elif method.server_streams:
            watch: Any = channel.unary_stream(method.path)
            answers.extend(watch(case.bodies[0], **kwargs))
        else:
            unary: Any = channel.unary_unary(method.path)
            answers.append(unary(case.bodies[0], **kwargs))
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    for answer in answers:
        assert decodes(method.response, answer), f"{method.path} answered undecodable bytes"
    return OK, ""


def _seen(method: Method, case: Case, code: grpc.StatusCode, details: str) -> str:
    shown = [b[:100] for b in case.bodies]
    return f"{method.path}, {case.credential.kind} credential, {shown!r}: {code.name} {details!r}"


# ------------------------------------------------------------------- still serving


def assert_cloud_serves(rig: Rig) -> None:
    channel = rig.channels["cloud"]
    check = channel.unary_unary(
        _H + "Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    for service in ("", *SERVICES):
        answer = check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_DEADLINE_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    models = channel.unary_unary(
        _A + "ListModels",
        request_serializer=admin_pb2.ListModelsRequest.SerializeToString,
        response_deserializer=admin_pb2.ListModelsResponse.FromString,
    )(admin_pb2.ListModelsRequest(), metadata=bearer_metadata(ADMIN_TOKEN), timeout=CALL_DEADLINE_S)
    assert "m" in [m.name for m in models.models]
    signed = channel.unary_unary(
        _F + "GetDesiredState",
        request_serializer=fleet_pb2.GetDesiredStateRequest.SerializeToString,
        response_deserializer=fleet_pb2.SignedDesiredState.FromString,
    )(
        fleet_pb2.GetDesiredStateRequest(),
        metadata=bearer_metadata(rig.secrets["device"]),
        timeout=CALL_DEADLINE_S,
    )
    state = fleet_pb2.DesiredState.FromString(signed.state)
    assert state.device_id == "fuzz-dev" and state.assignments, state


def assert_inference_serves(rig: Rig) -> None:
    channel = rig.channels["inference"]
    answer = channel.unary_unary(
        _H + "Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )(health_pb2.HealthCheckRequest(), timeout=CALL_DEADLINE_S)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    x = np.array([[1, 2, 3, 4], [-1, 0, 0.5, 8]], dtype=np.float32)
    b = np.array([0, 0, 0, 1], dtype=np.float32)
    request = pb.ModelInferRequest(model_name="affine", model_version="1")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.inputs.add(name="b", datatype="FP32", shape=[4])
    request.raw_input_contents.extend([x.tobytes(), b.tobytes()])
    response = channel.unary_unary(
        _OIP + "ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )(request, metadata=bearer_metadata(INFER_TOKEN), timeout=CALL_DEADLINE_S)
    names = [o.name for o in response.outputs]
    outputs = dict(zip(names, response.raw_output_contents, strict=True))
    y = np.frombuffer(outputs["y"], dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(y, x * 2.0 + b)


def escapes(rig: Rig) -> list[Path]:
    """Files a hostile tar wrote anywhere but inside its own upload's folder (uploads/
    <digest>/<name>/...: the `data` filter makes absolute member names relative)."""
    uploads = rig.cloud.settings.uploads_dir
    found = [*rig.root.rglob(ESCAPE_NAME), *Path("/tmp").glob(ESCAPE_NAME)]
    return [
        p
        for p in found
        if not (p.is_relative_to(uploads) and len(p.relative_to(uploads).parts) > 2)
    ]


# ------------------------------------------------------------------------- the tests


def test_every_method_has_a_rule() -> None:
    """Every method of every fuzzed service says what it may answer: a new method is
    fuzzed as soon as it has its rule."""
    assert sorted(RULES) == sorted({m.path for m in METHODS})


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.label)
def test_malformed_requests(rig: Rig, method: Method) -> None:
    sent = 0

    def check(case: Case) -> None:
        nonlocal sent
        allowed = expected(method, case)
        # Only an authorized, decodable call to a watch may stay open; everything else
        # must end well within the long deadline.
        deadline = WATCH_S if DE in allowed else CALL_DEADLINE_S
        code, details = call(rig, method, case, deadline)
        sent += 1
        assert code in allowed, _seen(method, case, code, details)
        assert len(details.encode()) <= MAX_MESSAGE_BYTES + 100, _seen(method, case, code, "")
        assert not rig.log.records, rig.log.take()

    right = Credential("valid", bearer_metadata(right_token(method, rig)))
    for kind, which, examples in plan(method):
        cases = st.builds(Case, bodies(method, rig, which), credentials(method, rig, kind))
        fuzz = given(case=cases)(check)
        if (kind, which) == ("valid", "messages"):
            for regression in rig.regressions.get(method.path, []):
                fuzz = example(case=Case(regression, right))(fuzz)
        settings(
            max_examples=examples,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )(fuzz)()

    # The boundary sweep: each field of a valid request in turn at each edge of its type.
    if RULES[method.path].sweep and method.path in rig.exemplars:
        first, rest = rig.exemplars[method.path]
        for variant in variants(first, rig.hints[_hint_set(method)]):
            check(Case((variant.SerializeToString(), *rest), right))

    figures.add("malformed requests", method.label, sent)
    assert_cloud_serves(rig)
    assert_inference_serves(rig)
    assert not escapes(rig), f"an upload wrote outside its own folder: {escapes(rig)}"
    assert not rig.log.take()


def test_open_health_watches_leave_inference_served(rig: Rig) -> None:
    """Health Watch is open to anyone (token or not) and each open stream holds a worker
    thread: 8 of them used to take all of the inference port's 8 threads, and every later
    call waited. Now those past half the threads are refused, and inference runs."""
    watch: Any = rig.channels["inference"].unary_stream(
        _H + "Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    streams = [watch(health_pb2.HealthCheckRequest(), timeout=5.0) for _ in range(12)]
    codes = []
    try:
        for stream in streams:
            try:
                next(stream)
                codes.append(OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        assert DE not in codes, f"watches waited for a thread: the others hold all ({codes})"
        assert set(codes) == {OK, RE}, codes
        assert_inference_serves(rig)
    finally:
        for stream in streams:
            stream.cancel()
    assert not rig.log.take()
