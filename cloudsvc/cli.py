"""`edgefleet cloud ...`: run the cloud service."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import click

from edgefleet.core.errors import EdgefleetError
from edgefleet.core.logs import configure as configure_logs
from edgefleet.core.tls import INSECURE_WARNING

log = logging.getLogger("edgefleet.cloud")


def _write_port_file(path: Path, port: int) -> None:
    # Written then renamed, so a reader never sees an empty or half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


@click.group()
def cloud() -> None:
    """Run the cloud service (registry, fleet, agent API)."""


@cloud.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="State folder.")
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to bind (default 50051; 0 = any free port).")
@click.option(
    "--admin-token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File holding the first admin token [default: made once, kept in DATA_DIR/admin-token]. "
    "Secrets never go on the command line, where `ps` shows them.",
)
@click.option(
    "--enroll-token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File holding a fleet-wide enroll token (no expiry, no labels); prefer "
    "`edgefleet tokens create`.",
)
@click.option(
    "--tls-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder of `edgefleet certs init` (server.pem, server.key, ca.pem, ca.key) "
    "[default: made once in DATA_DIR/tls].",
)
@click.option(
    "--tls-name",
    "tls_names",
    multiple=True,
    help="A host name or address devices reach the cloud by, for the certificate made in "
    "DATA_DIR/tls (repeatable).",
)
@click.option(
    "--device-port",
    type=int,
    help="Mutual TLS: also listen here for devices, which then call with the client "
    "certificate they get at enrollment (0: any free port).",
)
@click.option(
    "--insecure",
    is_flag=True,
    default=None,
    help="Plain text instead of TLS: tokens, models and data cross the network unencrypted. "
    "Trusted loopback or lab networks only.",
)
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file."
)
@click.option(
    "--port-file",
    type=click.Path(path_type=Path),
    help="Write the bound port here once serving (for --port 0).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="text (default) or json: one object a line, for log shippers.",
)
@click.option(
    "--metrics-port",
    type=int,
    help="Serve Prometheus /metrics on this port (plain HTTP, on metrics_host: 127.0.0.1 "
    "unless set; 0 picks one) [default: off].",
)
def serve(
    data_dir: Path | None,
    host: str | None,
    port: int | None,
    admin_token_file: Path | None,
    enroll_token_file: Path | None,
    tls_dir: Path | None,
    tls_names: tuple[str, ...],
    device_port: int | None,
    insecure: bool | None,
    config_file: Path | None,
    port_file: Path | None,
    log_format: str | None,
    metrics_port: int | None,
) -> None:
    """Serve the admin and agent APIs until SIGTERM or Ctrl-C."""
    from cloudsvc.server import CloudServer
    from cloudsvc.settings import CloudSettings

    os.umask(0o077)  # every file the cloud writes is its own: keys, tokens, data
    try:
        settings = CloudSettings.load(
            config_file,
            data_dir=data_dir,
            host=host,
            port=port,
            admin_token_file=admin_token_file,
            enroll_token_file=enroll_token_file,
            insecure=insecure,
            log_format=log_format,
            metrics_port=metrics_port,
        )
        tls = settings.tls
        if tls_dir is not None:
            tls = tls.model_copy(
                update={
                    "cert_file": tls_dir / "server.pem",
                    "key_file": tls_dir / "server.key",
                    "ca_file": tls_dir / "ca.pem",
                    "ca_key_file": tls_dir / "ca.key",
                }
            )
        if tls_names or device_port is not None:
            update: dict[str, object] = {"names": [*tls.names, *tls_names]}
            if device_port is not None:
                update["device_port"] = device_port
            tls = tls.model_copy(update=update)
        settings = settings.model_copy(update={"tls": tls})
        configure_logs(settings.log_format)
        log.info("edgefleet cloud settings:\n%s", settings.describe())
        server = CloudServer(settings).start()
    except EdgefleetError as err:
        raise click.ClickException(err.message) from None

    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Stoppable even under a parent that blocked them (a blocked SIGTERM waits for SIGKILL).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    if server.admin_token.path is not None:
        log.info("admin token is in %s", server.admin_token.path)
    if server.tls is None:
        log.warning("serving %s", INSECURE_WARNING)
    trust = server.trust_dir
    log.info(
        "devices trust this cloud through files in %s, provisioned to them out of band: "
        "`edgefleet agent run --cloud HOST:%d --ca-file ca.pem --root-key %s "
        "--enroll-token-file TOKEN-FILE` (make the token with `edgefleet tokens create`)",
        trust,
        server.port,
        server.keys.current.fingerprint,
    )
    if not settings.enroll_tokens and settings.enroll_token_file is None:
        log.info(
            "no fleet-wide enroll token was given: devices enroll with tokens made by "
            "`edgefleet tokens create --label site=... --max-uses N --ttl 1d`"
        )
    if port_file is not None:
        _write_port_file(port_file, server.port)
    log.info(
        "edgefleet cloud listening on %s (%s)%s",
        server.address,
        "plain text" if server.tls is None else "TLS",
        f"; devices with mutual TLS on port {server.device_port}" if server.device_port else "",
    )
    log.info(
        "jobs run on: %s", ", ".join(server.jobs.slots) or "nothing (jobs.cpu_slots=0, no GPU)"
    )
    while not stop.wait(1.0):
        pass
    started = server.started_at
    models = len(server.metadata.list_models())
    devices = len(server.metadata.list_devices())
    jobs = len(server.metadata.list_jobs(limit=1_000_000))
    server.stop(grace=5.0)
    log.info(
        f"edgefleet cloud stopped ({received[0] if received else 'stop'}) after "
        f"{time.time() - started:.0f}s: {models} model(s), {devices} device(s), {jobs} job(s)"
    )
