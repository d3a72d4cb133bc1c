"""A paho-mqtt client as edgefleet's processes use it: MQTT 5, VERSION2 callbacks, TLS
verified against a CA bundle (never unverified), reconnecting with backoff. Imports paho,
which the agent extra (and so the cloud's) installs."""

from __future__ import annotations

import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.core.mqtt import BrokerUrl


def make_client(
    broker: BrokerUrl,
    client_id: str,
    username: str,
    password: str,
    *,
    ca_file: Path | None,
    reconnect_max_s: int = 30,
    reconnect: bool = True,
) -> mqtt.Client:
    """A paho client for `broker`; with mqtts://, the broker's certificate must chain to
    `ca_file` and name the host dialled. With `reconnect`, its network loop reconnects
    after a failure, waiting 1 s, then twice as long each time, up to `reconnect_max_s`."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=reconnect,
    )
    client.username_pw_set(username, password)
    if broker.tls:
        client.tls_set(
            ca_certs=str(ca_file) if ca_file is not None else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    client.reconnect_delay_set(min_delay=1, max_delay=max(1, reconnect_max_s))
    return client
