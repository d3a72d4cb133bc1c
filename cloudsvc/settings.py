"""The cloud process's settings: defaults < TOML file < EDGEFLEET_CLOUD_* environment <
command-line options. Job settings are the nested section [jobs] (EDGEFLEET_CLOUD_JOBS__*)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from cloudsvc.mqtt.settings import MqttSettings
from edgefleet.core.errors import InvalidArgument
from edgefleet.core.manifests import DEFAULT_CHUNK_SIZE, MAX_CHUNK_BYTES
from edgefleet.core.settings import LayeredSettings


class JobSettings(BaseModel):
    """How fine-tune and compile jobs run: `[jobs]` in the TOML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: int | None = Field(
        None,
        ge=0,
        description="GPUs jobs may use, one job at a time each; unset: as many as "
        "`nvidia-smi -L` lists (0 without NVIDIA's driver).",
    )
    cpu_slots: int = Field(
        1, ge=0, le=64, description="Jobs that may run at once on the CPU (0: GPU only)."
    )
    threads: int = Field(
        0, ge=0, description="torch threads per job worker; 0: torch's default (all cores)."
    )
    fashion_mnist_dir: Path = Field(
        Path("/usr/share/datasets/fashion-mnist"),
        description="Where Debian's dataset-fashion-mnist puts the data set jobs call "
        "fashion-mnist.",
    )
    cancel_grace_s: float = Field(
        10.0, gt=0, description="Seconds a cancelled worker gets to stop before SIGKILL."
    )
    keep_files: bool = Field(
        False, description="Keep a job's builds after registering them (for debugging)."
    )
    data_roots: tuple[Path, ...] = Field(
        (),
        description="Folders on the cloud machine whose data sets jobs may name by path "
        "(`--data cloud:/srv/datasets/parts`); empty: uploads, built-in data and captures only.",
    )


class RolloutSettings(BaseModel):
    """How rollouts run: `[rollouts]` in the TOML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tick_s: float = Field(
        1.0, gt=0, le=60, description="Seconds between checks of each running rollout."
    )
    min_requests: int = Field(
        20,
        ge=1,
        description="Requests a gate needs on each side (new version; previous version for "
        "relative gates) to judge; with fewer the rollout pauses and says so.",
    )
    baseline_lookback_s: float = Field(
        3600.0,
        gt=0,
        description="How far before a rollout the previous version's figures on the same "
        "devices are taken from, for relative gates.",
    )


class LoopSettings(BaseModel):
    """The closed loop's controller (cloudsvc.loop): `[loop]` in the TOML file. What each
    model's loop does is set per model with `edgefleet loop enable`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tick_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="Seconds between steps of each loop's run (label counts, its job).",
    )


class TlsSettings(BaseModel):
    """TLS of the cloud's port: `[tls]` in the TOML file. With no files given, a private CA
    and a server certificate are made once in data_dir/tls (the CA's ca.pem is what clients
    and devices are given to verify the cloud)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: Path | None = Field(None, description="Server certificate (PEM, with chain).")
    key_file: Path | None = Field(None, description="Its private key (PEM).")
    ca_file: Path | None = Field(
        None, description="The CA bundle that verifies the server (published to devices)."
    )
    ca_key_file: Path | None = Field(
        None, description="The CA's key: signs device certificates for mutual TLS."
    )
    names: list[str] = Field(
        default_factory=list,
        description="Host names and addresses for a server certificate made here, besides "
        "loopback and this machine's names.",
    )
    device_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Mutual TLS: a second port where devices call with the client certificate "
        "they got at enrollment (0: any free port; unset: no mutual TLS).",
    )


class DriftSettings(BaseModel):
    """Drift monitoring (cloudsvc.drift): `[drift]` in the TOML file
    (EDGEFLEET_CLOUD_DRIFT__PSI_THRESHOLD=0.25)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, description="Check every version with a training baseline for drift."
    )
    interval_s: float = Field(60.0, gt=0, description="Seconds between two checks.")
    window_s: float = Field(
        3600.0,
        gt=0,
        le=366 * 86_400,
        description="Each check compares the telemetry of the last window_s seconds.",
    )
    psi_threshold: float = Field(
        0.2,
        gt=0,
        description="PSI at which a device or the fleet alerts (0.2: the usual rule of thumb "
        "for a shift worth acting on; 0.1-0.2 reads as moderate).",
    )
    clear_ratio: float = Field(
        0.9,
        gt=0,
        le=1,
        description="An alert clears when the PSI falls under clear_ratio x psi_threshold, so "
        "a PSI wavering around the threshold alerts once.",
    )
    min_count: int = Field(
        100,
        ge=1,
        description="Values a channel needs in the window before it is judged (fewer: noise).",
    )
    ks_max_captures: int = Field(
        200,
        ge=0,
        le=100_000,
        description="Sampled captures per version that `edgefleet drift` reads for the KS "
        "test (the oldest in the window; 0: no KS).",
    )
    webhook_url: SecretStr | None = Field(
        None,
        description="Where each new alert is POSTed as JSON (https://; its path often holds "
        "a secret, so it is masked). Unset: alerts go to the log and metrics only.",
    )
    webhook_insecure: bool = Field(
        False,
        description="Allow a plain http:// webhook_url: alerts then cross the network "
        "unencrypted. A trusted loopback or lab network only.",
    )
    webhook_timeout_s: float = Field(
        5.0, gt=0, le=60, description="Seconds one webhook POST may take."
    )
    webhook_retries: int = Field(
        3, ge=0, le=10, description="Further tries of a failed POST, 1, 2, 4... s apart."
    )

    @model_validator(mode="after")
    def _check_webhook(self) -> DriftSettings:
        if self.webhook_url is not None:
            url = self.webhook_url.get_secret_value()
            scheme = url.split("://", 1)[0].lower() if "://" in url else ""
            if scheme not in ("https", "http"):
                raise ValueError("drift.webhook_url must be an https:// URL")
            if scheme == "http" and not self.webhook_insecure:
                raise ValueError(
                    "drift.webhook_url is plain http: alerts would cross the network "
                    "unencrypted; use https:// or set drift.webhook_insecure = true"
                )
        return self


class CloudSettings(LayeredSettings):
    """Settings of `edgefleet cloud serve`. Environment: EDGEFLEET_CLOUD_<FIELD>, nested
    fields with __ (EDGEFLEET_CLOUD_JOBS__CPU_SLOTS=2)."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEFLEET_CLOUD_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path = Field(
        Path("./edgefleet-cloud"),
        description="Folder for the metadata database, blobs, keys and the admin token.",
    )
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 for every interface.")
    port: int = Field(50051, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    insecure: bool = Field(
        False,
        description="Serve plain text instead of TLS: tokens, models and data then cross the "
        "network unencrypted. For a trusted loopback or lab network only.",
    )
    tls: TlsSettings = Field(default_factory=lambda: TlsSettings(), description="TLS.")
    admin_token: SecretStr | None = Field(
        None,
        description="The first admin token (role admin); when unset one is made and kept in "
        "data_dir/admin-token. Prefer admin_token_file.",
    )
    admin_token_file: Path | None = Field(None, description="A file holding admin_token.")
    enroll_tokens: list[SecretStr] = Field(
        default_factory=list,
        description="Fleet-wide enrollment tokens (no expiry, no labels) accepted besides "
        "those made by `edgefleet tokens create`. Prefer enroll_token_file.",
    )
    enroll_token_file: Path | None = Field(
        None, description="A file holding one more fleet-wide enrollment token."
    )
    desired_state_ttl_s: float = Field(
        86_400.0,
        gt=0,
        description="How long a signed desired state stays valid; devices in contact get a "
        "fresh one at every fetch, and refuse a state older than this (a freeze attack).",
    )
    max_upload_bytes: int = Field(2 << 30, gt=0, description="Largest model file a push may send.")
    chunk_size: int = Field(
        DEFAULT_CHUNK_SIZE,
        gt=0,
        le=MAX_CHUNK_BYTES,
        description="Bytes per content-addressed artifact chunk (devices refuse larger).",
    )
    offline_after_s: float = Field(
        30.0, gt=0, description="A device counts as online if it called within this many seconds."
    )
    max_workers: int = Field(
        128,
        ge=9,
        description="gRPC worker threads. Every open stream holds one: 8 are kept for other "
        "calls, a quarter of the rest (16 at most) for streams without a credential (health "
        "watches), and the others for device watches.",
    )
    watch_keepalive_s: float = Field(
        15.0, gt=0, description="Seconds between keep-alive notices on idle watch streams."
    )
    jobs: JobSettings = Field(
        default_factory=lambda: JobSettings(), description="Fine-tune and compile jobs."
    )
    rollouts: RolloutSettings = Field(
        default_factory=lambda: RolloutSettings(), description="Rollouts in waves."
    )
    loop: LoopSettings = Field(
        default_factory=lambda: LoopSettings(),
        description="The closed loop: drift -> fine-tune -> held-out check -> canary.",
    )
    mqtt: MqttSettings = Field(
        default_factory=lambda: MqttSettings(),
        description="An MQTT broker for desired-state notices (off while mqtt.url is empty).",
    )
    drift: DriftSettings = Field(
        default_factory=lambda: DriftSettings(),
        description="Drift of devices' inputs from each version's training baseline.",
    )
    metadata_backend: str = Field(
        "sqlite", pattern="^(sqlite|memory)$", description="sqlite (durable) or memory (tests)."
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the Prometheus /metrics port binds: loopback by default; another "
        "address lets anyone who reaches it read model names, device counts and call rates.",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (plain HTTP); unset: off; 0 "
        "picks a free one.",
    )

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> CloudSettings:
        """Settings from an optional TOML file, the environment and explicit overrides
        (None values ignored, so CLI options left out fall through)."""
        from cloudsvc.errors import InvalidRequest

        try:
            return cls.from_sources(config_file, **overrides)
        except InvalidArgument as err:
            raise InvalidRequest(err.message) from None

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def feature_cache_dir(self) -> Path:
        return self.data_dir / "cache" / "features"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "metadata.db"

    @property
    def data_path(self) -> Path:
        """What devices sent back: captures and telemetry (cloudsvc.store.data_sqlite)."""
        return self.data_dir / "data.db"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def trust_dir(self) -> Path:
        return self.data_dir / "trust"

    def shown(self, name: str, value: Any) -> str:
        if name == "admin_token" and value is None:
            return f"(kept in {self.admin_token_path})"
        return super().shown(name, value)
