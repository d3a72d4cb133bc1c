"""AgentService: what devices call. The caller's device credential was checked before any
method runs (cloudsvc.access); a device reads and writes only its own state."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import replace

import grpc

from cloudsvc.access import DeviceCaller, EnrollCaller
from cloudsvc.errors import InvalidRequest, TooLarge
from cloudsvc.fleet import Fleet
from cloudsvc.ingest import Ingest
from cloudsvc.registry import Registry
from cloudsvc.store.blobs import check_digest
from edgefleet.core.fleet import Capabilities, ReportedState
from edgefleet.core.rpc import caller
from edgefleet.core.wire import from_proto, to_proto
from protos.artifact.v1 import artifact_pb2
from protos.fleet.v1 import data_pb2, fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

PIECE_SIZE = 256 << 10


class AgentService(fleet_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        registry: Registry,
        fleet: Fleet,
        ingest: Ingest,
        keepalive_s: float = 15.0,
        max_watchers: int = 64,
    ) -> None:
        self.registry = registry
        self.fleet = fleet
        self.ingest = ingest
        self.keepalive_s = keepalive_s
        # Each watch stream holds a worker thread; past this many, new watchers are refused
        # so that deploys, reports and downloads always find a free thread.
        self.max_watchers = max_watchers
        self._watchers = threading.BoundedSemaphore(max_watchers)

    def _device(self, requested: str) -> str:
        """The calling device's id, checked against the one the request names."""
        who: DeviceCaller = caller()
        return self.fleet.authorize(who.device_id, requested)

    def Enroll(
        self, request: fleet_pb2.EnrollRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.EnrollResponse:
        caps = (
            from_proto(request.capabilities, Capabilities)
            if request.HasField("capabilities")
            else None
        )
        who: EnrollCaller = caller()
        enrollment = self.fleet.enroll(
            request.enroll_token,
            request.device_id,
            caps,
            current_credential=who.credential,
            certificate_request=request.certificate_request,
        )
        log.info("enrolled device %s", enrollment.device_id)
        return to_proto(enrollment, fleet_pb2.EnrollResponse)

    def GetTrust(
        self, request: fleet_pb2.GetTrustRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.TrustChain:
        return to_proto(self.fleet.keys.chain(), fleet_pb2.TrustChain)

    def GetDesiredState(
        self, request: fleet_pb2.GetDesiredStateRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.SignedDesiredState:
        signed = self.fleet.signed_desired_state(self._device(request.device_id))
        return to_proto(signed, fleet_pb2.SignedDesiredState)

    def WatchDesiredState(
        self, request: fleet_pb2.WatchDesiredStateRequest, context: grpc.ServicerContext
    ) -> Iterator[fleet_pb2.DesiredStateNotice]:
        device_id = self._device(request.device_id)
        if not self._watchers.acquire(blocking=False):
            raise TooLarge(
                f"this cloud already serves {self.max_watchers} watch streams; poll "
                "GetDesiredState instead, or raise max_workers"
            )
        try:
            # A caller that goes away wakes its watcher at once, freeing the thread.
            context.add_callback(self.fleet.wake)
            sent = self.fleet.desired_state(device_id).generation
            yield fleet_pb2.DesiredStateNotice(generation=sent)
            while context.is_active():
                generation = self.fleet.wait_for_change(
                    device_id, sent, self.keepalive_s, gone=lambda: not context.is_active()
                )
                if generation is None:  # the server is stopping or the caller went away
                    return
                self.fleet.authenticate_id(device_id)  # a revoked device's stream ends
                # A repeat of the same generation is the keep-alive: a dead peer fails it.
                yield fleet_pb2.DesiredStateNotice(generation=generation)
                sent = max(sent, generation)
                self.fleet.touch(device_id)
        finally:
            self._watchers.release()

    def ReportState(
        self, request: fleet_pb2.ReportedState, context: grpc.ServicerContext
    ) -> fleet_pb2.ReportStateResponse:
        state = from_proto(request, ReportedState)
        device_id = self._device(state.device_id)
        # The cloud's clock says when it arrived, whatever the device wrote.
        generation = self.fleet.report(replace(state, device_id=device_id, reported_at=0.0))
        return fleet_pb2.ReportStateResponse(desired_generation=generation)

    def GetManifest(
        self, request: fleet_pb2.GetManifestRequest, context: grpc.ServicerContext
    ) -> artifact_pb2.SignedManifest:
        device_id = self._device(request.device_id)
        digest = check_digest(request.digest)
        self.fleet.readable(device_id, digest)
        if request.accept_compressed:
            return self.registry.wire_manifest(digest)
        return self.registry.signed_manifest(digest)

    def FetchChunk(
        self, request: fleet_pb2.FetchChunkRequest, context: grpc.ServicerContext
    ) -> Iterator[fleet_pb2.ChunkPiece]:
        device_id = self._device(request.device_id)
        sha = check_digest(request.sha256)
        self.fleet.chunk_readable(device_id, sha)
        blobs = self.registry.blobs
        total = blobs.size(sha)
        if request.offset > total:
            raise InvalidRequest(
                f"offset {request.offset} is beyond the chunk's {total} bytes; resume from at "
                f"most {total}"
            )
        offset = request.offset
        with blobs.open(sha) as f:
            f.seek(offset)
            while offset < total and context.is_active():
                data = f.read(PIECE_SIZE)
                if not data:
                    break
                yield fleet_pb2.ChunkPiece(offset=offset, data=data, total_size=total)
                offset += len(data)
        if total == 0 or request.offset == total:
            # Nothing left to send: one empty piece still tells the device the size.
            yield fleet_pb2.ChunkPiece(offset=offset, data=b"", total_size=total)

    def Sync(self, request: data_pb2.SyncBatch, context: grpc.ServicerContext) -> data_pb2.SyncAck:
        device_id = self._device(request.device_id)
        ack = self.ingest.sync(device_id, request)
        self.fleet.touch(device_id)
        return to_proto(ack, data_pb2.SyncAck)
