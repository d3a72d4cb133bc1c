"""Wire the cloud together: settings -> stores -> registry, fleet -> servicers -> gRPC server."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloudsvc.access import ADMIN_SERVICE, AGENT_SERVICE, JOB_SERVICE, Gate
from cloudsvc.admin_service import PUSH_PREFIX, AdminService
from cloudsvc.agent_service import AgentService
from cloudsvc.drift import DriftMonitor
from cloudsvc.errors import CloudError
from cloudsvc.fleet import Fleet
from cloudsvc.job_service import JobService
from cloudsvc.jobs.manager import JobManager
from cloudsvc.jobs.uploads import UploadStore
from cloudsvc.loop import ClosedLoop
from cloudsvc.metrics import CloudMetrics, MeteredIngest, serve_metrics
from cloudsvc.mqtt.service import CloudMqtt
from cloudsvc.registry import Registry
from cloudsvc.rollouts import RolloutEngine, RolloutTuning
from cloudsvc.settings import CloudSettings
from cloudsvc.signing import RootKeys, write_private
from cloudsvc.store.blobs import FolderBlobStore, remove_leftovers
from cloudsvc.store.data import DataStore, MemoryDataStore
from cloudsvc.store.data_sqlite import SqliteDataStore
from cloudsvc.store.memory import MemoryMetadataStore
from cloudsvc.store.metadata import MetadataStore
from cloudsvc.store.sqlite import SqliteMetadataStore
from cloudsvc.tokens import Tokens
from edgefleet.core import certs
from edgefleet.core.auth import read_secret
from edgefleet.core.errors import InvalidArgument
from edgefleet.core.metrics import MetricsEndpoint
from edgefleet.core.rpc import CallGuard
from edgefleet.core.tls import server_credentials
from protos.admin.v1 import admin_pb2_grpc, jobs_pb2_grpc
from protos.fleet.v1 import fleet_pb2_grpc

log = logging.getLogger(__name__)

# Chunk pieces are 256 KiB and client uploads 1 MiB; 64 MiB leaves room for manifests with
# many golden samples.
MAX_MESSAGE_BYTES = 64 << 20
# Worker threads never taken by watch streams, so unary calls and downloads always run.
RESERVED_WORKERS = 8
# What this port serves (health and reflection besides); health answers for each.
SERVICES = (ADMIN_SERVICE, JOB_SERVICE, AGENT_SERVICE)


@dataclass(frozen=True)
class AdminToken:
    value: str
    # Where it is kept when the service made it; None when it came from settings.
    path: Path | None


def read_secret_file(path: Path, what: str) -> str:
    try:
        return read_secret(path, what)
    except InvalidArgument as err:
        raise CloudError(err.message) from None


def resolve_admin_token(settings: CloudSettings) -> AdminToken:
    """The configured admin token, or the one kept in data_dir/admin-token (made once)."""
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        return AdminToken(settings.admin_token.get_secret_value(), None)
    if settings.admin_token_file is not None:
        return AdminToken(read_secret_file(settings.admin_token_file, "the admin token"), None)
    path = settings.admin_token_path
    if path.exists():
        value = path.read_text().strip()
        if value:
            return AdminToken(value, path)
    value = f"adm_{secrets.token_urlsafe(32)}"
    write_private(path, value.encode() + b"\n")
    return AdminToken(value, path)


def clean_interrupted_writes(
    settings: CloudSettings, blobs: FolderBlobStore, uploads: UploadStore
) -> int:
    """Delete what pushes, uploads and blob writes cut off by a kill left behind (a push is
    received whole in tmp/ before anything refers to it); bytes freed."""
    freed = blobs.clean_incoming() + uploads.clean_incoming()
    if settings.tmp_dir.is_dir():
        freed += remove_leftovers(settings.tmp_dir.glob(f"{PUSH_PREFIX}*"))
    if freed:
        log.info("removed %d bytes that interrupted pushes and uploads left behind", freed)
    return freed


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None
    ca_key: Path | None


def resolve_tls(settings: CloudSettings) -> TlsFiles | None:
    """The TLS files the cloud serves with: the configured ones, or a private CA and a
    server certificate made once in data_dir/tls. None with `insecure`."""
    if settings.insecure:
        return None
    tls = settings.tls
    if tls.cert_file is not None or tls.key_file is not None:
        if tls.cert_file is None or tls.key_file is None:
            raise CloudError("TLS needs both tls.cert_file and tls.key_file (--tls-dir sets both)")
        return TlsFiles(tls.cert_file, tls.key_file, tls.ca_file, tls.ca_key_file)
    made = certs.TlsFiles(settings.tls_dir)
    if not made.server_cert.exists():
        names = [*tls.names, *([settings.host] if settings.host not in ("0.0.0.0", "::") else [])]
        certs.init_ca(settings.tls_dir, names)
        log.info("made a private CA and a server certificate in %s", settings.tls_dir)
    return TlsFiles(made.server_cert, made.server_key, made.ca_cert, made.ca_key)


def publish_trust(settings: CloudSettings, keys: RootKeys, tls: TlsFiles | None) -> Path:
    """What devices are provisioned with, out of band, in data_dir/trust: the root key's
    fingerprint (root-key.txt) and the CA bundle that verifies the cloud (ca.pem)."""
    folder = settings.trust_dir
    certs.write_public(folder / "root-key.txt", (keys.current.fingerprint + "\n").encode())
    if tls is not None and tls.ca is not None:
        certs.write_public(folder / "ca.pem", tls.ca.read_bytes())
    return folder


def open_data(settings: CloudSettings) -> DataStore:
    if settings.metadata_backend == "memory":
        return MemoryDataStore()
    return SqliteDataStore(settings.data_path)


def open_metadata(settings: CloudSettings) -> MetadataStore:
    if settings.metadata_backend == "memory":
        return MemoryMetadataStore()
    return SqliteMetadataStore(settings.database_path)


class CloudServer:
    """A running cloud service. Stop it with `stop()`; `wait()` blocks until it stops."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        settings.data_dir.chmod(0o700)
        self.admin_token = resolve_admin_token(settings)
        self.tls = resolve_tls(settings)
        self.keys = RootKeys.load_or_create(settings.keys_dir)
        self.trust_dir = publish_trust(settings, self.keys, self.tls)
        static_tokens = [t.get_secret_value() for t in settings.enroll_tokens]
        if settings.enroll_token_file is not None:
            static_tokens.append(read_secret_file(settings.enroll_token_file, "an enroll token"))
        self.metadata = open_metadata(settings)
        self.blobs = FolderBlobStore(settings.blobs_dir)
        uploads = UploadStore(settings.uploads_dir, settings.max_upload_bytes)
        self.cleaned = clean_interrupted_writes(settings, self.blobs, uploads)
        self.registry = Registry(self.metadata, self.blobs, self.keys, settings.chunk_size)
        self.data = open_data(settings)
        self.tokens = Tokens(self.metadata, self.admin_token.value)
        mutual_tls = self.tls is not None and settings.tls.device_port is not None
        authority = None
        if mutual_tls:
            assert self.tls is not None
            if self.tls.ca is None or self.tls.ca_key is None:
                raise CloudError(
                    "mutual TLS (tls.device_port) signs device certificates: it needs "
                    "tls.ca_file and tls.ca_key_file (the CA made in data_dir/tls has both)"
                )
            authority = certs.CertificateAuthority.load(self.tls.ca, self.tls.ca_key)
        self.fleet = Fleet(
            self.metadata,
            self.registry,
            self.tokens,
            static_enroll_tokens=static_tokens,
            offline_after_s=settings.offline_after_s,
            certificate_authority=authority,
            keys=self.keys,
            desired_state_ttl_s=settings.desired_state_ttl_s,
        )
        # MQTT notices when a broker is configured (devices follow the gRPC watch either way).
        self.mqtt = (
            CloudMqtt(settings, self.fleet, self.tls.ca if self.tls else None)
            if settings.mqtt.enabled
            else None
        )
        self.jobs = JobManager(self.metadata, self.registry, settings)
        self.rollouts = RolloutEngine(
            self.fleet,
            self.metadata,
            self.data,
            RolloutTuning(
                settings.rollouts.tick_s,
                settings.rollouts.min_requests,
                settings.rollouts.baseline_lookback_s,
            ),
        )
        # Drift of devices' inputs from each version's baseline, checked on its own thread.
        self.drift = DriftMonitor(self.metadata, self.data, settings.drift)
        # Counted always (cheap); served on /metrics only when metrics_port is set.
        self.metrics = CloudMetrics(self.fleet, self.metadata, drift=self.drift)
        # The closed loop: drift -> warm-started fine-tune -> held-out check -> canary.
        self.loop = ClosedLoop(
            self.metadata,
            self.data,
            self.registry,
            self.jobs,
            self.rollouts,
            tick_s=settings.loop.tick_s,
        )
        self.drift.subscribe(self.loop.on_alert)
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.health = health.HealthServicer()
        # Streams hold a worker thread each. Anonymous ones (health watches) and device
        # watches share what RESERVED_WORKERS leaves, so unary calls always find a thread.
        streams = max(2, settings.max_workers - RESERVED_WORKERS)
        public_streams = max(1, min(16, streams // 4))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.max_workers, thread_name_prefix="cloud-rpc"
            ),
            interceptors=[
                CallGuard(
                    Gate(self.fleet, self.tokens, mutual_tls=mutual_tls),
                    public_streams=public_streams,
                    observe=self.metrics.observe_rpc,
                )
            ],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                # Agents ping every 30 s to notice dead links; allow it even between calls
                # rather than answering with GOAWAY "too_many_pings".
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminService(
                self.registry,
                self.fleet,
                self.tokens,
                settings.tmp_dir,
                settings.max_upload_bytes,
                self.data,
                self.rollouts,
                drift=self.drift,
                loop=self.loop,
            ),
            self._server,
        )
        jobs_pb2_grpc.add_JobServiceServicer_to_server(
            JobService(self.jobs, uploads),
            self._server,
        )
        fleet_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentService(
                self.registry,
                self.fleet,
                MeteredIngest(self.data, self.metadata, self.metrics),
                settings.watch_keepalive_s,
                max_watchers=max(1, streams - public_streams),
            ),
            self._server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = self._listen(settings.port, "--port")
        self.device_port = 0
        if mutual_tls:
            assert self.tls is not None and self.tls.ca is not None
            self.device_port = self._listen(
                settings.tls.device_port or 0, "tls.device_port", client_ca=self.tls.ca
            )
            self.fleet.device_port = self.device_port
        self.host = settings.host
        self.started_at = 0.0
        self._stopped = threading.Event()

    def _listen(self, port: int, option: str, client_ca: Path | None = None) -> int:
        address = f"{self.settings.host}:{port}"
        try:
            if self.tls is None:
                bound = self._server.add_insecure_port(address)
            else:
                credentials = server_credentials(self.tls.cert, self.tls.key, client_ca)
                bound = self._server.add_secure_port(address, credentials)
        except (RuntimeError, InvalidArgument) as err:
            self.metadata.close()
            raise CloudError(
                f"cannot listen on {address} ({err}); is another process using the port? "
                f"Pick another with {option} (0 = any free port)"
            ) from None
        return bound

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> CloudServer:
        if self.settings.metrics_port is not None:  # first: a port taken fails the start
            self.metrics_endpoint = serve_metrics(
                self.metrics, self.settings.metrics_host, self.settings.metrics_port
            )
        self._server.start()
        self.jobs.start()
        self.drift.start()
        self.rollouts.start()  # running rollouts continue where they were
        self.loop.start()  # runs of the closed loop continue from their recorded step
        if self.mqtt is not None:
            self.mqtt.start()
        self.started_at = time.time()
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("cloud serving on %s", self.address)
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, end watch streams, let calls in flight finish for `grace` s."""
        if self._stopped.is_set():
            return
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        self.health.enter_graceful_shutdown()
        self.loop.stop()  # first: it reads jobs, rollouts and the stores
        self.jobs.stop()
        self.drift.stop()  # before the stores close under it
        self.rollouts.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
        self.fleet.close()
        self._server.stop(grace).wait()
        self.metadata.close()
        self.data.close()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() completed; False if `timeout` passed first."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> CloudServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)


def serve(settings: CloudSettings) -> CloudServer:
    """Build and start the cloud service; the running server."""
    return CloudServer(settings).start()
