"""What TLS costs on the agent's link and on the inference port: the same calls, plain text
and TLS, in one run.

    python benchmarks/bench_tls.py [--seconds 3] [--json out.json]

Agent link (a real cloud service, in this process, plain and with the TLS it makes itself):
GetDesiredState (signed, unary) calls per second, and FetchChunk throughput of a 1 MiB chunk,
over one long-lived channel as the agent keeps it. Inference port: ModelInfer calls per
second of a small CNN (batch 1), plain, TLS, and TLS with a bearer token. Ratios are TLS /
plain from the same run; the connection set-up (the handshake) is paid once per channel.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import export_small_cnn, write_json


def rate(call: Callable[[], object], seconds: float) -> float:
    """Calls per second of `call`, after a short warm-up."""
    for _ in range(20):
        call()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        call()
        count += 1
    return count / elapsed


def agent_link(root: Path, insecure: bool, model: Path, seconds: float) -> dict[str, float]:
    from cloudsvc.server import CloudServer
    from cloudsvc.settings import CloudSettings
    from edgefleet.client import AdminClient
    from edgefleet.core.auth import bearer_metadata
    from edgefleet.core.tls import ClientSecurity
    from protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc

    cloud = CloudServer(
        CloudSettings.model_validate(
            {"data_dir": root, "port": 0, "insecure": insecure, "chunk_size": 1 << 20}
        )
    ).start()
    ca = None if insecure else cloud.trust_dir / "ca.pem"
    security = ClientSecurity(ca_file=ca, insecure=insecure)
    try:
        with AdminClient(
            cloud.address, token_file=root / "admin-token", ca_file=ca, insecure=insecure or None
        ) as admin:
            secret, _ = admin.create_enroll_token(max_uses=1)
            with security.channel(cloud.address) as channel:
                stub = fleet_pb2_grpc.AgentServiceStub(channel)
                device = stub.Enroll(fleet_pb2.EnrollRequest(enroll_token=secret, device_id="d1"))
                version = admin.push_model("m", model, skip_verify=True)
                admin.deploy("m", version.version)
                creds = bearer_metadata(device.device_token)
                request = fleet_pb2.GetDesiredStateRequest()
                desired = rate(lambda: stub.GetDesiredState(request, metadata=creds), seconds)
                digest = version.artifacts[0].manifest_digest
                signed = stub.GetManifest(
                    fleet_pb2.GetManifestRequest(digest=digest), metadata=creds
                )
                from edgefleet.core.manifests import all_chunks, expand
                from protos.artifact.v1 import artifact_pb2

                manifest = artifact_pb2.Manifest.FromString(expand(signed).manifest)
                chunk = max(all_chunks(manifest), key=lambda c: c.size)
                fetch = fleet_pb2.FetchChunkRequest(sha256=chunk.sha256)

                def pull() -> None:
                    for _ in stub.FetchChunk(fetch, metadata=creds):
                        pass

                pulls = rate(pull, seconds)
        return {"get_desired_per_s": desired, "chunk_mb_per_s": pulls * chunk.size / 2**20}
    finally:
        cloud.stop(grace=0.5)


def inference_port(root: Path, model: Path, seconds: float) -> dict[str, float]:
    import numpy as np

    from agent.inference.server import InferenceSecurity, start_inference_server
    from agent.runtime import ModelRepository, SessionOptions, load_model
    from edgefleet.client.inference import InferenceClient
    from edgefleet.core.certs import init_ca

    options = SessionOptions(providers=("CPUExecutionProvider",), intra_op_threads=1)
    repository = ModelRepository()
    repository.publish(load_model("cnn", 1, "sha256:bench", model, options))
    tls = init_ca(root / "tls")
    x = np.zeros((1, 3, 64, 64), dtype=np.float32)
    figures: dict[str, float] = {}
    for label, security, ca, token in (
        ("plain", InferenceSecurity(), None, ""),
        ("tls", InferenceSecurity(tls.server_cert, tls.server_key), tls.ca_cert, ""),
        (
            "tls_token",
            InferenceSecurity(tls.server_cert, tls.server_key, "t0k"),
            tls.ca_cert,
            "t0k",
        ),
    ):
        server = start_inference_server(repository, "127.0.0.1", 0, security=security)
        try:
            with InferenceClient(f"127.0.0.1:{server.port}", ca_file=ca, token=token) as client:
                request = client.prepare("cnn", {"image": x})

                def infer(c: InferenceClient = client, r: Any = request) -> object:
                    return c.infer_prepared(r)

                figures[f"{label}_infer_per_s"] = rate(infer, seconds)
        finally:
            server.stop(0)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        root = Path(tmp)
        model = root / "cnn.onnx"
        export_small_cnn(model)
        import numpy as np
        import onnx
        from onnx import numpy_helper

        # The chunk figure needs a model of a few MiB: pad the CNN with an unused weight.
        big = onnx.load(str(model))
        big.graph.initializer.append(
            numpy_helper.from_array(np.zeros(1 << 20, dtype=np.float32), "padding")
        )
        padded = root / "padded.onnx"
        onnx.save(big, str(padded))
        results["plain"] = agent_link(root / "plain", True, padded, args.seconds)
        results["tls"] = agent_link(root / "tls", False, padded, args.seconds)
        results["inference"] = inference_port(root, model, args.seconds)
    plain, tls, inf = results["plain"], results["tls"], results["inference"]
    rows = [
        ("agent link: GetDesiredState /s", plain["get_desired_per_s"], tls["get_desired_per_s"]),
        ("agent link: FetchChunk MiB/s", plain["chunk_mb_per_s"], tls["chunk_mb_per_s"]),
        ("inference: ModelInfer /s", inf["plain_infer_per_s"], inf["tls_infer_per_s"]),
        ("inference: + bearer token /s", inf["plain_infer_per_s"], inf["tls_token_infer_per_s"]),
    ]
    print(f"{'':34} {'plain':>10} {'TLS':>10} {'TLS/plain':>10}")
    for name, a, b in rows:
        print(f"{name:34} {a:>10.1f} {b:>10.1f} {b / a:>10.2f}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
