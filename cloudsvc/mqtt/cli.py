"""`edgefleet mqtt ...`: the broker's side of MQTT notices, run where the cloud's data is."""

from __future__ import annotations

from pathlib import Path

import click

from edgefleet.core.errors import EdgefleetError


@click.group()
def mqtt() -> None:
    """MQTT notices: the broker's password and access-control files."""


@mqtt.command("acl")
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="The cloud's TOML settings."
)
@click.option("--data-dir", type=click.Path(path_type=Path), help="The cloud's state folder.")
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the broker's password file here [default: mqtt.broker_password_file, or "
    "DATA_DIR/mqtt/passwd].",
)
@click.option(
    "--acl-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the broker's ACL file here [default: mqtt.broker_acl_file, or DATA_DIR/mqtt/acl].",
)
@click.option(
    "--tls-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="For the mosquitto.conf printed: the folder of `edgefleet mqtt cert` [default: the "
    "cloud's own certificate, good for a broker on the cloud's host].",
)
def acl(
    config_file: Path | None,
    data_dir: Path | None,
    password_file: Path | None,
    acl_file: Path | None,
    tls_dir: Path | None,
) -> None:
    """Write the broker's password file and ACL file from the cloud's devices.

    Each enrolled, unrevoked device gets an account (its hashed password from enrollment)
    that reads only its own desired-state notices and writes only its own status and
    telemetry; the cloud's account writes notices and reads the rest. A running cloud with
    [mqtt] rewrites both files by itself at every enrollment and revocation; this rebuilds
    them (after a restore, say, or for a broker elsewhere). Mosquitto re-reads them on SIGHUP.

    \b
      edgefleet mqtt acl --data-dir /var/lib/edgefleet
      kill -HUP $(cat /run/mosquitto.pid)
    """
    import getpass
    import os

    from cloudsvc.errors import CloudError
    from cloudsvc.mqtt.broker_files import mosquitto_conf
    from cloudsvc.mqtt.credentials import MqttCredentials
    from cloudsvc.mqtt.service import broker_files, credentials_path
    from cloudsvc.settings import CloudSettings
    from cloudsvc.store.sqlite import SqliteMetadataStore

    os.umask(0o077)
    try:
        settings = CloudSettings.load(config_file, data_dir=data_dir)
        mqtt_settings = settings.mqtt.model_copy(
            update={
                k: v
                for k, v in {
                    "broker_password_file": password_file,
                    "broker_acl_file": acl_file,
                }.items()
                if v is not None
            }
        )
        settings = settings.model_copy(update={"mqtt": mqtt_settings})
        where = credentials_path(settings)
        if where is None:
            raise CloudError(
                "with metadata_backend = memory the cloud keeps no devices on disk: the "
                "running cloud writes the broker's files itself"
            )
        if not settings.database_path.exists():
            raise CloudError(
                f"there is no cloud data in {settings.data_dir} (no {settings.database_path.name}); "
                "pass the cloud's --data-dir or --config"
            )
        store = SqliteMetadataStore(settings.database_path)
        try:
            live = {d.device_id for d in store.list_devices() if not d.revoked}
        finally:
            store.close()
        credentials = MqttCredentials(where)
        try:
            hashes = {d: h for d, h in credentials.hashes().items() if d in live}
        finally:
            credentials.close()
        files = broker_files(settings)
        files.write(hashes)
    except EdgefleetError as err:
        raise click.ClickException(err.message) from None
    without = len(live) - len(hashes)
    click.echo(f"password file: {files.password_file} ({len(hashes)} devices and the cloud)")
    click.echo(f"ACL file:      {files.acl_file}")
    if without:
        click.echo(
            f"{without} device(s) enrolled before MQTT was on have no account yet: they get one "
            "when they re-enroll (`edgefleet agent reenroll`); meanwhile they use the gRPC watch"
        )
    own = tls_dir is None
    tls = settings.tls_dir if tls_dir is None else tls_dir
    click.echo(
        "\nA mosquitto.conf that uses them (TLS with "
        + ("the cloud's own certificate" if own else f"the certificate in {tls}")
        + "):\n"
    )
    click.echo(
        mosquitto_conf(
            port=8883,
            password_file=files.password_file.resolve(),
            acl_file=files.acl_file.resolve(),
            cafile=(tls / "ca.pem").resolve(),
            certfile=(tls / ("server.pem" if own else "broker.pem")).resolve(),
            keyfile=(tls / ("server.key" if own else "broker.key")).resolve(),
            persistence_dir=Path("/var/lib/mosquitto"),
            pid_file=settings.mqtt.broker_pid_file,
            user=getpass.getuser(),
        )
    )


@mqtt.command("cert")
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="The cloud's TOML settings."
)
@click.option("--data-dir", type=click.Path(path_type=Path), help="The cloud's state folder.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default="edgefleet-broker-tls",
    show_default=True,
    help="Folder for broker.pem and broker.key.",
)
@click.option(
    "--days",
    type=click.IntRange(1, 825),
    default=825,
    show_default=True,
    help="Validity of the certificate.",
)
def cert(
    names: tuple[str, ...],
    config_file: Path | None,
    data_dir: Path | None,
    out: Path,
    days: int,
) -> None:
    """A TLS certificate for the broker, signed by the cloud's CA, for NAMES (the host names
    and addresses devices reach the broker by): devices verify the broker with the CA they
    already trust for the cloud.

    \b
      edgefleet mqtt cert broker.plant-1.example 10.0.0.7 --data-dir /var/lib/edgefleet
    """
    import os

    from cloudsvc.errors import CloudError
    from cloudsvc.settings import CloudSettings
    from edgefleet.core import certs

    os.umask(0o077)
    try:
        settings = CloudSettings.load(config_file, data_dir=data_dir)
        made = certs.TlsFiles(settings.tls_dir)
        ca, ca_key = settings.tls.ca_file or made.ca_cert, settings.tls.ca_key_file or made.ca_key
        if not ca_key.exists():
            raise CloudError(
                f"the cloud's CA key {ca_key} is not here: run this where the cloud keeps its "
                "data (its CA signs the broker's certificate), or sign one with your own PKI"
            )
        key_pem, cert_pem = certs.issue_server_certificate(
            certs.CertificateAuthority.load(ca, ca_key), names, days
        )
        certs.write_secret(out / "broker.key", key_pem)
        certs.write_public(out / "broker.pem", cert_pem)
        certs.write_public(out / "ca.pem", ca.read_bytes())
    except (EdgefleetError, OSError) as err:
        raise click.ClickException(getattr(err, "message", str(err))) from None
    click.echo(
        f"broker certificate: {out / 'broker.pem'} + {out / 'broker.key'} for {', '.join(names)}"
    )
    click.echo(
        f"in mosquitto.conf: cafile {out / 'ca.pem'}, certfile {out / 'broker.pem'}, keyfile {out / 'broker.key'}"
    )
