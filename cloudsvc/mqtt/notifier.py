"""The cloud's MQTT client: publishes each device's signed desired state, retained with QoS 1,
whenever its generation moves, and again periodically and after every (re)connection, so the
retained message a device finds when it (re)subscribes is always current and unexpired.

It learns of changes the way the gRPC watch does: every path that moves a device's
generation (deploy, rollback, label, enroll, capture policies) wakes `Fleet.changed`, and
the notifier then compares each device's generation with the one it last published. A path
added later is covered without calling anything new. The same pass keeps the broker's
password and ACL files in step with enrolled and revoked devices.

The broker is not trusted with what devices run: the payload is the SignedDesiredState the
agent verifies, and an agent treats it only as a notice to fetch its state over gRPC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from cloudsvc.fleet import Fleet
from cloudsvc.mqtt.settings import MqttSettings
from edgefleet.core.fleet import DesiredState
from edgefleet.core.mqtt import (
    STATUS,
    desired_topic,
    every_device,
    parse_status,
    parse_topic,
)
from edgefleet.core.mqtt_client import make_client
from edgefleet.core.wire import to_proto
from protos.fleet.v1 import fleet_pb2

log = logging.getLogger(__name__)

QOS = 1


class Accounts(Protocol):
    """The broker's accounts (its password and ACL files), kept in step by the notifier."""

    @property
    def version(self) -> int:
        """Moves on whenever a device's credential changes."""
        ...

    def sync(self, live: set[str]) -> None:
        """Give exactly these devices (enrolled, not revoked) their accounts."""
        ...


class MqttNotifier:
    """Publishes notices from a background thread until `stop()`; survives the broker's
    absence (paho reconnects with backoff; a full pass follows every connection)."""

    def __init__(
        self,
        fleet: Fleet,
        settings: MqttSettings,
        password: str,
        ca_file: Path | None,
        *,
        accounts: Accounts | None = None,
    ) -> None:
        self.fleet = fleet
        self.settings = settings
        self._accounts = accounts
        broker = settings.broker
        self._client = make_client(
            broker,
            settings.username,
            settings.username,
            password,
            ca_file=ca_file,
            reconnect_max_s=settings.reconnect_max_s,
        )
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._stop = threading.Event()
        self._resync = True
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefleet-mqtt", daemon=True)
        self._published: dict[str, int] = {}
        self._key_version = 0
        self._refresh_at = 0.0
        self._last_refusal = ""
        self._status: dict[str, str] = {}
        self._status_lock = threading.Lock()
        # Counters, for logs and tests.
        self.notices_published = 0
        self.passes = 0

    # lifecycle ----------------------------------------------------------------------------
    def start(self) -> MqttNotifier:
        broker = self.settings.broker
        # Asynchronous: a broker that is down at start delays nothing; paho keeps trying.
        self._client.connect_async(
            broker.host, broker.port, keepalive=self.settings.keepalive_s, clean_start=True
        )
        self._client.loop_start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if not self._thread.is_alive():
            return  # never started
        self.fleet.wake()
        self._thread.join(timeout=10)
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def device_status(self, device_id: str) -> str | None:
        """What the device last said on MQTT (online, or offline by its last will)."""
        with self._status_lock:
            return self._status.get(device_id)

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
            message = str(reason)
            if message != self._last_refusal:
                log.warning(
                    "the MQTT broker %s refused the cloud's account %r: %s; devices follow "
                    "the gRPC watch meanwhile (check mqtt.username, mqtt.password_file and "
                    "that the broker reads the cloud's password file)",
                    self.settings.url,
                    self.settings.username,
                    message,
                )
            self._last_refusal = message
            return
        self._last_refusal = ""
        log.info("connected to the MQTT broker %s", self.settings.url)
        client.subscribe(every_device(STATUS), qos=QOS)
        self._connected.set()
        # Whatever was retained may be gone (a broker restarted without persistence) or
        # stale: publish every notice again.
        with self.fleet.changed:
            self._resync = True
            self.fleet.changed.notify_all()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if self._last_refusal != "unreachable":
            log.warning(
                "cannot reach the MQTT broker %s; devices follow the gRPC watch meanwhile; "
                "retrying",
                self.settings.url,
            )
        self._last_refusal = "unreachable"

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
            log.warning(
                "lost the MQTT broker %s (%s); devices follow the gRPC watch meanwhile; "
                "reconnecting",
                self.settings.url,
                reason,
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        found = parse_topic(message.topic)
        if found is None or found[1] != STATUS:
            return
        device_id = found[0]
        state = parse_status(bytes(message.payload))  # None: a cleared message
        with self._status_lock:
            before = self._status.get(device_id)
            if state is None:
                self._status.pop(device_id, None)
            else:
                self._status[device_id] = state
        if state is not None and state != before:
            log.info("device %s is %s on MQTT", device_id, state)

    # the publishing loop ------------------------------------------------------------------
    def _snapshot(self) -> dict[str, DesiredState]:
        """Desired state of every enrolled, unrevoked device. Called holding `Fleet.changed`,
        as gRPC watchers read theirs: a change made after it wakes the wait that follows."""
        store = self.fleet.metadata
        return {
            d.device_id: store.get_desired(d.device_id)
            for d in store.list_devices()
            if not d.revoked
        }

    def _run(self) -> None:
        changed = self.fleet.changed
        synced: tuple[frozenset[str], int] | None = None
        while not self._stop.is_set():
            try:
                with changed:
                    if self._stop.is_set() or self.fleet.closed:
                        return
                    live = self._snapshot()
                    accounts = (
                        (frozenset(live), self._accounts.version)
                        if self._accounts is not None
                        else None
                    )
                    connected = self._connected.is_set()
                    key_version = self.fleet.keys.current.version
                    due = connected and (
                        self._resync
                        or time.monotonic() >= self._refresh_at
                        or key_version != self._key_version
                    )
                    moved = {
                        d: s for d, s in live.items() if self._published.get(d) != s.generation
                    }
                    gone = set(self._published) - set(live)
                    publish = connected and bool(moved or gone)
                    if not (due or publish or accounts != synced):
                        # Disconnected, the next connection wakes this (and publishes all).
                        wait = self._refresh_at - time.monotonic() if connected else 30.0
                        changed.wait(max(0.05, wait))
                        continue
                    if due:
                        self._resync = False
                self.passes += 1
                if self._accounts is not None and accounts != synced:
                    self._accounts.sync(set(live))
                    synced = accounts
                if due:
                    self._full_pass(live, key_version)
                elif publish:
                    self._publish(moved, gone)
            except Exception:
                log.exception("publishing desired-state notices failed; retrying")
                self._resync = True
                synced = None
                self._stop.wait(1.0)

    def _full_pass(self, live: Mapping[str, DesiredState], key_version: int) -> None:
        revoked = {d.device_id for d in self.fleet.metadata.list_devices() if d.revoked}
        if self._publish(dict(live), revoked | (set(self._published) - set(live))):
            self._key_version = key_version
            self._refresh_at = time.monotonic() + self.settings.republish_s
            log.debug("published every device's notice (%d devices)", len(live))

    def _publish(self, moved: Mapping[str, DesiredState], gone: set[str]) -> bool:
        """Publish these devices' notices and clear those of `gone` ones; False when the
        connection broke midway (a full pass follows the next connection)."""
        for device_id, desired in moved.items():
            signed = self.fleet.signed_desired_state(device_id, desired)
            payload = to_proto(signed, fleet_pb2.SignedDesiredState).SerializeToString()
            info = self._client.publish(desired_topic(device_id), payload, qos=QOS, retain=True)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self._resync = True
                return False
            self._published[device_id] = desired.generation
            self.notices_published += 1
        for device_id in gone:
            # An empty retained message clears it: a revoked device's notices go with it.
            self._client.publish(desired_topic(device_id), b"", qos=QOS, retain=True)
            self._published.pop(device_id, None)
        return True
