"""The one table from ErrorCode to gRPC status, and the helpers servicers use with it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from edgefleet.core.errors import EdgefleetError, ErrorCode

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
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

ERROR_CODE: dict[grpc.StatusCode, ErrorCode] = {v: k for k, v in GRPC_STATUS.items()}

F = TypeVar("F", bound=Callable[..., Any])


def abort_with(context: grpc.ServicerContext, error: EdgefleetError) -> None:
    """End the call with the status that the error's code maps to."""
    context.abort(GRPC_STATUS[error.code], error.message)


def grpc_method(fn: F) -> F:
    """Wrap a unary servicer method: EdgefleetError -> its status; anything else -> INTERNAL.

    The server keeps serving whatever a request does; an unexpected exception is logged
    with its traceback and answered INTERNAL rather than crashing a worker thread.
    """

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except EdgefleetError as err:
            abort_with(context, err)
        except Exception as err:
            if _is_abort(err):
                raise
            log.exception("unexpected error in %s", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")
        return None  # unreachable: abort raises

    return wrapper  # type: ignore[return-value]


def grpc_stream_method(fn: F) -> F:
    """Like grpc_method, for methods that return or yield a stream of responses."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from fn(self, request, context)
        except EdgefleetError as err:
            abort_with(context, err)
        except Exception as err:
            if _is_abort(err):
                raise
            log.exception("unexpected error in %s", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")

    return wrapper  # type: ignore[return-value]


def _is_abort(err: Exception) -> bool:
    # grpc raises a bare Exception from context.abort(); let it through untouched.
    return type(err) is Exception and not err.args


def error_from_rpc(err: grpc.RpcError) -> EdgefleetError:
    """Turn a failed call into the EdgefleetError a client can catch and show."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    mapped = ERROR_CODE.get(code, ErrorCode.INTERNAL)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach the server: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        mapped, details = ErrorCode.UNAVAILABLE, f"the server did not answer in time: {details}"
    return EdgefleetError(details or code.name, code=mapped)
