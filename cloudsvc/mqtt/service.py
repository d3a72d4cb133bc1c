"""MQTT for one cloud, wired together: device accounts issued at enrollment, the broker's
files kept in step, and the notifier. Built by CloudServer when `[mqtt] url` is set."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from cloudsvc.errors import CloudError
from cloudsvc.mqtt.broker_files import BrokerFiles
from cloudsvc.mqtt.credentials import MqttCredentials
from cloudsvc.signing import write_private
from edgefleet.core.auth import read_secret
from edgefleet.core.errors import InvalidArgument
from edgefleet.core.fleet import MqttAccess
from edgefleet.core.mqtt import new_password

if TYPE_CHECKING:
    from cloudsvc.fleet import Fleet
    from cloudsvc.mqtt.notifier import MqttNotifier
    from cloudsvc.settings import CloudSettings

log = logging.getLogger(__name__)


def mqtt_dir(settings: CloudSettings) -> Path:
    return settings.data_dir / "mqtt"


def credentials_path(settings: CloudSettings) -> Path | None:
    """Where device accounts are kept; None (memory) with the memory metadata backend."""
    if settings.metadata_backend == "memory":
        return None
    return mqtt_dir(settings) / "credentials.db"


def broker_paths(settings: CloudSettings) -> tuple[Path, Path]:
    """(password file, ACL file) the broker reads."""
    mqtt = settings.mqtt
    folder = mqtt_dir(settings)
    return (
        mqtt.broker_password_file or folder / "passwd",
        mqtt.broker_acl_file or folder / "acl",
    )


def cloud_password(settings: CloudSettings) -> str:
    """The cloud's own broker password: from mqtt.password_file, or made once and kept in
    data_dir/mqtt/cloud-password (0600)."""
    if settings.mqtt.password_file is not None:
        try:
            return read_secret(settings.mqtt.password_file, "the cloud's MQTT password")
        except InvalidArgument as err:
            raise CloudError(err.message) from None
    path = mqtt_dir(settings) / "cloud-password"
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    value = new_password()
    write_private(path, value.encode() + b"\n")
    return value


def broker_files(settings: CloudSettings) -> BrokerFiles:
    password_file, acl_file = broker_paths(settings)
    return BrokerFiles(
        password_file,
        acl_file,
        settings.mqtt.username,
        cloud_password(settings),
        settings.mqtt.broker_pid_file,
    )


class BrokerAccounts:
    """Device accounts: issued at enrollment, written to the broker's files for the devices
    that are enrolled and not revoked."""

    def __init__(self, credentials: MqttCredentials, files: BrokerFiles, url: str) -> None:
        self.credentials = credentials
        self.files = files
        self.url = url
        self._version = 0
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self._version

    def issue(self, device_id: str) -> MqttAccess | None:
        """A new account for an enrolling device; None (logged) if it cannot be stored: the
        device then enrolls without one and follows the gRPC watch until it re-enrolls."""
        try:
            access = self.credentials.issue(device_id, self.url)
        except sqlite3.Error as err:
            log.error("no MQTT account for device %s (it uses the gRPC watch): %s", device_id, err)
            return None
        with self._lock:
            self._version += 1
        return access

    def sync(self, live: set[str]) -> None:
        hashes = {d: h for d, h in self.credentials.hashes().items() if d in live}
        try:
            written = self.files.write(hashes)
        except OSError as err:
            # Notices go on; the broker keeps the accounts it had until the files can be written.
            log.error(
                "cannot write the MQTT broker's files (%s, %s): %s; devices enrolled since "
                "cannot reach the broker and follow the gRPC watch",
                self.files.password_file,
                self.files.acl_file,
                err,
            )
            return
        if written:
            log.info(
                "wrote the MQTT broker's password and ACL files (%d devices): %s, %s",
                len(hashes),
                self.files.password_file,
                self.files.acl_file,
            )


class CloudMqtt:
    """Issues device accounts through `fleet.mqtt_issuer` and publishes notices."""

    def __init__(self, settings: CloudSettings, fleet: Fleet, cloud_ca: Path | None) -> None:
        mqtt = settings.mqtt
        if mqtt.republish_s * 2 > settings.desired_state_ttl_s:
            raise CloudError(
                f"mqtt.republish_s ({mqtt.republish_s:g}) must be at most half of "
                f"desired_state_ttl_s ({settings.desired_state_ttl_s:g}): retained notices "
                "would expire before they are published again"
            )
        ca_file = mqtt.ca_file or cloud_ca
        if mqtt.broker.tls and ca_file is None:
            raise CloudError(
                f"the broker {mqtt.url} is reached over TLS, which needs the CA that signed its "
                "certificate: set mqtt.ca_file (the cloud's own CA is used when it serves TLS)"
            )
        from cloudsvc.mqtt.notifier import MqttNotifier  # paho, only when MQTT is on

        self.settings = mqtt
        self.credentials = MqttCredentials(credentials_path(settings))
        self.accounts = BrokerAccounts(
            self.credentials, broker_files(settings), mqtt.devices_broker
        )
        self.notifier: MqttNotifier = MqttNotifier(
            fleet, mqtt, self.accounts.files.cloud_password, ca_file, accounts=self.accounts
        )
        fleet.mqtt_issuer = self.accounts.issue
        self.fleet = fleet
        # Written at once, so a broker started before the cloud serves finds its files.
        self.accounts.sync(self.live_devices())

    def live_devices(self) -> set[str]:
        return {d.device_id for d in self.fleet.metadata.list_devices() if not d.revoked}

    def start(self) -> CloudMqtt:
        self.notifier.start()
        log.info(
            "MQTT notices on %s (devices are told %s); broker files: %s, %s",
            self.settings.url,
            self.settings.devices_broker,
            self.accounts.files.password_file,
            self.accounts.files.acl_file,
        )
        return self

    def stop(self) -> None:
        self.notifier.stop()
        self.credentials.close()
