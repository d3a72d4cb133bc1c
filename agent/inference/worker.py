"""One inference worker process of the worker-process mode (``workers`` starts them).

A worker serves the agent's inference port (and REST port) beside its siblings
(SO_REUSEPORT): its own ModelRepository with its own ONNX Runtime session of every model
served, its own data plane. It changes what it serves only when the control process says so,
over its pipe, and answers each change once it is done: a ``prepare`` loads a version (the
check that every worker can), a switch (``publish``, ``add``, ``drop``, ``remove``,
``traffic``) is answered only after the requests that were running when it was made have
finished (``InFlight``), so that once every worker answered, no request anywhere still runs
on what was switched away from.

What it measures goes back two ways: Triton's statistics into its shared-memory file
(``sharedstats``), read by every worker; its recorder's windows and captures handed over the
pipe every ``handover_interval_s`` (``Recorder.hand_over``) to the control process's recorder,
the one that writes the spool.

It ignores SIGINT and SIGTERM (the control process stops it, gracefully, over the pipe: a
terminal's Ctrl-C or systemd's stop reach every process of the group) and exits when the
control process goes (its pipe closes; its pid is checked too).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar, cast

import psutil

from agent.inference.batching import DEFAULT_MAX_BATCH
from agent.inference.dataplane import DataPlane, Encoder, RequestLimits, _ModelEntry
from agent.inference.rest import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_JSON_BYTES,
    RestServer,
    start_rest_server,
)
from agent.inference.server import InferenceSecurity, InferenceServer, start_inference_server
from agent.inference.sharedstats import SharedStatistics, SharedVersionStats
from agent.recorder import Recorder
from agent.runtime import LoadedModel, ModelRepository, SessionOptions, load_model
from agent.spool import Spool, SpoolStats
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.fleet import Assignment, Variant
from protos.inference.v2 import grpc_predict_v2_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load one version: the verified file the control process
    loaded and smoke-tested."""

    name: str
    version: int
    digest: str
    path: str


@dataclass(frozen=True)
class Snapshot:
    """Everything a worker serves, for one that starts (or restarts)."""

    models: tuple[ModelSpec, ...] = ()
    defaults: Mapping[str, int] = field(default_factory=dict)
    traffic: Mapping[str, tuple[Variant, ...]] = field(default_factory=dict)
    assignments: tuple[Assignment, ...] = ()


@dataclass(frozen=True)
class WorkerConfig:
    """How every worker serves (the agent's inference settings); `index` says which."""

    count: int
    host: str
    port: int
    stats_dir: str
    index: int = 0
    parent_pid: int = 0
    rest_host: str = ""
    rest_port: int | None = None
    rest_max_connections: int = 16
    rest_timeout_s: float = 30.0
    rest_header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    rest_max_connections_per_client: int = 0
    rest_max_json_bytes: int = DEFAULT_MAX_JSON_BYTES
    batching: bool = False
    max_batch: int = DEFAULT_MAX_BATCH
    limits: RequestLimits = field(default_factory=RequestLimits)
    cert_file: Path | None = None
    key_file: Path | None = None
    token: str = field(default="", repr=False)
    options: SessionOptions = field(default_factory=SessionOptions)
    stats_per_second: int = 20  # the recorder's, already divided among the workers
    max_row_bytes: int = 4 << 20
    handover_interval_s: float = 0.2
    drain_timeout_s: float = 30.0
    log_format: str = "text"
    log_level: int = logging.INFO


class InFlight:
    """Requests running, by epoch: `advance` starts a new epoch and waits until none of an
    earlier one runs (what a switch waits for before it is answered)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._epoch = 0
        self._counts: dict[int, int] = {0: 0}

    def enter(self) -> int:
        with self._cond:
            epoch = self._epoch
            self._counts[epoch] += 1
            return epoch

    def leave(self, epoch: int) -> None:
        with self._cond:
            left = self._counts[epoch] - 1
            if left or epoch == self._epoch:
                self._counts[epoch] = left
            else:
                del self._counts[epoch]
                self._cond.notify_all()

    def advance(self, timeout: float) -> bool:
        """Begin a new epoch; True once no request of an earlier one runs (False: some
        still ran after `timeout` seconds)."""
        with self._cond:
            old = self._epoch
            self._epoch = current = old + 1
            self._counts[current] = 0
            if not self._counts[old]:
                del self._counts[old]
            return self._cond.wait_for(lambda: len(self._counts) == 1, timeout)

    @property
    def running(self) -> int:
        with self._cond:
            return sum(self._counts.values())


class WorkerPlane(DataPlane):
    """A worker's data plane: statistics in shared memory, each request counted in flight."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        statistics: SharedStatistics,
        inflight: InFlight,
        **kwargs: Any,
    ) -> None:
        super().__init__(repository, **kwargs)
        self.statistics = statistics
        self.inflight = inflight

    def entry(self, model: LoadedModel) -> _ModelEntry:
        entry = super().entry(model)
        if entry.batcher is not None and isinstance(entry.stats, SharedVersionStats):
            entry.stats.follow(entry.batcher)
        return entry

    def infer(
        self,
        request: pb.ModelInferRequest,
        *,
        client: str | None = None,
        encode: Encoder[T] | None = None,
    ) -> T:
        epoch = self.inflight.enter()
        try:
            return super().infer(request, client=client, encode=encode)
        finally:
            self.inflight.leave(epoch)


class _NoSpool:
    """A worker's recorder never writes the spool (it hands over to the control process's)."""

    def stats(self) -> SpoolStats:
        return SpoolStats(0, 0, 0, 0, 0)


class Worker:
    def __init__(self, config: WorkerConfig, conn: Connection) -> None:
        self.config = config
        self.conn = conn
        self._send_lock = threading.Lock()
        self.repository = ModelRepository()
        self.inflight = InFlight()
        self.statistics = SharedStatistics(Path(config.stats_dir), config.index, config.count)
        self.recorder = Recorder(
            cast(Spool, _NoSpool()),
            stats_per_second=config.stats_per_second,
            max_row_bytes=config.max_row_bytes,
        )
        self._pending: dict[str, tuple[str, LoadedModel]] = {}
        self._server: InferenceServer | None = None
        self._rest: RestServer | None = None
        self._stopping = threading.Event()
        self._cpu_mark = _cpu()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    # start ----------------------------------------------------------------------------
    def start(self, snapshot: Snapshot) -> None:
        """Load what the agent serves, then open the ports: a worker takes no request before
        it serves every model."""
        c = self.config
        self.recorder.configure(snapshot.assignments)
        by_name: dict[str, list[LoadedModel]] = {}
        for spec in snapshot.models:
            by_name.setdefault(spec.name, []).append(self._load(spec))
        for name, models in by_name.items():
            default = snapshot.defaults.get(name, models[0].version)
            for model in models:
                if model.version != default:
                    self.repository.publish(model)
            chosen = next((m for m in models if m.version == default), models[-1])
            self.repository.publish(chosen, keep=[m.version for m in models if m is not chosen])
        for name, variants in snapshot.traffic.items():
            self.repository.set_traffic(name, variants)
        self.statistics.keep(self._loaded())
        security = InferenceSecurity(c.cert_file, c.key_file, c.token)
        self._server = start_inference_server(
            self.repository,
            c.host,
            c.port,
            batching=c.batching,
            max_batch=c.max_batch,
            limits=c.limits,
            security=security,
            recorder=self.recorder,
            plane_factory=functools.partial(
                WorkerPlane, statistics=self.statistics, inflight=self.inflight
            ),
            reuse_port=True,
        )
        if c.rest_port is not None:
            self._rest = start_rest_server(
                self._server.plane,
                c.rest_host or c.host,
                c.rest_port,
                cert_file=c.cert_file,
                key_file=c.key_file,
                token=c.token,
                max_request_bytes=c.limits.max_request_bytes,
                max_connections=c.rest_max_connections,
                timeout_s=c.rest_timeout_s,
                header_timeout_s=c.rest_header_timeout_s,
                max_connections_per_client=c.rest_max_connections_per_client,
                max_json_bytes=c.rest_max_json_bytes,
                reuse_port=True,
            )
        threading.Thread(
            target=self._hand_over_loop, name="edgefleet-handover", daemon=True
        ).start()
        self.send(("ready", os.getpid(), self._server.port))

    def _load(self, spec: ModelSpec) -> LoadedModel:
        """The version in this worker's own ONNX Runtime session (ArtifactRejected when it
        does not load: the file the control process verified and smoke-tested)."""
        return load_model(
            spec.name, spec.version, spec.digest, Path(spec.path), self.config.options
        )

    def _loaded(self) -> set[tuple[str, int]]:
        repo = self.repository
        return {(n, v) for n in repo.names() for v in repo.versions(n)}

    # what the control process says -----------------------------------------------------
    def serve(self) -> None:
        """Apply the control process's commands until it says stop or goes away."""
        while True:
            try:
                seq, kind, payload = self.conn.recv()
            except (EOFError, OSError):
                log.warning("the agent's control process is gone: this worker stops")
                self._exit(grace=0.0, code=0)
                return
            if kind == "stop":
                self._exit(grace=float(payload), code=0)
                return
            error = ""
            try:
                self.apply(kind, payload)
            except EdgefleetError as err:
                error = err.message
            except Exception as err:  # answered, never the end of the worker
                log.exception("worker %d could not apply %s", self.config.index, kind)
                error = f"{type(err).__name__}: {err}"
            if seq:
                self.send(("ack", seq, error))

    def apply(self, kind: str, payload: Any) -> None:
        repo = self.repository
        if kind == "prepare":
            spec: ModelSpec = payload
            self._pending.pop(spec.name, None)  # at most one prepared version a model
            self._pending[spec.name] = (spec.digest, self._load(spec))
            return
        if kind == "abort":
            self._pending.pop(str(payload), None)
            return
        if kind == "configure":
            self.recorder.configure(payload)
            return
        if kind == "publish":
            spec, keep = payload
            repo.publish(self._take(spec), keep=keep)
        elif kind == "add":
            repo.add(self._take(payload))
        elif kind == "drop":
            name, version = payload
            repo.drop(name, version)
        elif kind == "remove":
            repo.remove(str(payload))
            self._pending.pop(str(payload), None)
        elif kind == "traffic":
            name, variants = payload
            repo.set_traffic(name, variants)
        else:
            raise ValueError(f"unknown command {kind!r}")
        self._switched(kind)

    def _take(self, spec: ModelSpec) -> LoadedModel:
        """The version prepared for `spec`, else loaded now (a worker restarted in between)."""
        held = self._pending.pop(spec.name, None)
        if held is not None and held[0] == spec.digest:
            return held[1]
        return self._load(spec)

    def _switched(self, kind: str) -> None:
        """Answer a switch only once no request that may have seen the old state runs."""
        if not self.inflight.advance(self.config.drain_timeout_s):
            log.warning(
                "worker %d: requests still run on the previous state %.0f s after a %s",
                self.config.index,
                self.config.drain_timeout_s,
                kind,
            )
        self.statistics.keep(self._loaded())

    # what goes back ----------------------------------------------------------------------
    def _hand_over_loop(self) -> None:
        parent = self.config.parent_pid
        quiet = 0
        while not self._stopping.wait(self.config.handover_interval_s):
            if parent and os.getppid() != parent:
                log.warning("the agent's control process is gone: this worker stops")
                os._exit(0)
            quiet += 1
            try:
                # Every turn with something to say; at least every 5 s (memory, CPU).
                if self.hand_over(force=quiet * self.config.handover_interval_s >= 5):
                    quiet = 0
            except (OSError, ValueError):  # the pipe is closed: serve() sees it too
                return
            except Exception:
                log.exception("worker %d: hand-over failed", self.config.index)

    def hand_over(self, *, force: bool = True) -> bool:
        """Send what the recorder holds (and the process's CPU time and memory); False when
        there was nothing and not `force`."""
        if self._server is not None:
            self.statistics.record_memory(self._server.memory_stats)
        handover = self.recorder.hand_over()
        if handover.empty and not force:
            return False
        cpu = _cpu()
        handover = replace(
            handover,
            cpu_seconds=cpu - self._cpu_mark,
            rss=int(psutil.Process().memory_info().rss),
        )
        self._cpu_mark = cpu
        self.send(("handover", handover))
        return True

    def _exit(self, *, grace: float, code: int) -> None:
        self._stopping.set()
        if self._rest is not None:
            self._rest.stop(grace)
        if self._server is not None:
            self._server.stop(grace)
        with contextlib.suppress(Exception):
            self.hand_over()  # what the last requests recorded
            self.send(("bye",))
        logging.shutdown()
        os._exit(code)


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


class _WorkerPrefix(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def _configure_logging(config: WorkerConfig) -> None:
    from edgefleet.core.logs import TEXT_FORMAT, configure

    configure(config.log_format, config.log_level)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(_WorkerPrefix(config.index))
        if config.log_format != "json":
            handler.setFormatter(
                logging.Formatter(
                    TEXT_FORMAT.replace("%(name)s", "%(name)s[worker %(worker)d]"),
                    datefmt="%Y-%m-%dT%H:%M:%S%z",
                )
            )


def worker_main(config: WorkerConfig, conn: Connection, snapshot: Snapshot) -> None:
    """The worker process's entry point (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _configure_logging(config)
    worker = Worker(config, conn)
    try:
        worker.start(snapshot)
    except Exception as err:
        message = err.message if isinstance(err, EdgefleetError) else f"{type(err).__name__}: {err}"
        log.error("worker %d cannot start: %s", config.index, message)
        with contextlib.suppress(Exception):
            worker.send(("failed", message))
        logging.shutdown()
        sys.stderr.flush()
        os._exit(3)
    log.info(
        "inference worker %d (pid %d) serving on port %d", config.index, os.getpid(), config.port
    )
    worker.serve()
