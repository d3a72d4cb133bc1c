"""sd_notify against a real unix datagram socket standing in for systemd: the notifier alone,
the agent in this process (its watchdog stops when its loop or its reconciler stops), and
`edgefleet agent run` as systemd starts it (READY=1 once serving, watchdog pings at half
WATCHDOG_USEC, STOPPING=1 on SIGTERM). packaging/systemd's unit is render_unit's default."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from agent.daemon import Agent
from agent.settings import AgentSettings
from agent.systemd import Notifier, render_unit, socket_address
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.agent.fakes import FakeCloud, build_artifact

ROOT = Path(__file__).resolve().parents[2]


class FakeSystemd:
    """The socket systemd would pass in NOTIFY_SOCKET: every datagram, with when it came."""

    def __init__(self, address: str | bytes, on_message: Callable[[str], None] = print) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self.on_message = on_message
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode()
            self.on_message(text)
            self.messages.append((time.monotonic(), text))

    def fields(self, key: str) -> list[tuple[float, str]]:
        """(time, value) of every KEY=value received, in order."""
        return [
            (at, line.partition("=")[2])
            for at, text in list(self.messages)
            for line in text.split("\n")
            if line.startswith(f"{key}=")
        ]

    def wait_for(self, key: str, timeout: float = 60.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while not (found := self.fields(key)):
            assert time.monotonic() < deadline, f"no {key}= in {self.messages}"
            time.sleep(0.01)
        return found[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A unix socket path must fit 108 bytes: pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="sdn", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def systemd(short_dir: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = short_dir / "notify"
    fake = FakeSystemd(str(path), on_message=lambda text: None)
    yield fake, str(path)
    fake.close()


def intervals(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_addresses_as_systemd_writes_them() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@/org/freedesktop/systemd1/notify") == (
        b"\0/org/freedesktop/systemd1/notify"
    )
    assert socket_address("vsock:2:1234") is None
    assert socket_address("relative/path") is None


def test_without_systemd_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled and notifier.watchdog_interval_s == 0
    assert not notifier.ready("x") and not notifier.status("x") and not notifier.stopping()
    notifier.start_watchdog(lambda: True)  # no thread without a watchdog
    notifier.close()


def test_ready_status_stopping_reach_the_socket(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.enabled and notifier.watchdog_usec == 0
    assert notifier.ready("serving 0 models")
    assert notifier.status("two\nlines")  # a newline would start a bogus field
    assert notifier.stopping()
    fake.wait_for("STOPPING")
    texts = [text for _, text in fake.messages]
    assert texts == [
        "READY=1\nSTATUS=serving 0 models",
        "STATUS=two lines",
        "STOPPING=1\nSTATUS=stopping",
    ]
    notifier.close()


def test_an_abstract_socket_name() -> None:
    name = f"edgefleet-test-{os.getpid()}-{time.monotonic_ns()}"
    fake = FakeSystemd(b"\0" + name.encode(), on_message=lambda text: None)
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.ready()
        fake.wait_for("READY", timeout=10)
        notifier.close()
    finally:
        fake.close()


def test_a_vanished_socket_is_reported_not_raised(short_dir: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(short_dir / "gone")})
    assert notifier.enabled
    assert not notifier.ready() and not notifier.status("still running")
    notifier.close()


def test_the_watchdog_is_this_process_s_only_when_its_pid_says_so(
    systemd: tuple[FakeSystemd, str],
) -> None:
    _, path = systemd
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environ(env).watchdog_interval_s == 15.0
    mine = Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_usec == 30_000_000
    assert Notifier.from_environ({**env, "WATCHDOG_PID": "1"}).watchdog_usec == 0
    assert Notifier.from_environ({**env, "WATCHDOG_USEC": "soon"}).watchdog_usec == 0
    assert Notifier.from_environ({"WATCHDOG_USEC": "30000000"}).watchdog_usec == 0


def test_the_watchdog_pings_at_half_its_timeout_while_alive(
    systemd: tuple[FakeSystemd, str],
) -> None:
    fake, path = systemd
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    alive = threading.Event()
    alive.set()
    notifier.start_watchdog(alive.is_set)
    try:
        time.sleep(1.05)
        pings = [at for at, _ in fake.fields("WATCHDOG")]
        assert 6 <= len(pings) <= 13, pings
        gaps = intervals(pings)
        assert 0.08 <= sorted(gaps)[len(gaps) // 2] <= 0.15, gaps
        alive.clear()  # the loop stalls: no more pings
        time.sleep(0.15)
        stalled = len(fake.fields("WATCHDOG"))
        time.sleep(0.6)
        assert len(fake.fields("WATCHDOG")) == stalled
        alive.set()  # it recovers before systemd's timeout: pings again
        time.sleep(0.35)
        assert len(fake.fields("WATCHDOG")) >= stalled + 2
    finally:
        notifier.close()
    after = len(fake.fields("WATCHDOG"))
    time.sleep(0.3)
    assert len(fake.fields("WATCHDOG")) == after  # close() ends the thread


def test_the_agent_s_watchdog_stops_with_its_loop_or_its_reconciler(
    settings: AgentSettings,
    cloud: FakeCloud,
    tmp_path: Path,
    systemd: tuple[FakeSystemd, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, path = systemd
    cloud.assign(build_artifact(tmp_path, cloud.key, "m", 1))
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s
    agent = Agent(settings, link=cloud)
    unblock = threading.Event()
    stall = threading.Event()
    real_status = agent.status_parts

    def status_parts() -> tuple[str, str]:
        if stall.is_set():
            unblock.wait(30)  # run_forever's loop is stuck here
        return real_status()

    monkeypatch.setattr(agent, "status_parts", status_parts)
    seen: dict[str, int] = {}

    def drive() -> None:
        try:
            fake.wait_for("READY")
            deadline = time.monotonic() + 30
            while not any("m v1" in status for _, status in fake.fields("STATUS")):
                assert time.monotonic() < deadline, fake.messages
                time.sleep(0.05)
            time.sleep(0.5)
            seen["alive"] = len(fake.fields("WATCHDOG"))
            stall.set()
            time.sleep(0.5)  # the last ping before the stall may still come
            stuck = len(fake.fields("WATCHDOG"))
            time.sleep(1.0)
            seen["stuck"] = len(fake.fields("WATCHDOG")) - stuck
            stall.clear()
            unblock.set()
            time.sleep(0.6)
            seen["recovered"] = len(fake.fields("WATCHDOG")) - stuck - seen["stuck"]
            agent.reconciler.stop()  # the reconcile thread ends: the agent is not whole
            time.sleep(0.5)
            gone = len(fake.fields("WATCHDOG"))
            time.sleep(1.0)
            seen["no reconciler"] = len(fake.fields("WATCHDOG")) - gone
        finally:
            unblock.set()
            os.kill(os.getpid(), signal.SIGTERM)  # run_forever's handler: a clean stop

    # Whatever happens, a SIGTERM meant for run_forever never ends the test process.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        agent.run_forever()  # returns on the SIGTERM
    finally:
        driver.join(timeout=30)
        signal.signal(signal.SIGTERM, previous)
    assert seen["alive"] >= 3, seen
    assert seen["stuck"] == 0, seen
    assert seen["recovered"] >= 2, seen
    assert seen["no reconciler"] == 0, seen
    ready_at, ready_status = fake.fields("READY")[0][0], fake.fields("STATUS")[0][1]
    assert ready_status.startswith("serving "), ready_status
    assert fake.fields("STOPPING") and fake.fields("STOPPING")[0][0] > ready_at


def test_status_says_what_is_served_and_the_last_sync(
    settings: AgentSettings, cloud: FakeCloud, tmp_path: Path
) -> None:
    cloud.assign(build_artifact(tmp_path, cloud.key, "m", 1))
    agent = Agent(settings, link=cloud)
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while agent.repository.names() != ["m"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        state, sync = agent.status_parts()
        assert state == "serving 1 model (m v1)", state
        assert sync == "not synced yet"
        assert agent.syncer is not None
        agent.syncer.stats.last_success_at = time.time() - 3
        assert agent.status_parts()[1] == "last sync 3 s ago"
        assert not agent.alive(1.0)  # run_forever never turned: no watchdog ping
    finally:
        agent.stop()


def test_agent_run_under_systemd_notify(tmp_path: Path, systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    port_file = tmp_path / "port"
    serving_when_ready: list[bool] = []

    def on_message(text: str) -> None:
        if "READY=1" in text.split("\n"):  # at once: was the port serving already?
            serving_when_ready.append(port_file.exists())

    fake.on_message = on_message
    env = {
        **os.environ,
        "EDGEFLEET_AGENT_PROVIDERS": '["CPUExecutionProvider"]',
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "1000000",  # pings every 0.5 s
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    # Started with SIGTERM blocked (some init scripts and CI runners do that): the agent
    # unblocks it, so systemd's stop is still a clean one. A child inherits this mask.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "edgefleet.cli", "agent", "run",
                "--cloud", f"127.0.0.1:{dead}",
                "--insecure",
                "--root-key", "sha256:" + "ab" * 32,
                "--data-dir", str(tmp_path / "agent"),
                "--inference-port", "0",
                "--port-file", str(port_file),
            ],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    try:
        ready_at, _ = fake.wait_for("READY", timeout=90)
        assert serving_when_ready == [True]
        port = int(port_file.read_text())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            live = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                pb.ServerLiveRequest(), timeout=10
            )
        assert live.live
        status = fake.fields("STATUS")[0][1]
        assert status.startswith("serving 0 models; not enrolled yet"), status
        time.sleep(2.6)
        pings = [at for at, _ in fake.fields("WATCHDOG") if at >= ready_at]
        assert len(pings) >= 4, pings
        gaps = intervals(pings)
        # Every half WATCHDOG_USEC; never a whole one, or systemd would restart the agent.
        assert 0.4 <= sorted(gaps)[len(gaps) // 2] <= 0.65 and max(gaps) < 1.0, gaps
        assert not fake.fields("STOPPING")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    stopping_at, _ = fake.wait_for("STOPPING", timeout=5)
    assert stopping_at > pings[-1]


def test_the_packaged_unit_is_render_unit_s_default() -> None:
    packaged = (ROOT / "packaging" / "systemd" / "edgefleet-agent.service").read_text()
    assert packaged == render_unit("/usr/local/bin/edgefleet", Path("/etc/edgefleet/agent.toml"))
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "WatchdogSec=30s",
        "StateDirectory=edgefleet-agent",
        "StateDirectoryMode=0700",
        "ConfigurationDirectory=edgefleet",
        "User=edgefleet",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ExecStart=/usr/local/bin/edgefleet agent run --config /etc/edgefleet/agent.toml",
    ):
        assert line in packaged.splitlines(), line
    assert any(line.startswith("RestartSec=") for line in packaged.splitlines())
    assert any(line.startswith("ReadWritePaths=") for line in packaged.splitlines())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_unit(short_dir: Path) -> None:
    # ExecStart must name a program that exists where it is verified.
    unit = render_unit("/bin/true", Path("/etc/edgefleet/agent.toml"))
    (short_dir / "edgefleet-agent.service").write_text(unit)
    run = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(short_dir / "edgefleet-agent.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    problems = [line for line in run.stderr.splitlines() if "edgefleet-agent.service" in line]
    assert run.returncode == 0 and not problems, run.stderr
