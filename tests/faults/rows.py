"""What the way back holds, read straight from its files: an agent's spool (data_dir/spool.db)
and the cloud's data store (data_dir/data.db), as a test checks them after a kill.

Both are SQLite in WAL mode; a dead process's file is read as its restart would find it
(the last committed transaction, nothing after), a live one's through a read-only connection
that sees the last commit and writes nothing.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protos.fleet.v1 import data_pb2


@contextlib.contextmanager
def _open(path: Path, readonly: bool) -> Iterator[sqlite3.Connection]:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    else:
        conn = sqlite3.connect(str(path), timeout=10)
    try:
        yield conn
    finally:
        conn.close()


@dataclass(frozen=True)
class SpoolView:
    """An agent's spool as stored: the marks and every row it still holds."""

    spool_id: str
    acked: dict[str, int]  # stream -> every row up to here the cloud acknowledged
    last: dict[str, int]  # stream -> the last sequence number ever given
    captures: dict[int, data_pb2.Capture]  # held, unacknowledged or not
    telemetry: dict[int, data_pb2.TelemetryRecord]
    dropped: int  # captures evicted unsynced, since the spool was made
    written: int

    @property
    def unacked_captures(self) -> int:
        return sum(1 for seq in self.captures if seq > self.acked["captures"])


def read_spool(path: Path, *, readonly: bool = False) -> SpoolView:
    """The spool at `path` (`readonly`: the agent may be running)."""
    with _open(path, readonly) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        sequences = dict(conn.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
        captures = {
            int(seq): data_pb2.Capture.FromString(body)
            for seq, body in conn.execute("SELECT seq, body FROM captures ORDER BY seq")
        }
        telemetry = {
            int(seq): data_pb2.TelemetryRecord.FromString(body)
            for seq, body in conn.execute("SELECT seq, body FROM telemetry ORDER BY seq")
        }
    streams = ("telemetry", "captures")
    return SpoolView(
        str(meta["spool_id"]),
        {s: int(meta.get(f"{s}_acked", 0)) for s in streams},
        {s: int(sequences.get(s, 0)) for s in streams},
        captures,
        telemetry,
        int(meta.get("captures_dropped", 0)),
        int(meta.get("captures_written", 0)),
    )


@dataclass(frozen=True)
class CapturedRow:
    id: int
    seq: int
    request_id: str
    label: str


@dataclass
class CloudSpool:
    """What the cloud holds of one device's spool."""

    captures: list[CapturedRow] = field(default_factory=list)  # in the cloud's id order
    telemetry: list[data_pb2.TelemetryRecord] = field(default_factory=list)  # in seq order
    through: dict[str, int] = field(default_factory=dict)  # stream -> cursor
    lost: dict[str, int] = field(default_factory=dict)


def read_cloud(path: Path, *, readonly: bool = True) -> dict[tuple[str, str], CloudSpool]:
    """(device, spool) -> the rows and cursors the cloud's data store holds."""
    found: dict[tuple[str, str], CloudSpool] = {}
    with _open(path, readonly) as conn:
        for device, spool, stream, through, lost in conn.execute(
            "SELECT device_id, spool_id, stream, through, lost FROM cursors"
        ):
            held = found.setdefault((device, spool), CloudSpool())
            held.through[stream], held.lost[stream] = int(through), int(lost)
        for id_, device, spool, seq, body in conn.execute(
            "SELECT id, device_id, spool_id, seq, body FROM captures ORDER BY id"
        ):
            row = data_pb2.Capture.FromString(body)
            assert row.seq == seq, f"capture {id_}: column seq {seq}, body seq {row.seq}"
            found.setdefault((device, spool), CloudSpool()).captures.append(
                CapturedRow(int(id_), int(seq), row.request_id, row.label)
            )
        for device, spool, body in conn.execute(
            "SELECT device_id, spool_id, body FROM telemetry"
        ):  # stored in segments of windows (cloudsvc.store.data_sqlite)
            found.setdefault((device, spool), CloudSpool()).telemetry.extend(
                data_pb2.TelemetrySegment.FromString(body).rows
            )
    for held in found.values():
        held.telemetry.sort(key=lambda r: r.seq)
    return found


def cursors(path: Path, device: str, spool: str) -> dict[str, int]:
    """The cloud's marks of one spool now (read-only: the cloud may be serving)."""
    with _open(path, True) as conn:
        return {
            str(stream): int(through)
            for stream, through in conn.execute(
                "SELECT stream, through FROM cursors WHERE device_id = ? AND spool_id = ?",
                (device, spool),
            )
        }


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
