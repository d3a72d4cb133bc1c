"""How edgefleet's clients and servers secure a gRPC channel: TLS verified against a CA
bundle given to the client (never trusted on first use), optionally with a client
certificate (mutual TLS), or plain text only when asked for by name (`--insecure`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from edgefleet.core.errors import InvalidArgument

INSECURE_WARNING = (
    "plain text (--insecure): tokens, models and data cross the network unencrypted and "
    "anyone on the path can read and change them; use it on a trusted loopback or lab "
    "network only"
)


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidArgument(f"cannot read {what} {path}: {err.strerror}") from None


@dataclass(frozen=True)
class ClientSecurity:
    """What a client needs to reach a server safely."""

    ca_file: Path | None = None
    insecure: bool = False
    # Mutual TLS: this client's certificate and key (PEM).
    cert_pem: bytes = b""
    key_pem: bytes = b""

    def check(self, what: str) -> None:
        if not self.insecure and self.ca_file is None:
            raise InvalidArgument(
                f"{what} needs the CA bundle that signed the server's certificate "
                "(--ca-file: the cloud's DATA_DIR/trust/ca.pem, or the ca.pem of `edgefleet "
                "certs init`), or --insecure for plain text"
            )

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        if self.insecure:
            return grpc.insecure_channel(address, options=list(options))
        self.check(f"connecting to {address}")
        assert self.ca_file is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_file(self.ca_file, "the CA bundle"),
            private_key=self.key_pem or None,
            certificate_chain=self.cert_pem or None,
        )
        return grpc.secure_channel(address, credentials, options=list(options))


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """TLS for a server; with `client_ca_file`, clients must show a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(read_file(key_file, "the TLS key"), read_file(cert_file, "the TLS certificate"))],
        root_certificates=read_file(client_ca_file, "the client CA") if client_ca_file else None,
        require_client_auth=client_ca_file is not None,
    )


def peer_common_name(context: grpc.ServicerContext) -> str:
    """The common name of the verified client certificate of a mutual-TLS call ("" without)."""
    auth: Any = context.auth_context() or {}
    names = list(auth.get("x509_common_name") or [])
    return bytes(names[0]).decode() if names else ""
