"""The agent's durable state: one SQLite file (`data_dir/agent.db`, 0600: it holds the
device's credential and key).

It holds the device identity, the root keys it trusts (from the provisioned one along the
signed rotations), the desired state it last accepted, each model's version floor, and per
model the active and previous version. Every switch is one transaction, and that commit IS the atomic switch: a kill at
any instant leaves either the old or the new version active, never a mix. WAL with
synchronous=FULL, so a committed switch survives power loss.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DiskFull, StateError
from edgefleet.core.fleet import DesiredState, MqttAccess
from edgefleet.core.trust import RootKey
from edgefleet.core.wire import from_json, to_json

# Each entry upgrades the schema by one version; PRAGMA user_version records how far we are.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE identity (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        device_id TEXT NOT NULL,
        device_token TEXT NOT NULL,
        enrolled_at REAL NOT NULL
    );
    CREATE TABLE trusted_keys (public_key BLOB PRIMARY KEY);
    CREATE TABLE manifests (digest TEXT PRIMARY KEY, signed BLOB NOT NULL);
    CREATE TABLE models (
        model TEXT PRIMARY KEY,
        active_version INTEGER,
        active_digest TEXT,
        active_dir TEXT,
        previous_version INTEGER,
        previous_digest TEXT,
        previous_dir TEXT,
        observed_generation INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        switched_at REAL
    );
    CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # Keys from an enrollment answer are trusted no more: the root of trust is provisioned
    # out of band and followed through signed rotations (root_keys). Floors are the highest
    # version of each model ever activated: going below one needs an operator's rollback.
    """
    DROP TABLE trusted_keys;
    CREATE TABLE root_keys (version INTEGER PRIMARY KEY, public_key BLOB NOT NULL);
    CREATE TABLE floors (model TEXT PRIMARY KEY, version INTEGER NOT NULL);
    ALTER TABLE identity ADD COLUMN certificate BLOB NOT NULL DEFAULT x'';
    ALTER TABLE identity ADD COLUMN private_key BLOB NOT NULL DEFAULT x'';
    ALTER TABLE identity ADD COLUMN device_port INTEGER NOT NULL DEFAULT 0;
    """,
)


@dataclass(frozen=True)
class Identity:
    device_id: str
    device_token: str
    # Mutual TLS: the device's certificate and key (PEM), and the cloud's device port.
    certificate: bytes = b""
    private_key: bytes = b""
    device_port: int = 0
    # The cloud's MQTT broker and this device's account on it (None: no broker).
    mqtt: MqttAccess | None = None


@dataclass(frozen=True)
class Slot:
    """One installed version of a model: where its verified files are."""

    version: int
    digest: str
    dir: Path


@dataclass(frozen=True)
class ModelRecord:
    model: str
    active: Slot | None
    previous: Slot | None
    observed_generation: int
    last_error: str


class StateStore:
    """Thread-safe access to agent.db; every write is a single durable transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._lock = threading.RLock()
        try:
            # Made 0600 before SQLite opens it; its -wal and -shm take the same mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            path.chmod(0o600)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.DatabaseError as err:
            raise StateError(
                f"cannot open agent state {path}: {err}; move the file aside to start fresh "
                "(the device will re-enroll and re-download its models)"
            ) from None

    def _migrate(self) -> None:
        (current,) = self._db.execute("PRAGMA user_version").fetchone()
        if current > len(_MIGRATIONS):
            raise StateError(
                f"{self.path} has schema {current}, newer than this agent ({len(_MIGRATIONS)}); "
                "upgrade the agent"
            )
        for number in range(current, len(_MIGRATIONS)):
            with self._tx() as db:
                db.executescript_in_tx(_MIGRATIONS[number])
                db.execute(f"PRAGMA user_version={number + 1}")

    @contextmanager
    def _tx(self) -> Iterator[_Tx]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield _Tx(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as err:
                if "full" not in str(err):
                    raise
                # Nothing was written (the transaction rolled back): a clear error, not a crash.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise DiskFull(
                    f"the agent's state in {self.path} cannot be written: the disk is full; "
                    "what runs keeps running: free space on that disk"
                ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # identity -------------------------------------------------------------------------
    def identity(self) -> Identity | None:
        with self._lock:
            row = self._db.execute(
                "SELECT device_id, device_token, certificate, private_key, device_port "
                "FROM identity"
            ).fetchone()
        if row is None:
            return None
        with self._lock:
            access = self._db.execute("SELECT value FROM kv WHERE key = 'mqtt_access'").fetchone()
        mqtt = from_json(MqttAccess, access[0]) if access else None
        return Identity(row[0], row[1], bytes(row[2]), bytes(row[3]), int(row[4]), mqtt)

    def save_identity(self, identity: Identity) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO identity (id, device_id, device_token, enrolled_at,"
                " certificate, private_key, device_port) VALUES (1, ?, ?, ?, ?, ?, ?)",
                (
                    identity.device_id,
                    identity.device_token,
                    time.time(),
                    identity.certificate,
                    identity.private_key,
                    identity.device_port,
                ),
            )
            # In the same transaction: a device never holds one enrollment's token with
            # another's broker account.
            if identity.mqtt is None:
                db.execute("DELETE FROM kv WHERE key = 'mqtt_access'")
            else:
                db.execute(
                    "INSERT OR REPLACE INTO kv (key, value) VALUES ('mqtt_access', ?)",
                    (to_json(identity.mqtt),),
                )

    # trust ------------------------------------------------------------------------------
    def root_keys(self) -> list[RootKey]:
        """The root keys trusted, oldest first; the last signs desired states."""
        with self._lock:
            rows = self._db.execute(
                "SELECT version, public_key FROM root_keys ORDER BY version"
            ).fetchall()
        return [RootKey(int(v), bytes(k)) for v, k in rows]

    def trust(self, keys: list[RootKey]) -> None:
        """Add root keys verified along the chain (never replaces or drops one)."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO root_keys (version, public_key) VALUES (?, ?)",
                [(k.version, k.public_key) for k in keys],
            )

    def trusted_keys(self) -> list[bytes]:
        """Public keys a manifest may be signed by: every trusted root key version."""
        return [k.public_key for k in self.root_keys()]

    def accepted(self) -> tuple[int, float]:
        """Generation and issue time of the desired state last accepted."""
        with self._lock:
            rows = dict(
                self._db.execute(
                    "SELECT key, value FROM kv WHERE key IN ('accepted_generation',"
                    " 'accepted_issued_at')"
                ).fetchall()
            )
        return int(rows.get("accepted_generation", 0)), float(rows.get("accepted_issued_at", 0))

    def accept(self, generation: int, issued_at: float) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)",
                [("accepted_generation", str(generation)), ("accepted_issued_at", repr(issued_at))],
            )

    def save_desired(self, state: DesiredState) -> None:
        """The desired state last accepted, so what it asks (capture policies) holds across
        an offline restart."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO kv (key, value) VALUES ('desired', ?)", (to_json(state),)
            )

    def last_desired(self) -> DesiredState | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = 'desired'").fetchone()
        return from_json(DesiredState, row[0]) if row else None

    def floor(self, model: str) -> int:
        """The highest version of `model` this device ever activated (0: none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT version FROM floors WHERE model = ?", (model,)
            ).fetchone()
        return int(row[0]) if row else 0

    # manifests ------------------------------------------------------------------------
    def save_manifest(self, digest: str, signed: bytes) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO manifests (digest, signed) VALUES (?, ?)", (digest, signed)
            )

    def manifest(self, digest: str) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT signed FROM manifests WHERE digest = ?", (digest,)
            ).fetchone()
        return bytes(row[0]) if row else None

    def prune_manifests(self, keep: set[str]) -> None:
        with self._tx() as db:
            for (digest,) in db.execute("SELECT digest FROM manifests").fetchall():
                if digest not in keep:
                    db.execute("DELETE FROM manifests WHERE digest = ?", (digest,))

    # models ---------------------------------------------------------------------------
    def models(self) -> list[ModelRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM models ORDER BY model").fetchall()
        return [_record(r) for r in rows]

    def model(self, name: str) -> ModelRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM models WHERE model = ?", (name,)).fetchone()
        return _record(row) if row else None

    def switch(
        self,
        name: str,
        new: Slot,
        generation: int,
        *,
        rollback: bool = False,
        before_commit: Callable[[], None] | None = None,
    ) -> ModelRecord:
        """Make `new` active and the current active the previous, in one transaction, and
        raise the model's version floor to it (an operator's `rollback` sets the floor to it).

        `before_commit` runs inside the transaction (tests use it to die mid-switch).
        """
        with self._tx() as db:
            row = db.execute("SELECT * FROM models WHERE model = ?", (name,)).fetchone()
            old = _record(row) if row else None
            previous = old.active if old else None
            if previous is not None and previous.digest == new.digest:
                previous = old.previous if old else None
            db.execute(
                "INSERT INTO floors (model, version) VALUES (?, ?) ON CONFLICT(model)"
                " DO UPDATE SET version = "
                + ("excluded.version" if rollback else "max(version, excluded.version)"),
                (name, new.version),
            )
            db.execute(
                "INSERT OR REPLACE INTO models (model, active_version, active_digest, active_dir,"
                " previous_version, previous_digest, previous_dir, observed_generation,"
                " last_error, switched_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', ?)",
                (
                    name,
                    new.version,
                    new.digest,
                    str(new.dir),
                    previous.version if previous else None,
                    previous.digest if previous else None,
                    str(previous.dir) if previous else None,
                    generation,
                    time.time(),
                ),
            )
            if before_commit is not None:
                before_commit()
        record = self.model(name)
        assert record is not None
        return record

    def record_error(self, name: str, error: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO models (model) VALUES (?)", (name,))
            db.execute("UPDATE models SET last_error = ? WHERE model = ?", (error, name))

    def mark_observed(self, name: str, generation: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE models SET observed_generation = ?, last_error = '' WHERE model = ?",
                (generation, name),
            )

    def remove_model(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM models WHERE model = ?", (name,))

    # generation -----------------------------------------------------------------------
    def observed_generation(self) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM kv WHERE key = 'observed_generation'"
            ).fetchone()
        return int(row[0]) if row else 0

    def set_observed_generation(self, generation: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO kv (key, value) VALUES ('observed_generation', ?)",
                (str(generation),),
            )


class _Tx:
    """The connection inside an open transaction (no implicit commits)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple[object, ...]]) -> sqlite3.Cursor:
        return self._db.executemany(sql, rows)

    def executescript_in_tx(self, script: str) -> None:
        # executescript() would COMMIT first; run statement by statement instead.
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)


def _record(row: tuple[object, ...]) -> ModelRecord:
    (model, av, ad, adir, pv, pd, pdir, gen, err, _at) = row

    def slot(v: object, d: object, p: object) -> Slot | None:
        if v is None or d is None or p is None:
            return None
        return Slot(int(str(v)), str(d), Path(str(p)))

    return ModelRecord(
        model=str(model),
        active=slot(av, ad, adir),
        previous=slot(pv, pd, pdir),
        observed_generation=int(str(gen)),
        last_error=str(err),
    )
