"""The fleet simulator: many lightweight agents in one process against one real cloud.

Each simulated device is the real agent minus its ONNX Runtime and its inference port: its
own identity (enrolled with a real enroll token), its own state folder and SQLite state, the
real `GrpcCloudLink` (its own channel, as a device has its own connection), the real
`Reconciler` (trust, signed desired states, version floors, manifests, resumable chunk
downloads with sha256 checks, assembly, the atomic switch, reports) and the real `Watcher`;
optionally the real `Recorder` + `Spool` + `Syncer` for telemetry windows.

What is simulated, and named so: :class:`SimulatedRuntime` stands in for ONNX Runtime and the
golden-sample smoke test. It "loads" a verified version instantly (after checking the
entrypoint file is there) and answers requests with a configurable :class:`Behaviour` per
(device, model, version): latency, error rate, outputs, or a failed load. Convergence and
rollback times therefore measure the cloud and the protocol, not ONNX Runtime's load time
(which bench_inference and bench_delta measure).

Threads: per online device, its reconcile loop and its watch stream (as a real agent); the
heartbeat reports and the simulated traffic (requests, telemetry windows, sync) run on one
fleet thread each, walking the devices, instead of three threads per device: what reaches
the cloud is the same calls.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pydantic import SecretStr

from agent.artifacts import ArtifactStore
from agent.chunks import ChunkStore
from agent.cloud_link import GrpcCloudLink, Watcher
from agent.errors import ArtifactRejected
from agent.reconciler import Reconciler
from agent.recorder import Recorder
from agent.runtime import LoadedModel, ModelRepository, SessionOptions
from agent.settings import AgentSettings
from agent.spool import Spool
from agent.state import StateStore
from agent.sync import Syncer
from edgefleet.cli.processes import CloudTrust, ManagedProcess, cloud_process
from edgefleet.client.admin import AdminClient
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.fleet import ReportedState
from edgefleet.core.retry import Backoff
from edgefleet.core.tls import ClientSecurity
from protos.artifact.v1 import artifact_pb2

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
SIMULATED_PROVIDER = "SimulatedExecutionProvider"


# the cloud ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CloudAccess:
    """What the simulated devices and the helpers need of a cloud: its address, the trust
    provisioned out of band (CA bundle, root key fingerprint) and an admin token file."""

    address: str
    root_key: str
    admin_token_file: Path
    ca_file: Path | None = None
    insecure: bool = False
    pid: int | None = None  # the cloud's process, when it is one (CPU accounting)

    @classmethod
    def of(cls, process: ManagedProcess, trust: CloudTrust) -> CloudAccess:
        return cls(
            process.address,
            trust.root_key,
            trust.admin_token_file,
            trust.ca_file,
            trust.insecure,
            process.pid,
        )

    def admin(self, timeout: float = 60.0) -> AdminClient:
        return AdminClient(
            self.address,
            token_file=self.admin_token_file,
            ca_file=self.ca_file,
            insecure=self.insecure,
            timeout=timeout,
        )

    def security(self) -> ClientSecurity:
        return ClientSecurity(ca_file=self.ca_file, insecure=self.insecure)


class SimCloud:
    """A real cloud process (`edgefleet cloud serve`, TLS, SQLite) that a test can SIGKILL
    and start again on the same data folder and port, as its devices expect it.

    Sized for `devices` watch streams: each open stream holds one of its gRPC worker
    threads, and the default (128) would turn the watches of a bigger fleet away (they would
    fall back to the resync timer and the report answers). `env` sets more of its settings
    (`EDGEFLEET_CLOUD_...`), e.g. a faster rollout tick."""

    def __init__(
        self,
        workdir: Path,
        *,
        devices: int = 100,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.extra = list(extra)
        self.env = {"EDGEFLEET_CLOUD_MAX_WORKERS": str(max(128, devices + 64)), **(env or {})}
        self.process, self.trust = cloud_process(workdir, self.extra)

    @property
    def access(self) -> CloudAccess:
        return CloudAccess.of(self.process, self.trust)

    def start(self, timeout: float = 60.0) -> CloudAccess:
        self.process.env.update(self.env)
        self.process.start().wait_ready(timeout)
        return self.access

    def kill(self) -> None:
        """SIGKILL: nothing is flushed or said."""
        self.process.kill()

    def restart(self, *, kill: bool = True, timeout: float = 60.0) -> CloudAccess:
        """SIGKILL it (or stop it cleanly) and start it again on the same port and data."""
        port = self.process.port
        if kill:
            self.process.kill()
        else:
            self.process.stop()
        self.process, self.trust = cloud_process(self.workdir, self.extra, port=port)
        return self.start(timeout)

    def stop(self) -> None:
        self.process.stop()


@contextmanager
def start_cloud(
    workdir: Path,
    *,
    devices: int = 100,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[CloudAccess]:
    """A started :class:`SimCloud`'s access, stopped at the end."""
    cloud = SimCloud(workdir, devices=devices, extra=extra, env=env)
    try:
        yield cloud.start()
    finally:
        cloud.stop()


# the simulated runtime ------------------------------------------------------------------


class SimulatedFailure(RuntimeError):
    """A request the simulated runtime was told to fail (Behaviour.error_rate)."""


@dataclass(frozen=True)
class Behaviour:
    """How a simulated version behaves on a device.

    latency_ms: mean latency of a request (what telemetry reports; nothing sleeps);
    jitter: the spread, as a fraction of latency_ms (lognormal, so p95 > p50);
    error_rate: the share of requests that fail;
    fail_load: when non-empty, activation fails with this reason (as a failed smoke test);
    outputs: feeds -> outputs; default zeros shaped like the manifest's outputs.
    """

    latency_ms: float = 2.0
    jitter: float = 0.2
    error_rate: float = 0.0
    fail_load: str = ""
    outputs: Callable[[Mapping[str, Array]], list[Array]] | None = None

    def latency_s(self, rng: random.Random) -> float:
        if self.jitter <= 0:
            return self.latency_ms / 1000
        return self.latency_ms * rng.lognormvariate(0.0, self.jitter) / 1000


@dataclass(frozen=True)
class _Node:
    """What an ONNX Runtime NodeArg tells LoadedModel: name, type, shape."""

    name: str
    type: str
    shape: tuple[int | str, ...]


_NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}


class SimulatedSession:
    """Stands in for `onnxruntime.InferenceSession` (SIMULATION): inputs and outputs from the
    verified manifest, answers from the runtime's current Behaviour for this version."""

    def __init__(self, runtime: SimulatedRuntime, device_id: str, manifest: Any) -> None:
        self.runtime = runtime
        self.device_id = device_id
        self.model = str(manifest.model)
        self.version = int(manifest.version)
        self._inputs = [_Node(s.name, s.datatype, tuple(s.shape)) for s in manifest.inputs]
        self._outputs = [_Node(s.name, s.datatype, tuple(s.shape)) for s in manifest.outputs]

    def get_inputs(self) -> list[_Node]:
        return self._inputs

    def get_modelmeta(self) -> Any:
        return SimpleNamespace(custom_metadata_map={})

    def get_outputs(self) -> list[_Node]:
        return self._outputs

    def run(
        self, names: Sequence[str] | None, feeds: Mapping[str, Array], run_options: object = None
    ) -> list[Array]:
        behaviour = self.runtime.behaviour(self.device_id, self.model, self.version)
        if behaviour.error_rate > 0 and self.runtime.rng.random() < behaviour.error_rate:
            raise SimulatedFailure(f"{self.model} v{self.version}: simulated failure")
        if behaviour.outputs is not None:
            return behaviour.outputs(feeds)
        rows = next((int(np.shape(a)[0]) for a in feeds.values() if np.ndim(a)), 1)
        wanted = set(names or [o.name for o in self._outputs])
        return [
            np.zeros(
                [rows if not isinstance(d, int) or d < 0 else d for d in o.shape] or [rows],
                _NUMPY.get(o.type, np.float32),
            )
            for o in self._outputs
            if o.name in wanted
        ]


class SimulatedRuntime:
    """SIMULATION of ONNX Runtime and the golden-sample smoke test, shared by a fleet.

    `loader(device_id)` is what the device's Reconciler calls after the real download,
    assembly and sha256 checks: it checks the format and that the entrypoint is among the
    verified files, then returns a LoadedModel whose session is a SimulatedSession, at once,
    unless the version's Behaviour says `fail_load`. Behaviours are looked up at every call,
    so a version can be made slow or faulty on some devices while they run.
    """

    def __init__(self, default: Behaviour | None = None, *, seed: int = 0) -> None:
        self.default = default or Behaviour()
        self.rng = random.Random(seed)
        self._rules: list[tuple[str, int, frozenset[str] | None, Behaviour]] = []
        self._lock = threading.Lock()
        self.loads = 0
        self.refused = 0
        # (device, model, version) -> loads (a restarted device loads what it has again)
        self.loaded: Counter[tuple[str, str, int]] = Counter()

    def set(
        self,
        model: str,
        version: int,
        behaviour: Behaviour,
        devices: Iterable[str] | None = None,
    ) -> None:
        """From now on, `model` v`version` behaves so on `devices` (every device: None). A
        later rule wins over an earlier one that also matches."""
        with self._lock:
            chosen = frozenset(devices) if devices is not None else None
            self._rules.append((model, version, chosen, behaviour))

    def behaviour(self, device_id: str, model: str, version: int) -> Behaviour:
        for rule_model, rule_version, devices, behaviour in reversed(self._rules):
            if (rule_model, rule_version) == (model, version) and (
                devices is None or device_id in devices
            ):
                return behaviour
        return self.default

    def loader(
        self, device_id: str
    ) -> Callable[[artifact_pb2.Manifest, str, Path, SessionOptions], LoadedModel]:
        def load(
            manifest: artifact_pb2.Manifest, digest: str, folder: Path, options: SessionOptions
        ) -> LoadedModel:
            label = f"{manifest.model} v{manifest.version}"
            if manifest.format and manifest.format != "onnx":
                raise ArtifactRejected(f"{label} has format {manifest.format!r}")
            if not manifest.entrypoint or not (folder / manifest.entrypoint).is_file():
                raise ArtifactRejected(f"{label}: its entrypoint is not among its files")
            behaviour = self.behaviour(device_id, manifest.model, manifest.version)
            if behaviour.fail_load:
                with self._lock:
                    self.refused += 1
                raise ArtifactRejected(f"{label}: {behaviour.fail_load} (simulated)")
            session = SimulatedSession(self, device_id, manifest)
            with self._lock:
                self.loads += 1
                self.loaded[(device_id, manifest.model, int(manifest.version))] += 1
            # LoadedModel asks the session only for get_inputs/get_outputs/get_modelmeta/run.
            return LoadedModel(
                manifest.model,
                manifest.version,
                digest,
                cast(ort.InferenceSession, session),
                SIMULATED_PROVIDER,
            )

        return load


# one device -----------------------------------------------------------------------------


class _ObservedLink(GrpcCloudLink):
    """The real link; a report the cloud took is also handed to `on_report`, so the fleet
    knows when the cloud learned what a device serves without polling it."""

    on_report: Callable[[ReportedState], None] | None = None

    def report_state(self, report: ReportedState) -> int:
        generation = super().report_state(report)
        if self.on_report is not None:
            self.on_report(report)
        return generation


class SimDevice:
    """One simulated device. Components that hold files (state, spool) and the link are
    opened at start() and closed at stop()/kill(), like an agent process's lifetime; the
    chunk and version folders stay, so a restart resumes from local state."""

    def __init__(self, fleet: SimFleet, device_id: str, data_dir: Path, telemetry: bool) -> None:
        self.fleet = fleet
        self.device_id = device_id
        self.data_dir = data_dir
        self.telemetry = telemetry
        self.settings = fleet._settings(device_id, data_dir)
        self.chunks = ChunkStore(data_dir / "chunks")
        self.artifacts = ArtifactStore(data_dir, self.chunks)
        # model -> (version the cloud was last told it serves, monotonic time it was first told)
        self.serving_since: dict[str, tuple[int, float]] = {}
        self.online = False
        self.state: StateStore | None = None
        self.link: _ObservedLink | None = None
        self.reconciler: Reconciler | None = None
        self.repository = ModelRepository()
        self.spool: Spool | None = None
        self.recorder: Recorder | None = None
        self.syncer: Syncer | None = None
        self._watcher: Watcher | None = None
        self._thread: threading.Thread | None = None
        self._last_window = 0.0
        self._lock = threading.Lock()

    # lifetime -------------------------------------------------------------------------
    def _open(self) -> Reconciler:
        s = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state = StateStore(s.db_path)
        link = self.link = _ObservedLink(s.cloud, s.cloud_security(), rpc_timeout_s=s.rpc_timeout_s)
        link.on_report = self._reported
        self.repository = ModelRepository()
        on_desired = None
        if self.telemetry:
            self.spool = Spool(self.data_dir / "spool.db", s.spool_budget_bytes)
            recorder = self.recorder = Recorder(
                self.spool, telemetry_interval_s=s.telemetry_interval_s
            )
            self.syncer = Syncer(self.spool, link, interval_s=s.sync_interval_s)
            self._last_window = time.monotonic()

            def on_desired(desired: Any) -> None:
                recorder.configure(desired.assignments)

        self.reconciler = Reconciler(
            s,
            self.state,
            self.chunks,
            self.artifacts,
            link,
            self.repository,
            on_desired=on_desired,
            loader=self.fleet.runtime.loader(self.device_id),
        )
        return self.reconciler

    def enroll(self) -> None:
        """Trust the cloud (the provisioned root key) and enroll with the fleet's token, with
        the agent's own code; no loop starts."""
        reconciler = self._open()
        try:
            reconciler.ensure_trust()
            reconciler.ensure_identity()
        finally:
            self._close(report=False)

    def start(self) -> None:
        """Come online as a (re)started agent does: serve what is on disk, then reconcile
        in the background and follow the watch stream."""
        with self._lock:
            if self.online:
                return
            reconciler = self._open()
            reconciler.restore()
            reconciler.ensure_identity()  # the link authenticates before the watch opens
            assert self.state is not None and self.link is not None
            s = self.settings
            self._thread = threading.Thread(
                target=reconciler.run, name=f"sim-{self.device_id}", daemon=True
            )
            self._thread.start()
            if self.fleet.watch:
                self._watcher = Watcher(
                    self.link,
                    self.state.observed_generation,
                    lambda g: reconciler.notice(g, via="gRPC watch"),
                    Backoff(base=s.backoff_base_s, cap=s.backoff_cap_s),
                )
                self._watcher.start()
            self.online = True

    def stop(self) -> None:
        """Go offline cleanly, as `Agent.stop` does: telemetry written, a last report."""
        with self._lock:
            if self.online:
                self._halt()
                if self.recorder is not None:
                    self.recorder.stop()  # not started: only writes the open windows
                self._close(report=True)

    def kill(self) -> None:
        """Die as under SIGKILL: streams drop, nothing more is said; files stay as they are."""
        with self._lock:
            if self.online:
                self._halt()
                self._close(report=False)

    def _halt(self) -> None:
        self.online = False
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self.reconciler is not None:
            self.reconciler.stop()

    def _close(self, *, report: bool) -> None:
        if report and self.reconciler is not None:
            self.reconciler.report()
        if self.link is not None:
            self.link.close()  # cancels a download in flight, so the join below is short
        if self._thread is not None:
            self._thread.join(timeout=self.settings.rpc_timeout_s + 5)
            self._thread = None
        if self.state is not None:
            self.state.close()
            self.state = None
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        self.recorder = self.syncer = None

    # what it does ---------------------------------------------------------------------
    def _reported(self, report: ReportedState) -> None:
        now = time.monotonic()
        for status in report.models:
            current = self.serving_since.get(status.model)
            if current is None or current[0] != status.active_version:
                self.serving_since[status.model] = (status.active_version, now)

    def serving(self, model: str) -> int:
        """The version of `model` this device serves now (0: none)."""
        try:
            return self.repository.default_version(model)
        except EdgefleetError:
            return 0

    @property
    def bytes_fetched(self) -> int:
        """Bytes this device downloaded since it was created: chunks plus signed manifests
        (as they travelled, compressed), counted by the agent's chunk store."""
        return self.chunks.stats.bytes_fetched + self.chunks.stats.manifest_bytes

    def error(self, model: str) -> str:
        if self.reconciler is None:
            return "offline"
        return self.reconciler.status(model).error or self.reconciler.device_error

    def serve(self, requests: int, rng: random.Random) -> None:
        """`requests` simulated requests on each served model's default version, counted
        by the real Recorder (latency from the version's Behaviour; nothing sleeps)."""
        recorder = self.recorder
        if recorder is None:
            return
        feeds_cache: dict[str, dict[str, Array]] = {}
        for name in self.repository.names():
            try:
                model = self.repository.get(name)
            except EdgefleetError:
                continue
            feeds = feeds_cache.setdefault(name, _feeds(model))
            outputs_names = [o.name for o in model.outputs]
            behaviour = self.fleet.runtime.behaviour(self.device_id, name, model.version)
            for _ in range(requests):
                started = time.perf_counter() - behaviour.latency_s(rng)
                try:
                    outputs = model.run(feeds, outputs_names)
                except SimulatedFailure:
                    recorder.failed(name, model.version)
                    continue
                recorder.observe(name, model.version, feeds, outputs_names, outputs, started)

    def flush_telemetry(self, *, force: bool = False) -> int:
        """Close the telemetry window when it is due, and sync the spool; rows sent."""
        if self.recorder is None or self.syncer is None:
            return 0
        now = time.monotonic()
        if not force and now - self._last_window < self.settings.telemetry_interval_s:
            return 0
        self._last_window = now
        self.recorder.flush_telemetry()
        try:
            return self.syncer.sync_once()
        except EdgefleetError as err:
            log.info("%s: sync failed: %s", self.device_id, err.message)
            return 0


def _feeds(model: LoadedModel) -> dict[str, Array]:
    """One row of zeros per input (its dynamic dimensions as 1)."""
    return {
        spec.name: np.zeros(
            [d if d > 0 else 1 for d in spec.shape] or [1],
            _NUMPY.get(spec.datatype, np.float32),
        )
        for spec in model.inputs
    }


# the fleet ------------------------------------------------------------------------------


@dataclass
class Convergence:
    """How long until every device served `version` of `model`, as the cloud learned it
    from their reports (seconds from `since`), and when the admin API confirmed it."""

    model: str
    version: int
    devices: int
    seconds: float  # until the last device's report saying it serves the version
    p50_s: float
    confirmed_s: float  # until `AdminClient.devices()` showed every device converged
    per_device: dict[str, float] = field(default_factory=dict)


class SimFleet:
    """Simulated devices against one cloud, in this process.

    with start_cloud(tmp, devices=100) as cloud, SimFleet(cloud, tmp / "fleet") as fleet:
        fleet.enroll(100, {"site": "sim"})
        t0 = time.monotonic()
        fleet.admin.deploy("m", 1, selector={"site": "sim"})
        print(fleet.wait_until_converged("m", 1, since=t0).seconds)
    """

    def __init__(
        self,
        cloud: CloudAccess,
        workdir: Path,
        *,
        runtime: SimulatedRuntime | None = None,
        watch: bool = True,
        report_interval_s: float = 10.0,
        resync_interval_s: float = 30.0,
        telemetry_interval_s: float = 1.0,
        traffic_tick_s: float = 0.25,
        requests_per_tick: int = 5,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.cloud = cloud
        self.workdir = workdir
        self.runtime = runtime or SimulatedRuntime()
        self.watch = watch
        self.report_interval_s = report_interval_s
        self.resync_interval_s = resync_interval_s
        self.telemetry_interval_s = telemetry_interval_s
        self.traffic_tick_s = traffic_tick_s
        self.requests_per_tick = requests_per_tick
        self._extra_settings = dict(settings or {})
        self.devices: dict[str, SimDevice] = {}
        self.admin = cloud.admin()
        self._enroll_token = ""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rng = random.Random(1)

    def _settings(self, device_id: str, data_dir: Path) -> AgentSettings:
        values: dict[str, Any] = {
            "cloud": self.cloud.address,
            "ca_file": self.cloud.ca_file,
            "insecure": self.cloud.insecure,
            "root_key": self.cloud.root_key,
            "device_id": device_id,
            "data_dir": data_dir,
            "enroll_token": SecretStr(self._enroll_token) if self._enroll_token else None,
            "resync_interval_s": self.resync_interval_s,
            "report_interval_s": self.report_interval_s,
            "telemetry_interval_s": self.telemetry_interval_s,
            # Small simulated models; the real floor (64 MiB) times a thousand folders on
            # one disk says nothing about a device.
            "min_free_disk_bytes": 0,
            **self._extra_settings,
        }
        return AgentSettings(**values)

    # enrollment and lifetime ----------------------------------------------------------
    def enroll(
        self,
        count: int,
        labels: Mapping[str, str],
        *,
        prefix: str = "sim",
        telemetry: int | Iterable[int] = 0,
        start: bool = True,
        workers: int = 8,
    ) -> list[SimDevice]:
        """Enroll `count` devices with one enroll token (max_uses=count, granting `labels`),
        each with its own identity, credential and state folder; `telemetry`: how many (the
        first ones) or which indexes also record and sync telemetry. All enroll before any
        loop starts: each enrollment wakes every open watch on the cloud."""
        secret, _ = self.admin.create_enroll_token(
            labels=dict(labels), max_uses=count, note=f"fleet simulator: {prefix}"
        )
        self._enroll_token = secret
        chosen = set(range(telemetry)) if isinstance(telemetry, int) else set(telemetry)
        start_index = len(self.devices)
        made = []
        for i in range(count):
            device_id = f"{prefix}-{start_index + i:04d}"
            made.append(SimDevice(self, device_id, self.workdir / device_id, telemetry=i in chosen))
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(SimDevice.enroll, made))
        for device in made:
            self.devices[device.device_id] = device
        self._ensure_threads()
        if start:
            self.start(d.device_id for d in made)
        return made

    def _pick(self, ids: Iterable[str] | None) -> list[SimDevice]:
        return list(self.devices.values()) if ids is None else [self.devices[i] for i in ids]

    def start(self, ids: Iterable[str] | None = None, *, workers: int = 8) -> None:
        """Bring devices online (all: None)."""
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(SimDevice.start, self._pick(ids)))

    def stop(self, ids: Iterable[str] | None = None, *, workers: int = 8) -> None:
        """Take devices offline cleanly (all: None)."""
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(SimDevice.stop, self._pick(ids)))

    def kill(self, ids: Iterable[str] | None = None, *, workers: int = 8) -> None:
        """Kill devices (all: None): no goodbye; start() brings them back from disk."""
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(SimDevice.kill, self._pick(ids)))

    def online(self) -> list[SimDevice]:
        return [d for d in self.devices.values() if d.online]

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.kill()  # fast: the cloud goes too, and a last report says nothing of use
        self.admin.close()

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the fleet's background work ------------------------------------------------------
    def _ensure_threads(self) -> None:
        if self._threads:
            return
        for name, target in (("sim-heartbeat", self._heartbeat), ("sim-traffic", self._traffic)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _heartbeat(self) -> None:
        # The agent's report loop, for every online device in turn.
        while not self._stop.wait(self.report_interval_s):
            for device in self.online():
                reconciler = device.reconciler
                if device.online and reconciler is not None:
                    try:
                        reconciler.report()
                    except Exception:  # closed under us by a stop
                        log.debug("heartbeat of %s failed", device.device_id, exc_info=True)

    def _traffic(self) -> None:
        while not self._stop.wait(self.traffic_tick_s):
            for device in self.online():
                if not device.telemetry:
                    continue
                try:
                    with device._lock:
                        if device.online:
                            device.serve(self.requests_per_tick, self._rng)
                            device.flush_telemetry()
                except Exception:
                    log.exception("simulated traffic on %s failed", device.device_id)

    def flush_telemetry(self) -> int:
        """Close every telemetry device's window now and sync it; rows sent."""
        sent = 0
        for device in self.online():
            with device._lock:
                if device.online:
                    sent += device.flush_telemetry(force=True)
        return sent

    # figures --------------------------------------------------------------------------
    def bytes_fetched(self) -> dict[str, int]:
        """Per device: bytes downloaded so far (chunks + manifests)."""
        return {d.device_id: d.bytes_fetched for d in self.devices.values()}

    def cloud_cpu_seconds(self) -> float:
        """User + system CPU time of the cloud's process so far (0 for an in-process one)."""
        if self.cloud.pid is None:
            return 0.0
        import psutil

        times = psutil.Process(self.cloud.pid).cpu_times()
        return float(times.user + times.system)

    def wait_until_converged(
        self,
        model: str,
        version: int,
        *,
        timeout: float = 60.0,
        devices: Iterable[str] | None = None,
        since: float | None = None,
        poll: float = 0.05,
        confirm: bool = True,
    ) -> Convergence:
        """Wait until every device in `devices` (all online ones: None) has told the cloud it
        serves `version` of `model` (its report, taken); then, with `confirm`, until
        `AdminClient.devices()` shows them converged. Times are seconds after `since`
        (time.monotonic(); default: now). Raises TimeoutError naming who is behind."""
        start = time.monotonic() if since is None else since
        chosen = self._pick(devices) if devices is not None else self.online()
        deadline = time.monotonic() + timeout
        while True:
            behind = [d for d in chosen if d.serving_since.get(model, (0, 0.0))[0] != version]
            if not behind:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(self._behind_message(model, version, behind, timeout))
            time.sleep(poll)
        per_device = {d.device_id: d.serving_since[model][1] - start for d in chosen}
        confirmed = 0.0
        if confirm:
            wanted = {d.device_id for d in chosen}
            while True:
                seen = [d for d in self.admin.devices() if d.device_id in wanted]
                if len(seen) == len(wanted) and all(
                    d.running(model) == version and d.converged for d in seen
                ):
                    confirmed = time.monotonic() - start
                    break
                if time.monotonic() > deadline:
                    lagging = [
                        f"{d.device_id} (v{d.running(model)})"
                        for d in seen
                        if d.running(model) != version or not d.converged
                    ]
                    raise TimeoutError(
                        f"the admin API does not show {model} v{version} converged on "
                        f"{len(lagging)} devices: {', '.join(lagging[:10])}"
                    )
                time.sleep(max(poll, 0.2))
        times = sorted(per_device.values())
        return Convergence(
            model,
            version,
            len(chosen),
            times[-1] if times else 0.0,
            statistics.median(times) if times else 0.0,
            confirmed,
            per_device,
        )

    def _behind_message(
        self, model: str, version: int, behind: list[SimDevice], timeout: float
    ) -> str:
        shown = ", ".join(
            f"{d.device_id} (serves v{d.serving(model)}, {d.error(model) or 'no error'})"
            for d in behind[:10]
        )
        return (
            f"{len(behind)} devices did not report {model} v{version} within {timeout:.0f}s: "
            f"{shown}"
        )
