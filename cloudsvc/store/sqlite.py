"""Metadata in one SQLite file: WAL, synchronous=FULL (an acknowledged write survives power
loss), schema migrations registered in code and applied in order at open.

One connection shared by the gRPC worker threads behind a lock: the cloud's metadata writes
are small and rare next to chunk transfers, so serialising them costs nothing measurable.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlite_utils

from cloudsvc.errors import Conflict, UnknownResource
from cloudsvc.store.metadata import (
    AdminTokenRecord,
    DeviceRecord,
    EnrollTokenRecord,
    MetadataStore,
)
from edgefleet.core.data import CapturePolicy, InputStats
from edgefleet.core.fleet import (
    Assignment,
    Capabilities,
    Deployment,
    DesiredState,
    ModelStatus,
    ReportedState,
)
from edgefleet.core.jobs import Job, JobEvent, JobProgress, JobState, TargetOutcome, Trial
from edgefleet.core.loop import Loop, LoopRun
from edgefleet.core.rollouts import Rollout, RolloutState
from edgefleet.core.tokens import AdminToken, EnrollToken, Role
from edgefleet.core.versions import Artifact, Evaluation, Lineage, Model, ModelVersion, TensorSpec
from edgefleet.core.wire import from_json, to_json

# SQLite's integers are signed 64-bit; a larger Python int cannot be bound as a parameter.
SQLITE_MAX_INT = 2**63 - 1
# Devices whose credential lookups are kept in memory (a fleet's worth; then start over).
_TOKEN_CACHE = 100_000
Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[tuple[int, str, Migration]] = []


def migration(number: int, name: str) -> Callable[[Migration], Migration]:
    """Register a schema step; steps run once each, in number order, inside a transaction."""

    def register(fn: Migration) -> Migration:
        MIGRATIONS.append((number, name, fn))
        MIGRATIONS.sort(key=lambda m: m[0])
        return fn

    return register


@migration(1, "registry, devices, states, enroll tokens")
def _initial(db: sqlite_utils.Database) -> None:
    db.table("models").create({"name": str, "description": str, "created_at": int}, pk="name")
    db.table("versions").create(
        {
            "model": str,
            "version": int,
            "description": str,
            "created_at": int,
            "source_sha256": str,
            "parent_version": int,
            "metadata": str,
            "inputs": str,
            "outputs": str,
            "golden_sample_count": int,
            "created_by": str,
        },
        pk=("model", "version"),
    )
    db.table("artifacts").create(
        {
            "model": str,
            "version": int,
            "target": str,
            "manifest_digest": str,
            "size_bytes": int,
            "chunk_count": int,
            "created_at": int,
            "signature_hex": str,
            "key_id": str,
        },
        pk=("model", "version", "target"),
    )
    db.table("artifacts").create_index(["manifest_digest"])
    db.table("devices").create(
        {
            "device_id": str,
            "token_hash": str,
            "enrolled_at": int,
            "labels": str,
            "capabilities": str,
            "last_seen_at": float,
        },
        pk="device_id",
    )
    db.table("devices").create_index(["token_hash"], unique=True)
    db.table("desired").create(
        {"device_id": str, "generation": int, "assignments": str}, pk="device_id"
    )
    db.table("reported").create(
        {
            "device_id": str,
            "observed_generation": int,
            "models": str,
            "last_error": str,
            "inference_endpoint": str,
            "reported_at": float,
        },
        pk="device_id",
    )
    db.table("enroll_tokens").create(
        {"token_hash": str, "created_at": int, "expires_at": int, "note": str}, pk="token_hash"
    )


@migration(2, "standing deployments")
def _deployments(db: sqlite_utils.Database) -> None:
    db.table("deployments").create(
        {
            "model": str,
            "selector": str,
            "version": int,
            "target": str,
            "created_at": float,
            "seq": int,
        },
        pk=("model", "selector"),
    )


@migration(3, "lineage, evaluation, artifact metrics, jobs")
def _jobs(db: sqlite_utils.Database) -> None:
    db.table("versions").add_column("lineage", str, not_null_default="")
    db.table("versions").add_column("evaluation", str, not_null_default="")
    db.table("artifacts").add_column("metrics", str, not_null_default="{}")
    db.table("artifacts").add_column("steps", str, not_null_default="[]")
    db.table("artifacts").add_column("format", str, not_null_default="onnx")
    db.table("artifacts").add_column("file_count", int, not_null_default=1)
    # seq orders jobs and numbers their ids; AUTOINCREMENT so an id is never reused.
    db.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT UNIQUE NOT NULL,"
        " kind TEXT, model TEXT, request TEXT, state TEXT, created_at REAL, started_at REAL,"
        " finished_at REAL, slot TEXT, progress TEXT, result TEXT, error TEXT, retry_of TEXT)"
    )
    db.table("jobs").create_index(["model"])
    db.table("job_events").create(
        {"job_id": str, "seq": int, "at": float, "kind": str, "message": str, "data": str},
        pk=("job_id", "seq"),
    )


@migration(4, "reported capabilities and labels")
def _reported_details(db: sqlite_utils.Database) -> None:
    db.table("reported").add_column("capabilities", str, not_null_default="")
    db.table("reported").add_column("labels", str, not_null_default="{}")


@migration(5, "token details, admin tokens, device revocation, previous desired state")
def _trust(db: sqlite_utils.Database) -> None:
    tokens = db.table("enroll_tokens")
    tokens.add_column("token_id", str, not_null_default="")
    tokens.add_column("max_uses", int, not_null_default=0)
    tokens.add_column("uses", int, not_null_default=0)
    tokens.add_column("labels", str, not_null_default="{}")
    tokens.add_column("revoked", int, not_null_default=0)
    tokens.add_column("device_id", str, not_null_default="")
    db.execute("UPDATE enroll_tokens SET token_id = substr(token_hash, 1, 12)")
    db.table("admin_tokens").create(
        {
            "token_hash": str,
            "token_id": str,
            "name": str,
            "role": str,
            "created_at": float,
            "revoked": int,
        },
        pk="token_hash",
    )
    db.table("devices").add_column("revoked", int, not_null_default=0)
    db.table("desired").add_column("previous", str, not_null_default="[]")
    db.table("deployments").add_column("rollback", int, not_null_default=0)


@migration(6, "the highest version ever assigned, per device and model")
def _peaks(db: sqlite_utils.Database) -> None:
    db.table("desired").add_column("peaks", str, not_null_default="{}")
    for row in db.execute("SELECT device_id, assignments, previous FROM desired").fetchall():
        peaks: dict[str, int] = {}
        for column in (row[1], row[2]):
            for a in json.loads(column or "[]"):
                peaks[a["model"]] = max(peaks.get(a["model"], 0), int(a["version"]))
        db.execute("UPDATE desired SET peaks = ? WHERE device_id = ?", (json.dumps(peaks), row[0]))


@migration(7, "capture policies, version baselines")
def _capture(db: sqlite_utils.Database) -> None:
    db.table("capture_policies").create({"model": str, "policy": str}, pk="model")
    db.table("versions").add_column("baseline", str, not_null_default="[]")


@migration(8, "rollouts")
def _rollouts(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TABLE rollouts (rollout_id TEXT PRIMARY KEY, model TEXT NOT NULL,"
        " state TEXT NOT NULL, created_at REAL NOT NULL, body TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX rollouts_by_model ON rollouts (model, created_at)")


@migration(9, "the closed loop: settings per model, and its runs")
def _loops(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE loops (model TEXT PRIMARY KEY, body TEXT NOT NULL)")
    db.execute(
        "CREATE TABLE loop_runs (model TEXT NOT NULL, number INTEGER NOT NULL,"
        " state TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (model, number))"
    )


@migration(10, "test-set scores and later evaluations of versions")
def _evaluations(db: sqlite_utils.Database) -> None:
    db.table("versions").add_column("test", str, not_null_default="")
    db.table("versions").add_column("evaluations", str, not_null_default="[]")


def _optional_json(cls: Any, text: str) -> Any:
    return from_json(cls, text) if text else None


class SqliteMetadataStore(MetadataStore):
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path) if str(path) != ":memory:" else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._by_token: dict[str, DeviceRecord] = {}
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT).
        self._conn = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        self._db = sqlite_utils.Database(self._conn)
        if self.path is not None:
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self._tx() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (number INTEGER PRIMARY KEY, name TEXT, applied_at INTEGER)"
            )
            done = {r[0] for r in conn.execute("SELECT number FROM schema_migrations")}
            for number, name, fn in MIGRATIONS:
                if number not in done:
                    fn(self._db)
                    conn.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, strftime('%s','now'))",
                        (number, name),
                    )

    @property
    def schema_version(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT max(number) FROM schema_migrations").fetchone()
            return int(row[0] or 0)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # models and versions -------------------------------------------------------------------
    _MODEL_SQL = (
        "SELECT m.name, m.description, m.created_at,"
        " coalesce(max(v.version), 0) AS latest, count(v.version) AS n"
        " FROM models m LEFT JOIN versions v ON v.model = m.name"
    )

    def _model(self, row: sqlite3.Row) -> Model:
        return Model(row[0], row[1], row[2], int(row[3]), int(row[4]))

    def ensure_model(self, name: str, description: str, created_at: int) -> Model:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO models (name, description, created_at) VALUES (?, ?, ?)",
                (name, description, created_at),
            )
        model = self.get_model(name)
        assert model is not None
        return model

    def get_model(self, name: str) -> Model | None:
        rows = self._rows(self._MODEL_SQL + " WHERE m.name = ? GROUP BY m.name", (name,))
        return self._model(rows[0]) if rows else None

    def list_models(self) -> list[Model]:
        rows = self._rows(self._MODEL_SQL + " GROUP BY m.name ORDER BY m.name")
        return [self._model(r) for r in rows]

    def add_version(self, version: ModelVersion) -> ModelVersion:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO models (name, description, created_at) VALUES (?, ?, ?)",
                (version.model, version.description, version.created_at),
            )
            try:
                conn.execute(
                    "INSERT INTO versions (model, version, description, created_at,"
                    " source_sha256, parent_version, metadata, inputs, outputs,"
                    " golden_sample_count, created_by, lineage, evaluation, baseline, test,"
                    " evaluations) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        version.model,
                        version.version,
                        version.description,
                        version.created_at,
                        version.source_sha256,
                        version.parent_version,
                        json.dumps(dict(version.metadata), sort_keys=True),
                        to_json(version.inputs, tuple[TensorSpec, ...]),
                        to_json(version.outputs, tuple[TensorSpec, ...]),
                        version.golden_sample_count,
                        version.created_by,
                        to_json(version.lineage) if version.lineage else "",
                        to_json(version.evaluation) if version.evaluation else "",
                        to_json(version.baseline, tuple[InputStats, ...]),
                        to_json(version.test) if version.test else "",
                        to_json(version.evaluations, tuple[Evaluation, ...]),
                    ),
                )
            except sqlite3.IntegrityError:
                raise Conflict(
                    f"{version.model} version {version.version} exists; versions are immutable"
                ) from None
            for a in version.artifacts:
                self._insert_artifact(conn, a)
        return version

    def _insert_artifact(self, conn: sqlite3.Connection, a: Artifact) -> None:
        try:
            conn.execute(
                "INSERT INTO artifacts (model, version, target, manifest_digest, size_bytes,"
                " chunk_count, created_at, signature_hex, key_id, metrics, steps, format,"
                " file_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    a.model,
                    a.version,
                    a.target,
                    a.manifest_digest,
                    a.size_bytes,
                    a.chunk_count,
                    a.created_at,
                    a.signature_hex,
                    a.key_id,
                    json.dumps(dict(a.metrics), sort_keys=True),
                    json.dumps(list(a.steps)),
                    a.format,
                    a.file_count,
                ),
            )
        except sqlite3.IntegrityError:
            raise Conflict(f"{a.model} v{a.version} already has a {a.target} artifact") from None

    def add_artifact(self, artifact: Artifact) -> None:
        with self._tx() as conn:
            exists = conn.execute(
                "SELECT 1 FROM versions WHERE model = ? AND version = ?",
                (artifact.model, artifact.version),
            ).fetchone()
            if exists is None:
                raise UnknownResource(f"{artifact.model} has no version {artifact.version}")
            self._insert_artifact(conn, artifact)

    def add_evaluation(self, model: str, version: int, evaluation: Evaluation) -> None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT evaluations FROM versions WHERE model = ? AND version = ?",
                (model, version),
            ).fetchone()
            if row is None:
                raise UnknownResource(f"{model} has no version {version}")
            kept = from_json(tuple[Evaluation, ...], row[0])
            conn.execute(
                "UPDATE versions SET evaluations = ? WHERE model = ? AND version = ?",
                (to_json((*kept, evaluation), tuple[Evaluation, ...]), model, version),
            )

    def _artifact(self, r: sqlite3.Row) -> Artifact:
        return Artifact(
            r["model"],
            r["version"],
            r["target"],
            r["manifest_digest"],
            r["size_bytes"],
            r["chunk_count"],
            r["created_at"],
            r["signature_hex"],
            r["key_id"],
            json.loads(r["metrics"]),
            tuple(json.loads(r["steps"])),
            r["format"],
            r["file_count"],
        )

    def _version(self, r: sqlite3.Row, artifacts: tuple[Artifact, ...]) -> ModelVersion:
        return ModelVersion(
            model=r["model"],
            version=r["version"],
            description=r["description"],
            created_at=r["created_at"],
            source_sha256=r["source_sha256"],
            parent_version=r["parent_version"],
            metadata=json.loads(r["metadata"]),
            inputs=from_json(tuple[TensorSpec, ...], r["inputs"]),
            outputs=from_json(tuple[TensorSpec, ...], r["outputs"]),
            golden_sample_count=r["golden_sample_count"],
            created_by=r["created_by"],
            artifacts=artifacts,
            lineage=_optional_json(Lineage, r["lineage"]),
            evaluation=_optional_json(Evaluation, r["evaluation"]),
            baseline=from_json(tuple[InputStats, ...], r["baseline"]),
            test=_optional_json(Evaluation, r["test"]),
            evaluations=from_json(tuple[Evaluation, ...], r["evaluations"]),
        )

    def get_version(self, model: str, version: int) -> ModelVersion | None:
        with self._lock:
            rows = self._rows(
                "SELECT * FROM versions WHERE model = ? AND version = ?", (model, version)
            )
            if not rows:
                return None
            arts = self._rows(
                "SELECT * FROM artifacts WHERE model = ? AND version = ? ORDER BY target",
                (model, version),
            )
            return self._version(rows[0], tuple(self._artifact(a) for a in arts))

    def list_versions(self, model: str) -> list[ModelVersion]:
        with self._lock:
            rows = self._rows("SELECT * FROM versions WHERE model = ? ORDER BY version", (model,))
            arts: dict[int, list[Artifact]] = {}
            for a in self._rows(
                "SELECT * FROM artifacts WHERE model = ? ORDER BY target", (model,)
            ):
                arts.setdefault(a["version"], []).append(self._artifact(a))
            return [self._version(r, tuple(arts.get(r["version"], ()))) for r in rows]

    def find_artifact(self, manifest_digest: str) -> Artifact | None:
        rows = self._rows(
            "SELECT * FROM artifacts WHERE manifest_digest = ? LIMIT 1", (manifest_digest,)
        )
        return self._artifact(rows[0]) if rows else None

    # devices -------------------------------------------------------------------------------
    def _device(self, r: sqlite3.Row) -> DeviceRecord:
        return DeviceRecord(
            device_id=r["device_id"],
            token_hash=r["token_hash"],
            enrolled_at=r["enrolled_at"],
            labels=json.loads(r["labels"]),
            capabilities=from_json(Capabilities, r["capabilities"]),
            last_seen_at=r["last_seen_at"],
            revoked=bool(r["revoked"]),
        )

    def put_device(self, device: DeviceRecord) -> None:
        with self._tx() as conn:
            self._by_token.clear()
            conn.execute(
                "INSERT OR REPLACE INTO devices (device_id, token_hash, enrolled_at, labels,"
                " capabilities, last_seen_at, revoked) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    device.device_id,
                    device.token_hash,
                    device.enrolled_at,
                    json.dumps(dict(device.labels), sort_keys=True),
                    to_json(device.capabilities),
                    device.last_seen_at,
                    int(device.revoked),
                ),
            )

    def get_device(self, device_id: str) -> DeviceRecord | None:
        rows = self._rows("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return self._device(rows[0]) if rows else None

    def device_by_token_hash(self, token_hash: str) -> DeviceRecord | None:
        # Every device call authenticates: answered from memory once seen. Any change to a
        # device (enrollment, re-enrollment, revocation, labels) goes through put_device,
        # which forgets them all, so a revocation is refused from the next call on. The
        # record's last_seen_at may lag (touch_device does not forget): callers need who
        # it is and whether it is revoked.
        cached = self._by_token.get(token_hash)  # no lock: writers hold it through fsyncs
        if cached is not None:
            return cached
        with self._lock:
            rows = self._rows("SELECT * FROM devices WHERE token_hash = ?", (token_hash,))
            if not rows:
                return None
            found = self._device(rows[0])
            if len(self._by_token) >= _TOKEN_CACHE:
                self._by_token.clear()
            self._by_token[token_hash] = found
            return found

    def list_devices(self) -> list[DeviceRecord]:
        return [self._device(r) for r in self._rows("SELECT * FROM devices ORDER BY device_id")]

    def touch_device(self, device_id: str, seen_at: float) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE devices SET last_seen_at = ? WHERE device_id = ?", (seen_at, device_id)
            )

    # desired and reported state ----------------------------------------------------------
    @staticmethod
    def _desired(conn: sqlite3.Connection, device_id: str) -> DesiredState:
        row = conn.execute("SELECT * FROM desired WHERE device_id = ?", (device_id,)).fetchone()
        if row is None:
            return DesiredState(device_id)
        assignments = from_json(tuple[Assignment, ...], row["assignments"])
        return DesiredState(device_id, row["generation"], assignments)

    def get_desired(self, device_id: str) -> DesiredState:
        with self._lock:
            return self._desired(self._conn, device_id)

    def assign(
        self,
        assignments: Mapping[str, Assignment],
        deployment: Deployment | None = None,
    ) -> dict[str, int]:
        generations = {}
        with self._tx() as conn:
            if deployment is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO deployments (model, selector, version, target,"
                    " created_at, seq, rollback) VALUES (?, ?, ?, ?, ?,"
                    " (SELECT coalesce(max(seq), 0) + 1 FROM deployments), ?)",
                    (
                        deployment.model,
                        json.dumps(deployment.key[1]),
                        deployment.version,
                        deployment.target,
                        deployment.created_at,
                        int(deployment.rollback),
                    ),
                )
            for device_id, assignment in assignments.items():
                current = self._desired(conn, device_id)
                state = current.with_assignment(assignment)
                peaks = self._peaks(conn, device_id)
                # Variants count: a device sends telemetry of the versions it serves beside.
                peaks[assignment.model] = max(
                    peaks.get(assignment.model, 0),
                    assignment.version,
                    *(v.version for v in assignment.variants),
                )
                conn.execute(
                    "INSERT OR REPLACE INTO desired (device_id, generation, assignments,"
                    " previous, peaks) VALUES (?, ?, ?, ?, ?)",
                    (
                        device_id,
                        state.generation,
                        to_json(state.assignments),
                        to_json(current.assignments),
                        json.dumps(peaks, sort_keys=True),
                    ),
                )
                generations[device_id] = state.generation
        return generations

    @staticmethod
    def _peaks(conn: sqlite3.Connection, device_id: str) -> dict[str, int]:
        row = conn.execute("SELECT peaks FROM desired WHERE device_id = ?", (device_id,)).fetchone()
        return {str(k): int(v) for k, v in json.loads(row[0]).items()} if row else {}

    def capture_policy(self, model: str) -> CapturePolicy | None:
        rows = self._rows("SELECT policy FROM capture_policies WHERE model = ?", (model,))
        return from_json(CapturePolicy, rows[0]["policy"]) if rows else None

    def set_capture_policy(self, model: str, policy: CapturePolicy) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO capture_policies VALUES (?, ?)", (model, to_json(policy))
            )

    def peaks(self, device_id: str) -> dict[str, int]:
        with self._lock:
            return self._peaks(self._conn, device_id)

    def allowed_digests(self, device_id: str) -> set[str]:
        rows = self._rows(
            "SELECT assignments, previous FROM desired WHERE device_id = ?", (device_id,)
        )
        if not rows:
            return set()
        return {
            digest
            for column in ("assignments", "previous")
            for a in from_json(tuple[Assignment, ...], rows[0][column])
            for digest in a.digests()
        }

    def get_reported(self, device_id: str) -> ReportedState | None:
        rows = self._rows("SELECT * FROM reported WHERE device_id = ?", (device_id,))
        if not rows:
            return None
        r = rows[0]
        return ReportedState(
            device_id=r["device_id"],
            observed_generation=r["observed_generation"],
            models=from_json(tuple[ModelStatus, ...], r["models"]),
            capabilities=_optional_json(Capabilities, r["capabilities"]),
            last_error=r["last_error"],
            labels=json.loads(r["labels"]),
            inference_endpoint=r["inference_endpoint"],
            reported_at=r["reported_at"],
        )

    def put_reported(self, state: ReportedState) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO reported (device_id, observed_generation, models,"
                " last_error, inference_endpoint, reported_at, capabilities, labels)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    state.device_id,
                    state.observed_generation,
                    to_json(state.models),
                    state.last_error,
                    state.inference_endpoint,
                    state.reported_at,
                    to_json(state.capabilities) if state.capabilities else "",
                    json.dumps(dict(state.labels), sort_keys=True),
                ),
            )

    # enrollment tokens -------------------------------------------------------------------
    def add_enroll_token(self, token: EnrollTokenRecord) -> None:
        t = token.token
        with self._tx() as conn:
            try:
                conn.execute(
                    "INSERT INTO enroll_tokens (token_hash, created_at, expires_at, note, token_id,"
                    " max_uses, uses, labels, revoked, device_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        token.token_hash,
                        t.created_at,
                        t.expires_at,
                        t.note,
                        t.token_id,
                        t.max_uses,
                        t.uses,
                        json.dumps(dict(t.labels), sort_keys=True),
                        int(t.revoked),
                        t.device_id,
                    ),
                )
            except sqlite3.IntegrityError:
                raise Conflict("that enrollment token exists already") from None

    @staticmethod
    def _enroll_token(r: sqlite3.Row) -> EnrollTokenRecord:
        return EnrollTokenRecord(
            r["token_hash"],
            EnrollToken(
                token_id=r["token_id"],
                created_at=r["created_at"],
                expires_at=r["expires_at"],
                note=r["note"],
                max_uses=r["max_uses"],
                uses=r["uses"],
                labels=json.loads(r["labels"]),
                revoked=bool(r["revoked"]),
                device_id=r["device_id"],
            ),
        )

    def get_enroll_token(self, token_hash: str) -> EnrollTokenRecord | None:
        rows = self._rows("SELECT * FROM enroll_tokens WHERE token_hash = ?", (token_hash,))
        return self._enroll_token(rows[0]) if rows else None

    def find_enroll_token(self, token_id: str) -> EnrollTokenRecord | None:
        rows = self._rows("SELECT * FROM enroll_tokens WHERE token_id = ?", (token_id,))
        return self._enroll_token(rows[0]) if rows else None

    def list_enroll_tokens(self) -> list[EnrollToken]:
        rows = self._rows("SELECT * FROM enroll_tokens ORDER BY created_at DESC, rowid DESC")
        return [self._enroll_token(r).token for r in rows]

    def put_enroll_token(self, token: EnrollTokenRecord) -> None:
        t = token.token
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE enroll_tokens SET expires_at = ?, note = ?, max_uses = ?, uses = ?,"
                " labels = ?, revoked = ?, device_id = ? WHERE token_hash = ?",
                (
                    t.expires_at,
                    t.note,
                    t.max_uses,
                    t.uses,
                    json.dumps(dict(t.labels), sort_keys=True),
                    int(t.revoked),
                    t.device_id,
                    token.token_hash,
                ),
            )
            if cursor.rowcount == 0:
                raise UnknownResource(f"no enrollment token {t.token_id}")

    def use_enroll_token(self, token_hash: str, now: float) -> tuple[EnrollToken | None, str]:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT * FROM enroll_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
            if row is None:
                return None, "is not valid"
            token = self._enroll_token(row).token
            refusal = token.refusal(now)
            if refusal:
                return token, refusal
            conn.execute(
                "UPDATE enroll_tokens SET uses = uses + 1 WHERE token_hash = ?", (token_hash,)
            )
            return replace(token, uses=token.uses + 1), ""

    # admin tokens ------------------------------------------------------------------------
    def add_admin_token(self, token: AdminTokenRecord) -> None:
        t = token.token
        with self._tx() as conn:
            try:
                conn.execute(
                    "INSERT INTO admin_tokens VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        token.token_hash,
                        t.token_id,
                        t.name,
                        t.role.value,
                        t.created_at,
                        int(t.revoked),
                    ),
                )
            except sqlite3.IntegrityError:
                raise Conflict("that admin token exists already") from None

    @staticmethod
    def _admin_token(r: sqlite3.Row) -> AdminTokenRecord:
        return AdminTokenRecord(
            r["token_hash"],
            AdminToken(
                r["token_id"], r["name"], Role(r["role"]), r["created_at"], bool(r["revoked"])
            ),
        )

    def get_admin_token(self, token_hash: str) -> AdminTokenRecord | None:
        rows = self._rows("SELECT * FROM admin_tokens WHERE token_hash = ?", (token_hash,))
        return self._admin_token(rows[0]) if rows else None

    def find_admin_token(self, token_id: str) -> AdminTokenRecord | None:
        rows = self._rows("SELECT * FROM admin_tokens WHERE token_id = ?", (token_id,))
        return self._admin_token(rows[0]) if rows else None

    def list_admin_tokens(self) -> list[AdminToken]:
        rows = self._rows("SELECT * FROM admin_tokens ORDER BY created_at DESC, rowid DESC")
        return [self._admin_token(r).token for r in rows]

    def put_admin_token(self, token: AdminTokenRecord) -> None:
        t = token.token
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE admin_tokens SET name = ?, role = ?, revoked = ? WHERE token_hash = ?",
                (t.name, t.role.value, int(t.revoked), token.token_hash),
            )
            if cursor.rowcount == 0:
                raise UnknownResource(f"no admin token {t.token_id}")

    # deployments -------------------------------------------------------------------------
    def unassign(self, model: str, device_ids: Sequence[str]) -> dict[str, int]:
        generations = {}
        with self._tx() as conn:
            for device_id in device_ids:
                current = self._desired(conn, device_id)
                if current.assignment(model) is None:
                    continue
                state = current.without(model)
                conn.execute(
                    "UPDATE desired SET generation = ?, assignments = ?, previous = ?"
                    " WHERE device_id = ?",
                    (
                        state.generation,
                        to_json(state.assignments),
                        to_json(current.assignments),
                        device_id,
                    ),
                )
                generations[device_id] = state.generation
        return generations

    def put_rollout(self, rollout: Rollout) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO rollouts VALUES (?, ?, ?, ?, ?)",
                (
                    rollout.rollout_id,
                    rollout.spec.model,
                    rollout.state.value,
                    rollout.created_at,
                    to_json(rollout),
                ),
            )

    def get_rollout(self, rollout_id: str) -> Rollout | None:
        rows = self._rows("SELECT body FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        return from_json(Rollout, rows[0]["body"]) if rows else None

    def list_rollouts(self, model: str = "", states: Sequence[RolloutState] = ()) -> list[Rollout]:
        where, params = [], []
        if model:
            where.append("model = ?")
            params.append(model)
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += [s.value for s in states]
        sql = "SELECT body FROM rollouts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._rows(sql + " ORDER BY created_at", tuple(params))
        return [from_json(Rollout, r["body"]) for r in rows]

    def count_rollouts(self) -> int:
        return int(self._rows("SELECT count(*) FROM rollouts")[0][0])

    def put_loop(self, loop: Loop) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO loops VALUES (?, ?)",
                (loop.config.model, to_json(replace(loop, runs=()))),
            )

    def get_loop(self, model: str) -> Loop | None:
        rows = self._rows("SELECT body FROM loops WHERE model = ?", (model,))
        return from_json(Loop, rows[0]["body"]) if rows else None

    def list_loops(self) -> list[Loop]:
        rows = self._rows("SELECT body FROM loops ORDER BY model")
        return [from_json(Loop, r["body"]) for r in rows]

    def put_loop_run(self, run: LoopRun) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO loop_runs VALUES (?, ?, ?, ?)",
                (run.model, run.number, run.state.value, to_json(run)),
            )

    def list_loop_runs(self, model: str, limit: int = 20) -> list[LoopRun]:
        rows = self._rows(
            "SELECT body FROM loop_runs WHERE model = ? ORDER BY number DESC LIMIT ?",
            (model, limit or -1),
        )
        return [from_json(LoopRun, r["body"]) for r in rows]

    def list_deployments(self) -> list[Deployment]:
        return [
            Deployment(
                r["model"],
                {k: v for k, v in json.loads(r["selector"])},
                r["version"],
                r["target"],
                r["created_at"],
                bool(r["rollback"]),
            )
            for r in self._rows("SELECT * FROM deployments ORDER BY seq")
        ]

    # jobs -------------------------------------------------------------------------------
    _JOB_COLUMNS = (
        "kind, model, request, state, created_at, started_at, finished_at, slot, progress,"
        " result, error, retry_of"
    )

    @staticmethod
    def _job_values(job: Job) -> tuple[Any, ...]:
        # `result` keeps what a finished job made: its version, trials and target outcomes.
        result = {
            "version": job.result_version,
            "trials": json.loads(to_json(job.trials)),
            "outcomes": json.loads(to_json(job.targets)),
        }
        return (
            job.kind,
            job.model,
            job.request_json,
            job.state.value,
            job.created_at,
            job.started_at,
            job.finished_at,
            job.slot,
            to_json(job.progress),
            json.dumps(result),
            job.error,
            job.retry_of,
        )

    @staticmethod
    def _job(r: sqlite3.Row) -> Job:
        result = json.loads(r["result"] or "{}")
        return Job(
            job_id=r["job_id"],
            kind=r["kind"],
            model=r["model"],
            request_json=r["request"],
            state=JobState(r["state"]),
            created_at=r["created_at"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            slot=r["slot"],
            progress=from_json(JobProgress, r["progress"] or "{}"),
            error=r["error"],
            result_version=int(result.get("version", 0)),
            trials=from_json(tuple[Trial, ...], json.dumps(result.get("trials", []))),
            targets=from_json(tuple[TargetOutcome, ...], json.dumps(result.get("outcomes", []))),
            retry_of=r["retry_of"],
        )

    def create_job(self, job: Job) -> Job:
        with self._tx() as conn:
            cursor = conn.execute(
                f"INSERT INTO jobs (job_id, {self._JOB_COLUMNS})"
                " VALUES (hex(randomblob(8)), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self._job_values(job),
            )
            seq = int(cursor.lastrowid or 0)
            created = replace(job, job_id=f"job-{seq}")
            conn.execute("UPDATE jobs SET job_id = ? WHERE seq = ?", (created.job_id, seq))
        return created

    def get_job(self, job_id: str) -> Job | None:
        rows = self._rows("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def list_jobs(
        self, model: str = "", states: Sequence[JobState] = (), limit: int = 100
    ) -> list[Job]:
        where, params = [], []
        if model:
            where.append("model = ?")
            params.append(model)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(s.value for s in states)
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = self._rows(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit))
        return [self._job(r) for r in rows]

    def update_job(self, job: Job) -> None:
        assignments = ", ".join(f"{c.strip()} = ?" for c in self._JOB_COLUMNS.split(","))
        with self._tx() as conn:
            cursor = conn.execute(
                f"UPDATE jobs SET {assignments} WHERE job_id = ?",
                (*self._job_values(job), job.job_id),
            )
            if cursor.rowcount == 0:
                raise UnknownResource(f"no job is called {job.job_id!r}")

    def add_job_event(self, event: JobEvent) -> JobEvent:
        # `data` holds a progress event's progress, or a state event's state.
        data = ""
        if event.progress is not None:
            data = to_json(event.progress)
        elif event.state is not JobState.UNSPECIFIED:
            data = event.state.value
        with self._tx() as conn:
            row = conn.execute(
                "SELECT coalesce(max(seq), 0) FROM job_events WHERE job_id = ?", (event.job_id,)
            ).fetchone()
            stored = replace(event, seq=int(row[0]) + 1)
            conn.execute(
                "INSERT INTO job_events VALUES (?, ?, ?, ?, ?, ?)",
                (stored.job_id, stored.seq, stored.at, stored.kind, stored.message, data),
            )
        return stored

    @staticmethod
    def _event(r: sqlite3.Row) -> JobEvent:
        data = r["data"] or ""
        progress = from_json(JobProgress, data) if r["kind"] == "progress" and data else None
        state = JobState(data) if r["kind"] == "state" and data else JobState.UNSPECIFIED
        return JobEvent(r["job_id"], r["seq"], r["at"], r["kind"], r["message"], progress, state)

    def list_job_events(
        self, job_id: str, after_seq: int = 0, limit: int = 10_000
    ) -> list[JobEvent]:
        # A cursor past SQLite's largest integer (a client's uint64) means "none yet".
        after_seq = min(after_seq, SQLITE_MAX_INT)
        rows = self._rows(
            "SELECT * FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after_seq, limit),
        )
        return [self._event(r) for r in rows]
