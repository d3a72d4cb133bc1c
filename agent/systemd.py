"""Tell systemd how the agent is doing (sd_notify), without libsystemd.

Under `Type=notify` systemd passes a unix datagram socket in `$NOTIFY_SOCKET` (a path, or
an abstract name written with a leading `@`) and reads `KEY=value` lines from it:
`READY=1` once the agent serves, `STATUS=...` for `systemctl status`, `WATCHDOG=1` at
least every `$WATCHDOG_USEC` microseconds (else systemd kills and restarts the service),
`STOPPING=1` when it shuts down. Outside systemd (no `$NOTIFY_SOCKET`) every call here does
nothing, so the agent runs the same under a terminal, a container or a test.

The unit this module's notifications are meant for is rendered by :func:`render_unit`
(`edgefleet agent install` writes it; packaging/systemd/edgefleet-agent.service is its
default rendering).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes | None:
    """`$NOTIFY_SOCKET` as a socket address: a path, or an abstract name (`@name` becomes
    NUL + name); None for what this module does not speak (`vsock:...`, relative paths)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """One service's sd_notify channel; disabled (and silent) when not under systemd."""

    def __init__(self, address: str | bytes | None, watchdog_usec: int = 0) -> None:
        self._address = address
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False
        self.watchdog_usec = watchdog_usec
        self._watchdog_stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        if address is not None:
            try:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            except OSError as err:  # pragma: no cover - AF_UNIX exists wherever systemd does
                log.warning("cannot talk to systemd: %s", err)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The channel systemd handed this process, if any. The watchdog is this process's
        only when `$WATCHDOG_PID` is unset or names it (as sd_watchdog_enabled decides)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%s is no unix socket address; not notifying systemd", raw)
        usec = 0
        pid = env.get("WATCHDOG_PID", "")
        if not pid or pid == str(os.getpid()):
            try:
                usec = max(0, int(env.get("WATCHDOG_USEC", "0") or 0))
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is no number; no watchdog", env["WATCHDOG_USEC"])
        return cls(address, usec if address is not None else 0)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def watchdog_interval_s(self) -> float:
        """How often to ping: half the watchdog timeout (0: no watchdog)."""
        return self.watchdog_usec / 2e6

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one datagram; False when not sent (never raises)."""
        if self._socket is None or self._address is None:
            return False
        # A newline ends a field: one inside a STATUS text would start a bogus field.
        data = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            with self._lock:
                self._socket.sendto(data, self._address)
        except OSError as err:
            if not self._failed:  # once: systemd may be restarting, the agent goes on
                log.warning("cannot notify systemd at %r: %s", self._address, err)
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self, status: str = "stopping") -> bool:
        self.stop_watchdog()
        return self.send("STOPPING=1", f"STATUS={status}")

    def start_watchdog(self, alive: Callable[[], bool]) -> None:
        """Ping `WATCHDOG=1` every half timeout from a thread, but only while `alive()`
        says the agent's loops are alive: when they stall the pings stop and systemd,
        after `WatchdogSec`, kills and restarts the agent. Nothing without a watchdog."""
        if not self.enabled or self.watchdog_usec <= 0 or self._watchdog is not None:
            return
        interval = self.watchdog_interval_s
        self._watchdog_stop.clear()

        def _ping() -> None:
            stalled = False
            while True:
                ok = alive()
                if ok:
                    self.send("WATCHDOG=1")
                elif not stalled:
                    log.error(
                        "the agent's loop stalled: no watchdog ping; systemd restarts it "
                        "within %.0fs unless it recovers",
                        self.watchdog_usec / 1e6,
                    )
                stalled = not ok
                if self._watchdog_stop.wait(interval):
                    return

        self._watchdog = threading.Thread(target=_ping, name="edgefleet-watchdog", daemon=True)
        self._watchdog.start()

    def stop_watchdog(self) -> None:
        self._watchdog_stop.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=5)
        self._watchdog = None

    def close(self) -> None:
        self.stop_watchdog()
        if self._socket is not None:
            self._socket.close()
            self._socket = None


# The unit ------------------------------------------------------------------------------

UNIT_NAME = "edgefleet-agent.service"
STATE_DIRECTORY = "edgefleet-agent"  # StateDirectory=: /var/lib/edgefleet-agent
SERVICE_USER = "edgefleet"

_UNIT = """\
# edgefleet device agent: reconciles models with the cloud and serves inference (README:
# "On a device").
# Written by `edgefleet agent install` (packaging/systemd/ has the default one); settings
# in {config}.
#   systemctl status edgefleet-agent     what it serves, its last sync (STATUS= lines)
#   journalctl -u edgefleet-agent -f     its log
[Unit]
Description=edgefleet device agent (models from the cloud, local inference)
# network.target, not network-online.target: the agent serves what it has from disk
# while offline, and a device without a link must not wait for one at boot.
After=network.target
# At most 5 starts in 10 minutes, then systemd gives up until `systemctl restart`.
StartLimitIntervalSec=10min
StartLimitBurst=5

[Service]
# The agent says READY=1 itself once the inference port is bound and what is on disk is
# loaded; STATUS= keeps `systemctl status` current; STOPPING=1 on SIGTERM.
Type=notify
NotifyAccess=main
ExecStart={exec_start} agent run --config {config}
Restart=on-failure
RestartSec=5s
# Loading the models on disk (or building TensorRT engines) comes before READY=1.
TimeoutStartSec=5min
# The stop: in-flight requests (stop_grace_s), a last report to the cloud, the spool closed.
TimeoutStopSec=90s
# WATCHDOG=1 comes every 15 s while the agent's loops run; none for 30 s: systemd kills the
# agent (SIGABRT) and Restart=on-failure starts it again.
WatchdogSec=30s
Environment=PYTHONUNBUFFERED=1

# A dedicated system user (useradd --system edgefleet), not DynamicUser=: the files in
# {config_dir} (the enroll token, an inference key) are given to a uid known before the
# first start (chown edgefleet, mode 0600), and on Jetson the same user joins the video
# and render groups for the GPU. With DynamicUser=yes those files would have to be
# world-readable or passed through LoadCredential=.
User={user}
Group={user}
# GPUs: uncomment where the device nodes belong to these groups (Jetson, some dGPU hosts).
#SupplementaryGroups=video render

# /var/lib/edgefleet-agent (0700, owned by the service user): the device's credential,
# its key, the chunk store, the models and the spool (data_dir in the settings).
StateDirectory={state}
StateDirectoryMode=0700
# /etc/edgefleet: settings, CA bundle, token files; read-only to the service.
ConfigurationDirectory=edgefleet
ConfigurationDirectoryMode=0755
UMask=0077

# Hardening: the agent only writes its state directory.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=-/var/lib/{state}
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
CapabilityBoundingSet=
AmbientCapabilities=
# AF_UNIX: NOTIFY_SOCKET; AF_NETLINK: interface addresses.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
# Not set, on purpose: PrivateDevices=yes hides /dev/nvidia* and Jetson's /dev/nvhost-*
# from the CUDA and TensorRT providers; ProtectClock=yes implies DeviceAllow=char-rtc, which
# before systemd 252 (Ubuntu 22.04 and JetPack 6 have 249) blocks every other device, the
# GPU's too; MemoryDenyWriteExecute=yes breaks CUDA's JIT.

[Install]
WantedBy=multi-user.target
"""


def render_unit(exec_start: str, config: Path) -> str:
    """The unit file for an agent started by `exec_start` (the `edgefleet` command, or
    `python -m edgefleet.cli`) with its settings in `config`."""
    return _UNIT.format(
        exec_start=exec_start,
        config=config,
        config_dir=config.parent,
        user=SERVICE_USER,
        state=STATE_DIRECTORY,
    )


def _toml(value: object) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(str(value))


def render_settings(
    *,
    cloud: str,
    root_key: str,
    ca_file: Path | None,
    enroll_token_file: Path,
    config_dir: Path,
) -> str:
    """The commented agent.toml `edgefleet agent install` writes (no secret inside: the
    enroll token stays in its own file)."""
    trust = (
        "# The CA bundle that verifies the cloud's certificate (the cloud's DATA_DIR/trust/ca.pem),\n"
        "# copied here out of band.\n"
        f"ca_file = {_toml(ca_file)}\n"
        if ca_file is not None
        else "# Plain text to the cloud (--insecure): trusted networks only; signatures still guard\n"
        '# what the device runs. For TLS: ca_file = "/etc/edgefleet/ca.pem" instead.\n'
        "insecure = true\n"
    )
    return f"""\
# edgefleet agent settings, read by `edgefleet agent run --config {config_dir / "agent.toml"}`
# (what {UNIT_NAME} runs). Any setting may also come from an EDGEFLEET_AGENT_<NAME>
# variable; `edgefleet agent run --help` says what each does. After a change:
#   systemctl restart edgefleet-agent

# The cloud's agent port, as this device reaches it.
cloud = {_toml(cloud)}
{trust}# The fingerprint of the cloud's root key (its DATA_DIR/trust/root-key.txt): the only key this
# device trusts, with the successors that key signs.
root_key = {_toml(root_key)}
# The enrollment token (`edgefleet tokens create`), 0600 and owned by {SERVICE_USER}: read on
# the first start only. The device then holds its own credential and the file may go.
enroll_token_file = {_toml(enroll_token_file)}
# The device's credential and key, chunks, models and spool: systemd's StateDirectory
# (0700, owned by {SERVICE_USER}), the one place the service may write.
data_dir = {_toml(Path("/var/lib") / STATE_DIRECTORY)}

# Inference (Open Inference Protocol over gRPC) binds 127.0.0.1:8001. To serve the network,
# set the address, a bearer token and TLS together:
# inference_host = "0.0.0.0"
# inference_port = 8001
# inference_token_file = "{config_dir / "inference-token"}"
# inference_cert_file = "{config_dir / "inference.pem"}"
# inference_key_file = "{config_dir / "inference.key"}"

# Execution providers to try, best first; unset: the best this ONNX Runtime build has
# (TensorRT, CUDA, OpenVINO, then CPU).
# providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]

# The device id asked for at enrollment (empty: the cloud chooses) and advisory labels.
# device_id = "line-1"
# labels = {{ line = "1" }}

# Prometheus /metrics on 127.0.0.1 (plain HTTP).
# metrics_port = 9101
# log_format = "json"
"""
