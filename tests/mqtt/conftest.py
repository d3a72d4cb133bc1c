"""A real Mosquitto for the MQTT tests: started on a free port with its own config (the one
`edgefleet mqtt acl` recommends: no anonymous clients, the password and ACL files the cloud
writes, a TLS listener with the cloud's certificate from its own CA) and stopped by PID.
With it, a real cloud in this process and agents in this process or as processes."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from agent.cloud_link import GrpcCloudLink
from agent.daemon import Agent
from agent.settings import AgentSettings
from cloudsvc.mqtt.broker_files import mosquitto_conf
from cloudsvc.mqtt.notifier import MqttNotifier
from cloudsvc.server import CloudServer
from cloudsvc.settings import CloudSettings
from edgefleet.cli import cli
from edgefleet.client import AdminClient
from edgefleet.core.fleet import MqttAccess
from edgefleet.core.mqtt import BrokerUrl
from edgefleet.core.mqtt_client import make_client
from tests.agent.fakes import inline_golden, model_bytes

ENROLL_SECRET = "enroll-secret-for-mqtt-tests"


def find_mosquitto() -> str | None:
    # Debian installs it in /usr/sbin, which a user's PATH may lack.
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )


MOSQUITTO = find_mosquitto()


def require_mosquitto() -> str:
    if MOSQUITTO is None:
        pytest.skip("the mosquitto broker is not installed here (apt-get install mosquitto)")
    return MOSQUITTO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or check}")
        time.sleep(0.02)


@dataclass
class Broker:
    """One Mosquitto process with its own folder, config and port."""

    folder: Path
    port: int
    password_file: Path
    acl_file: Path
    tls_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.folder / "mosquitto.pid"

    @property
    def log_path(self) -> Path:
        return self.folder / "mosquitto.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> Broker:
        assert MOSQUITTO is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "data").mkdir(exist_ok=True)
        config = self.folder / "mosquitto.conf"
        config.write_text(
            mosquitto_conf(
                port=self.port,
                host="127.0.0.1",
                password_file=self.password_file,
                acl_file=self.acl_file,
                cafile=self.tls_dir / "ca.pem",
                certfile=self.tls_dir / "broker.pem",
                keyfile=self.tls_dir / "broker.key",
                persistence_dir=self.folder / "data",
                # Started as root, Mosquitto would switch to user `mosquitto`, who cannot
                # read the cloud's files; as anyone else it stays who it is.
                user=getpass.getuser(),
            )
            + "log_dest stderr\nlog_type all\n"
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [MOSQUITTO, "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        # Mosquitto writes a pid file only as a daemon; the cloud reads this one to SIGHUP it.
        self.pid_file.write_text(f"{self.process.pid}\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"mosquitto exited:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen on {self.port}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (it saves retained messages and sessions), SIGKILL after 10 s."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None
        self.pid_file.unlink(missing_ok=True)


class QuietWatchLink(GrpcCloudLink):
    """The real gRPC link, but its desired-state watch never announces anything (it just
    stays open): whatever tells the agent of a deploy, it is not the gRPC watch."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._quiet = threading.Event()

    def watch(self, known_generation: int) -> Iterator[int]:
        self._quiet.wait()
        yield from ()

    def cancel_watch(self) -> None:
        self._quiet.set()
        super().cancel_watch()


@dataclass
class Rig:
    """A real cloud (in this process, TLS, SQLite) with [mqtt] pointing at a real broker."""

    tmp: Path
    broker: Broker
    cloud: CloudServer
    admin: AdminClient
    agents: list[Agent] = field(default_factory=list)
    events: dict[str, list[str]] = field(default_factory=dict)
    pushed: int = 0

    @property
    def notifier(self) -> MqttNotifier:
        assert self.cloud.mqtt is not None
        return self.cloud.mqtt.notifier

    @property
    def trust(self) -> Path:
        return self.cloud.trust_dir

    def agent_settings(self, name: str, **overrides: object) -> AgentSettings:
        values: dict[str, object] = {
            "cloud": self.cloud.address,
            "ca_file": self.trust / "ca.pem",
            "root_key": (self.trust / "root-key.txt").read_text().strip(),
            "enroll_token": SecretStr(ENROLL_SECRET),
            "device_id": name,
            "data_dir": self.tmp / name,
            "providers": ["CPUExecutionProvider"],
            "inference_host": "127.0.0.1",
            "inference_port": 0,
            "resync_interval_s": 300,
            "report_interval_s": 300,
            "backoff_base_s": 0.05,
            "backoff_cap_s": 0.5,
            "min_free_disk_bytes": 0,
            "mqtt": {"reconnect_max_s": 1, "keepalive_s": 5},
            **overrides,
        }
        return AgentSettings.model_validate(values)

    def start_agent(self, name: str, *, grpc_watch: bool = True, **overrides: object) -> Agent:
        """An agent in this process. Without `grpc_watch` its watch stream stays silent and it
        re-checks only every resync_interval_s (300 s here): a deploy it follows within
        seconds reached it over MQTT."""
        settings = self.agent_settings(name, **overrides)
        link = None
        if not grpc_watch:
            link = QuietWatchLink(settings.cloud, settings.cloud_security())
        events = self.events.setdefault(name, [])
        agent = Agent(settings, link=link, on_event=events.append)
        agent.start()
        self.agents.append(agent)
        return agent

    def wait_settled(self, name: str) -> None:
        """Until the agent enrolled and reported its first pass: later deploys need a notice."""
        wait_for(lambda: self.cloud.metadata.get_reported(name) is not None, 20, "a first report")

    def push(self) -> int:
        """A new version of model "m" (y = x + version)."""
        self.pushed += 1
        path = self.tmp / f"m{self.pushed}.onnx"
        path.write_bytes(model_bytes(float(self.pushed)))
        pushed = self.admin.push_model(
            "m", path, golden_samples=[inline_golden(float(self.pushed))]
        )
        return pushed.version

    def deploy(self, version: int) -> int:
        """Deploy to every device; the highest generation it gave."""
        moved = self.admin.deploy("m", version)
        return max(moved.values(), default=0)

    def notices(self, name: str, via: str) -> list[str]:
        return [e for e in self.events.get(name, []) if f"(notice via {via})" in e]

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.admin.close()
        self.cloud.stop(grace=0.5)
        self.broker.stop()


@dataclass
class Probe:
    """A bare MQTT client with some account, recording what the broker answers."""

    client: mqtt.Client
    connack: ReasonCode | None = None
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def got(self, topic: str) -> list[bytes]:
        return [p for t, p in list(self.messages) if t == topic]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        """Publish with QoS 1; the broker's PUBACK reason (MQTT 5 says "not authorized")."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        wait_for(lambda: info.mid in self.pubacks, 5, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def probe(rig: Rig, username: str, password: str) -> Probe:
    client = make_client(
        BrokerUrl.parse(rig.broker.url),
        username,
        username,
        password,
        ca_file=rig.trust / "ca.pem",
        reconnect=False,
    )
    p = Probe(client)

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        p.connack = reason

    def on_message(c: mqtt.Client, u: Any, message: mqtt.MQTTMessage) -> None:
        p.messages.append((message.topic, bytes(message.payload)))

    def on_publish(c: mqtt.Client, u: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        p.pubacks[mid] = reason

    def on_disconnect(c: mqtt.Client, u: Any, f: Any, reason: ReasonCode, props: Any) -> None:
        p.disconnected.set()

    client.on_connect = on_connect
    client.on_message = on_message
    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    client.connect(BrokerUrl.parse(rig.broker.url).host, rig.broker.port, keepalive=10)
    client.loop_start()
    wait_for(lambda: p.connack is not None or p.disconnected.is_set(), 10, "CONNACK")
    return p


def connect(rig: Rig, access: MqttAccess, timeout: float = 10.0) -> Probe:
    """A probe with the device's account, once the broker has loaded it."""
    deadline = time.monotonic() + timeout
    while True:
        p = probe(rig, access.username, access.password)
        if p.connack is not None and not p.connack.is_failure:
            return p
        p.close()
        assert time.monotonic() < deadline, f"{access.username} never got in: {p.connack}"
        time.sleep(0.2)


def serving(agent: Agent, version: int) -> bool:
    try:
        return agent.repository.default_version("m") == version
    except Exception:
        return False


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    require_mosquitto()
    data = tmp_path / "cloud"
    port = free_port()
    broker = Broker(
        tmp_path / "broker",
        port,
        data / "mqtt" / "passwd",
        data / "mqtt" / "acl",
        tmp_path / "broker" / "tls",
    )
    settings = CloudSettings.model_validate(
        {
            "data_dir": data,
            "port": 0,
            "chunk_size": 4096,
            "enroll_tokens": [ENROLL_SECRET],
            "mqtt": {
                "url": broker.url,
                "broker_pid_file": broker.pid_file,
                "reconnect_max_s": 1,
                "keepalive_s": 5,
            },
        }
    )
    cloud = CloudServer(settings)  # makes its CA and writes the broker's files
    # The broker's certificate, from the cloud's CA, as the README says to make it.
    made = CliRunner().invoke(
        cli,
        [
            "mqtt",
            "cert",
            "127.0.0.1",
            "localhost",
            "--data-dir",
            str(data),
            "--out",
            str(broker.tls_dir),
        ],
    )
    assert made.exit_code == 0, made.output
    broker.start()
    cloud.start()
    admin = AdminClient(
        cloud.address, token_file=data / "admin-token", ca_file=data / "trust" / "ca.pem"
    )
    r = Rig(tmp_path, broker, cloud, admin)
    try:
        assert r.notifier.wait_connected(15), broker.log_tail()
        yield r
    finally:
        r.stop()
