"""The agent's spool: captured inferences and telemetry kept in SQLite (data_dir/spool.db,
WAL) until the cloud acknowledges them, through days offline and any number of restarts.

Rows are stored as their wire bytes with their sequence number inside, so a sync batch is
the rows' bytes put together, with no parsing on the device. Sequences are per stream,
from 1, never reused; the spool has an id of its own (a wiped device starts a new spool
whose sequences start again, and the cloud keeps the two apart).

Bounded by a disk budget. Eviction order, when the spool outgrows it: rows the cloud has
acknowledged are deleted at once, so what goes first is the oldest unsynced captures,
counted (and reported in telemetry, and to the cloud, which counts them lost). Telemetry is
never evicted: it is small, and losing it would hide what happened.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from agent.errors import DiskFull

log = logging.getLogger(__name__)

TELEMETRY, CAPTURES = "telemetry", "captures"
STREAMS = (TELEMETRY, CAPTURES)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS telemetry (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, size INTEGER NOT NULL, body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS captures (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, size INTEGER NOT NULL, body BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class Pending:
    """What to send next of one stream: rows in order, and the sequence below which
    everything not acknowledged is gone from the device (evicted)."""

    stream: str
    bodies: tuple[bytes, ...]
    first_seq: int
    last_seq: int
    dropped_through: int
    size: int


@dataclass(frozen=True)
class SpoolStats:
    bytes: int
    telemetry_pending: int
    captures_pending: int
    captures_dropped: int  # evicted unsynced, since the spool was made
    captures_written: int


class Spool:
    def __init__(self, path: Path, budget_bytes: int = 0) -> None:
        """`budget_bytes`: the most the spool may take on disk (0: no limit)."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.budget_bytes = budget_bytes
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # A committed row survives the process being killed (what the tests do); a power cut
        # may lose the last moments' rows, which costs a fsync per batch to avoid.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        path.chmod(0o600)
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if "spool_id" not in meta:
            meta["spool_id"] = uuid.uuid4().hex
            self._db.execute("INSERT INTO meta VALUES ('spool_id', ?)", (meta["spool_id"],))
        self.spool_id = meta["spool_id"]
        self._next = {s: self._last_assigned(s) + 1 for s in STREAMS}

    def _last_assigned(self, stream: str) -> int:
        row = self._db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (stream,)
        ).fetchone()
        return int(row[0]) if row else 0

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as err:
                if "full" not in str(err):
                    raise
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise DiskFull(
                    f"the spool {self.path} cannot be written: the disk is full"
                ) from None

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, conn: sqlite3.Connection, key: str, value: int) -> None:
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    # writing ----------------------------------------------------------------------------
    def append(self, stream: str, messages: Sequence[Message]) -> int:
        """Store rows of `stream` (Capture or TelemetryRecord messages, in order): each is
        given its sequence number (its `seq`) and kept as its wire bytes. Returns how many."""
        with self._tx() as conn:
            first = self._next[stream]
            rows = []
            for n, message in enumerate(messages):
                message.seq = first + n  # type: ignore[attr-defined]
                body = message.SerializeToString()
                rows.append((first + n, len(body), body))
            if rows:
                conn.executemany(f"INSERT INTO {stream} (seq, size, body) VALUES (?, ?, ?)", rows)
                if stream == CAPTURES:
                    written = self._meta("captures_written") + len(rows)
                    self._set_meta(conn, "captures_written", written)
            self._next[stream] = first + len(rows)
        if rows and self.budget_bytes:
            self.enforce_budget()
        return len(rows)

    def used_bytes(self) -> int:
        with self._lock:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            size = self._db.execute("PRAGMA page_size").fetchone()[0]
        wal = self.path.with_name(self.path.name + "-wal")
        return int((pages - free) * size) + (wal.stat().st_size if wal.exists() else 0)

    def enforce_budget(self) -> int:
        """Evict the oldest unsynced captures until the spool fits its budget; how many."""
        if not self.budget_bytes:
            return 0
        evicted = 0
        with self._lock:
            over = self.used_bytes() - self.budget_bytes
            if over <= 0:
                return 0
            # Much of that may be the WAL, which a checkpoint gives back: only rows are evicted
            # for room (counting the WAL kept a small spool at a fraction of its budget).
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            over = self.used_bytes() - self.budget_bytes
            if over <= 0:
                return 0
            with self._tx() as conn:
                victims = []
                freed = 0
                for seq, size in conn.execute("SELECT seq, size FROM captures ORDER BY seq"):
                    victims.append(seq)
                    freed += size + 64
                    if freed >= over + self.budget_bytes // 10:  # a margin: evict in batches
                        break
                if victims:
                    conn.execute("DELETE FROM captures WHERE seq <= ?", (victims[-1],))
                    evicted = len(victims)
                    self._set_meta(
                        conn, "captures_dropped", self._meta("captures_dropped") + evicted
                    )
            if evicted:
                log.warning(
                    "spool over its budget (%d bytes): evicted the %d oldest unsynced captures",
                    self.budget_bytes,
                    evicted,
                )
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return evicted

    # syncing ----------------------------------------------------------------------------
    def pending(
        self, stream: str, max_rows: int, max_bytes: int, *, after: int = 0
    ) -> Pending | None:
        """The next rows to send of `stream` (None: nothing to send, nothing to tell): those
        after the cloud's acknowledgement, or after `after` where rows up to it are in
        flight."""
        with self._lock:
            acked = self._meta(f"{stream}_acked")
            start = max(acked, after)
            bodies: list[bytes] = []
            size = 0
            first = last = 0
            for seq, body in self._db.execute(
                f"SELECT seq, body FROM {stream} WHERE seq > ? ORDER BY seq LIMIT ?",
                (start, max_rows),
            ):
                if bodies and size + len(body) > max_bytes:
                    break
                first = first or seq
                last = seq
                bodies.append(body)
                size += len(body)
            # Everything not acknowledged below the first row still held is gone: evicted.
            gone_below = (first - 1) if bodies else self._next[stream] - 1
            dropped = gone_below if gone_below > start else 0
            if not bodies and not dropped:
                return None
            return Pending(stream, tuple(bodies), first, last, dropped, size)

    def acknowledge(self, stream: str, through: int) -> None:
        """The cloud stored every row of `stream` up to `through`: let them go."""
        with self._tx() as conn:
            if through <= self._meta(f"{stream}_acked"):
                return
            conn.execute(f"DELETE FROM {stream} WHERE seq <= ?", (through,))
            self._set_meta(conn, f"{stream}_acked", through)

    def stats(self) -> SpoolStats:
        with self._lock:
            counts = {
                s: self._db.execute(
                    f"SELECT count(*) FROM {s} WHERE seq > ?", (self._meta(f"{s}_acked"),)
                ).fetchone()[0]
                for s in STREAMS
            }
            return SpoolStats(
                self.used_bytes(),
                int(counts[TELEMETRY]),
                int(counts[CAPTURES]),
                self._meta("captures_dropped"),
                self._meta("captures_written"),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
