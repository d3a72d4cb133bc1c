"""The broker's password file and access-control file, written by the cloud.

Mosquitto reads both (`password_file`, `acl_file` in mosquitto.conf) at start and again on
SIGHUP, when it also drops connected clients whose account is gone. Each device may read
only its own desired-state notices and write only its own status and telemetry; the cloud's
account writes notices and reads status and telemetry. Revoked devices have no account.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgefleet.core.mqtt import (
    DESIRED,
    STATUS,
    TELEMETRY,
    every_device,
    hash_password,
    topic,
)

log = logging.getLogger(__name__)

HEADER = (
    "# Written by edgefleet (`edgefleet mqtt acl`, and the cloud at every change): do not edit.\n"
)


def password_file_text(accounts: Mapping[str, str]) -> str:
    """Mosquitto's password file: `username:$7$...` per account, sorted."""
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(accounts.items()))


def acl_text(cloud_username: str, device_ids: list[str]) -> str:
    """Mosquitto's acl_file: the cloud's rights, then each device's own topics only."""
    lines = [
        HEADER.rstrip("\n"),
        "# Devices read only their own desired-state notices and write only their own status",
        "# and telemetry; the cloud writes notices and reads status and telemetry.",
        "",
        f"user {cloud_username}",
        f"topic write {every_device(DESIRED)}",
        f"topic read {every_device(STATUS)}",
        f"topic read {every_device(TELEMETRY)}",
    ]
    for device_id in sorted(device_ids):
        lines += [
            "",
            f"user {device_id}",
            f"topic read {topic(device_id, DESIRED)}",
            f"topic write {topic(device_id, STATUS)}",
            f"topic write {topic(device_id, TELEMETRY)}",
        ]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    """Whole or not at all: a broker reloading mid-write never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@dataclass
class BrokerFiles:
    """Keeps the broker's two files in step with the fleet; SIGHUPs the broker (when its
    pid file is known) after a change."""

    password_file: Path
    acl_file: Path
    cloud_username: str
    cloud_password: str
    pid_file: Path | None = None

    def __post_init__(self) -> None:
        # Hashed once: the salt is random, and an unchanged fleet must give unchanged files.
        self._cloud_hash = hash_password(self.cloud_password)
        self._written: tuple[str, str] | None = None

    def render(self, device_hashes: Mapping[str, str]) -> tuple[str, str]:
        """(password file, ACL file) for these devices (id -> hash); revoked ones left out
        by the caller."""
        accounts = {**device_hashes, self.cloud_username: self._cloud_hash}
        passwords = HEADER + password_file_text(accounts)
        return passwords, acl_text(self.cloud_username, list(device_hashes))

    def write(self, device_hashes: Mapping[str, str]) -> bool:
        """Write both files if they changed (True then) and tell the broker to reload."""
        rendered = self.render(device_hashes)
        if rendered == self._written and self.password_file.exists() and self.acl_file.exists():
            return False
        passwords, acl = rendered
        # Readable by the owner's group too, for a broker running as another user in it.
        _write(self.password_file, passwords, 0o640)
        _write(self.acl_file, acl, 0o640)
        self._written = rendered
        self.reload()
        return True

    def reload(self) -> None:
        if self.pid_file is None:
            return
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except FileNotFoundError:
            log.debug("no broker pid file %s: no broker runs to reload", self.pid_file)
        except (ValueError, OSError) as err:
            log.warning(
                "cannot tell the broker (pid file %s) to reload its password and ACL files: "
                "%s; reload it yourself (SIGHUP)",
                self.pid_file,
                err,
            )


def mosquitto_conf(
    *,
    port: int,
    password_file: Path,
    acl_file: Path,
    host: str = "",
    cafile: Path | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    persistence_dir: Path | None = None,
    pid_file: Path | None = None,
    user: str = "",
) -> str:
    """A mosquitto.conf (Mosquitto 2.0) for edgefleet: no anonymous clients, the accounts
    and ACL the cloud writes, client ids bound to usernames (so no device can take over
    another's session), TLS when a certificate is given. `user`: the account Mosquitto
    started as root runs as; it must read the cloud's files (the cloud's own user does)."""
    lines = [
        "# For edgefleet: accounts and access from the files the cloud writes.",
        *([f"user {user}"] if user else []),
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        f"listener {port}{f' {host}' if host else ''}",
        # A device's session is its own: nobody can connect under its client id. A
        # listener's option: set before any `listener` line, Mosquitto opens its default
        # listener (plain MQTT on port 1883, every interface) to hold it.
        "use_username_as_clientid true",
    ]
    if certfile is not None and keyfile is not None:
        lines += [
            *([f"cafile {cafile}"] if cafile is not None else []),
            f"certfile {certfile}",
            f"keyfile {keyfile}",
        ]
    if persistence_dir is not None:
        # Retained notices and devices' sessions survive a broker restart.
        lines += ["persistence true", f"persistence_location {persistence_dir}/"]
    if pid_file is not None:
        lines.append(f"pid_file {pid_file}")
    return "\n".join(lines) + "\n"
