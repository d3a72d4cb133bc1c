"""Desired-state notices over the cloud's MQTT broker, beside the gRPC watch.

The device subscribes, in a persistent session, to `edgefleet/v1/devices/{id}/desired`,
where the cloud keeps the device's signed desired state retained. A message is verified
(the trusted root key's signature, this device's id, not expired) and then only wakes the
reconciler, which fetches and verifies the state over gRPC itself: a notice is a hint, and
the broker is trusted with nothing. Verifying first keeps a broker, or a device with a
mistaken ACL, from making this one fetch on command or log generations that do not exist.

On connecting, the device says it is online on `.../status` (retained); its last will, sent
by the broker when the link dies without a goodbye, says offline. Losing the broker changes
nothing for convergence: the gRPC watch and the periodic re-check go on, paho reconnects
with backoff, and the retained notice delivered on re-subscribing heals whatever was missed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.reconciler import Reconciler
from agent.settings import AgentSettings
from agent.state import StateStore
from edgefleet.core.errors import InvalidArgument
from edgefleet.core.fleet import MqttAccess
from edgefleet.core.mqtt import (
    OFFLINE,
    ONLINE,
    BrokerUrl,
    desired_topic,
    status_payload,
    status_topic,
    telemetry_topic,
)
from edgefleet.core.mqtt_client import make_client
from edgefleet.core.trust import SignedDesiredState, TrustError, accept_desired
from edgefleet.core.wire import from_proto
from protos.fleet.v1 import fleet_pb2

log = logging.getLogger(__name__)

QOS = 1
VIA = "MQTT"


class MqttNotices:
    """A background thread that follows the device's MQTT account (from enrollment, in the
    agent's state) and keeps one paho client connected with it."""

    def __init__(
        self,
        settings: AgentSettings,
        state: StateStore,
        reconciler: Reconciler,
        *,
        poll_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.state = state
        self.reconciler = reconciler
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefleet-mqtt", daemon=True)
        self._client: mqtt.Client | None = None
        self._access: MqttAccess | None = None
        self._device_id = ""
        self._said = ""
        # Counters, for logs and tests.
        self.notices = 0
        self.refused = 0
        self.connections = 0
        self.sessions_resumed = 0

    # lifecycle ----------------------------------------------------------------------------
    def start(self) -> MqttNotices:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Say offline (retained), disconnect cleanly (no last will), stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._close(goodbye=True)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish_telemetry(self, payload: bytes) -> bool:
        """Send a telemetry message on this device's own telemetry topic (QoS 1); False
        when not connected (the gRPC sync carries telemetry regardless)."""
        client = self._client
        if client is None or not self._connected.is_set():
            return False
        info = client.publish(telemetry_topic(self._device_id), payload, qos=QOS)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _say(self, message: str, *args: object, level: int = logging.INFO) -> None:
        """Log a state change once, not once per retry."""
        text = message % args if args else message
        if text != self._said:
            self._said = text
            log.log(level, "%s", text)

    # the account --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                identity = self.state.identity()
                access = identity.mqtt if identity is not None else None
                if access != self._access:
                    self._close(goodbye=False)
                    self._access = access
                    if access is not None and identity is not None:
                        self._open(identity.device_id, access)
            except Exception:
                log.exception("MQTT notices failed; the gRPC watch carries notices")
            self._stop.wait(self._poll_s)

    def _broker(self, access: MqttAccess) -> BrokerUrl | None:
        mqtt_settings = self.settings.mqtt
        try:
            broker = BrokerUrl.parse(mqtt_settings.url or access.url)
        except InvalidArgument as err:
            self._say("not using MQTT: %s", err.message, level=logging.WARNING)
            return None
        if not broker.tls and not (mqtt_settings.insecure or self.settings.insecure):
            self._say(
                "not using the cloud's plain-text MQTT broker %s: this device's broker password "
                "would cross the network unencrypted (set mqtt.insecure to allow it); notices "
                "come over the gRPC watch",
                broker,
                level=logging.WARNING,
            )
            return None
        if broker.tls and (mqtt_settings.ca_file or self.settings.ca_file) is None:
            self._say(
                "not using the MQTT broker %s: TLS needs the CA that signed its certificate "
                "(mqtt.ca_file, or ca_file); notices come over the gRPC watch",
                broker,
                level=logging.WARNING,
            )
            return None
        return broker

    def _open(self, device_id: str, access: MqttAccess) -> None:
        broker = self._broker(access)
        if broker is None:
            return
        s = self.settings.mqtt
        client = make_client(
            broker,
            access.username,
            access.username,
            access.password,
            ca_file=s.ca_file or self.settings.ca_file,
            reconnect_max_s=s.reconnect_max_s,
        )
        # Sent by the broker when the link dies without a goodbye: a crash, a power cut.
        client.will_set(status_topic(device_id), status_payload(OFFLINE), qos=QOS, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = s.session_expiry_s
        self._device_id = device_id
        self._client = client
        # Asynchronous: a broker that is down delays nothing; paho retries with backoff.
        client.connect_async(
            broker.host,
            broker.port,
            keepalive=s.keepalive_s,
            clean_start=False,
            properties=properties,
        )
        client.loop_start()
        self._say("reaching the MQTT broker %s as %s", broker, access.username)

    def _close(self, *, goodbye: bool) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if goodbye and self._connected.is_set():
            info = client.publish(
                status_topic(self._device_id), status_payload(OFFLINE), qos=QOS, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        self._connected.clear()
        client.disconnect()
        client.loop_stop()

    # paho callbacks (its network thread) --------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            self._say(
                "the MQTT broker refused this device (%s): notices come over the gRPC watch; "
                "retrying (a device enrolled a moment ago counts once the cloud has rewritten "
                "the broker's password file)",
                reason,
                level=logging.WARNING,
            )
            return
        # Every (re)subscription delivers the retained notice: what was missed while away.
        client.subscribe(desired_topic(self._device_id), options=SubscribeOptions(qos=QOS))
        client.publish(status_topic(self._device_id), status_payload(ONLINE), qos=QOS, retain=True)
        self.connections += 1
        self.sessions_resumed += int(flags.session_present)
        self._connected.set()
        self._say(
            "MQTT connected (session %s): desired-state notices come over MQTT and the gRPC watch",
            "resumed" if flags.session_present else "new",
        )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._say(
            "cannot reach the MQTT broker: notices come over the gRPC watch; retrying",
            level=logging.WARNING,
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stop.is_set():
            self._say(
                "lost the MQTT broker (%s): notices come over the gRPC watch; reconnecting",
                reason,
                level=logging.WARNING,
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return  # a cleared retained message
        try:
            self._notice(bytes(message.payload))
        except Exception:
            log.exception("an MQTT notice could not be handled")

    def _notice(self, payload: bytes) -> None:
        identity = self.state.identity()
        keys = self.state.root_keys()
        if identity is None or not keys:
            return  # the reconciler establishes trust first
        message = fleet_pb2.SignedDesiredState()
        try:
            message.ParseFromString(payload)
        except Exception:
            self.refused += 1
            log.warning("refused an MQTT notice: it is no signed desired state")
            return
        signed = from_proto(message, SignedDesiredState)
        current = keys[-1]
        if signed.key_id != current.key_id:
            # Perhaps a rotated root key: the reconciler follows the signed chain over gRPC.
            log.info("an MQTT notice is signed by a key not trusted yet; re-checking over gRPC")
            self.reconciler.wake()
            return
        try:
            # Generation 0: any generation passes here; the reconciler refuses old ones.
            desired = accept_desired(
                signed,
                current,
                identity.device_id,
                0,
                0.0,
                clock_skew_s=self.settings.clock_skew_s,
            )
        except TrustError as err:
            self.refused += 1
            log.warning("refused an MQTT notice: %s", err.message)
            return
        self.notices += 1
        self.reconciler.notice(desired.generation, via=VIA)
