"""The inference port as an attacker on the network would try it: a bearer token when one is
set, TLS when configured, loopback by default with a loud warning otherwise, and memory
bounded whatever the requests' sizes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.inference.limits import (
    LARGE_REQUEST_BYTES,
    REQUEST_OVERHEAD_BYTES,
    LargeRequests,
    peek_model,
    request_limit,
)
from agent.inference.server import (
    InferenceSecurity,
    InferenceServer,
    RequestLimits,
    exposure_warning,
    start_inference_server,
)
from agent.runtime import ModelRepository
from edgefleet.client.inference import InferenceClient
from edgefleet.core import errors
from edgefleet.core.certs import init_ca
from edgefleet.core.versions import TensorSpec
from protos.inference.v2 import grpc_predict_v2_pb2 as pb

TOKEN = "inference-secret"


@pytest.fixture
def guarded(repository: ModelRepository, tmp_path: Path) -> Iterator[tuple[InferenceServer, Path]]:
    tls = init_ca(tmp_path / "tls")
    server = start_inference_server(
        repository,
        "127.0.0.1",
        0,
        security=InferenceSecurity(tls.server_cert, tls.server_key, TOKEN),
    )
    yield server, tls.ca_cert
    server.stop(None)


def test_a_token_is_needed_for_inference_but_not_for_health(
    guarded: tuple[InferenceServer, Path],
) -> None:
    server, ca = guarded
    address = f"127.0.0.1:{server.port}"
    x = {"in": np.arange(4, dtype=np.float32)}
    for token in ("", "wrong-token"):
        with InferenceClient(address, ca_file=ca, token=token) as client:
            with pytest.raises(errors.Unauthenticated, match="bearer token"):
                client.infer("id-fp32", x)
            with pytest.raises(errors.Unauthenticated):
                client.metadata("id-fp32")
    with InferenceClient(address, ca_file=ca, token=TOKEN) as client:
        assert client.infer("id-fp32", x).outputs["out"].tolist() == [0, 1, 2, 3]
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca.read_bytes())) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_tls_port_refuses_plain_text(guarded: tuple[InferenceServer, Path]) -> None:
    server, _ = guarded
    with (
        InferenceClient(f"127.0.0.1:{server.port}", token=TOKEN, timeout=5) as client,
        pytest.raises(errors.Unavailable),
    ):
        client.live()


def test_an_open_port_says_so_loudly() -> None:
    open_port = exposure_warning("0.0.0.0", InferenceSecurity())
    assert "WARNING" in open_port and "authentication or TLS" in open_port
    assert "TLS" in exposure_warning("0.0.0.0", InferenceSecurity(token="t"))
    protected = InferenceSecurity(Path("c.pem"), Path("c.key"), "t")
    assert exposure_warning("0.0.0.0", protected) == ""
    assert exposure_warning("127.0.0.1", InferenceSecurity()) == ""


def test_the_request_limit_follows_the_model_shapes() -> None:
    image = TensorSpec("image", "FP32", (-1, 3, 224, 224))
    limit = request_limit([image], [4], max_rows=64, max_dynamic=4096, ceiling=1 << 30)
    assert limit == REQUEST_OVERHEAD_BYTES + 64 * 3 * 224 * 224 * 4
    tokens = TensorSpec("input_ids", "INT64", (-1, -1))
    # Typed int64 contents take up to ten bytes an element on the wire.
    limit = request_limit([tokens], [8], max_rows=8, max_dynamic=128, ceiling=1 << 30)
    assert limit == REQUEST_OVERHEAD_BYTES + 8 * 128 * 10
    assert request_limit([image], [4], max_rows=64, max_dynamic=1, ceiling=1 << 20) == 1 << 20


def test_the_model_is_read_without_parsing_the_tensors() -> None:
    request = pb.ModelInferRequest(model_name="m", model_version="3", id="x")
    request.raw_input_contents.append(b"\0" * 1000)
    assert peek_model(request.SerializeToString()) == ("m", "3")
    assert peek_model(b"\xff\xff\xff") == ("", "")
    assert peek_model(b"") == ("", "")


def test_a_request_over_its_models_limit_is_refused_before_parsing(
    repository: ModelRepository,
) -> None:
    limits = RequestLimits(max_rows=64, max_request_bytes=64 << 20)
    server = start_inference_server(repository, "127.0.0.1", 0, limits=limits)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            # id-fp32 takes FP32[N]: at most 64 rows, 256 bytes of tensor.
            fine = client.infer("id-fp32", {"in": np.ones(64, dtype=np.float32)})
            assert fine.outputs["out"].shape == (64,)
            big = np.ones(200_000, dtype=np.float32)  # 800 KB, legal for the server at large
            with pytest.raises(errors.ResourceExhausted, match="its limit is") as info:
                client.infer("id-fp32", {"in": big})
            assert "inference_max_rows" in info.value.message
            with pytest.raises(errors.NotFound):
                client.infer("no-such-model", {"in": big})
            assert client.live()
        assert server.memory_stats.refused_over_limit == 1
    finally:
        server.stop(None)


def test_large_requests_wait_their_turn() -> None:
    large = LargeRequests(in_flight=2)
    running = 0
    most = 0
    lock = threading.Lock()

    def one(size: int) -> None:
        nonlocal running, most
        with large.admit(size):
            with lock:
                running += 1
                most = max(most, running)
            time.sleep(0.05)
            with lock:
                running -= 1

    threads = [threading.Thread(target=one, args=(LARGE_REQUEST_BYTES + 1,)) for _ in range(8)]
    threads += [threading.Thread(target=one, args=(100,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The four small requests are never queued; the large ones two at a time.
    assert most <= 2 + 4
    assert large.stats.large_requests == 8
