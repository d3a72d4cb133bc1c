"""MQTT, the second transport for desired-state notices: topic names, broker addresses,
status payloads and the password hashes the broker checks (paho-free: the cloud, the agent
and the CLI import it).

The cloud publishes each device's signed desired state, retained with QoS 1, on
`edgefleet/v1/devices/{id}/desired`; the device subscribes to that topic alone, and writes
only its own `.../status` (retained, with a last will that says offline) and
`.../telemetry`. The payload is signed, so the broker is not trusted with what a device
runs: a notice only tells the agent to fetch and verify its desired state over gRPC. Bulk
bytes (artifacts, captures) never go through the broker.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

from edgefleet.core.errors import InvalidArgument

TOPIC_ROOT = "edgefleet/v1/devices"
DESIRED, STATUS, TELEMETRY = "desired", "status", "telemetry"
# What a device's status says.
ONLINE, OFFLINE = "online", "offline"
# Device ids are 1-63 of [A-Za-z0-9._-] starting with a letter or digit: never "_...". The
# cloud's account starts with "_", so no device can ever be given the cloud's name.
DEFAULT_CLOUD_USERNAME = "_edgefleet-cloud"
_USERNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$")
# Mosquitto's own hash ("$7$": PBKDF2-SHA512), as mosquitto_passwd 2.0 writes it: 12 bytes
# of salt, 101 iterations. The passwords hashed here are 256 random bits, which no number of
# iterations makes any harder to guess; the hash only keeps the file free of secrets.
HASH_ITERATIONS = 101
_HASH = re.compile(r"^\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")
SCHEMES = {"mqtts": 8883, "mqtt": 1883}


def topic(device_id: str, kind: str) -> str:
    """`edgefleet/v1/devices/{device_id}/{kind}` (kind: desired, status or telemetry)."""
    return f"{TOPIC_ROOT}/{device_id}/{kind}"


def desired_topic(device_id: str) -> str:
    return topic(device_id, DESIRED)


def status_topic(device_id: str) -> str:
    return topic(device_id, STATUS)


def telemetry_topic(device_id: str) -> str:
    return topic(device_id, TELEMETRY)


def every_device(kind: str) -> str:
    """The filter matching `kind` of every device (`edgefleet/v1/devices/+/status`)."""
    return topic("+", kind)


def parse_topic(name: str) -> tuple[str, str] | None:
    """(device id, kind) of one of the fleet's topics; None for any other topic."""
    root, _, rest = name.rpartition("/")
    prefix, _, device_id = root.rpartition("/")
    if prefix != TOPIC_ROOT or not device_id or rest not in (DESIRED, STATUS, TELEMETRY):
        return None
    return device_id, rest


def check_username(name: str, what: str = "an MQTT username") -> str:
    if not _USERNAME.match(name):
        raise InvalidArgument(
            f"{name[:80]!r} is not usable as {what}: 1-63 letters, digits, '.', '_' or '-'"
        )
    return name


@dataclass(frozen=True)
class BrokerUrl:
    """Where a broker listens: mqtts://host:port (TLS) or mqtt://host:port (plain text)."""

    tls: bool
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> BrokerUrl:
        scheme, sep, rest = text.strip().partition("://")
        if not sep or scheme.lower() not in SCHEMES:
            raise InvalidArgument(
                f"broker URL {text[:120]!r} must be mqtts://HOST[:PORT] (TLS, port 8883 by "
                "default) or mqtt://HOST[:PORT] (plain text, 1883)"
            )
        if "@" in rest or "/" in rest.rstrip("/") or "?" in rest:
            raise InvalidArgument(
                f"broker URL {text[:120]!r} must be only scheme, host and port: credentials "
                "never go in a URL (devices get theirs at enrollment)"
            )
        rest = rest.rstrip("/")
        host, port = rest, str(SCHEMES[scheme.lower()])
        if rest.startswith("["):  # [IPv6]:port
            end = rest.find("]")
            host, tail = rest[1:end], rest[end + 1 :]
            if tail:
                if not tail.startswith(":"):
                    raise InvalidArgument(f"broker URL {text[:120]!r}: cannot read the port")
                port = tail[1:]
        elif ":" in rest:
            host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"broker URL {text[:120]!r}: needs a host and a port 1-65535")
        return cls(scheme.lower() == "mqtts", host, int(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


# passwords -------------------------------------------------------------------------------


def new_password() -> str:
    """A device's (or the cloud's) MQTT password: 256 random bits."""
    return f"mqtt_{secrets.token_urlsafe(32)}"


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = HASH_ITERATIONS
) -> str:
    """The password as a line of Mosquitto's password file keeps it: `$7$iterations$salt$hash`
    (PBKDF2-SHA512, base64), which Mosquitto 2.0 checks and mosquitto_passwd writes."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """Whether `password` is the one `hashed` (a `$7$` hash) was made from."""
    found = _HASH.match(hashed)
    if found is None:
        return False
    iterations, salt, digest = found.groups()
    try:
        salt_bytes = base64.b64decode(salt, validate=True)
        expected = base64.b64decode(digest, validate=True)
    except ValueError:
        return False
    actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt_bytes, int(iterations), 64)
    return hmac.compare_digest(actual, expected)


# status ----------------------------------------------------------------------------------


def status_payload(state: str, **details: object) -> bytes:
    """A device's status message: JSON with `state` (online or offline) and `at` (unix s)."""
    return json.dumps({"state": state, "at": round(time.time(), 3), **details}).encode()


def parse_status(payload: bytes) -> str | None:
    """The `state` of a status message; None for an empty (cleared) or malformed one."""
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    state = value.get("state") if isinstance(value, dict) else None
    return state if state in (ONLINE, OFFLINE) else None
