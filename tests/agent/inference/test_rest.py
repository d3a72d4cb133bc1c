"""The KServe v2 REST port over the same data plane as gRPC: called with the standard library's
HTTP client and with tritonclient.http, JSON tensors and the binary-data extension, the same
error texts as gRPC with the HTTP status of their code, TLS and the bearer token, and the
port's own limits (body size, connections, read timeout)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.daemon import Agent
from agent.errors import STATUS
from agent.inference.rest import RestServer, start_rest_server
from agent.inference.server import InferenceServer, start_inference_server
from agent.runtime import ModelRepository
from agent.settings import AgentSettings
from edgefleet.core.certs import init_ca
from edgefleet.core.errors import ErrorCode
from edgefleet.core.rpc import GRPC_STATUS
from edgefleet.core.tensors import TYPED_CONTENTS_FIELD
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.agent.fakes import FakeCloud

from .conftest import MAX_MESSAGE
from .test_server import _bad_requests, affine_request

X = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.array([1, 2, 3, 4], dtype=np.float32)


@pytest.fixture(scope="module")
def rest(server: InferenceServer) -> Iterator[RestServer]:
    srv = start_rest_server(server.plane, "127.0.0.1", 0, timeout_s=5.0)
    yield srv
    srv.stop(0)


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post_json(port: int, path: str, payload: Any) -> tuple[int, Any]:
    status, _, body = call(
        port, "POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    return status, json.loads(body)


def affine_json(**extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.tolist()},  # nested
            {"name": "b", "datatype": "FP32", "shape": [4], "data": B.tolist()},  # flat
        ],
        **extra,
    }


def test_health_and_metadata(rest: RestServer) -> None:
    assert call(rest.port, "GET", "/v2/health/live")[::2] == (200, b'{"live":true}')
    assert call(rest.port, "GET", "/v2/health/ready")[::2] == (200, b'{"ready":true}')
    status, _, body = call(rest.port, "GET", "/v2")
    meta = json.loads(body)
    assert (
        status == 200
        and meta["name"] == "edgefleet-agent"
        and "classification" in meta["extensions"]
    )
    status, _, body = call(rest.port, "GET", "/v2/models/affine")
    assert status == 200
    assert json.loads(body) == {
        "name": "affine",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "b", "datatype": "FP32", "shape": [4]},
        ],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "total", "datatype": "FP32", "shape": [-1]},
        ],
    }
    assert call(rest.port, "GET", "/v2/models/affine/versions/1/ready")[0] == 200
    status, _, body = call(rest.port, "GET", "/v2/models/affine/versions/7/ready")
    assert (status, json.loads(body)) == (400, {"name": "affine", "ready": False})
    status, _, body = call(rest.port, "GET", "/v2/models/resnet")
    assert status == 404 and "'resnet' is not served here" in json.loads(body)["error"]


def test_unknown_endpoints_and_methods(rest: RestServer) -> None:
    status, _, body = call(rest.port, "GET", "/v1/models")
    assert status == 404 and "/v2" in json.loads(body)["error"]
    status, headers, _ = call(rest.port, "GET", "/v2/models/affine/infer")
    assert status == 405 and headers["Allow"] == "POST"
    status, _, body = call(rest.port, "POST", "/v2/systemsharedmemory/region/r/register", b"{}")
    assert status == 501 and "not implemented" in json.loads(body)["error"]


def test_json_inference_flat_and_nested(rest: RestServer) -> None:
    status, answer = post_json(rest.port, "/v2/models/affine/infer", affine_json(id="r1"))
    assert status == 200
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("affine", "2", "r1")
    y, total = answer["outputs"]
    assert (y["name"], y["datatype"], y["shape"]) == ("y", "FP32", [2, 4])
    np.testing.assert_allclose(np.array(y["data"]).reshape(2, 4), X * 3 + B)
    np.testing.assert_allclose(total["data"], (X * 3 + B).sum(1))
    status, answer = post_json(
        rest.port,
        "/v2/models/affine/versions/1/infer",
        affine_json(outputs=[{"name": "total"}]),
    )
    assert status == 200 and answer["model_version"] == "1"
    assert [o["name"] for o in answer["outputs"]] == ["total"]
    np.testing.assert_allclose(answer["outputs"][0]["data"], (X * 2 + B).sum(1))


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("BOOL", [True, False, True]),
        ("INT8", [-128, 0, 127]),
        ("UINT64", [0, 1, 2**64 - 1]),
        ("INT64", [-(2**63), 0, 2**63 - 1]),
        ("FP64", [0.1, -1e300, 3.0]),
        ("FP16", [0.5, -1.25, 3.0]),  # the protocol carries FP16 raw: converted, not typed
        ("BYTES", ["a", "", "héllo"]),
    ],
)
def test_json_round_trip_of_types(rest: RestServer, datatype: str, values: list[Any]) -> None:
    payload = {"inputs": [{"name": "in", "datatype": datatype, "shape": [3], "data": values}]}
    status, answer = post_json(rest.port, f"/v2/models/id-{datatype.lower()}/infer", payload)
    assert status == 200, answer
    out = answer["outputs"][0]
    assert (out["datatype"], out["shape"], out["data"]) == (datatype, [3], values)


def test_binary_data_extension(rest: RestServer) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2, 4],
                    "parameters": {"binary_data_size": X.nbytes},
                },
                {"name": "b", "datatype": "FP32", "shape": [4], "data": B.tolist()},
            ],
            "outputs": [
                {"name": "y", "parameters": {"binary_data": True}},
                {"name": "total"},
            ],
        }
    ).encode()
    status, headers, body = call(
        rest.port,
        "POST",
        "/v2/models/affine/infer",
        header + X.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    split = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:split])
    y, total = answer["outputs"]
    assert y["parameters"] == {"binary_data_size": 32} and "data" not in y
    np.testing.assert_allclose(np.frombuffer(body[split:], np.float32).reshape(2, 4), X * 3 + B)
    np.testing.assert_allclose(total["data"], (X * 3 + B).sum(1))
    # Binary data nobody claims, or claimed beyond the body, is refused.
    status, _, body = call(
        rest.port,
        "POST",
        "/v2/models/affine/infer",
        header + X.tobytes() + b"extra",
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 400 and "no input's binary_data_size claims" in json.loads(body)["error"]


def test_tritonclient_http(rest: RestServer) -> None:
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (dev extra)")
    InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{rest.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("affine", "1") and not client.is_model_ready("affine", "9")
        meta = client.get_model_metadata("affine")
        assert [i["name"] for i in meta["inputs"]] == ["x", "b"]
        assert client.get_server_metadata()["name"] == "edgefleet-agent"
        for binary in (True, False):
            x = httpclient.InferInput("x", [2, 4], "FP32")
            x.set_data_from_numpy(X, binary_data=binary)
            b = httpclient.InferInput("b", [4], "FP32")
            b.set_data_from_numpy(B, binary_data=binary)
            outputs = [
                httpclient.InferRequestedOutput("y", binary_data=binary),
                httpclient.InferRequestedOutput("total", binary_data=not binary),
            ]
            result = client.infer("affine", [x, b], outputs=outputs, model_version="1")
            np.testing.assert_allclose(result.as_numpy("y"), X * 2 + B)
            np.testing.assert_allclose(result.as_numpy("total"), (X * 2 + B).sum(1))
        # No outputs named: tritonclient asks for all of them in binary.
        result = client.infer("affine", [x, b], request_id="abc")
        assert result.get_response()["id"] == "abc"
        np.testing.assert_allclose(result.as_numpy("y"), X * 3 + B)
        # Classification over REST: BYTES "score:index:label".
        top = httpclient.InferRequestedOutput("y", binary_data=False, class_count=2)
        got = client.infer("affine", [x, b], outputs=[top], model_version="1").as_numpy("y")
        assert [v.decode() if isinstance(v, bytes) else v for v in got[0]] == [
            "10.000000:3:3",
            "7.000000:2:2",
        ]
        words = np.array([b"edge", b"", b"fleet"], dtype=np.object_)
        w = httpclient.InferInput("in", [3], "BYTES")
        w.set_data_from_numpy(words)
        assert list(client.infer("id-bytes", [w]).as_numpy("out")) == list(words)
        bad = httpclient.InferInput("x", [2, 4], "INT32")
        bad.set_data_from_numpy(X.astype(np.int32))
        with pytest.raises(InferenceServerException, match="takes FP32"):
            client.infer("affine", [bad, b])
    finally:
        client.close()


def _as_rest(request: pb.ModelInferRequest) -> tuple[str, bytes, dict[str, str]]:
    """The REST request that says what a gRPC request says: raw contents as binary data,
    typed contents as JSON data."""
    raw = list(request.raw_input_contents)
    inputs: list[dict[str, Any]] = []
    for index, tensor in enumerate(request.inputs):
        item: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if index < len(raw):
            item["parameters"] = {"binary_data_size": len(raw[index])}
        elif tensor.HasField("contents"):
            field = TYPED_CONTENTS_FIELD[tensor.datatype]
            item["data"] = list(getattr(tensor.contents, field))
        inputs.append(item)
    payload: dict[str, Any] = {"inputs": inputs}
    if request.outputs:
        payload["outputs"] = [{"name": o.name} for o in request.outputs]
    header = json.dumps(payload).encode()
    path = f"/v2/models/{request.model_name}"
    if request.model_version:
        path += f"/versions/{request.model_version}"
    headers = {"Inference-Header-Content-Length": str(len(header))} if raw else {}
    return path + "/infer", header + b"".join(raw), headers


# gRPC cases whose request REST cannot say (REST names each input's bytes itself).
NOT_SAYABLE = {"raw count", "raw and typed"}


@pytest.mark.parametrize("case", sorted(set(_bad_requests()) - NOT_SAYABLE))
def test_each_grpc_error_has_the_same_text_over_rest(
    rest: RestServer, stub: pb_grpc.GRPCInferenceServiceStub, case: str
) -> None:
    request, code, fragment = _bad_requests()[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == code
    path, body, headers = _as_rest(request)
    status, _, answer = call(rest.port, "POST", path, body, headers)
    error = json.loads(answer)["error"]
    assert error == info.value.details()
    assert fragment in error
    expected_http = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
    }[code]
    assert status == expected_http


def test_the_one_status_table_agrees_with_the_grpc_interceptor() -> None:
    assert set(STATUS) == set(ErrorCode)
    for code, (grpc_code, http_code) in STATUS.items():
        assert GRPC_STATUS[code] == grpc_code
        assert 400 <= int(http_code) < 600
    assert int(STATUS[ErrorCode.INVALID_ARGUMENT][1]) == 400
    assert int(STATUS[ErrorCode.NOT_FOUND][1]) == 404
    assert int(STATUS[ErrorCode.UNAVAILABLE][1]) == 503


def test_over_the_limit_is_413_before_the_body_is_read(rest: RestServer) -> None:
    rows = MAX_MESSAGE // 16 + 1
    big = np.zeros((rows, 4), np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [rows, 4],
                    "parameters": {"binary_data_size": big.nbytes},
                },
                {"name": "b", "datatype": "FP32", "shape": [4], "data": B.tolist()},
            ]
        }
    ).encode()
    status, headers, body = call(
        rest.port,
        "POST",
        "/v2/models/affine/infer",
        header + big.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    # (Here the model's limit is the port's: max_request_bytes caps it.)
    assert status == 413 and "at most 65536" in json.loads(body)["error"]
    assert headers.get("Connection") == "close"
    assert call(rest.port, "GET", "/v2/health/live")[0] == 200


def test_keep_alive_serves_many_requests_on_one_connection(rest: RestServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", rest.port, timeout=10)
    try:
        body = json.dumps(affine_json()).encode()
        first_socket = None
        for _ in range(5):
            conn.request("POST", "/v2/models/affine/infer", body=body)
            response = conn.getresponse()
            assert response.status == 200
            response.read()
            first_socket = first_socket or conn.sock
            assert conn.sock is first_socket  # not reconnected
    finally:
        conn.close()


def test_connections_are_capped_and_slow_bodies_time_out(server: InferenceServer) -> None:
    srv = start_rest_server(server.plane, "127.0.0.1", 0, max_connections=1, timeout_s=0.5)
    try:
        held = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        held.request("GET", "/v2/health/live")
        assert held.getresponse().read() == b'{"live":true}'  # the one slot, kept alive
        status, _, body = call(srv.port, "GET", "/v2/health/live")
        assert status == 503 and b"too many connections" in body
        held.close()
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            raw.sendall(
                b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
            )
            started = time.monotonic()
            answer = raw.recv(4096)
            assert answer.startswith(b"HTTP/1.1 503") and b"did not arrive" in answer
            assert time.monotonic() - started < 3
    finally:
        srv.stop(0)


def test_tls_and_the_bearer_token(repository: ModelRepository, tmp_path: Path) -> None:
    tls = init_ca(tmp_path / "tls")
    server = start_inference_server(repository, "127.0.0.1", 0, max_workers=2)
    srv = start_rest_server(
        server.plane,
        "127.0.0.1",
        0,
        cert_file=tls.server_cert,
        key_file=tls.server_key,
        token="rest-secret",
    )
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    context.check_hostname = False

    def https(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=10, context=context)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    try:
        assert https("/v2/health/ready", {})[0] == 200  # probes need no token
        status, headers, body = https("/v2/models/affine", {})
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in json.loads(body)["error"]
        assert https("/v2/models/affine", {"Authorization": "Bearer wrong"})[0] == 401
        assert https("/v2/models/affine", {"Authorization": "Bearer rest-secret"})[0] == 200
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            call(srv.port, "GET", "/v2/health/live")  # plain text on a TLS port
    finally:
        srv.stop(0)
        server.stop(0)


def test_the_agent_serves_rest_beside_grpc(settings: AgentSettings, cloud: FakeCloud) -> None:
    agent = Agent(settings.model_copy(update={"rest_port": 0}), link=cloud)
    agent.start(reconcile=False)
    try:
        assert agent.rest_port is not None
        status, _, body = call(agent.rest_port, "GET", "/v2/health/live")
        assert (status, body) == (200, b'{"live":true}')
        assert call(agent.rest_port, "GET", "/v2/health/ready")[0] == 400  # nothing loaded
    finally:
        agent.stop()
    assert Agent(settings, link=cloud).rest_port is None  # off by default


def test_rest_and_grpc_share_one_plane(
    rest: RestServer, server: InferenceServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    stats = server.plane.statistics.of("affine", 2)
    before = stats.figures().success.count
    stub.ModelInfer(affine_request())
    assert post_json(rest.port, "/v2/models/affine/infer", affine_json())[0] == 200
    assert stats.figures().success.count == before + 2


def test_a_body_over_its_models_limit_is_413(repository: ModelRepository) -> None:
    from agent.inference.server import RequestLimits

    limits = RequestLimits(max_rows=64, max_request_bytes=64 << 20)
    server = start_inference_server(repository, "127.0.0.1", 0, limits=limits, max_workers=2)
    srv = start_rest_server(server.plane, "127.0.0.1", 0)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        big = np.ones(200_000, dtype=np.float32)  # legal for the port, not for id-fp32
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "in",
                        "datatype": "FP32",
                        "shape": [big.size],
                        "parameters": {"binary_data_size": big.nbytes},
                    }
                ]
            }
        ).encode()
        conn.request(
            "POST",
            "/v2/models/id-fp32/infer",
            header + big.tobytes(),
            {"Inference-Header-Content-Length": str(len(header))},
        )
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 413 and "its limit is" in error
        assert "inference_max_rows" in error
        assert server.memory_stats.refused_over_limit == 1
        # The refused body was read past, never parsed: the connection goes on.
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().read() == b'{"live":true}'
    finally:
        conn.close()
        srv.stop(0)
        server.stop(0)


def test_tritons_config_statistics_and_index_over_rest(rest: RestServer) -> None:
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (dev extra)")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{rest.port}")
    try:
        config = client.get_model_config("affine", "1")
        assert (config["name"], config["platform"], config["max_batch_size"]) == (
            "affine",
            "onnxruntime_onnx",
            0,
        )
        assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
            ("x", "TYPE_FP32", [-1, 4]),
            ("b", "TYPE_FP32", [4]),
        ]
        before = client.get_inference_statistics("affine", "2")["model_stats"][0]
        assert post_json(rest.port, "/v2/models/affine/infer", affine_json())[0] == 200
        after = client.get_inference_statistics("affine", "2")["model_stats"][0]
        success = after["inference_stats"]["success"]["count"]
        assert success == before["inference_stats"]["success"]["count"] + 1
        assert after["inference_stats"]["compute_infer"]["ns"] > 0
        everything = client.get_inference_statistics()["model_stats"]
        assert {("affine", "1"), ("affine", "2")} <= {(s["name"], s["version"]) for s in everything}
        index = client.get_model_repository_index()
        assert {"name": "affine", "version": "2", "state": "READY"} in index
    finally:
        client.close()


# -- the attacker review's findings ---------------------------------------------------------


def _raw(port: int, data: bytes, *, wait: float = 3.0) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it (or `wait`)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as conn:
        conn.sendall(data)
        end = time.monotonic() + wait
        try:
            while time.monotonic() < end:
                chunk = conn.recv(65536)
                if not chunk:
                    return out + b"<closed>"
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def _closed_within(conn: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `conn` within `seconds` while a byte of `trickle` is sent
    every 0.2 s."""
    conn.settimeout(0.2)
    end = time.monotonic() + seconds
    for byte in (trickle * 1000) or iter(int, 1):
        if time.monotonic() > end:
            return False
        try:
            if conn.recv(4096) == b"":
                return True
        except TimeoutError:
            pass
        except OSError:
            return True
        if trickle:
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return True
    return False


def test_trickled_headers_meet_a_deadline_and_one_address_cannot_take_every_slot(
    server: InferenceServer,
) -> None:
    # Slowloris: a request line and headers sent a byte at a time kept every connection
    # open (each read reset the read timeout), and 503 answered everyone else, probes too.
    srv = start_rest_server(
        server.plane, "127.0.0.1", 0, max_connections=4, timeout_s=5.0, header_timeout_s=1.0
    )
    attackers = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(2)]
    try:
        for conn in attackers:
            conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Slow: ")
        time.sleep(0.2)
        # The same address may hold half the slots; another address is still served.
        status, _, body = call(srv.port, "GET", "/v2/health/live")
        assert status == 503 and b"too many connections from this address" in body
        other = http.client.HTTPConnection(
            "127.0.0.1", srv.port, timeout=5, source_address=("127.0.0.2", 0)
        )
        other.request("GET", "/v2/health/live")
        assert other.getresponse().read() == b'{"live":true}'
        other.close()
        # However the bytes trickle, the headers' deadline (1 s, not the 5 s read timeout)
        # closes the connections.
        started = time.monotonic()
        assert all(_closed_within(conn, 3.0, trickle=b"abcdef") for conn in attackers)
        assert time.monotonic() - started < 3.0
        # A connection that sends nothing at all is closed at the same deadline.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as silent:
            assert _closed_within(silent, 3.0)
        assert call(srv.port, "GET", "/v2/health/live")[0] == 200
    finally:
        for conn in attackers:
            conn.close()
        srv.stop(0)


def test_an_unknown_model_is_404_before_its_body_is_parsed_and_slow_bodies_hold_no_slot(
    repository: ModelRepository,
) -> None:
    from agent.inference.server import RequestLimits

    limits = RequestLimits(max_rows=1 << 20, max_request_bytes=64 << 20, large_in_flight=1)
    server = start_inference_server(repository, "127.0.0.1", 0, limits=limits, max_workers=2)
    srv = start_rest_server(server.plane, "127.0.0.1", 0, timeout_s=5.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    slow = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(2)]
    try:
        # The model is looked up before the body is read, let alone parsed.
        status, _, body = call(srv.port, "POST", "/v2/models/no-such/infer", b"{" * 100)
        assert status == 404 and "'no-such' is not served here" in json.loads(body)["error"]
        # Uploads still arriving (to no model, or a legal 2 MiB one) hold no large-request
        # slot: a large gRPC request (there is one slot) is served meanwhile.
        for conn, model in zip(slow, (b"no-such", b"id-fp32"), strict=True):
            conn.sendall(
                b"POST /v2/models/" + model + b"/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 2097152\r\n\r\n{"
            )
        time.sleep(0.3)
        request = pb.ModelInferRequest(model_name="id-fp32")
        request.inputs.add(name="in", datatype="FP32", shape=[400_000])
        request.raw_input_contents.append(np.zeros(400_000, np.float32).tobytes())
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(request, timeout=3).model_name == "id-fp32"
    finally:
        for conn in slow:
            conn.close()
        channel.close()
        srv.stop(0)
        server.stop(0)


def test_json_bodies_have_a_smaller_cap_than_binary_ones(server: InferenceServer) -> None:
    srv = start_rest_server(server.plane, "127.0.0.1", 0, max_json_bytes=1024)
    try:
        status, answer = post_json(srv.port, "/v2/models/affine/infer", affine_json(id="r" * 2000))
        assert status == 413 and "binary data" in answer["error"]
        assert "rest_max_json_bytes" in answer["error"]
        # The same tensors, larger, as binary data behind a small JSON header: served.
        x = np.ones((64, 4), np.float32)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [64, 4],
                        "parameters": {"binary_data_size": x.nbytes},
                    },
                    {"name": "b", "datatype": "FP32", "shape": [4], "data": B.tolist()},
                ]
            }
        ).encode()
        status, _, _ = call(
            srv.port,
            "POST",
            "/v2/models/affine/infer",
            header + x.tobytes(),
            {"Inference-Header-Content-Length": str(len(header))},
        )
        assert status == 200 and len(header) + x.nbytes > 1024
    finally:
        srv.stop(0)


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n",
        b"Content-Length: {n}\r\nTransfer-Encoding: identity\r\n",
        b"Content-Length: 0\r\nContent-Length: {n}\r\n",
        b"Content-Length: {n}\r\nContent-Length: {n}\r\n",
        b"Content-Length: +{n}\r\n",
        b"Content-Length: {n}\x0b\r\n",
        b"Content-Length: 0{n}_0\r\n",
        b"Content-Length: -1\r\n",
        "Content-Length: \u0661\r\n".encode(),
    ],
)
def test_framing_a_proxy_could_read_otherwise_is_400_and_closes(
    rest: RestServer, framing: bytes
) -> None:
    # Request smuggling: a body framed one way here and another way by a proxy in front
    # hides a second request in it.
    body = json.dumps(
        {"inputs": [{"name": "in", "datatype": "INT32", "shape": [1], "data": [7]}]}
    ).encode()
    smuggled = b"GET /v2/models/stats HTTP/1.1\r\nHost: x\r\n\r\n"
    for path in (b"/v2/models/id-int32/infer", b"/v2/repository/index"):
        head = framing.replace(b"{n}", str(len(body)).encode())
        answer = _raw(
            rest.port,
            b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + body + smuggled,
        )
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert answer.count(b"HTTP/1.1 ") == 1 and answer.endswith(b"<closed>")


def test_non_finite_outputs_are_answered_as_binary_data(rest: RestServer) -> None:
    # NaN and Infinity are not JSON: answering them as JSON numbers broke strict parsers.
    x = X.copy()
    x[0, 1], x[1, 2] = np.nan, np.inf
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2, 4],
                    "parameters": {"binary_data_size": x.nbytes},
                },
                {"name": "b", "datatype": "FP32", "shape": [4], "data": B.tolist()},
            ],
        }
    ).encode()
    status, headers, body = call(
        rest.port,
        "POST",
        "/v2/models/affine/infer",
        header + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    split = int(headers["Inference-Header-Content-Length"])

    def strict(constant: str) -> Any:
        raise AssertionError(f"{constant} in a JSON answer")

    y, total = json.loads(body[:split], parse_constant=strict)["outputs"]
    assert y["parameters"] == {"binary_data_size": 32} and "data" not in y
    assert total["parameters"] == {"binary_data_size": 8} and "data" not in total
    np.testing.assert_array_equal(
        np.frombuffer(body[split : split + 32], np.float32).reshape(2, 4), x * 3 + B
    )
    np.testing.assert_array_equal(np.frombuffer(body[split + 32 :], np.float32), [np.nan, np.inf])
