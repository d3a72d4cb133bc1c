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
@click.option("--admin-token", help="Admin token (default: made once, kept in DATA_DIR).")
@click.option("--enroll-token", "enroll_tokens", multiple=True, help="Accept this enroll token.")
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
def serve(
    data_dir: Path | None,
    host: str | None,
    port: int | None,
    admin_token: str | None,
    enroll_tokens: tuple[str, ...],
    config_file: Path | None,
    port_file: Path | None,
    log_format: str | None,
) -> None:
    """Serve the admin and agent APIs until SIGTERM or Ctrl-C."""
    from cloudsvc.server import CloudServer
    from cloudsvc.settings import CloudSettings

    try:
        settings = CloudSettings.load(
            config_file,
            data_dir=data_dir,
            host=host,
            port=port,
            admin_token=admin_token,
            enroll_tokens=list(enroll_tokens) or None,
            log_format=log_format,
        )
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
    if server.admin_token.path is not None:
        log.info("admin token is in %s", server.admin_token.path)
    if not settings.enroll_tokens:
        log.info(
            "no enroll token was given (--enroll-token): devices enroll only with tokens made "
            "by `edgefleet enroll-token --ttl 86400 --cloud %s` (with the admin token)",
            server.address,
        )
    if port_file is not None:
        _write_port_file(port_file, server.port)
    log.info("edgefleet cloud listening on %s", server.address)
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
