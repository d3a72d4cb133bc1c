"""The worker-process mode: `inference_workers` N > 1 serves inference from N processes that
share the inference port (and the REST port), so that a device with more cores uses them
(one Python process answers on about one core: the GIL).

The agent's own process (the control process) keeps everything else (reconcile, spool, sync,
metrics) and serves nothing; it starts the workers (``worker``) with multiprocessing's spawn
context, restarts one that dies (logged, counted: ``restarts``), and tells them what to serve:

- **Ports.** Each worker binds the port with SO_REUSEPORT (gRPC's ``grpc.so_reuseport``), so
  the kernel spreads connections over them. The control process first binds it too (with
  SO_REUSEPORT, never listening: port 0 picks the port they all take) and holds a lock named
  after it (an abstract Unix socket), so a second agent cannot join the group and take half
  the traffic silently. gRPC's Python server cannot serve a listening socket made elsewhere,
  so there is no pre-fork fallback: where SO_REUSEPORT is missing the mode is refused.
- **Switching together.** Every change the reconciler makes to the repository
  (``WorkerRepository``) is made in every worker first, then in the control process's own
  repository, which is what the agent reports from. A new version is first *prepared*
  (loaded) in every worker when the reconciler loads it (the wrapped ``loader``): a worker
  that cannot load it fails the activation, as a single process would, and nothing changes
  anywhere. Then the switch itself is sent to every worker, and each answers once the requests
  that ran on the old state have finished; only when all have answered does the control
  process switch and the reconciler report. So after the switch is reported, no request runs
  on the old version in any worker.
- **Statistics, merged.** Triton's ModelStatistics live in shared counters (``sharedstats``)
  that every worker sums; the recorder's telemetry windows and captures are handed over each
  worker's pipe (``Recorder.hand_over`` / ``take_over``) to the control process's recorder,
  which alone writes the spool, so /metrics, the telemetry and the captures sent to the cloud
  count each request once. One duplex pipe per worker, not one shared queue: a worker killed
  while writing to a shared queue would hold its lock and wedge the others.
- **Life.** Workers exit when the control process goes (their pipe closes; their parent pid
  is checked too), and are stopped gracefully (in-flight requests finish) when it stops.

A/B splits and shadows behave as in one process: a routing key's version is a hash of the
key (``runtime.bucket``), the same in every worker. Shared-memory regions (``shm``) belong to
the connection that registered them, and a connection is served by one worker, so they work
per worker unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast

from agent.errors import ArtifactRejected, Unavailable
from agent.inference.limits import MemoryStats
from agent.inference.sharedstats import WorkerTotals, create_files, make_folder, worker_totals
from agent.inference.worker import ModelSpec, Snapshot, WorkerConfig, worker_main
from agent.recorder import Recorder
from agent.runtime import LoadedModel, ModelRepository, SessionOptions
from edgefleet.core.fleet import Assignment, Variant
from protos.artifact.v1 import artifact_pb2

log = logging.getLogger(__name__)

__all__ = [
    "WorkerFigures",
    "WorkerPool",
    "WorkerRepository",
    "reuse_port_supported",
    "threads_per_session",
]

START_TIMEOUT_S = 120.0  # for every worker to load the models and listen
COMMAND_TIMEOUT_S = 300.0  # for every worker to load a version or make a switch
STOP_EXTRA_S = 10.0  # past the grace period, before a worker that did not stop is killed
RESTART_BACKOFF_CAP_S = 30.0

Loader = Callable[[artifact_pb2.Manifest, str, Path, SessionOptions], LoadedModel]


def reuse_port_supported() -> bool:
    """Whether sockets here can share a port (SO_REUSEPORT)."""
    if not hasattr(socket, "SO_REUSEPORT"):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except OSError:
            return False
        return bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def threads_per_session(intra_op_threads: int, workers: int) -> int:
    """ONNX Runtime intra-op threads per session in each worker: the setting when it names a
    number, else (0: one per core) the cores divided among the workers."""
    if intra_op_threads > 0:
        return intra_op_threads
    return max(1, usable_cpus() // max(1, workers))


@dataclass(frozen=True)
class WorkerFigures:
    """What /metrics says of the workers."""

    configured: int
    serving: int  # started, listening and alive
    restarts: int  # workers that died and were started again
    workers: tuple[WorkerTotals, ...] = ()


@dataclass
class _Process:
    """One worker process, from its start to its end (a restart makes a new one)."""

    process: BaseProcess
    conn: Connection
    started_at: float
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    pid: int = 0
    ready: bool = False
    ready_at: float = 0.0
    closed: bool = False  # its pipe closed: it exited (or is about to)
    failure: str = ""  # why it could not start, as it said
    acks: dict[int, str] = field(default_factory=dict)

    def send(self, message: tuple[Any, ...]) -> None:
        with self.send_lock:
            self.conn.send(message)


@dataclass
class _Slot:
    index: int
    current: _Process | None = None
    restarts: int = 0
    failures: int = 0  # deaths in a row soon after a start
    restart_at: float = 0.0


class WorkerRepository(ModelRepository):
    """The control process's repository in worker mode: each change is made in every worker
    first (the pool's barrier), then here. What the agent reports is read here."""

    def __init__(self) -> None:
        super().__init__()
        self.pool: WorkerPool | None = None
        self.variants: dict[str, tuple[Variant, ...]] = {}

    def publish(self, model: LoadedModel, *, keep: Sequence[int] = ()) -> list[LoadedModel]:
        pool = self.pool
        if pool is None:
            return super().publish(model, keep=keep)
        with pool.lock:
            pool.commit("publish", (pool.spec(model), tuple(keep)))
            dropped = super().publish(model, keep=keep)
            pool.forget_unloaded()
            return dropped

    def add(self, model: LoadedModel) -> LoadedModel | None:
        pool = self.pool
        if pool is None:
            return super().add(model)
        with pool.lock:
            replaced = super().add(model)  # refuses what a worker would refuse, before it
            pool.commit("add", pool.spec(model))
            return replaced

    def drop(self, name: str, version: int) -> LoadedModel | None:
        pool = self.pool
        if pool is None:
            return super().drop(name, version)
        with pool.lock:
            pool.commit("drop", (name, version))
            return super().drop(name, version)

    def remove(self, name: str) -> list[LoadedModel]:
        pool = self.pool
        if pool is None:
            self.variants.pop(name, None)
            return super().remove(name)
        with pool.lock:
            pool.commit("remove", name)
            self.variants.pop(name, None)
            removed = super().remove(name)
            pool.forget_unloaded()
            return removed

    def set_traffic(self, name: str, variants: Sequence[Variant]) -> None:
        pool = self.pool
        if pool is None:
            self._keep_variants(name, variants)
            super().set_traffic(name, variants)
            return
        with pool.lock:
            pool.commit("traffic", (name, tuple(variants)))
            self._keep_variants(name, variants)
            super().set_traffic(name, variants)

    def _keep_variants(self, name: str, variants: Sequence[Variant]) -> None:
        if variants:
            self.variants[name] = tuple(variants)
        else:
            self.variants.pop(name, None)

    def loaded(self) -> list[LoadedModel]:
        models = []
        for name in self.names():
            for version in self.versions(name):
                models.append(self.get(name, version))
        return models


class WorkerPool:
    """N inference worker processes serving one repository's models on one port."""

    def __init__(
        self,
        repository: WorkerRepository,
        config: WorkerConfig,
        *,
        recorder: Recorder | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        command_timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> None:
        if config.count < 1:
            raise ValueError("a worker pool has at least one worker")
        self.count = config.count
        self.repository = repository
        repository.pool = self
        self._config = config
        self._recorder = recorder
        self._start_timeout = start_timeout_s
        self._command_timeout = command_timeout_s
        # Held across a change in the workers and here, and across a restart's snapshot, so
        # that a worker (re)started always gets the state every other worker has.
        self.lock = threading.RLock()
        self._cond = threading.Condition()
        self._slots = [_Slot(i) for i in range(config.count)]
        self._specs: dict[str, ModelSpec] = {}  # by digest
        self._assignments: tuple[Assignment, ...] = ()
        self._seq = itertools.count(1)
        self._context = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._readers: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._folder: Path | None = None
        self.restarts = 0
        self.port = 0
        self.rest_port: int | None = None

    # what is served --------------------------------------------------------------------
    def loader(self, inner: Loader) -> Loader:
        """The reconciler's loader, extended: once `inner` loaded and smoke-tested a version,
        every worker loads it too (prepare), or the activation fails."""

        def load(
            manifest: artifact_pb2.Manifest, digest: str, folder: Path, options: SessionOptions
        ) -> LoadedModel:
            model = inner(manifest, digest, folder, options)
            spec = ModelSpec(model.name, model.version, digest, str(folder / manifest.entrypoint))
            with self.lock:
                self._specs[digest] = spec
                self.prepare(spec)
            return model

        return load

    def spec(self, model: LoadedModel) -> ModelSpec:
        """How a worker loads `model`: the file its loader loaded it from."""
        spec = self._specs.get(model.digest)
        if spec is not None and (spec.name, spec.version) == (model.name, model.version):
            return spec
        path = getattr(model.session, "_model_path", None)  # loaded by someone else (tests)
        if not path:
            raise ArtifactRejected(
                f"{model.name} v{model.version} was not loaded from a file the inference "
                "workers can load"
            )
        spec = ModelSpec(model.name, model.version, model.digest, str(path))
        self._specs[model.digest] = spec
        return spec

    def configure(self, assignments: Sequence[Assignment]) -> None:
        """The capture policies and input bins of the desired state, for every recorder."""
        with self.lock:
            self._assignments = tuple(assignments)
            self._broadcast("configure", self._assignments, wait=False)

    def prepare(self, spec: ModelSpec) -> None:
        """Every worker loads `spec` beside what it serves; ArtifactRejected (and nothing
        changed anywhere) when one cannot."""
        with self.lock:
            errors = self._broadcast("prepare", spec)
            if errors:
                self._broadcast("abort", spec.name, wait=False)
                said = "; ".join(f"worker {i}: {e}" for i, e in errors)
                raise ArtifactRejected(
                    f"{spec.name} v{spec.version} did not load in every inference worker "
                    f"({said[:600]}); what they serve is unchanged"
                )

    def commit(self, kind: str, payload: Any) -> None:
        """Make a change in every worker, each answering once no request runs on the old
        state. A worker that cannot is stopped: it restarts with the control process's state."""
        with self.lock:
            for index, error in self._broadcast(kind, payload):
                log.error(
                    "inference worker %d could not apply %s (%s); restarting it", index, kind, error
                )
                self._kill(index)

    def snapshot(self) -> Snapshot:
        """What every worker serves now (for one that starts)."""
        with self.lock:
            repo = self.repository
            models = tuple(self.spec(m) for m in repo.loaded())
            defaults = {name: repo.default_version(name) for name in repo.names()}
            return Snapshot(models, defaults, dict(repo.variants), self._assignments)

    def forget_unloaded(self) -> None:
        """Drop the load instructions of versions no longer served (after a switch)."""
        with self.lock:
            digests = {m.digest for m in self.repository.loaded()}
            self._specs = {d: s for d, s in self._specs.items() if d in digests}

    # processes ---------------------------------------------------------------------------
    def start(self) -> None:
        """Reserve the ports, start every worker with what the repository serves, and wait
        until each serves; Unavailable when one cannot."""
        if not reuse_port_supported():
            raise Unavailable(
                "inference_workers > 1 needs SO_REUSEPORT, which this system does not offer "
                "(gRPC's Python server cannot share a listening socket made by another "
                "process); set inference_workers = 1"
            )
        if not sys.platform.startswith("linux"):
            log.warning(
                "on %s the kernel may not spread connections over the inference workers "
                "(Linux does); measure before relying on inference_workers > 1",
                sys.platform,
            )
        c = self._config
        try:
            self.port = self._reserve(c.host, c.port, "inference", "--inference-port")
            if c.rest_port is not None:
                self.rest_port = self._reserve(
                    c.rest_host or c.host, c.rest_port, "REST", "rest_port"
                )
            self._folder = make_folder()
            create_files(self._folder, self.count)
        except BaseException:
            self._release()
            raise
        self._config = replace(
            c, port=self.port, rest_port=self.rest_port, stats_dir=str(self._folder)
        )
        atexit.register(self._at_exit)
        with self.lock:
            for slot in self._slots:
                self._spawn(slot)
        deadline = time.monotonic() + self._start_timeout
        with self._cond:
            while True:
                procs = [s.current for s in self._slots if s.current is not None]
                failed = [p for p in procs if p.closed or p.failure]
                if failed or all(p.ready for p in procs) or time.monotonic() > deadline:
                    break
                self._cond.wait(0.2)
        if failed or not all(p.ready for p in procs):
            if failed:
                why = failed[0].failure or f"it exited ({failed[0].process.exitcode})"
            else:
                why = f"not serving after {self._start_timeout:.0f} s"
            self.stop(0)
            raise Unavailable(f"an inference worker could not start: {why}")
        self._supervisor = threading.Thread(
            target=self._supervise, name="edgefleet-workers", daemon=True
        )
        self._supervisor.start()
        log.info(
            "%d inference workers serving port %d%s (pids %s)",
            self.count,
            self.port,
            f" and REST port {self.rest_port}" if self.rest_port is not None else "",
            ", ".join(str(p.pid) for p in procs),
        )

    def _reserve(self, host: str, port: int, what: str, fix: str) -> int:
        """Bind host:port with SO_REUSEPORT (never listening) and lock it for this agent;
        the port (chosen, with 0)."""
        bind = host.strip("[]")
        try:
            infos = socket.getaddrinfo(
                bind or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, address = infos[0]
            guard = socket.socket(family, socket.SOCK_STREAM)
            self._sockets.append(guard)
            guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            guard.bind(address)
        except OSError as err:
            raise Unavailable(
                f"cannot serve {what} on {host}:{port}: {err.strerror or err}; choose another "
                f"with {fix} (0 picks a free one)"
            ) from None
        chosen = int(guard.getsockname()[1])
        if sys.platform.startswith("linux"):
            lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sockets.append(lock)
            try:  # abstract namespace: released by the kernel when this process ends
                lock.bind(f"\0edgefleet-agent-{what}-{bind}:{chosen}")
            except OSError:
                raise Unavailable(
                    f"cannot serve {what} on {host}:{chosen}: another agent's inference "
                    f"workers serve it; choose another with {fix}"
                ) from None
        return chosen

    def _spawn(self, slot: _Slot) -> None:
        """Start slot's worker with what is served now (lock held)."""
        config = replace(self._config, index=slot.index, parent_pid=os.getpid())
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main,
            args=(config, child, self.snapshot()),
            name=f"edgefleet-inference-{slot.index}",
            daemon=True,
        )
        process.start()
        child.close()  # the worker's end: its exit closes the pipe for the reader below
        proc = _Process(process, parent, time.monotonic())
        slot.current = proc
        reader = threading.Thread(
            target=self._read,
            args=(slot, proc),
            name=f"edgefleet-worker-{slot.index}",
            daemon=True,
        )
        reader.start()
        self._readers = [t for t in self._readers if t.is_alive()] + [reader]

    def _read(self, slot: _Slot, proc: _Process) -> None:
        """Everything one worker process says, until its pipe closes."""
        while True:
            try:
                message = proc.conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle: a bug, said once
                log.exception("inference worker %d sent what cannot be read", slot.index)
                continue
            kind = message[0]
            if kind == "handover":
                if self._recorder is not None:
                    try:
                        self._recorder.take_over(message[1], slot.index)
                    except Exception:
                        log.exception("worker %d's telemetry could not be taken", slot.index)
                continue
            with self._cond:
                if kind == "ready":
                    proc.pid, proc.ready, proc.ready_at = int(message[1]), True, time.monotonic()
                elif kind == "ack":
                    proc.acks[int(message[1])] = str(message[2])
                elif kind == "failed":
                    proc.failure = str(message[1])
                self._cond.notify_all()
        with self._cond:
            proc.closed = True
            self._cond.notify_all()

    def _broadcast(self, kind: str, payload: Any, *, wait: bool = True) -> list[tuple[int, str]]:
        """Send a command to every worker alive; with `wait`, the (worker, error) of each
        that failed it, exited, or did not answer in time."""
        seq = next(self._seq) if wait else 0
        sent: list[tuple[_Slot, _Process]] = []
        for slot in self._slots:
            proc = slot.current
            if proc is None or proc.closed:
                continue
            try:
                proc.send((seq, kind, payload))
            except (OSError, ValueError):
                continue  # it is gone: its restart will carry the new state
            sent.append((slot, proc))
        if not wait:
            return []
        deadline = time.monotonic() + self._command_timeout
        with self._cond:
            while True:
                waiting = [p for _, p in sent if seq not in p.acks and not p.closed]
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    break
                self._cond.wait(min(0.5, left))
            errors = []
            for slot, proc in sent:
                if seq in proc.acks:
                    error = proc.acks.pop(seq)
                    if error:
                        errors.append((slot.index, error))
                elif proc.closed:
                    errors.append((slot.index, "the worker exited"))
                else:
                    errors.append((slot.index, f"no answer in {self._command_timeout:.0f} s"))
        return errors

    def _kill(self, index: int) -> None:
        proc = self._slots[index].current
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.process.kill()

    def _supervise(self) -> None:
        """Restart a worker that died (at once the first time, then backing off while it keeps
        dying soon after its start)."""
        while not self._stopping.is_set():
            procs = {
                s.current.process.sentinel: s
                for s in self._slots
                if s.current is not None and s.current.process.sentinel is not None
            }
            if procs:
                ended = wait(list(procs), timeout=0.5)
            else:
                ended = []
                self._stopping.wait(0.5)
            if self._stopping.is_set():
                return
            now = time.monotonic()
            for sentinel in ended:
                self._ended(procs[cast(int, sentinel)], now)
            for slot in self._slots:
                if slot.current is None and slot.restart_at <= now:
                    with self.lock:
                        if self._stopping.is_set():
                            return
                        try:
                            self._spawn(slot)
                        except Exception:
                            log.exception("inference worker %d could not be started", slot.index)
                            slot.failures += 1
                            slot.restart_at = now + self._backoff(slot)

    def _ended(self, slot: _Slot, now: float) -> None:
        proc = slot.current
        if proc is None:
            return
        proc.process.join(timeout=1)
        code = proc.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        soon = not proc.ready or now - proc.ready_at < 10
        slot.failures = slot.failures + 1 if soon else 0
        slot.current = None
        slot.restarts += 1
        self.restarts += 1
        slot.restart_at = now + self._backoff(slot)
        if self._recorder is not None:
            self._recorder.forget(slot.index)
        log.error(
            "inference worker %d (pid %d) ended (%s)%s; restarting it%s (restart %d)",
            slot.index,
            proc.pid or proc.process.pid or 0,
            how,
            f": {proc.failure}" if proc.failure else "",
            f" in {slot.restart_at - now:.1f} s" if slot.restart_at > now else "",
            self.restarts,
        )
        with contextlib.suppress(OSError):
            proc.conn.close()

    @staticmethod
    def _backoff(slot: _Slot) -> float:
        if slot.failures <= 1:
            return 0.0
        return float(min(RESTART_BACKOFF_CAP_S, 0.5 * 2 ** (slot.failures - 1)))

    def stop(self, grace: float | None = None) -> None:
        """Stop every worker: each stops taking calls and gives running ones `grace`
        seconds; one still there after that (and a margin) is killed."""
        self._stopping.set()
        grace = grace or 0.0
        procs = [s.current for s in self._slots if s.current is not None]
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.send((0, "stop", grace))
        deadline = time.monotonic() + grace + STOP_EXTRA_S
        for proc in procs:
            proc.process.join(max(0.0, deadline - time.monotonic()))
            if proc.process.exitcode is None:
                log.warning("inference worker pid %s did not stop: killing it", proc.pid)
                proc.process.kill()
                proc.process.join(5)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=5)
        for reader in self._readers:  # the last hand-overs are taken before this returns
            reader.join(timeout=5)
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.conn.close()
        self._release()
        atexit.unregister(self._at_exit)

    def _release(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets = []
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _at_exit(self) -> None:
        """The interpreter exits without stop(): close the pipes (the workers exit on it)
        before multiprocessing joins its children."""
        if not self._stopping.is_set():
            self.stop(0)

    # figures ---------------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        """The serving workers' process ids, by worker (0: none serving in that slot)."""
        with self._cond:
            return [
                s.current.pid if s.current is not None and s.current.ready else 0
                for s in self._slots
            ]

    def figures(self) -> WorkerFigures:
        with self._cond:
            serving = sum(
                1
                for s in self._slots
                if s.current is not None and s.current.ready and not s.current.closed
            )
        totals = worker_totals(self._folder, self.count) if self._folder is not None else []
        return WorkerFigures(self.count, serving, self.restarts, tuple(totals))

    @property
    def memory_stats(self) -> MemoryStats:
        """Large requests served and refused, heap trims: every worker's, summed."""
        total = MemoryStats()
        for worker in self.figures().workers:
            m = worker.memory
            total.large_requests += m.large_requests
            total.refused_over_limit += m.refused_over_limit
            total.trims += m.trims
        return total
