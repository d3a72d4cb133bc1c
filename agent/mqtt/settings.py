"""`[mqtt]` of the agent's settings (EDGEFLEET_AGENT_MQTT__ENABLED=false, ...). The broker and
the device's account come from enrollment; these only say how to use them."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.core.errors import InvalidArgument
from edgefleet.core.mqtt import BrokerUrl


class MqttSettings(BaseModel):
    """Desired-state notices over the cloud's MQTT broker, beside the gRPC watch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="Subscribe to notices on the broker the cloud named at enrollment (the "
        "gRPC watch and the periodic re-check run either way).",
    )
    url: str = Field(
        "",
        description="Reach the broker here instead of where the cloud said (another route "
        "from this site); mqtts://HOST[:PORT] or mqtt://HOST[:PORT].",
    )
    ca_file: Path | None = Field(
        None,
        description="The CA bundle that verifies the broker's certificate; unset: ca_file, "
        "the cloud's CA this device is provisioned with.",
    )
    insecure: bool = Field(
        False,
        description="Use a plain-text mqtt:// broker: this device's broker password would "
        "cross the network unencrypted (notices stay signed). Without it (or the agent's own "
        "insecure) such a broker is not used and notices come over the gRPC watch.",
    )
    keepalive_s: int = Field(
        30, ge=5, le=3600, description="MQTT keep-alive: a dead link shows within ~1.5x this."
    )
    session_expiry_s: int = Field(
        7 * 86_400,
        ge=0,
        description="How long the broker keeps this device's session (its subscription and "
        "notices queued for it) while it is away.",
    )
    reconnect_max_s: int = Field(
        30, ge=1, description="Longest wait between attempts to reach the broker."
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value:
            try:
                return str(BrokerUrl.parse(value))
            except InvalidArgument as err:
                raise ValueError(err.message) from None
        return value
