"""The agent image's HEALTHCHECK: is the agent's inference port answering?

gRPC health checking on 127.0.0.1:$EDGEFLEET_AGENT_INFERENCE_PORT (8001): any answer means
the agent runs (SERVING once a model is loaded, NOT_SERVING before; health checking needs
no token). Where the port speaks TLS, a plain-text call fails; then a completed TLS
handshake is the sign of life (nothing is verified or sent: no secret is needed here).
Exit status 0: healthy, 1: not.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 5.0


def grpc_health(port: int) -> str | None:
    """The health status the port answers, None when it does not answer in plain text."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
            )
        except grpc.RpcError:
            return None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def tls_handshake(port: int) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # liveness only: whoever answers is on this host
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw,
            context.wrap_socket(raw),
        ):
            return True
    except OSError:
        return False


def main() -> int:
    port = int(os.environ.get("EDGEFLEET_AGENT_INFERENCE_PORT") or 8001)
    status = grpc_health(port)
    if status is not None:
        print(f"inference port {port}: {status}")
        return 0
    if tls_handshake(port):
        print(f"inference port {port}: TLS handshake completed")
        return 0
    print(f"inference port {port}: no answer", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
