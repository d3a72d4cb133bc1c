"""Devices' MQTT accounts: a password made at each enrollment, handed to the device once and
kept here only as the hash Mosquitto's password file holds (`$7$`, PBKDF2-SHA512).

A small SQLite file of its own (data_dir/mqtt/credentials.db, 0600) so the broker's files
can be rebuilt from it at any time (`edgefleet mqtt acl`); in memory with the memory
metadata backend. Safe to use from many threads.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from cloudsvc.errors import CloudError
from edgefleet.core.fleet import MqttAccess
from edgefleet.core.mqtt import hash_password, new_password

_SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    device_id TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    issued_at REAL NOT NULL
)
"""


class MqttCredentials:
    """Per-device MQTT password hashes; the username is the device id."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            if path is None:
                self._db = sqlite3.connect(":memory:", check_same_thread=False)
            else:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
                path.chmod(0o600)
                self._db = sqlite3.connect(path, check_same_thread=False, timeout=10)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as err:
            raise CloudError(
                f"cannot open the MQTT credentials {path}: {err}; move it aside and re-enroll "
                "devices (or run without [mqtt]: devices follow the gRPC watch)"
            ) from None

    def issue(self, device_id: str, url: str) -> MqttAccess:
        """A new password for the device (any earlier one stops working once the broker's
        files are rewritten); only its hash is kept."""
        password = new_password()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO credentials (device_id, password_hash, issued_at) "
                "VALUES (?, ?, ?)",
                (device_id, hash_password(password), time.time()),
            )
            self._db.commit()
        return MqttAccess(url=url, username=device_id, password=password)

    def hashes(self) -> dict[str, str]:
        """Device id -> password hash, for every device ever issued one."""
        with self._lock:
            rows = self._db.execute("SELECT device_id, password_hash FROM credentials").fetchall()
        return {str(d): str(h) for d, h in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
