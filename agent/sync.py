"""The agent's side of sync: the spool's rows to the cloud, telemetry before captures, in
batches, under an upload bandwidth cap, each stream's rows let go only once the cloud
acknowledged them. Killed at any moment, it resends what was not acknowledged, and the
cloud stores nothing twice (it skips rows at or below its mark)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from agent.ratelimit import RateLimiter
from agent.spool import CAPTURES, STREAMS, TELEMETRY, Pending, Spool
from edgefleet.core.data import SyncAck
from edgefleet.core.errors import EdgefleetError, ErrorCode
from edgefleet.core.protowire import LEN, VARINT, field, tag, varint
from edgefleet.core.retry import Backoff

log = logging.getLogger(__name__)

# Field numbers of SyncBatch (protos/fleet/v1/data.proto): a batch is written from the
# rows' stored bytes, never parsed on the device.
_DEVICE_ID, _TELEMETRY, _CAPTURES, _SPOOL_ID = 1, 2, 3, 4
_DROPPED = {TELEMETRY: 5, CAPTURES: 6}


def encode_batch(device_id: str, spool_id: str, parts: list[Pending]) -> bytes:
    """A SyncBatch's wire bytes from the pending rows of each stream."""
    out = [field(_DEVICE_ID, device_id.encode()), field(_SPOOL_ID, spool_id.encode())]
    for part in parts:
        row_tag = tag(_TELEMETRY if part.stream == TELEMETRY else _CAPTURES, LEN)
        for body in part.bodies:
            out += (row_tag, varint(len(body)), body)
        if part.dropped_through:
            out.append(tag(_DROPPED[part.stream], VARINT) + varint(part.dropped_through))
    return b"".join(out)


class SyncLink(Protocol):
    """What the syncer needs of the cloud link."""

    @property
    def device_id(self) -> str: ...

    def sync(self, batch: bytes) -> SyncAck:
        """Send a SyncBatch's wire bytes; the cloud's acknowledgement."""
        ...


@dataclass
class SyncStats:
    batches: int = 0
    rows: int = 0
    bytes: int = 0
    failures: int = 0
    last_success_at: float = 0.0
    last_error: str = ""


class Syncer:
    def __init__(
        self,
        spool: Spool,
        link: SyncLink,
        *,
        interval_s: float = 10.0,
        max_batch_rows: int = 2_000,
        max_batch_bytes: int = 4 << 20,
        upload_bytes_per_s: int = 0,
        backoff: Backoff | None = None,
    ) -> None:
        self.spool = spool
        self.link = link
        self.interval_s = interval_s
        self.max_batch_rows = max_batch_rows
        # Under a cap, a batch is at most a second's worth: a bigger one would cross the
        # link at full speed after a long wait, the burst the cap is there to prevent.
        if upload_bytes_per_s > 0:
            max_batch_bytes = min(max_batch_bytes, max(upload_bytes_per_s, 16 << 10))
        self.max_batch_bytes = max_batch_bytes
        self.rate = RateLimiter(upload_bytes_per_s)
        self.backoff = backoff or Backoff(base=0.5, cap=30.0)
        self.stats = SyncStats()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # The call in flight runs here while the spool is read and trimmed beside it.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgefleet-sync-call")

    def sync_once(self) -> int:
        """Send everything pending, telemetry first, until the spool is empty; rows sent.
        Raises EdgefleetError when the cloud cannot be reached or refuses a batch."""
        sent = 0
        for stream in STREAMS:  # telemetry first: it is small and says how things are
            if not self.link.device_id:
                return sent  # not enrolled yet: nothing may be sent
            sent += self._send(stream)
        self.stats.last_success_at = time.time()
        self.stats.last_error = ""
        return sent

    def _send(self, stream: str) -> int:
        """One stream's rows, a batch at a time: while the cloud stores one, the next is
        read and the last acknowledged one let go (one batch in flight, always in order:
        the cloud takes a stream's rows only following on from its mark)."""
        sent = 0
        part = self.spool.pending(stream, self.max_batch_rows, self.max_batch_bytes)
        acked: int | None = None  # acknowledged by the cloud, not yet let go by the spool
        try:
            while part is not None and not self._stop.is_set():
                batch = encode_batch(self.link.device_id, self.spool.spool_id, [part])
                self.rate.acquire(len(batch))
                call = self._pool.submit(self.link.sync, batch)
                if acked is not None:
                    self.spool.acknowledge(stream, acked)
                    acked = None
                following = self.spool.pending(
                    stream, self.max_batch_rows, self.max_batch_bytes, after=part.last_seq
                )
                ack = call.result()
                acked = ack.telemetry_through if stream == TELEMETRY else ack.captures_through
                self.stats.batches += 1
                self.stats.rows += len(part.bodies)
                self.stats.bytes += len(batch)
                sent += len(part.bodies)
                if acked < part.last_seq:
                    # The cloud stopped short of the batch: it says so with an error, never
                    # silently; resending from its mark is what the next pass does.
                    break
                part = following
        finally:
            if acked is not None:
                self.spool.acknowledge(stream, acked)
        return sent

    def start(self) -> Syncer:
        self._thread = threading.Thread(target=self._run, name="edgefleet-sync", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        delay = self.interval_s
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                sent = self.sync_once()
                self.backoff.reset()
                delay = self.interval_s
                if sent:
                    log.debug("synced %d rows", sent)
            except EdgefleetError as err:
                self.stats.failures += 1
                self.stats.last_error = err.message
                delay = self.backoff.next_delay()
                level = logging.DEBUG if err.code == ErrorCode.UNAVAILABLE else logging.WARNING
                log.log(level, "sync: %s (next try in %.1fs)", err.message, delay)
            except Exception:
                self.stats.failures += 1
                delay = self.backoff.next_delay()
                log.exception("sync failed; the rows stay in the spool")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False)
