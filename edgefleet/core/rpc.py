"""gRPC on both sides of the wire, in one place: the table from error class to status, the
one server interceptor every edgefleet server runs, and the client's way back.

The interceptor (:class:`CallGuard`) wraps every method of every service a server offers:

- it decodes request bytes itself, so bytes that are no message answer INVALID_ARGUMENT
  (grpc's own decoder would answer INTERNAL and log a traceback per request);
- it asks the server's `authorize` callback who the caller is, before the method runs, so
  a method cannot forget its check; what it answers is the caller of :func:`caller`;
- it turns an EdgefleetError into its status with a bounded message, and any other
  exception into a fixed INTERNAL message (the details go to the log only).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from edgefleet.core.errors import (
    BY_CODE,
    EdgefleetError,
    ErrorCode,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

GRPC_STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
ERROR_CODE: dict[grpc.StatusCode, ErrorCode] = {v: k for k, v in GRPC_STATUS.items()}

# Status messages travel in HTTP/2 trailers (percent-encoded, so a byte can take three): a
# message echoing a client's 20 KB name would break the transport instead of answering.
# Every message is cut to this many UTF-8 bytes.
MAX_MESSAGE_BYTES = 1000

Authorize = Callable[[str, grpc.ServicerContext], object]
"""(full method name, the call's context) -> the caller, or raise an EdgefleetError. The
context gives the metadata (credentials) and, on a mutual-TLS port, the peer certificate."""

Admit = Callable[[bytes], AbstractContextManager[object]]
"""(the request's raw bytes) -> held while the call runs, or raise an EdgefleetError: a
server's chance to refuse or queue a large request before it is parsed into a second copy."""

Observe = Callable[[str, grpc.StatusCode, float], None]
"""(full method name, the status the call ended with, seconds it took: a stream's lifetime)
-> None: told of every call once it ends (metrics). Must be quick and must not raise."""

_CALLER: ContextVar[object] = ContextVar("edgefleet_caller", default=None)


def caller() -> Any:
    """Who makes the call being served: what the server's `authorize` answered for it."""
    return _CALLER.get()


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    data = message.encode("utf-8")
    if len(data) <= limit:
        return message
    kept = data[: limit - 40].decode("utf-8", errors="ignore")
    return f"{kept}... ({len(message) - len(kept)} more characters)"


def abort_with(context: grpc.ServicerContext, error: EdgefleetError) -> None:
    """End the call with the status that the error's code maps to."""
    context.abort(GRPC_STATUS[error.code], bounded(error.message))


def _is_abort(err: BaseException) -> bool:
    # grpc raises a bare Exception from context.abort(); let it through untouched.
    return type(err) is Exception and not err.args


def _status(context: grpc.ServicerContext, err: BaseException) -> grpc.StatusCode:
    """The status a call that raised `err` ends with (for an observer)."""
    if isinstance(err, EdgefleetError):
        return GRPC_STATUS[err.code]
    if _is_abort(err):
        code = getattr(context, "code", lambda: None)()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    if isinstance(err, GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def _fail(context: grpc.ServicerContext, method: str, err: BaseException) -> None:
    if isinstance(err, EdgefleetError):
        abort_with(context, err)
    incident = secrets.token_hex(4)
    log.error("unexpected error in %s (incident %s)", method, incident, exc_info=err)
    context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error (incident {incident}); the server's log has the details",
    )


def _decoder(method: str, parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        if parse is None:
            return raw
        try:
            return parse(raw)
        except (DecodeError, ValueError, RuntimeError):
            raise InvalidArgument(
                f"the request to {method} is not a valid protobuf message; check the client's "
                "generated code against this server's .proto"
            ) from None

    return decode


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


class CallGuard(grpc.ServerInterceptor):
    """The one interceptor of an edgefleet server: decode safely, authorize, map errors."""

    def __init__(
        self,
        authorize: Authorize | None = None,
        public_streams: int = 16,
        admit: Mapping[str, Admit] | None = None,
        observe: Observe | None = None,
        max_streams: int | None = None,
    ) -> None:
        self._authorize = authorize
        self._observe = observe
        self._admit = dict(admit or {})
        self._handlers: dict[str, Handler] = {}
        # Streams hold a server thread each: callers without an identity (health watches,
        # reflection, anything on an open port) may hold this many at once, no more.
        self._public_streams = threading.BoundedSemaphore(public_streams)
        self._public_limit = public_streams
        # Every stream (any method, any caller) out of one budget: below the server's
        # threads, so that unary calls are always served. None: no budget but the above.
        self._streams = None if max_streams is None else threading.BoundedSemaphore(max_streams)
        self._stream_limit = max_streams

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = details.method
        handler = self._handlers.get(method)
        if handler is None:
            inner = continuation(details)
            if inner is None:  # not served: not cached, so unknown names cannot fill memory
                return None
            handler = self._handlers[method] = self._wrap(method, inner)
        return handler

    def _wrap(self, method: str, inner: Handler) -> Handler:
        decode = _decoder(method, inner.request_deserializer)
        authorize = self._authorize
        admit = None if inner.request_streaming else self._admit.get(method)
        serialize = inner.response_serializer
        observe = self._observe

        def ended(started: float, code: grpc.StatusCode) -> None:
            if observe is None:
                return
            try:
                observe(method, code, time.perf_counter() - started)
            except Exception:  # metrics never fail a call
                log.exception("the call observer failed")

        def enter(context: grpc.ServicerContext) -> Any:
            if authorize is None:
                return None
            return _CALLER.set(authorize(method, context))

        def leave(token: Any) -> None:
            if token is not None:
                _CALLER.reset(token)

        def requests(raw: Iterator[bytes]) -> Iterator[Any]:
            for item in raw:
                yield decode(item)

        # What the servicer method is given: one decoded message, or a stream of them.
        parse: Callable[[Any], Any] = requests if inner.request_streaming else decode
        behaviour: Any = (
            (inner.stream_stream if inner.response_streaming else inner.stream_unary)
            if inner.request_streaming
            else (inner.unary_stream if inner.response_streaming else inner.unary_unary)
        )

        def unary(raw: Any, context: grpc.ServicerContext) -> Any:
            token = None
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                token = enter(context)
                with admit(raw) if admit is not None else nullcontext():
                    return behaviour(parse(raw), context)
            except BaseException as err:
                code = _status(context, err)
                if _is_abort(err):
                    raise
                _fail(context, method, err)
            finally:
                leave(token)
                ended(started, code)
            return None  # unreachable: _fail aborts

        public = self._public_streams
        limit = self._public_limit
        budget = self._streams
        budget_limit = self._stream_limit

        def streaming(raw: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = None
            held = False
            budgeted = False
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                token = enter(context)
                if budget is not None:
                    budgeted = budget.acquire(blocking=False)
                    if not budgeted:
                        raise ResourceExhausted(
                            f"{budget_limit} streams are open already, the most this server "
                            "holds; close one or try later"
                        )
                if caller() is None:
                    held = public.acquire(blocking=False)
                    if not held:
                        raise ResourceExhausted(
                            f"{limit} streams without a credential are open already; try later"
                        )
                yield from behaviour(parse(raw), context)
            except BaseException as err:
                code = _status(context, err)
                if _is_abort(err) or isinstance(err, GeneratorExit):
                    raise
                _fail(context, method, err)
            finally:
                if held:
                    public.release()
                if budgeted and budget is not None:
                    budget.release()
                leave(token)
                ended(started, code)

        if not inner.response_streaming:
            make = (
                grpc.stream_unary_rpc_method_handler
                if inner.request_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            return make(unary, response_serializer=serialize)
        if inner.request_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=serialize)
        return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=serialize)


def error_from_rpc(err: grpc.RpcError) -> EdgefleetError:
    """The failed call as the EdgefleetError subclass of its status (NotFound for NOT_FOUND,
    ...), so a client can `except NotFound:`."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"cannot reach the server: {details or 'no answer'}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"the server did not answer in time: {details or 'deadline exceeded'}")
    if code == grpc.StatusCode.CANCELLED:
        return Unavailable(f"the call was cancelled: {details or 'cancelled'}")
    mapped = ERROR_CODE.get(code)
    if mapped is None:
        return Internal(f"{code.name}: {details}" if details else code.name)
    return BY_CODE[mapped](details or code.name)
