"""`edgefleet certs ...`: a private CA and a server certificate for a small deployment or a
test (users with their own PKI bring their files instead)."""

from __future__ import annotations

from pathlib import Path

import click

from edgefleet.core import certs as certificates
from edgefleet.core.errors import EdgefleetError


@click.group()
def certs() -> None:
    """TLS certificates for the cloud (and an agent's inference port)."""


@certs.command("init")
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False), default="edgefleet-tls")
@click.option(
    "--name",
    "names",
    multiple=True,
    help="A host name or IP address clients reach the server by (repeatable); loopback and "
    "this machine's names are always included.",
)
@click.option(
    "--days",
    type=click.IntRange(1, certificates.SERVER_DAYS),
    default=certificates.SERVER_DAYS,
    show_default=True,
    help="Validity of the server certificate.",
)
def init(folder: Path, names: tuple[str, ...], days: int) -> None:
    """Make a CA (ca.pem, ca.key) and a server certificate signed by it (server.pem,
    server.key) in FOLDER, keys readable by their owner only. An existing CA is never
    replaced: devices trust it.

    \b
      edgefleet certs init /etc/edgefleet/tls --name cloud.plant-1.example --name 10.0.0.5
      edgefleet cloud serve --tls-dir /etc/edgefleet/tls
      (each device gets /etc/edgefleet/tls/ca.pem, out of band, as --ca-file)
    """
    try:
        files = certificates.init_ca(folder, names, days=days)
    except EdgefleetError as err:
        raise click.ClickException(err.message) from None
    served = ", ".join(dict.fromkeys([*names, *certificates.default_names()]))
    click.echo(f"CA:          {files.ca_cert} (give this to clients: --ca-file)")
    click.echo(f"CA key:      {files.ca_key} (secret: signs device certificates)")
    click.echo(f"server:      {files.server_cert} + {files.server_key}, for {served}")
    click.echo(f"valid for {days} days; serve with `edgefleet cloud serve --tls-dir {folder}`")
