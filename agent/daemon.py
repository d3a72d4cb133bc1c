"""The agent process: local state, the inference server and the reconcile loop together.

`start()` serves what is on disk before any cloud call, so a device that reboots while
offline keeps answering inference; the reconcile loop then converges when the cloud is
reachable. Every step is crash-safe: chunks, version folders and the switch commit are
each published atomically, so a kill at any instant restarts cleanly.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from agent.activation import load_and_check
from agent.artifacts import ArtifactStore
from agent.chunks import ChunkStore
from agent.cloud_link import CloudLink, GrpcCloudLink, Watcher
from agent.errors import ModelNotFound, NotEnrolled
from agent.inference.limits import MemoryStats
from agent.inference.rest import RestServer, start_rest_server
from agent.inference.server import (
    InferenceSecurity,
    InferenceServer,
    RequestLimits,
    exposure_warning,
    start_inference_server,
)
from agent.inference.worker import WorkerConfig
from agent.inference.workers import WorkerPool, WorkerRepository, threads_per_session
from agent.mqtt.notices import MqttNotices
from agent.ratelimit import RateLimiter
from agent.reconciler import Loader, Reconciler
from agent.recorder import Recorder
from agent.runtime import ModelRepository, SessionOptions
from agent.settings import AgentSettings
from agent.spool import Spool
from agent.state import Identity, StateStore
from agent.sync import Syncer
from agent.systemd import Notifier
from edgefleet.core.fleet import DesiredState
from edgefleet.core.retry import Backoff

if TYPE_CHECKING:
    from edgefleet.core.metrics import MetricsEndpoint

log = logging.getLogger(__name__)


def advertised_endpoint(settings: AgentSettings, port: int) -> str:
    """The inference address to report: the configured one, else the local address the
    cloud is reached from (so a wildcard bind still reports something dialable)."""
    if settings.advertise_address:
        return settings.advertise_address
    host = settings.inference_host
    if host in ("0.0.0.0", "::", ""):
        cloud_host = settings.cloud.rpartition(":")[0].strip("[]")
        try:
            # A UDP "connect" sends nothing; it only picks the route's source address.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((cloud_host, 9))
                host = probe.getsockname()[0]
        except OSError:
            host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def request_limits(settings: AgentSettings) -> RequestLimits:
    s = settings
    return RequestLimits(
        max_rows=s.inference_max_rows,
        max_dynamic=s.inference_max_dynamic,
        max_request_bytes=s.max_request_bytes,
        large_in_flight=s.inference_large_in_flight,
        stream_idle_s=s.inference_stream_idle_s,
    )


def worker_config(settings: AgentSettings) -> WorkerConfig:
    """How the inference worker processes serve (inference_workers > 1): the settings of the
    single server, with ONNX Runtime's threads and the input statistics' rate divided among
    them."""
    s, n = settings, settings.inference_workers
    return WorkerConfig(
        count=n,
        host=s.inference_host,
        port=s.inference_port,
        stats_dir="",
        rest_host=s.rest_host,
        rest_port=s.rest_port,
        rest_max_connections=s.rest_max_connections,
        rest_timeout_s=s.rest_timeout_s,
        rest_header_timeout_s=s.rest_header_timeout_s,
        rest_max_connections_per_client=s.rest_max_connections_per_client,
        rest_max_json_bytes=s.rest_max_json_bytes,
        batching=s.inference_batching,
        max_batch=s.inference_max_batch,
        limits=request_limits(s),
        cert_file=s.inference_cert_file,
        key_file=s.inference_key_file,
        token=s.inference_secret(),
        options=SessionOptions(
            providers=tuple(s.providers),
            intra_op_threads=threads_per_session(s.intra_op_threads, n),
        ),
        stats_per_second=-(-s.input_stats_per_second // n),
        max_row_bytes=s.capture_max_row_bytes,
        log_format=s.log_format,
        log_level=logging.getLogger().getEffectiveLevel(),
    )


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        link: CloudLink | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        # With inference workers, every change to what is served is made in each of them
        # first (agent.inference.workers), then here, where reports read it.
        self.repository = (
            WorkerRepository() if settings.inference_workers > 1 else ModelRepository()
        )
        self.workers: WorkerPool | None = None  # inference_workers > 1
        self._warning = ""
        self._link = link
        self._on_event = on_event
        self._server: InferenceServer | None = None
        self._rest: RestServer | None = None  # KServe v2 REST, when rest_port is set
        self._state: StateStore | None = None
        self._reconciler: Reconciler | None = None
        self._watcher: Watcher | None = None
        self.mqtt: MqttNotices | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._device_id = ""
        self.spool: Spool | None = None
        self.recorder: Recorder | None = None
        self.syncer: Syncer | None = None
        self.metrics: MetricsEndpoint | None = None  # /metrics, when metrics_port is set
        self._heartbeat = 0.0  # monotonic time of run_forever's last turn (the watchdog's)

    @property
    def inference_port(self) -> int:
        if self.workers is not None:
            return self.workers.port
        if self._server is None:
            raise RuntimeError("the agent is not started")
        return self._server.port

    @property
    def rest_port(self) -> int | None:
        """The REST inference port (None: rest_port is not set)."""
        if self.workers is not None:
            return self.workers.rest_port
        return self._rest.port if self._rest is not None else None

    @property
    def exposure_warning(self) -> str:
        """Non-empty when the inference port is open to the network unprotected."""
        return self._server.warning if self._server is not None else self._warning

    @property
    def reconciler(self) -> Reconciler:
        if self._reconciler is None:
            raise RuntimeError("the agent is not started")
        return self._reconciler

    @property
    def device_id(self) -> str:
        if self._state is not None and not self._stopping.is_set():
            identity = self._state.identity()
            self._device_id = identity.device_id if identity else ""
        return self._device_id

    def start(self, *, reconcile: bool = True) -> None:
        s = self.settings
        # The folder holds the device's credential and key: only this user reads it.
        s.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        s.data_dir.chmod(0o700)
        self._state = StateStore(s.db_path)
        chunks = ChunkStore(s.data_dir / "chunks", RateLimiter(s.max_download_bytes_per_s))
        artifacts = ArtifactStore(s.data_dir, chunks)
        if self._link is None:
            self._link = GrpcCloudLink(
                s.cloud,
                s.cloud_security(),
                rpc_timeout_s=s.rpc_timeout_s,
                chunk_timeout_s=s.chunk_timeout_s,
            )
        self.spool = Spool(s.data_dir / "spool.db", s.spool_budget_bytes)
        recorder = self.recorder = Recorder(
            self.spool,
            telemetry_interval_s=s.telemetry_interval_s,
            stats_per_second=s.input_stats_per_second,
            max_row_bytes=s.capture_max_row_bytes,
        )
        pool = None
        loader: Loader = load_and_check
        if isinstance(self.repository, WorkerRepository):
            pool = self.workers = WorkerPool(self.repository, worker_config(s), recorder=recorder)
            loader = pool.loader(load_and_check)  # every worker loads a version, or none

        def on_desired(desired: DesiredState) -> None:
            recorder.configure(desired.assignments)
            if pool is not None:
                pool.configure(desired.assignments)

        self._reconciler = Reconciler(
            s,
            self._state,
            chunks,
            artifacts,
            self._link,
            self.repository,
            on_event=self._on_event,
            on_desired=on_desired,
            loader=loader,
        )
        self._reconciler.restore()
        security = InferenceSecurity(
            s.inference_cert_file, s.inference_key_file, s.inference_secret()
        )
        if pool is not None:
            pool.start()  # what restore() loaded, in every worker, before they listen
            self._warning = exposure_warning(s.inference_host, security)
        else:
            self._start_server(security, recorder)
        recorder.start()
        self._reconciler.inference_endpoint = advertised_endpoint(s, self.inference_port)
        if s.metrics_port is not None:
            from agent.metrics import serve_metrics  # prometheus-client only when asked for

            self.metrics = serve_metrics(
                host=s.metrics_host,
                port=s.metrics_port,
                repository=self.repository,
                reconciler=self._reconciler,
                recorder=recorder,
                spool=self.spool,
                syncer=lambda: self.syncer,
                memory=self._memory_stats,
                device_id=lambda: self.device_id,
                workers=pool.figures if pool is not None else None,
            )
        if not reconcile:
            return
        self._start_loops()

    def _memory_stats(self) -> MemoryStats:
        if self.workers is not None:
            return self.workers.memory_stats
        return self._server.memory_stats if self._server is not None else MemoryStats()

    def _start_server(self, security: InferenceSecurity, recorder: Recorder) -> None:
        """The inference server (and REST port) in this process: inference_workers = 1."""
        s = self.settings
        self._server = start_inference_server(
            self.repository,
            s.inference_host,
            s.inference_port,
            batching=s.inference_batching,
            max_batch=s.inference_max_batch,
            limits=request_limits(s),
            security=security,
            recorder=recorder,
        )
        if s.rest_port is not None:
            try:  # the same data plane, TLS and token as the gRPC port
                self._rest = start_rest_server(
                    self._server.plane,
                    s.rest_host or s.inference_host,
                    s.rest_port,
                    cert_file=s.inference_cert_file,
                    key_file=s.inference_key_file,
                    token=s.inference_secret(),
                    max_request_bytes=s.max_request_bytes,
                    max_connections=s.rest_max_connections,
                    timeout_s=s.rest_timeout_s,
                    header_timeout_s=s.rest_header_timeout_s,
                    max_connections_per_client=s.rest_max_connections_per_client,
                    max_json_bytes=s.rest_max_json_bytes,
                )
            except Exception:
                self._server.stop(0)
                raise

    def _start_loops(self) -> None:
        s = self.settings
        assert self._link is not None and self._reconciler is not None
        assert self.spool is not None and self._state is not None
        self.syncer = Syncer(
            self.spool,
            self._link,
            interval_s=s.sync_interval_s,
            upload_bytes_per_s=s.upload_bytes_per_s,
            backoff=Backoff(base=s.backoff_base_s, cap=s.backoff_cap_s),
        ).start()
        self._spawn("edgefleet-reconcile", self._reconciler.run)
        self._spawn("edgefleet-report", self._report_loop)
        self._watcher = Watcher(
            self._link,
            self._state.observed_generation,
            functools.partial(self._reconciler.notice, via="gRPC watch"),
            Backoff(base=s.backoff_base_s, cap=s.backoff_cap_s),
        )
        self._watcher.start()
        if s.mqtt.enabled:
            # Beside the watch, on the broker the cloud named at enrollment (if any).
            self.mqtt = MqttNotices(s, self._state, self._reconciler).start()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _report_loop(self) -> None:
        while not self._stopping.wait(self.settings.report_interval_s):
            if self._reconciler is not None:
                self._reconciler.report()

    def stop(self) -> None:
        """Stop reconciling, let in-flight inference finish (grace period), close the db."""
        if self._stopping.is_set():
            return
        _ = self.device_id  # remember it for the exit summary; the db closes below
        self._stopping.set()
        if self.metrics is not None:
            self.metrics.stop()  # first: no scrape reads the parts closing below
        if self._watcher is not None:
            self._watcher.stop()
        if self.mqtt is not None:
            self.mqtt.stop()  # says offline on the broker
        if self._reconciler is not None:
            self._reconciler.stop()
        if self._rest is not None:
            self._rest.stop(self.settings.stop_grace_s)
        if self._server is not None:
            self._server.stop(self.settings.stop_grace_s)
        if self.workers is not None:
            self.workers.stop(self.settings.stop_grace_s)  # their last telemetry taken over
        if self.recorder is not None:
            self.recorder.stop()  # what was recorded goes to the spool, windows closed
        if self.syncer is not None:
            self.syncer.stop()
        if self._reconciler is not None:
            # A last report before the link closes (best effort: the cloud may be away).
            self._reconciler.report()
        if self._link is not None:
            # Closing the channel cancels a download in flight, so a stalled chunk cannot
            # hold the stop for its whole deadline; the .part file resumes on next start.
            self._link.close()
        for thread in self._threads:
            thread.join(timeout=self.settings.rpc_timeout_s + 5)
        if self._state is not None and not any(t.is_alive() for t in self._threads):
            self._state.close()
        if self.spool is not None:
            self.spool.close()

    def run_forever(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop cleanly.

        Under systemd (agent/systemd.py) it says READY=1 once it serves, keeps STATUS=
        current, pings the watchdog while this loop and the agent's threads run, and says
        STOPPING=1 on the way out."""
        done = threading.Event()

        def _handle(signum: int, frame: FrameType | None) -> None:
            log.info("received signal %d; stopping", signum)
            done.set()

        systemd = Notifier.from_environ()
        previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        # A parent that blocked them (some init scripts and CI runners do) must not keep the
        # agent from stopping: a blocked SIGTERM waits, pending, until SIGKILL.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            if self._server is None and self.workers is None:
                self.start()
            # Turns well inside a watchdog ping interval, so a live loop never misses one.
            tick = min(1.0, systemd.watchdog_interval_s / 2 or 1.0)
            self._heartbeat = time.monotonic()
            shown = self._status() or ("serving", "")
            shown_at = self._heartbeat
            systemd.ready("; ".join(part for part in shown if part))
            systemd.start_watchdog(functools.partial(self.alive, systemd.watchdog_interval_s))
            while not done.wait(tick):
                self._heartbeat = now = time.monotonic()
                parts = self._status() if systemd.enabled else None
                # A change of what is served or wrong at once; the sync's age every 5 s.
                if parts and (parts[0] != shown[0] or (parts != shown and now - shown_at >= 5)):
                    systemd.status("; ".join(parts))
                    shown, shown_at = parts, now
        finally:
            systemd.stopping()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()
            systemd.close()

    def alive(self, within_s: float) -> bool:
        """True while run_forever turned in the last `within_s` seconds and the reconcile and
        report threads run: what the systemd watchdog pings on."""
        if time.monotonic() - self._heartbeat > within_s:
            return False
        return all(thread.is_alive() for thread in self._threads)

    def status_parts(self) -> tuple[str, str]:
        """What `systemctl status` shows: what is served and what is wrong, then the sync
        ("serving 2 models (a v3, b v1)", "last sync 3 s ago")."""
        served = []
        for name in self.repository.names():
            try:
                served.append(f"{name} v{self.repository.default_version(name)}")
            except ModelNotFound:  # unloaded in between
                continue
        state = f"serving {len(served)} model{'' if len(served) == 1 else 's'}"
        if served:
            state += f" ({', '.join(served)})"
        if not self.device_id:
            state += "; not enrolled yet"
        error = self._reconciler.device_error if self._reconciler is not None else ""
        if error:
            state += f"; {error[:200]}"
        last = self.syncer.stats.last_success_at if self.syncer is not None else 0.0
        sync = f"last sync {max(0.0, time.time() - last):.0f} s ago" if last else "not synced yet"
        return state, sync

    def _status(self) -> tuple[str, str] | None:
        try:
            return self.status_parts()
        except Exception:  # a status line is never the reason the agent stops
            log.debug("no status line", exc_info=True)
            return None


def reenroll_device(settings: AgentSettings) -> Identity:
    """Rotate the credential of the device whose state is in settings.data_dir, with a
    re-enroll token (settings' enroll token) or its current credential; the running agent, if
    any, reads the new identity on its next pass."""
    if not settings.db_path.exists():
        raise NotEnrolled(
            f"there is no agent state in {settings.data_dir}: a device that never enrolled "
            "enrolls with `edgefleet agent run --enroll-token-file FILE`"
        )
    state = StateStore(settings.db_path)
    link = GrpcCloudLink(
        settings.cloud, settings.cloud_security(), rpc_timeout_s=settings.rpc_timeout_s
    )
    try:
        chunks = ChunkStore(settings.data_dir / "chunks", RateLimiter(0))
        reconciler = Reconciler(
            settings,
            state,
            chunks,
            ArtifactStore(settings.data_dir, chunks),
            link,
            ModelRepository(),
        )
        reconciler.ensure_trust()  # the cloud must be the one this device trusts
        return reconciler.reenroll(settings.enroll_secret())
    finally:
        link.close()
        state.close()
