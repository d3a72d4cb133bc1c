"""`edgefleet agent …`: run the device agent. A thin layer over agent.daemon.Agent."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
from pydantic import ValidationError

from agent.errors import SettingsError
from agent.settings import AgentSettings, load, parse_labels
from agent.systemd import SERVICE_USER, STATE_DIRECTORY, UNIT_NAME, render_settings, render_unit
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.logs import configure as configure_logs
from edgefleet.core.settings import describe_validation
from edgefleet.core.tls import INSECURE_WARNING

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


def _settings_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The options `run` and `reenroll` share: where the cloud is and how it is trusted."""
    for option in reversed(
        [
            click.option(
                "--cloud", help="host:port of the cloud service [env EDGEFLEET_AGENT_CLOUD]."
            ),
            click.option(
                "--ca-file",
                type=click.Path(path_type=Path, dir_okay=False),
                help="CA bundle that verifies the cloud's certificate (the cloud's "
                "DATA_DIR/trust/ca.pem), provisioned out of band.",
            ),
            click.option(
                "--root-key",
                help="Fingerprint of the cloud's root key (DATA_DIR/trust/root-key.txt of the "
                "cloud), provisioned out of band: the only key this device will trust, with "
                "its signed successors.",
            ),
            click.option(
                "--insecure",
                is_flag=True,
                default=None,
                help="Reach the cloud in plain text: credentials and models cross the network "
                "unencrypted (signatures still guard what runs). Trusted networks only.",
            ),
            click.option(
                "--data-dir",
                type=click.Path(path_type=Path),
                help="Where the agent keeps its state (made 0700).",
            ),
            click.option(
                "--config",
                "config_file",
                type=click.Path(path_type=Path, dir_okay=False),
                help="TOML file of settings (same names as the EDGEFLEET_AGENT_* variables, "
                "lowercase).",
            ),
            click.option(
                "--log-format",
                type=click.Choice(["text", "json"]),
                help="text (default) or json: one object a line, for log shippers.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@agent.command("run")
@_settings_options
@click.option(
    "--enroll-token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File holding the enrollment token (`edgefleet tokens create`), needed on the first "
    "start only [env EDGEFLEET_AGENT_ENROLL_TOKEN]. Never on the command line: `ps` shows it.",
)
@click.option("--device-id", help="Device id to ask for at enrollment.")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="K=V",
    help="A label this device reports (advisory: the labels that place it in deployments are "
    "the operator's, from its enroll token or `edgefleet devices label`); repeatable.",
)
@click.option(
    "--inference-host",
    help="Address the inference server binds (default 127.0.0.1; 0.0.0.0 opens it to the "
    "network: set an inference token and TLS then).",
)
@click.option("--inference-port", type=int, help="Inference port (default 8001; 0 picks one).")
@click.option(
    "--rest-port",
    type=int,
    help="Also serve KServe v2 REST on this port (same models, TLS and token; 0 picks one) "
    "[default: off].",
)
@click.option(
    "--inference-workers",
    type=click.IntRange(1, 256),
    help="Inference server processes sharing the port(s) (default 1: the agent's own "
    "process; more use more cores, Linux).",
)
@click.option(
    "--metrics-port",
    type=int,
    help="Serve Prometheus /metrics on this port (plain HTTP, on metrics_host: 127.0.0.1 "
    "unless set; 0 picks one) [default: off].",
)
@click.option(
    "--port-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the bound inference port here once serving.",
)
def run(
    cloud: str | None,
    ca_file: Path | None,
    root_key: str | None,
    insecure: bool | None,
    data_dir: Path | None,
    config_file: Path | None,
    log_format: str | None,
    enroll_token_file: Path | None,
    device_id: str | None,
    labels: tuple[str, ...],
    inference_host: str | None,
    inference_port: int | None,
    rest_port: int | None,
    inference_workers: int | None,
    metrics_port: int | None,
    port_file: Path | None,
) -> None:
    """Run the agent until SIGTERM or Ctrl-C.

    \b
    First start on a device (files provisioned out of band):
      edgefleet agent run --cloud cloud.example:50051 --ca-file ca.pem \\
          --root-key "$(cat root-key.txt)" --enroll-token-file enroll-token
    """
    os.umask(0o077)  # the state, the credential and the device key are this user's only
    settings = _load(
        config_file,
        cloud=cloud,
        ca_file=ca_file,
        root_key=root_key,
        insecure=insecure,
        data_dir=data_dir,
        log_format=log_format,
        enroll_token_file=enroll_token_file,
        device_id=device_id,
        labels=_labels(labels),
        inference_host=inference_host,
        inference_port=inference_port,
        rest_port=rest_port,
        inference_workers=inference_workers,
        metrics_port=metrics_port,
    )
    run_agent(settings, port_file)


@agent.command("reenroll")
@_settings_options
@click.option(
    "--enroll-token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File holding a re-enroll token made for this device (`edgefleet tokens create "
    "--reenroll ID`); without one, the device's current credential is used.",
)
def reenroll(
    cloud: str | None,
    ca_file: Path | None,
    root_key: str | None,
    insecure: bool | None,
    data_dir: Path | None,
    config_file: Path | None,
    log_format: str | None,
    enroll_token_file: Path | None,
) -> None:
    """Rotate this device's credential (and its client certificate under mutual TLS).

    The agent never drops its identity on its own when the cloud refuses it: after a
    revocation, or to rotate a credential, the operator makes a re-enroll token bound to
    the device and runs this on it. A running agent picks the new credential up on its next
    pass.
    """
    os.umask(0o077)
    settings = _load(
        config_file,
        cloud=cloud,
        ca_file=ca_file,
        root_key=root_key,
        insecure=insecure,
        data_dir=data_dir,
        log_format=log_format,
        enroll_token_file=enroll_token_file,
    )
    configure_logs(settings.log_format)
    from agent.daemon import reenroll_device

    try:
        identity = reenroll_device(settings)
    except EdgefleetError as err:
        raise click.ClickException(err.message) from None
    how = " with a new client certificate" if identity.certificate else ""
    click.echo(
        f"device {identity.device_id} re-enrolled{how}; its new credential is in {settings.db_path}"
    )


def _labels(items: tuple[str, ...]) -> dict[str, str] | None:
    try:
        return parse_labels(items) if items else None
    except SettingsError as err:
        raise click.ClickException(err.message) from None


def _load(config_file: Path | None, **overrides: object) -> AgentSettings:
    try:
        return load(config_file, **overrides)
    except SettingsError as err:
        raise click.ClickException(err.message) from None


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
        "agent %s serving Open Inference Protocol on %s:%d%s; cloud %s over %s",
        who,
        settings.inference_host,
        daemon.inference_port,
        " (OPEN TO THE NETWORK, UNPROTECTED: see the warning above)"
        if daemon.exposure_warning
        else "",
        settings.cloud,
        "PLAIN TEXT (--insecure)" if settings.insecure else "TLS",
    )
    if settings.insecure:
        log.warning("the agent reaches the cloud in %s", INSECURE_WARNING)
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


# install ----------------------------------------------------------------------------------


def _agent_command() -> str:
    """How systemd starts this installation's `edgefleet`: the script beside this Python
    (a venv's bin/), else this Python with -m."""
    script = Path(sys.executable).parent / "edgefleet"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return f"{sys.executable} -m edgefleet.cli"


def _run_command(argv: list[str]) -> None:
    """Run one setup command as root (`--now`), echoing it; a failure stops the install."""
    click.echo(f"# {shlex.join(argv)}")
    try:
        subprocess.run(argv, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise click.ClickException(f"{shlex.join(argv)} failed: {err}") from None


def _service_user() -> tuple[int, int] | None:
    """uid and gid of the service user, None while it does not exist."""
    import pwd  # POSIX only: the CLI module also imports where it is missing

    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _write(path: Path, text: str, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Write atomically (temp file + rename) with `mode` (and `owner`) set before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@agent.command("install")
@click.option("--cloud", required=True, help="host:port of the cloud's agent port.")
@click.option(
    "--root-key",
    required=True,
    help="Fingerprint of the cloud's root key (its DATA_DIR/trust/root-key.txt).",
)
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where the CA bundle that verifies the cloud lies on this device "
    "[default: CONFIG_DIR/ca.pem].",
)
@click.option(
    "--enroll-token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where the enrollment token lies on this device [default: CONFIG_DIR/enroll-token].",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Reach the cloud in plain text (no CA file). Trusted networks only.",
)
@click.option(
    "--unit-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/etc/systemd/system"),
    show_default=True,
    help="Where the systemd unit goes.",
)
@click.option(
    "--config-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/etc/edgefleet"),
    show_default=True,
    help="Where agent.toml goes.",
)
@click.option("--force", is_flag=True, help="Replace an existing agent.toml.")
@click.option(
    "--now",
    is_flag=True,
    help="Also run what is left (as root): create the edgefleet user, reload systemd, "
    "enable and start the agent.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print what would be written and run; change nothing."
)
def install(
    cloud: str,
    root_key: str,
    ca_file: Path | None,
    enroll_token_file: Path | None,
    insecure: bool,
    unit_dir: Path,
    config_dir: Path,
    force: bool,
    now: bool,
    dry_run: bool,
) -> None:
    """Install the agent as a systemd service: the unit file and a commented agent.toml.

    \b
    On the device, as root, with ca.pem and the token copied to /etc/edgefleet:
      edgefleet agent install --cloud cloud.example:50051 --root-key "$(cat root-key.txt)" --now
    """
    if insecure and ca_file is not None:
        raise click.ClickException("--insecure and --ca-file contradict each other: give one")
    config_dir = config_dir.absolute()
    ca = None if insecure else (ca_file or config_dir / "ca.pem").absolute()
    token = (enroll_token_file or config_dir / "enroll-token").absolute()
    config = config_dir / "agent.toml"
    unit_path = unit_dir.absolute() / UNIT_NAME
    try:  # what `agent run` would refuse, refused now
        AgentSettings(cloud=cloud, root_key=root_key, ca_file=ca, insecure=insecure)
    except ValidationError as err:
        raise click.ClickException(describe_validation(err, AgentSettings, None)) from None
    root = os.geteuid() == 0
    if now and not root and not dry_run:
        raise click.ClickException("--now runs useradd and systemctl: run it as root")

    command = _agent_command()
    unit = render_unit(command, config)
    settings = render_settings(
        cloud=cloud, root_key=root_key, ca_file=ca, enroll_token_file=token, config_dir=config_dir
    )
    keep = config.exists() and not force
    user = _service_user()
    owner = user if root else None  # who the written settings and the token go to
    left: list[list[str]] = []
    if user is None:
        left.append(
            ["useradd", "--system", "--no-create-home", "--home-dir", f"/var/lib/{STATE_DIRECTORY}",
             "--shell", "/usr/sbin/nologin", SERVICE_USER]
        )  # fmt: skip
    if owner is None:
        # The service reads them as its user (ProtectSystem=strict keeps them read-only).
        left.append(["chown", f"{SERVICE_USER}:", str(config), str(token)])
    left += [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "edgefleet-agent"]]
    notes = [
        f"{path} is under a home folder, which the service cannot see (ProtectHome=yes): "
        "move it (edgefleet itself: a venv in /opt/edgefleet, say) and run this again"
        for path in (command.split()[0], ca, token)
        if path is not None and str(path).startswith(("/home/", "/root/", "/run/user/"))
    ]
    notes += [
        f"{path} does not exist yet: copy {what} there"
        for path, what in ((ca, "the cloud's trust/ca.pem"), (token, "the enrollment token"))
        if path is not None and not path.exists()
    ]

    if dry_run:
        click.echo(f"--- {unit_path} (0644{', replaced' if unit_path.exists() else ''})")
        click.echo(unit, nl=False)
        click.echo(f"--- {config} ({'exists: kept, --force replaces it' if keep else '0600'})")
        click.echo(settings, nl=False)
        click.echo("--- then, as root:" if not now else "--- then (--now):")
        for step in left:
            click.echo(f"  {shlex.join(step)}")
        for note in notes:
            click.echo(f"note: {note}")
        return

    _write(unit_path, unit, 0o644)
    click.echo(f"wrote {unit_path}")
    if keep:
        click.echo(f"kept {config} (it exists; --force replaces it)")
    else:
        _write(config, settings, 0o600, owner)
        click.echo(f"wrote {config} (0600)")
    if owner is not None and token.exists():
        os.chown(token, *owner)
    for note in notes:
        click.echo(f"note: {note}")
    if not now:
        click.echo("left to do, as root:")
        for step in left:
            click.echo(f"  {shlex.join(step)}")
        return
    for step in left:
        if step[0] == "chown":  # os.chown once the user exists: the paths may not yet
            created = _service_user()
            if created is None:
                raise click.ClickException(f"there is no user {SERVICE_USER} to give files to")
            for path in (config, token):
                if path.exists():
                    os.chown(path, *created)
            continue
        _run_command(step)
    click.echo("edgefleet-agent started: systemctl status edgefleet-agent")
