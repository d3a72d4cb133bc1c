"""An on-path attacker at the gRPC level: a server the agent dials instead of the cloud
(only possible in --insecure mode, or with a certificate the device trusts), forwarding
every call to the real cloud as raw bytes. Hooks rewrite what passes, or answer instead.

    mitm = GrpcMitm(cloud_address)
    mitm.on_response["GetDesiredState"] = lambda raw: tampered(raw)
    mitm.answer["GetTrust"] = lambda raw, metadata: attacker_chain_bytes
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc

from protos.fleet.v1 import fleet_pb2

SERVICE = "edgefleet.fleet.v1.AgentService"
_STREAMING = {
    m.name: m.server_streaming
    for m in fleet_pb2.DESCRIPTOR.services_by_name["AgentService"].methods
}

Metadata = tuple[tuple[str, str | bytes], ...]
# (request bytes, metadata) -> response bytes (or, for streams, a list of response bytes)
Answer = Callable[[bytes, Metadata], Any]


class Refuse(Exception):
    """Raised by a hook: end the call with this status, as the attacker chooses."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class GrpcMitm:
    def __init__(
        self,
        upstream: str,
        upstream_credentials: grpc.ChannelCredentials | None = None,
        serve_credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        """`serve_credentials`: answer over TLS with them (an impostor's own certificate)."""
        self._channel = (
            grpc.secure_channel(upstream, upstream_credentials)
            if upstream_credentials
            else grpc.insecure_channel(upstream)
        )
        self.on_request: dict[str, Callable[[bytes], bytes]] = {}
        self.on_response: dict[str, Callable[[bytes], bytes]] = {}
        self.answer: dict[str, Answer] = {}
        self.seen: dict[str, list[bytes]] = {}  # responses that passed, per method
        self.metadata_seen: dict[str, list[tuple[str, str | bytes]]] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self._server.add_generic_rpc_handlers((_Handler(self),))
        self.port = (
            self._server.add_secure_port("127.0.0.1:0", serve_credentials)
            if serve_credentials
            else self._server.add_insecure_port("127.0.0.1:0")
        )
        self._server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self, method: str) -> int:
        with self._lock:
            return self.calls.get(method, 0)

    def _note(self, method: str, response: bytes | None, metadata: Metadata = ()) -> None:
        with self._lock:
            self.metadata_seen.setdefault(method, []).extend(metadata)
            self.calls[method] = self.calls.get(method, 0) + 1
            if response is not None:
                self.seen.setdefault(method, []).append(response)

    def forward_unary(self, method: str, raw: bytes, metadata: Metadata) -> bytes:
        call: Any = self._channel.unary_unary(f"/{SERVICE}/{method}")
        response: bytes = call(raw, metadata=metadata, timeout=30)
        return response

    def forward_stream(self, method: str, raw: bytes, metadata: Metadata) -> Iterator[bytes]:
        call: Any = self._channel.unary_stream(f"/{SERVICE}/{method}")
        yield from call(raw, metadata=metadata)

    def close(self) -> None:
        self._server.stop(0).wait()
        self._channel.close()


def _identity(raw: bytes) -> bytes:
    return raw


def _metadata(context: grpc.ServicerContext) -> Metadata:
    return tuple(
        (k, v)
        for k, v in context.invocation_metadata() or ()
        if not k.startswith(":")
        and k not in ("user-agent", "te", "content-type")
        and not k.startswith("grpc-")
    )


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, mitm: GrpcMitm) -> None:
        self._mitm = mitm

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        service, _, method = details.method.strip("/").partition("/")
        if service != SERVICE or method not in _STREAMING:
            return None
        mitm = self._mitm
        if _STREAMING[method]:

            def stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
                metadata = _metadata(context)
                try:
                    raw = mitm.on_request.get(method, _identity)(raw)
                    items: Iterable[bytes]
                    if method in mitm.answer:
                        items = list(mitm.answer[method](raw, metadata))
                    else:
                        items = mitm.forward_stream(method, raw, metadata)
                    rewrite = mitm.on_response.get(method, _identity)
                    for item in items:
                        out = rewrite(item)
                        mitm._note(method, out, metadata)
                        yield out
                except Refuse as refusal:
                    mitm._note(method, None)
                    context.abort(refusal.code, refusal.details)
                except grpc.RpcError as err:
                    context.abort(err.code(), err.details() or "")

            return grpc.unary_stream_rpc_method_handler(stream)

        def unary(raw: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = _metadata(context)
            try:
                raw = mitm.on_request.get(method, _identity)(raw)
                if method in mitm.answer:
                    response = mitm.answer[method](raw, metadata)
                else:
                    response = mitm.forward_unary(method, raw, metadata)
                out: bytes = mitm.on_response.get(method, _identity)(response)
                mitm._note(method, out, metadata)
                return out
            except Refuse as refusal:
                mitm._note(method, None)
                context.abort(refusal.code, refusal.details)
            except grpc.RpcError as err:
                context.abort(err.code(), err.details() or "")
            raise AssertionError("unreachable")

        return grpc.unary_unary_rpc_method_handler(unary)
