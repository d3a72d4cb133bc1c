"""The agent's settings: one pydantic-settings model, from a TOML file and `EDGEFLEET_AGENT_*`
environment variables.

Nothing is read at import time: `load()` builds the settings when the daemon starts.
Precedence, highest first: explicit overrides (CLI flags), environment, config file, defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    NoDecode,
    SettingsConfigDict,
)

from agent.errors import SettingsError
from agent.mqtt.settings import MqttSettings
from agent.runtime import PROVIDER_PREFERENCE
from edgefleet.core.auth import secret_value
from edgefleet.core.errors import InvalidArgument
from edgefleet.core.settings import LayeredSettings
from edgefleet.core.tls import ClientSecurity


class AgentSettings(LayeredSettings):
    """How one device agent runs. Every field can be set as EDGEFLEET_AGENT_<NAME>."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEFLEET_AGENT_", env_nested_delimiter="__", extra="forbid"
    )
    cloud: str = Field(
        default="127.0.0.1:50051", description="host:port of the cloud's AgentService."
    )
    enroll_token: SecretStr | None = Field(
        default=None,
        description="Enrollment token; needed only until the device has enrolled. Prefer "
        "enroll_token_file.",
    )
    enroll_token_file: Path | None = Field(
        default=None, description="A file holding the enrollment token (not on the command line)."
    )
    insecure: bool = Field(
        default=False,
        description="Reach the cloud in plain text: its credential and models then cross the "
        "network unencrypted (signatures still protect what the device runs).",
    )
    ca_file: Path | None = Field(
        default=None,
        description="The CA bundle that verifies the cloud's certificate (the cloud's "
        "data_dir/trust/ca.pem), provisioned out of band.",
    )
    root_key: str = Field(
        default="",
        description="Fingerprint (sha256:...) of the cloud's root key that signs manifests and "
        "desired states (the cloud's data_dir/trust/root-key.txt), provisioned out of band; "
        "the device trusts that key and its signed successors, and nothing else.",
    )
    clock_skew_s: float = Field(
        default=300.0,
        ge=0,
        description="How far this device's clock may lag the cloud's before a fresh desired "
        "state looks expired.",
    )
    device_id: str = Field(
        default="", description="Device id to ask for at enrollment; empty lets the cloud choose."
    )
    data_dir: Path = Field(
        default=Path("./edgefleet-agent"), description="Where state, chunks and models live."
    )
    labels: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="Labels sent at enrollment and in reports."
    )
    inference_host: str = Field(
        default="127.0.0.1",
        description="Address the Open Inference Protocol server binds: loopback by default; "
        "0.0.0.0 opens it to the network (set inference_token and TLS then).",
    )
    inference_port: int = Field(
        default=8001,
        ge=0,
        le=65535,
        description="Port of the inference server; 0 picks a free one.",
    )
    rest_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the KServe v2 HTTP/REST inference endpoint beside the gRPC one "
        "(same models, TLS and bearer token); unset: off; 0 picks a free one.",
    )
    rest_host: str = Field(
        default="",
        description="Address the REST endpoint binds; empty: inference_host (loopback by "
        "default; another address needs inference_token and TLS, as the gRPC port does).",
    )
    rest_max_connections: int = Field(
        default=16,
        ge=1,
        description="REST connections served at once (each holds a thread); more are answered 503.",
    )
    rest_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="REST read timeout: an idle keep-alive connection closes after it, and a "
        "request body must arrive within it.",
    )
    rest_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="REST deadline for a request's line and headers (and, on a new "
        "connection, the TLS handshake before them), however slowly they trickle in.",
    )
    rest_max_connections_per_client: int = Field(
        default=0,
        ge=0,
        description="REST connections one client address may hold at once; 0: half of "
        "rest_max_connections (at least 1). Behind a proxy every client has its address: "
        "raise it to rest_max_connections there.",
    )
    rest_max_json_bytes: int = Field(
        default=8 << 20,
        ge=1,
        description="Largest JSON part of a REST inference body (parsed JSON takes many times "
        "its size in memory); larger tensors travel as binary data (the binary-data "
        "extension), up to the model's request limit.",
    )
    advertise_address: str = Field(
        default="",
        description="host:port reported to the cloud as the inference endpoint; empty derives it.",
    )
    providers: list[str] = Field(
        default_factory=lambda: list(PROVIDER_PREFERENCE),
        description="ONNX Runtime execution providers to try, best first.",
    )
    intra_op_threads: int = Field(
        default=1, ge=0, description="ONNX Runtime intra-op threads per session (0: one per core)."
    )
    inference_workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Inference server processes sharing the inference (and REST) port: 1 "
        "serves from the agent's own process; N > 1 starts N worker processes (SO_REUSEPORT, "
        "Linux), each with its own ONNX Runtime session of every model (intra_op_threads 0 "
        "then means the cores divided among them), switching versions together, their "
        "statistics merged; a worker that dies is restarted.",
    )
    inference_batching: bool = Field(
        default=False,
        description="Run inference requests that arrive while their model is busy together as "
        "one batch (models whose inputs and outputs share a symbolic first dimension); pays "
        "on GPUs and multi-threaded sessions, not on one CPU thread.",
    )
    inference_max_batch: int = Field(
        default=32, ge=1, description="Most rows in one dynamic batch."
    )
    resync_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="Re-check the desired state this often even without a notice.",
    )
    report_interval_s: float = Field(
        default=10.0, gt=0, description="Send a state report (heartbeat) this often."
    )
    backoff_base_s: float = Field(
        default=0.5, gt=0, description="First retry delay ceiling after a failed pass."
    )
    backoff_cap_s: float = Field(default=30.0, gt=0, description="Largest retry delay ceiling.")
    min_free_disk_bytes: int = Field(
        default=64 << 20,
        ge=0,
        description="Free space that must remain on the data disk after a download.",
    )
    inference_stream_idle_s: float = Field(
        default=300.0,
        gt=0,
        description="An inference stream (ModelStreamInfer) that sends no request for this "
        "long is closed (DEADLINE_EXCEEDED), so idle streams cannot hold the server's threads.",
    )
    max_request_bytes: int = Field(
        default=64 << 20,
        gt=0,
        description="Largest inference request accepted at all; each model's own limit (from "
        "its input shapes, inference_max_rows rows) is usually lower.",
    )
    inference_max_rows: int = Field(
        default=64,
        ge=1,
        description="For a model's request size limit: the most rows (first dimension) one "
        "request may carry when the model's batch dimension is dynamic.",
    )
    inference_max_dynamic: int = Field(
        default=4096,
        ge=1,
        description="For a model's request size limit: the largest size a dynamic dimension "
        "other than the batch (e.g. sequence length) may take.",
    )
    inference_large_in_flight: int = Field(
        default=2,
        ge=1,
        description="Requests over 1 MiB served at once; more wait, so memory stays bounded.",
    )
    inference_token: SecretStr | None = Field(
        default=None,
        description="Bearer token inference calls must carry (unset: none). Prefer "
        "inference_token_file.",
    )
    inference_token_file: Path | None = Field(
        default=None, description="A file holding inference_token."
    )
    inference_cert_file: Path | None = Field(
        default=None, description="TLS certificate of the inference port (with inference_key_file)."
    )
    inference_key_file: Path | None = Field(default=None, description="Its private key.")
    spool_budget_bytes: int = Field(
        default=512 << 20,
        ge=0,
        description="Most disk the spool of captures and telemetry may take (0: no limit); "
        "past it, the oldest unsynced captures are evicted (counted and reported), never "
        "telemetry.",
    )
    telemetry_interval_s: float = Field(
        default=60.0, gt=0, description="Length of a telemetry window (counts, latency, inputs)."
    )
    input_stats_per_second: int = Field(
        default=20,
        ge=0,
        description="Requests a second per model version whose inputs are summarised into "
        "telemetry (statistics per channel or feature); bounds their cost on the request path.",
    )
    capture_max_row_bytes: int = Field(
        default=4 << 20,
        gt=0,
        description="A request larger than this (inputs and outputs) is not captured, unless "
        "the model's capture policy sets its own limit.",
    )
    sync_interval_s: float = Field(
        default=10.0, gt=0, description="Send what the spool holds this often (and at start)."
    )
    upload_bytes_per_s: int = Field(
        default=0,
        ge=0,
        description="Cap on sync upload bandwidth in bytes per second (0: no cap); telemetry "
        "goes before captures.",
    )
    rpc_timeout_s: float = Field(
        default=15.0, gt=0, description="Deadline of unary calls to the cloud."
    )
    chunk_timeout_s: float = Field(
        default=120.0, gt=0, description="Deadline of one chunk download stream."
    )
    max_download_bytes_per_s: int = Field(
        default=0,
        ge=0,
        description="Cap on artifact download bandwidth in bytes per second (0: no cap); "
        "keeps an update from saturating a site's link.",
    )
    stop_grace_s: float = Field(
        default=5.0, ge=0, description="Grace period for in-flight requests at shutdown."
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the Prometheus /metrics port binds: loopback by default; another "
        "address lets anyone who reaches it read model names, versions and rates.",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint (plain HTTP); unset: off; 0 "
        "picks a free one.",
    )

    mqtt: MqttSettings = Field(
        default_factory=lambda: MqttSettings(),
        description="Desired-state notices over the broker the cloud names at enrollment.",
    )

    @field_validator("cloud")
    @classmethod
    def _check_cloud(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"cloud must be host:port, e.g. 127.0.0.1:50051 (got {value!r})")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _parse_labels(cls, value: Any) -> Any:
        # EDGEFLEET_AGENT_LABELS=site=a,hw=pi reads naturally on a device; JSON also works.
        if isinstance(value, str):
            if value.lstrip().startswith("{"):
                return json.loads(value)
            return parse_labels([v for v in value.split(",") if v.strip()])
        return value

    @field_validator("root_key")
    @classmethod
    def _check_root_key(cls, value: str) -> str:
        if value:
            from edgefleet.core.trust import parse_fingerprint

            try:
                return parse_fingerprint(value)
            except InvalidArgument as err:
                raise ValueError(err.message) from None
        return value

    @model_validator(mode="after")
    def _check_pairs(self) -> AgentSettings:
        if (self.inference_cert_file is None) != (self.inference_key_file is None):
            raise ValueError("inference TLS needs both inference_cert_file and inference_key_file")
        if self.insecure and self.ca_file is not None:
            raise ValueError("insecure and ca_file contradict each other: set one")
        return self

    @property
    def db_path(self) -> Path:
        return self.data_dir / "agent.db"

    def enroll_secret(self) -> str:
        """The enrollment token, from the setting or its file ("" when neither is set)."""
        return self._secret(self.enroll_token, self.enroll_token_file, "the enroll token")

    def inference_secret(self) -> str:
        return self._secret(self.inference_token, self.inference_token_file, "the inference token")

    @staticmethod
    def _secret(value: SecretStr | None, path: Path | None, what: str) -> str:
        try:
            return secret_value(value, path, what)
        except InvalidArgument as err:
            raise SettingsError(err.message) from None

    def cloud_security(self) -> ClientSecurity:
        security = ClientSecurity(ca_file=self.ca_file, insecure=self.insecure)
        security.check("the agent")
        return security


def parse_labels(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`k=v` strings as a dict; a malformed one says how to write it."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"label {item!r} is not key=value, e.g. --label site=plant-1")
        labels[key.strip()] = value.strip()
    return labels


def load(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from the config file (if any), the environment and `overrides` (CLI flags).

    Overrides that are None are ignored, so CLI options left unset fall through.
    """
    try:
        return AgentSettings.from_sources(config_file, **overrides)
    except InvalidArgument as err:
        raise SettingsError(err.message) from None
