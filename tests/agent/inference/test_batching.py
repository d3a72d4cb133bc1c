"""Dynamic batching: queued requests share one run and each gets exactly its own answer.

Which requests end up in one batch depends on timing, so the tests that check grouping hold
the model's first run on a gate until the others are queued (waiting on the batcher's queue,
not on the clock); the tests through a real server check answers and status codes only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper

from agent.errors import InvalidRequest
from agent.inference.batching import DynamicBatcher, batch_axis
from agent.inference.server import InferenceServer, start_inference_server
from agent.runtime import LoadedModel, ModelRepository
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

from .conftest import load

Array = npt.NDArray[Any]
Input = pb.ModelInferRequest.InferInputTensor
TABLE = np.arange(15, dtype=np.float32).reshape(5, 3)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def scale_model(path: Path, first_dim: str | int = "batch") -> Path:
    """x: FP32[first_dim, F] -> y = 2x (FP32[first_dim, F]), total = sum(x, 1) (FP32[first_dim])."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [first_dim, "F"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [first_dim, "F"])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [first_dim])
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0),
    ]
    return _save(helper.make_graph(nodes, "scale", [x], [y, total], inits), path)


def lookup_model(path: Path) -> Path:
    """idx: INT64[batch] -> rows = TABLE[idx] (FP32[batch, 3]); an index past 4 fails the run."""
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])
    rows = helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 3])
    table = helper.make_tensor("table", TensorProto.FLOAT, [5, 3], TABLE.reshape(-1).tolist())
    node = helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0)
    return _save(helper.make_graph([node], "lookup", [idx], [rows], [table]), path)


@pytest.fixture(scope="module")
def scale(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load("scale", 1, scale_model(tmp_path_factory.mktemp("batching") / "scale.onnx"))


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = scale_model(tmp_path_factory.mktemp("batching") / "fixed.onnx", first_dim=2)
    return load("fixed", 1, path)


@pytest.fixture(scope="module")
def lookup(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load("lookup", 1, lookup_model(tmp_path_factory.mktemp("batching") / "lookup.onnx"))


class Gate:
    """A run function that holds its first call until opened and records every call."""

    def __init__(self, run: Callable[[dict[str, Array], Sequence[str]], list[Array]]) -> None:
        self._run = run
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.entered = threading.Event()
        self.calls: list[tuple[dict[str, Array], tuple[str, ...], int]] = []

    def __call__(self, feeds: dict[str, Array], output_names: Sequence[str]) -> list[Array]:
        with self._lock:
            first = not self.calls
            self.calls.append((feeds, tuple(output_names), threading.get_ident()))
        if first:
            self.entered.set()
            assert self._open.wait(10), "the test never opened the gate"
        return self._run(feeds, output_names)

    def open(self) -> None:
        self._open.set()


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in 10 s"
        time.sleep(0.001)


def double(feeds: dict[str, Array], output_names: Sequence[str]) -> list[Array]:
    """A model whose every output is 2 * x."""
    return [feeds["x"] * 2 for _ in output_names]


def run_held(
    batcher: DynamicBatcher, gate: Gate, first: dict[str, Array], queued: list[dict[str, Array]]
) -> list[Array | Exception]:
    """Run `first` (held on the gate), queue `queued` behind it, open the gate; each outcome."""
    names = ("y",)

    def call(feeds: dict[str, Array]) -> Array | Exception:
        try:
            return batcher.run(feeds, names)[0]
        except Exception as err:
            return err

    with ThreadPoolExecutor(len(queued) + 1) as pool:
        head = pool.submit(call, first)
        assert gate.entered.wait(10)
        rest = [pool.submit(call, feeds) for feeds in queued]
        wait_until(lambda: batcher.queued() == len(queued))
        gate.open()
        return [head.result(10)] + [f.result(10) for f in rest]


def rows(n: int, start: float, width: int = 4) -> dict[str, Array]:
    return {"x": np.arange(start, start + n * width, dtype=np.float32).reshape(n, width)}


def test_batch_axis_is_the_shared_symbolic_first_dim(
    scale: LoadedModel,
    fixed: LoadedModel,
    lookup: LoadedModel,
    affine_v1: LoadedModel,
    identities: dict[str, LoadedModel],
) -> None:
    assert batch_axis(scale) == "batch"
    assert batch_axis(lookup) == "batch"
    assert batch_axis(identities["BYTES"]) == "N"
    assert batch_axis(fixed) is None  # first dimension fixed at 2
    assert batch_axis(affine_v1) is None  # input b has no batch dimension
    assert not DynamicBatcher.for_model(fixed).batchable
    assert DynamicBatcher.for_model(scale, max_batch=8).batchable


def test_idle_request_runs_alone_on_its_own_thread() -> None:
    seen: list[int] = []

    def run(feeds: dict[str, Array], names: Sequence[str]) -> list[Array]:
        seen.append(threading.get_ident())
        return double(feeds, names)

    batcher = DynamicBatcher(run, ["x"])
    for n in (1, 3):
        x = rows(n, 0.0)
        np.testing.assert_array_equal(batcher.run(x, ["y"])[0], x["x"] * 2)
    assert seen == [threading.get_ident()] * 2
    assert batcher.stats().largest == 1


def test_queued_requests_share_one_run_and_get_their_own_rows() -> None:
    gate = Gate(double)
    batcher = DynamicBatcher(gate, ["x"], max_batch=32)
    queued = [rows(n, 100.0 * i) for i, n in enumerate([1, 3, 1, 2, 1], start=1)]
    outcomes = run_held(batcher, gate, rows(1, 0.0), queued)
    for feeds, got in zip([rows(1, 0.0), *queued], outcomes, strict=True):
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, feeds["x"] * 2)
    # The held run, then one run over all 8 queued rows, made on a requester's thread.
    assert [c[0]["x"].shape[0] for c in gate.calls] == [1, 8]
    assert batcher.stats().runs == 2
    assert batcher.stats().largest == 5
    assert batcher.queued() == 0


def test_batches_group_by_shape_and_stop_at_max_batch() -> None:
    gate = Gate(double)
    batcher = DynamicBatcher(gate, ["x"], max_batch=4)
    wide = [rows(1, 10.0 * i, width=6) for i in range(2)]
    narrow = [rows(1, 100.0 * i) for i in range(5)]
    queued = [narrow[0], wide[0], *narrow[1:], wide[1]]
    outcomes = run_held(batcher, gate, rows(1, 0.0), queued)
    for feeds, got in zip([rows(1, 0.0), *queued], outcomes, strict=True):
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, feeds["x"] * 2)
    shapes = [c[0]["x"].shape for c in gate.calls[1:]]
    # Oldest first; requests of another width wait for their own batch; at most 4 rows each.
    assert shapes == [(4, 4), (2, 6), (1, 4)]


def test_requests_larger_than_max_batch_run_alone_even_while_busy() -> None:
    gate = Gate(double)
    batcher = DynamicBatcher(gate, ["x"], max_batch=4)
    with ThreadPoolExecutor(2) as pool:
        head = pool.submit(batcher.run, rows(1, 0.0), ["y"])
        assert gate.entered.wait(10)
        big = rows(5, 1.0)
        np.testing.assert_array_equal(batcher.run(big, ["y"])[0], big["x"] * 2)
        gate.open()
        head.result(10)


def test_a_failed_batch_is_run_again_request_by_request() -> None:
    def strict(feeds: dict[str, Array], names: Sequence[str]) -> list[Array]:
        if (feeds["x"] < 0).any():
            raise InvalidRequest("negative values")
        return double(feeds, names)

    gate = Gate(strict)
    batcher = DynamicBatcher(gate, ["x"])
    bad: dict[str, Array] = {"x": -np.ones((1, 4), dtype=np.float32)}
    queued = [rows(1, 1.0), bad, rows(2, 5.0)]
    outcomes = run_held(batcher, gate, rows(1, 0.0), queued)
    assert isinstance(outcomes[2], InvalidRequest)
    for i in (0, 1, 3):
        feeds = [rows(1, 0.0), *queued][i]
        got = outcomes[i]
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, feeds["x"] * 2)


def test_outputs_without_a_batch_axis_stop_batching() -> None:
    def column_sums(feeds: dict[str, Array], names: Sequence[str]) -> list[Array]:
        return [feeds["x"].sum(axis=0, keepdims=True) for _ in names]

    gate = Gate(column_sums)
    batcher = DynamicBatcher(gate, ["x"])
    queued = [rows(1, 1.0), rows(1, 9.0)]
    outcomes = run_held(batcher, gate, rows(1, 0.0), queued)
    for feeds, got in zip([rows(1, 0.0), *queued], outcomes, strict=True):
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, feeds["x"])  # each request's own column sums
    assert not batcher.batchable


def test_real_model_batched_equals_unbatched(scale: LoadedModel) -> None:
    gate = Gate(scale.run)
    batcher = DynamicBatcher(gate, ["x"])
    names = ("y", "total")
    rng = np.random.default_rng(0)
    requests: list[dict[str, Array]] = [
        {"x": rng.standard_normal((n, 5), dtype=np.float32)} for n in [1, 2, 1, 4, 1, 3]
    ]
    outcomes: list[list[Array]] = []
    with ThreadPoolExecutor(len(requests)) as pool:
        head = pool.submit(batcher.run, requests[0], names)
        assert gate.entered.wait(10)
        # Mixed output selections: the batch runs the union and hands each its own.
        rest = [
            pool.submit(batcher.run, feeds, names if i % 2 else names[::-1])
            for i, feeds in enumerate(requests[1:])
        ]
        wait_until(lambda: batcher.queued() == len(rest))
        gate.open()
        outcomes = [head.result(10)] + [f.result(10) for f in rest]
    assert [c[0]["x"].shape[0] for c in gate.calls] == [1, 11]
    for i, (feeds, got) in enumerate(zip(requests, outcomes, strict=True)):
        want: list[Array] = scale.run(feeds, names)
        if i and not (i - 1) % 2:
            want = want[::-1]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6)


def test_real_model_error_reaches_only_its_request(lookup: LoadedModel) -> None:
    gate = Gate(lookup.run)
    batcher = DynamicBatcher(gate, ["idx"])
    good = [np.array([0, 4]), np.array([2]), np.array([1, 1, 3])]
    bad = np.array([7])
    feeds: list[dict[str, Array]] = [
        {"idx": a.astype(np.int64)} for a in [good[0], bad, good[1], good[2]]
    ]
    outcomes: list[list[Array] | Exception] = []

    def call(f: dict[str, Array]) -> list[Array] | Exception:
        try:
            return batcher.run(f, ["rows"])
        except Exception as err:
            return err

    with ThreadPoolExecutor(4) as pool:
        head = pool.submit(call, feeds[0])
        assert gate.entered.wait(10)
        rest = [pool.submit(call, f) for f in feeds[1:]]
        wait_until(lambda: batcher.queued() == 3)
        gate.open()
        outcomes = [head.result(10)] + [f.result(10) for f in rest]
    assert isinstance(outcomes[1], InvalidRequest)
    assert "cannot run on these inputs" in str(outcomes[1])
    for i, idx in ((0, good[0]), (2, good[1]), (3, good[2])):
        got = outcomes[i]
        assert isinstance(got, list)
        np.testing.assert_array_equal(got[0], TABLE[idx])


# Through a real server: many client threads at once; answers and statuses must be exact.


@pytest.fixture(scope="module")
def batching_stub(
    scale: LoadedModel, fixed: LoadedModel, lookup: LoadedModel
) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    repo = ModelRepository()
    for model in (scale, fixed, lookup):
        repo.publish(model)
    server: InferenceServer = start_inference_server(
        repo, "127.0.0.1", 0, max_workers=8, batching=True
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()
    server.stop(None)


def x_request(model: str, x: Array, *, typed: bool = False) -> pb.ModelInferRequest:
    tensor = Input(name="x", datatype="FP32", shape=x.shape)
    if typed:
        tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
        return pb.ModelInferRequest(model_name=model, inputs=[tensor])
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()])


def answers(response: pb.ModelInferResponse) -> dict[str, Array]:
    out: dict[str, Array] = {}
    for i, tensor in enumerate(response.outputs):
        if response.raw_output_contents:
            flat = np.frombuffer(response.raw_output_contents[i], np.float32)
        else:
            flat = np.array(tensor.contents.fp32_contents, np.float32)
        out[tensor.name] = flat.reshape(tuple(tensor.shape))
    return out


@pytest.mark.parametrize("model", ["scale", "fixed"])
def test_concurrent_requests_through_the_server(
    batching_stub: pb_grpc.GRPCInferenceServiceStub, model: str
) -> None:
    rng = np.random.default_rng(1)
    sizes = [2] * 64 if model == "fixed" else [1, 1, 2, 1, 3, 1, 1, 4] * 8
    inputs = [rng.standard_normal((n, 6), dtype=np.float32) for n in sizes]

    def call(i: int) -> dict[str, Array]:
        return answers(batching_stub.ModelInfer(x_request(model, inputs[i], typed=i % 5 == 0)))

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(len(inputs))))
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_allclose(got["y"], x * 2, rtol=1e-6)
        np.testing.assert_allclose(got["total"], x.sum(axis=1), rtol=1e-5, atol=1e-5)


def test_bad_requests_fail_alone_through_the_server(
    batching_stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    def call(i: int) -> tuple[grpc.StatusCode, Array | None]:
        if i % 4 == 1:  # a value the model cannot run on: fails inside ONNX Runtime
            idx = np.array([9], dtype=np.int64)
        elif i % 4 == 3:  # refused while decoding: wrong datatype
            idx = np.array([1], dtype=np.int32)
        else:
            idx = np.array([i % 5, (i + 1) % 5], dtype=np.int64)
        datatype = "INT64" if idx.dtype == np.int64 else "INT32"
        request = pb.ModelInferRequest(
            model_name="lookup",
            inputs=[Input(name="idx", datatype=datatype, shape=idx.shape)],
            raw_input_contents=[idx.tobytes()],
        )
        try:
            response = batching_stub.ModelInfer(request)
        except grpc.RpcError as err:
            return err.code(), None
        rows_ = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(-1, 3)
        np.testing.assert_array_equal(rows_, TABLE[idx])
        return grpc.StatusCode.OK, rows_

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(call, range(48)))
    for i, (code, _) in enumerate(outcomes):
        want = grpc.StatusCode.INVALID_ARGUMENT if i % 2 else grpc.StatusCode.OK
        assert code == want, f"request {i}"


def test_batching_off_serves_the_same(scale: LoadedModel) -> None:
    repo = ModelRepository()
    repo.publish(scale)
    server = start_inference_server(repo, "127.0.0.1", 0, batching=False, max_workers=4)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            x = np.arange(12, dtype=np.float32).reshape(3, 4)
            got = answers(stub.ModelInfer(x_request("scale", x)))
            np.testing.assert_array_equal(got["y"], x * 2)
    finally:
        server.stop(None)
