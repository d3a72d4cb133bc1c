"""Everything the agent says to the cloud, behind the small `CloudLink` interface.

The reconciler depends only on the Protocol and speaks domain types (edgefleet.core.fleet);
this module is where they meet the wire. The real link is gRPC (AgentService) with
keepalive, deadlines and the device token as `authorization: Bearer` metadata. Failed calls
become EdgefleetErrors via error_from_rpc. Tests use an in-memory fake of the Protocol.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import grpc

from agent.state import Identity
from edgefleet.core.auth import bearer_metadata
from edgefleet.core.data import SyncAck
from edgefleet.core.errors import (
    EdgefleetError,
    ErrorCode,
    Internal,
    Unauthenticated,
    Unavailable,
)
from edgefleet.core.fleet import Capabilities, Enrollment, ReportedState
from edgefleet.core.retry import Backoff
from edgefleet.core.rpc import error_from_rpc
from edgefleet.core.tls import ClientSecurity
from edgefleet.core.trust import SignedDesiredState, TrustChain
from edgefleet.core.wire import from_proto, to_proto
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import data_pb2, fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
SYNC_METHOD = "/edgefleet.fleet.v1.AgentService/Sync"


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


class CloudLink(Protocol):
    """The cloud as the agent sees it. Every method raises EdgefleetError on failure."""

    def enroll(
        self,
        enroll_token: str,
        device_id: str,
        labels: dict[str, str],
        capabilities: Capabilities,
        *,
        certificate_request: bytes = b"",
        current_credential: str = "",
    ) -> Enrollment: ...

    def authenticate(self, identity: Identity) -> None: ...

    @property
    def device_id(self) -> str:
        """The enrolled device's id ("" before enrollment)."""
        ...

    def get_trust(self) -> TrustChain:
        """The cloud's root keys and rotations, unverified: the caller follows the chain."""
        ...

    def get_desired_state(self) -> SignedDesiredState:
        """The signed desired state, unverified: the caller checks it against its trust."""
        ...

    def report_state(self, report: ReportedState) -> int:
        """Send a report; returns the cloud's desired generation."""
        ...

    def get_manifest(self, digest: str) -> artifact_pb2.SignedManifest: ...

    def fetch_chunk(self, sha256: str, offset: int) -> Iterator[bytes]: ...

    def watch(self, known_generation: int) -> Iterator[int]:
        """Generations as the cloud announces them; ends or raises when the stream breaks."""
        ...

    def sync(self, batch: bytes) -> SyncAck:
        """Send a SyncBatch (its wire bytes, as agent.sync writes them); the acknowledgement."""
        ...

    def close(self) -> None: ...


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as err:
        raise error_from_rpc(err) from None
    except ValueError as err:
        raise _closed(err) from None


def _closed(err: ValueError) -> EdgefleetError:
    # grpc raises ValueError for a call on a channel closed by stop(): the agent is
    # stopping, which is no failure of the model being converged.
    if "closed" in str(err).lower():
        return Unavailable("the link to the cloud is closed: the agent is stopping")
    raise err


class GrpcCloudLink:
    """The cloud over gRPC: TLS verified against the provisioned CA bundle (plain text only
    with `insecure`); with mutual TLS, device calls go to the cloud's device port with the
    device's own certificate."""

    def __init__(
        self,
        address: str,
        security: ClientSecurity,
        *,
        rpc_timeout_s: float = 15.0,
        chunk_timeout_s: float = 120.0,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        self.address = address
        self._security = security
        self._rpc_timeout = rpc_timeout_s
        self._chunk_timeout = chunk_timeout_s
        self._options = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Reconnect quickly after the cloud returns; the reconciler paces retries.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        self._channel = security.channel(address, self._options)
        self._enroll_stub = fleet_pb2_grpc.AgentServiceStub(self._channel)
        self._device_channel: grpc.Channel | None = None
        self._stub = self._enroll_stub
        self._identity: Identity | None = None
        self._watch_call: _Cancellable | None = None
        self._lock = threading.Lock()

    def _meta(self) -> tuple[tuple[str, str], ...]:
        if self._identity is None:
            raise Unauthenticated("the agent has no device credential yet; it must enroll first")
        return bearer_metadata(self._identity.device_token)

    @property
    def device_id(self) -> str:
        return self._identity.device_id if self._identity else ""

    def authenticate(self, identity: Identity) -> None:
        if (
            identity.certificate
            and identity.device_port
            and (self._identity is None or self._identity.certificate != identity.certificate)
        ):
            host = self.address.rpartition(":")[0]
            secured = replace(
                self._security, cert_pem=identity.certificate, key_pem=identity.private_key
            )
            old = self._device_channel
            self._device_channel = secured.channel(f"{host}:{identity.device_port}", self._options)
            self._stub = fleet_pb2_grpc.AgentServiceStub(self._device_channel)
            if old is not None:
                old.close()
        self._identity = identity

    def enroll(
        self,
        enroll_token: str,
        device_id: str,
        labels: dict[str, str],
        capabilities: Capabilities,
        *,
        certificate_request: bytes = b"",
        current_credential: str = "",
    ) -> Enrollment:
        request = fleet_pb2.EnrollRequest(
            enroll_token=enroll_token,
            device_id=device_id,
            labels=labels,
            capabilities=to_proto(capabilities, fleet_pb2.Capabilities),
            certificate_request=certificate_request,
        )
        metadata = bearer_metadata(current_credential) if current_credential else None
        response: fleet_pb2.EnrollResponse = _call(
            lambda: self._enroll_stub.Enroll(request, timeout=self._rpc_timeout, metadata=metadata)
        )
        return from_proto(response, Enrollment)

    def get_trust(self) -> TrustChain:
        chain: fleet_pb2.TrustChain = _call(
            lambda: self._enroll_stub.GetTrust(
                fleet_pb2.GetTrustRequest(), timeout=self._rpc_timeout
            )
        )
        return from_proto(chain, TrustChain)

    def get_desired_state(self) -> SignedDesiredState:
        request = fleet_pb2.GetDesiredStateRequest(device_id=self.device_id)
        signed: fleet_pb2.SignedDesiredState = _call(
            lambda: self._stub.GetDesiredState(
                request, timeout=self._rpc_timeout, metadata=self._meta()
            )
        )
        return from_proto(signed, SignedDesiredState)

    def report_state(self, report: ReportedState) -> int:
        request = to_proto(report, fleet_pb2.ReportedState)
        response: fleet_pb2.ReportStateResponse = _call(
            lambda: self._stub.ReportState(
                request, timeout=self._rpc_timeout, metadata=self._meta()
            )
        )
        return int(response.desired_generation)

    def get_manifest(self, digest: str) -> artifact_pb2.SignedManifest:
        request = fleet_pb2.GetManifestRequest(
            device_id=self.device_id, digest=digest, accept_compressed=True
        )
        signed: artifact_pb2.SignedManifest = _call(
            lambda: self._stub.GetManifest(
                request, timeout=self._rpc_timeout, metadata=self._meta()
            )
        )
        return signed

    def fetch_chunk(self, sha256: str, offset: int) -> Iterator[bytes]:
        request = fleet_pb2.FetchChunkRequest(
            device_id=self.device_id, sha256=sha256, offset=offset
        )
        stream = _call(
            lambda: self._stub.FetchChunk(
                request, timeout=self._chunk_timeout, metadata=self._meta()
            )
        )
        expected = offset
        try:
            for piece in stream:
                if piece.offset != expected:
                    stream.cancel()
                    raise Internal(
                        f"chunk {sha256[:12]}: the cloud sent bytes from offset {piece.offset}, "
                        f"expected {expected}"
                    )
                expected += len(piece.data)
                yield piece.data
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        finally:
            stream.cancel()

    def watch(self, known_generation: int) -> Iterator[int]:
        request = fleet_pb2.WatchDesiredStateRequest(
            device_id=self.device_id, known_generation=known_generation
        )
        call = _call(lambda: self._stub.WatchDesiredState(request, metadata=self._meta()))
        with self._lock:
            self._watch_call = call
        try:
            for notice in call:
                yield int(notice.generation)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            raise error_from_rpc(err) from None
        finally:
            with self._lock:
                self._watch_call = None

    def sync(self, batch: bytes) -> SyncAck:
        channel = self._device_channel or self._channel
        # Raw bytes in: the batch is written from the spool's stored rows, not parsed.
        call: Any = channel.unary_unary(
            SYNC_METHOD, response_deserializer=data_pb2.SyncAck.FromString
        )
        ack: data_pb2.SyncAck = _call(
            lambda: call(batch, timeout=self._chunk_timeout, metadata=self._meta())
        )
        return from_proto(ack, SyncAck)

    def cancel_watch(self) -> None:
        with self._lock:
            call = self._watch_call
        if call is not None:
            call.cancel()

    def close(self) -> None:
        self.cancel_watch()
        self._channel.close()
        if self._device_channel is not None:
            self._device_channel.close()


class Watcher:
    """A background thread that follows WatchDesiredState and calls `on_generation` with
    each announced generation; it reconnects with backoff when the stream breaks."""

    def __init__(
        self,
        link: CloudLink,
        known_generation: Callable[[], int],
        on_generation: Callable[[int], None],
        backoff: Backoff,
    ) -> None:
        self._link = link
        self._known = known_generation
        self._on_generation = on_generation
        self._backoff = backoff
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefleet-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        cancel = getattr(self._link, "cancel_watch", None)
        if cancel is not None:
            cancel()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for generation in self._link.watch(self._known()):
                    self._backoff.reset()
                    self._on_generation(generation)
                    if self._stop.is_set():
                        return
            except EdgefleetError as err:
                if err.code == ErrorCode.UNAUTHENTICATED and not self._stop.is_set():
                    log.debug("watch waits for enrollment: %s", err)
                else:
                    log.info("desired-state watch broke: %s", err)
            except Exception:
                log.exception("desired-state watch failed")
            self._stop.wait(self._backoff.next_delay())
