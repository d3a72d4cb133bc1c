"""`edgefleet agent …`: run the device agent. A thin layer over agent.daemon.Agent."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import click

from agent.errors import SettingsError
from agent.settings import AgentSettings, load, parse_labels
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.logs import configure as configure_logs

log = logging.getLogger("edgefleet.agent")


def write_port_file(path: Path, port: int) -> None:
    """Write the port so that a reader never sees a partial file (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(f"{port}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@click.group("agent")
def agent() -> None:
    """Run the device agent: reconcile models with the cloud and serve inference."""


@agent.command("run")
@click.option("--cloud", help="host:port of the cloud service [env EDGEFLEET_AGENT_CLOUD].")
@click.option("--enroll-token", help="Enrollment token, needed on the first start only.")
@click.option(
    "--data-dir", type=click.Path(path_type=Path), help="Where the agent keeps its state."
)
@click.option("--device-id", help="Device id to ask for at enrollment.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="A device label; repeatable.")
@click.option("--inference-host", help="Address the inference server binds (default 0.0.0.0).")
@click.option("--inference-port", type=int, help="Inference port (default 8001; 0 picks one).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML file of settings (same names as the EDGEFLEET_AGENT_* variables, lowercase).",
)
@click.option(
    "--port-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the bound inference port here once serving.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="text (default) or json: one object a line, for log shippers.",
)
def run(
    cloud: str | None,
    enroll_token: str | None,
    data_dir: Path | None,
    device_id: str | None,
    labels: tuple[str, ...],
    inference_host: str | None,
    inference_port: int | None,
    config_file: Path | None,
    port_file: Path | None,
    log_format: str | None,
) -> None:
    """Run the agent until SIGTERM or Ctrl-C."""
    try:
        settings = load(
            config_file,
            cloud=cloud,
            enroll_token=enroll_token,
            data_dir=data_dir,
            device_id=device_id,
            labels=parse_labels(labels) if labels else None,
            inference_host=inference_host,
            inference_port=inference_port,
            log_format=log_format,
        )
    except SettingsError as err:
        raise click.ClickException(err.message) from None
    run_agent(settings, port_file)


def run_agent(settings: AgentSettings, port_file: Path | None = None) -> None:
    # Imported here so that `edgefleet agent --help` stays fast.
    from agent.daemon import Agent

    configure_logs(settings.log_format)
    log.info("edgefleet agent settings:\n%s", settings.describe())
    daemon = Agent(settings)
    try:
        daemon.start()
    except EdgefleetError as err:
        daemon.stop()
        raise click.ClickException(err.message) from None
    who = daemon.device_id or "(not enrolled yet)"
    log.info(
        "agent %s serving Open Inference Protocol on %s:%d",
        who,
        settings.inference_host,
        daemon.inference_port,
    )
    if port_file is not None:
        write_port_file(port_file, daemon.inference_port)
    try:
        daemon.run_forever()
    finally:
        r = daemon.reconciler
        stats = r.chunks.stats
        serving = ", ".join(
            f"{name} v{daemon.repository.default_version(name)}"
            for name in daemon.repository.names()
        )
        log.info(
            f"agent {daemon.device_id or who} stopped: serving {serving or 'nothing'}; "
            f"{r.counters.activations} activation(s), {r.counters.rejections} rejection(s), "
            f"{r.counters.passes} pass(es); fetched {stats.bytes_fetched} bytes in "
            f"{stats.chunks_fetched} chunk(s), skipped {stats.bytes_skipped} bytes already "
            f"held, resumed {stats.bytes_resumed} bytes; {stats.manifest_bytes} manifest bytes"
        )
