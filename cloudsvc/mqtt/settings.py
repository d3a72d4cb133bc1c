"""`[mqtt]` of the cloud's settings (EDGEFLEET_CLOUD_MQTT__URL=...): off while `url` is empty."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgefleet.core.errors import InvalidArgument
from edgefleet.core.mqtt import DEFAULT_CLOUD_USERNAME, BrokerUrl, check_username


class MqttSettings(BaseModel):
    """The MQTT broker that carries desired-state notices: `[mqtt]` in the TOML file. With
    no url, devices follow the gRPC watch alone (what an unconfigured cloud does)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(
        "",
        description="The broker as the cloud reaches it: mqtts://HOST[:8883] (TLS, verified "
        "with ca_file) or mqtt://HOST[:1883] (plain text: needs insecure). Empty: no MQTT.",
    )
    device_url: str = Field(
        "",
        description="The broker as devices reach it, given to them at enrollment; empty: url.",
    )
    username: str = Field(
        DEFAULT_CLOUD_USERNAME,
        description="The cloud's own account on the broker; it starts with '_', which no "
        "device id can, so no device is ever given the cloud's name.",
    )
    password_file: Path | None = Field(
        None,
        description="A file holding the cloud's broker password; unset: one is made once and "
        "kept in data_dir/mqtt/cloud-password.",
    )
    ca_file: Path | None = Field(
        None,
        description="The CA bundle that verifies the broker's certificate; unset: the cloud's "
        "own CA (tls.ca_file, or data_dir/tls/ca.pem), which devices are provisioned with.",
    )
    insecure: bool = Field(
        False,
        description="Allow a plain-text mqtt:// broker: passwords and notices then cross the "
        "network unencrypted (notices stay signed). Trusted loopback or lab networks only.",
    )
    broker_password_file: Path | None = Field(
        None,
        description="Where the broker's password_file is written (hashes only, Mosquitto's "
        "format); unset: data_dir/mqtt/passwd.",
    )
    broker_acl_file: Path | None = Field(
        None,
        description="Where the broker's acl_file is written; unset: data_dir/mqtt/acl.",
    )
    broker_pid_file: Path | None = Field(
        None,
        description="The broker's pid_file: after rewriting its files the cloud sends it "
        "SIGHUP, so an enrolled or revoked device counts at once (unset: reload it yourself).",
    )
    republish_s: float = Field(
        3600.0,
        gt=0,
        description="Publish every device's notice again this often, freshly signed: retained "
        "notices must not outlive desired_state_ttl_s.",
    )
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive of the cloud.")
    reconnect_max_s: int = Field(
        30, ge=1, description="Longest wait between the cloud's attempts to reach the broker."
    )

    @field_validator("url", "device_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value:
            try:
                return str(BrokerUrl.parse(value))
            except InvalidArgument as err:
                raise ValueError(err.message) from None
        return value

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str) -> str:
        try:
            check_username(value, "the cloud's MQTT username")
        except InvalidArgument as err:
            raise ValueError(err.message) from None
        if not value.startswith("_"):
            raise ValueError(
                f"the cloud's MQTT username {value!r} must start with '_', which no device id "
                "can: otherwise a device could enroll under the cloud's name"
            )
        return value

    @model_validator(mode="after")
    def _check_plain(self) -> MqttSettings:
        for name in ("url", "device_url"):
            value = getattr(self, name)
            if value and not BrokerUrl.parse(value).tls and not self.insecure:
                raise ValueError(
                    f"mqtt.{name} {value} is plain text: its passwords and notices would cross "
                    "the network unencrypted; use mqtts:// or set mqtt.insecure = true"
                )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def broker(self) -> BrokerUrl:
        return BrokerUrl.parse(self.url)

    @property
    def devices_broker(self) -> str:
        """The URL devices are given at enrollment."""
        return self.device_url or self.url
