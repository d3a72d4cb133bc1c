"""The agent's serving surface on one server core: unary vs streaming gRPC vs in-process ONNX
Runtime (the limit) and PyTorch eager, REST vs gRPC, and a 224x224x3 frame through shared
memory vs raw bytes.

    python benchmarks/bench_serving.py [--model small-cnn|efficientnet-lite0|both]
                                       [--seconds 3] [--requests 3000] [--rounds 5]
                                       [--concurrency 4] [--no-pin] [--json out.json]

The server (``start_inference_server`` with the REST port beside it, the same data plane) runs
in a child process pinned to one CPU, the client on another (sched_setaffinity, what taskset
does), so they share no core and no GIL; the in-process baselines (ONNX Runtime and PyTorch
eager, one thread each, ``torch.inference_mode()``) run on the server's CPU. Models, batch 1:
the small CNN of bench_inference.py (3x64x64 in, 10 classes: the transport's cost shows), and
a fine-tune-shaped EfficientNet-Lite0 classifier at 224 px (the pretrained backbone and a
10-class linear head with seeded random weights, exported by the jobs' ``export_onnx``: the
model's time dominates). PyTorch eager runs the very module each ONNX model was exported from.
Rows: calls one at a time (p50, p99, req/s) and `--concurrency` callers at once (req/s: what
one server core answers), each against in-process ORT of the same run. Each row gets
`--seconds` (at most `--requests`) in all, split over `--rounds` rounds that visit the rows
in turn, so other work on a shared machine weighs on all of them alike. The shared-memory
rows send a new 224x224x3 FP32 frame (588 KiB) each call, written into a registered /dev/shm
region or put into the request's raw contents, to a model that averages it (so the model's
time is small and the transport's shows); they run with every `--model`. Default run (both
models): about 90 s.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    INPUT_SHAPE,
    Figures,
    describe_machine,
    export_efficientnet_lite0,
    export_small_cnn,
    pin_to_cpu,
    print_table,
    summarise,
    write_json,
)

SMALL_CNN = "small-cnn"
EFFICIENTNET = "efficientnet-lite0"
MODELS = (SMALL_CNN, EFFICIENTNET)
EFFICIENTNET_SHAPE = (1, 3, 224, 224)
FRAME_MODEL = "frame-mean"
FRAME_SHAPE = (1, 224, 224, 3)
MAX_WORKERS = 8
MAX_STREAMS = MAX_WORKERS // 2  # the streams the agent's server takes at once


@dataclass
class Case:
    """One model as the benchmark runs it: its name (also the served model's), the ONNX file,
    the torch module that file was exported from (PyTorch eager runs it), the input every call
    sends, and how close eager must come to ONNX Runtime's answer."""

    name: str
    title: str
    path: Path
    net: Any  # torch.nn.Module, in eval mode
    image: Any  # numpy FP32, batch 1
    json_rest: bool  # also time REST with JSON tensors (small inputs only)
    eager_tolerance: float


def build_case(name: str, folder: Path) -> Case:
    import numpy as np

    path = folder / f"{name}.onnx"
    if name == SMALL_CNN:
        net = export_small_cnn(path)
        image = np.random.default_rng(0).standard_normal(INPUT_SHAPE, dtype=np.float32)
        return Case(name, f"small CNN {list(INPUT_SHAPE)}", path, net, image, True, 1e-4)
    net = export_efficientnet_lite0(path)
    pixels = np.random.default_rng(0).random(EFFICIENTNET_SHAPE, dtype=np.float32) * 255
    title = f"EfficientNet-Lite0 + 10-class head {list(EFFICIENTNET_SHAPE)}"
    return Case(name, title, path, net, pixels.astype(np.float32), False, 1e-3)


def frame_model(path: Path) -> Path:
    """image: FP32[1,224,224,3] -> mean: FP32[1,3] (the mean of each channel)."""
    import onnx
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, list(FRAME_SHAPE))
    mean = helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    node = helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0)
    graph = helper.make_graph([node], "frame", [image], [mean], [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


# -- the server process ---------------------------------------------------------------------


def serve(models: Path, port_file: Path, pin: bool) -> None:
    """Child process: publish every model in `models` (named after its file), serve gRPC and
    REST, write the ports, run until stdin closes."""
    if pin:
        print(f"server {pin_to_cpu(0)}", file=sys.stderr)
    from agent.inference.rest import start_rest_server
    from agent.inference.server import start_inference_server
    from agent.runtime import ModelRepository, SessionOptions, load_model

    options = SessionOptions(
        providers=("CPUExecutionProvider",), intra_op_threads=1, inter_op_threads=1
    )
    repository = ModelRepository()
    for path in sorted(models.glob("*.onnx")):
        repository.publish(load_model(path.stem, 1, "bench", path, options))
    server = start_inference_server(repository, "127.0.0.1", 0, max_workers=MAX_WORKERS)
    rest = start_rest_server(server.plane, "127.0.0.1", 0)
    port_file.write_text(f"{server.port} {rest.port}")
    sys.stdin.read()  # the parent closes our stdin when it is done
    rest.stop(0)
    server.stop(0)


def start_server(models: Path, pin: bool) -> tuple[subprocess.Popen[bytes], int, int]:
    port_file = models / "ports"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(models), "--port-file", str(port_file)]
        + ([] if pin else ["--no-pin"]),
        stdin=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the inference server process did not start")
        time.sleep(0.05)
    grpc_port, rest_port = (int(p) for p in port_file.read_text().split())
    return proc, grpc_port, rest_port


# -- clients ---------------------------------------------------------------------------------


class Stream:
    """One ModelStreamInfer stream used call by call: send a request, wait for its answer."""

    def __init__(self, stub: Any, request: Any) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._request = request

        def pending() -> Iterator[Any]:
            while (item := self._requests.get()) is not None:
                yield item

        self._replies = stub.ModelStreamInfer(pending())

    def __call__(self) -> Any:
        self._requests.put(self._request)
        reply = next(self._replies)
        if reply.error_message:
            raise RuntimeError(reply.error_message)
        return reply

    def close(self) -> None:
        self._requests.put(None)
        for _ in self._replies:
            pass


class Rest:
    """Inference over one keep-alive HTTP connection, the input as binary data (or JSON)."""

    def __init__(self, port: int, model: str, image: Any, *, binary: bool) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self._path = f"/v2/models/{model}/infer"
        tensor: dict[str, Any] = {"name": "image", "datatype": "FP32", "shape": list(image.shape)}
        outputs = [{"name": "logits", "parameters": {"binary_data": binary}}]
        if binary:
            tensor["parameters"] = {"binary_data_size": image.nbytes}
            header = json.dumps({"inputs": [tensor], "outputs": outputs}).encode()
            self._body = header + image.tobytes()
            self._headers = {"Inference-Header-Content-Length": str(len(header))}
        else:
            tensor["data"] = image.ravel().tolist()
            self._body = json.dumps({"inputs": [tensor], "outputs": outputs}).encode()
            self._headers = {"Content-Type": "application/json"}

    def _post(self) -> tuple[http.client.HTTPResponse, bytes]:
        self._conn.request("POST", self._path, self._body, self._headers)
        response = self._conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(body.decode())
        return response, body

    def __call__(self) -> bytes:
        return self._post()[1]

    def logits(self) -> Any:
        """One call's answer as a flat FP32 array (binary or JSON)."""
        import numpy as np

        response, body = self._post()
        length = response.getheader("Inference-Header-Content-Length")
        if length is None:
            return np.array(json.loads(body)["outputs"][0]["data"], np.float32)
        return np.frombuffer(body[int(length) :], np.float32)

    def close(self) -> None:
        self._conn.close()


# -- measuring: rows in alternating rounds ----------------------------------------------------


@dataclass
class Row:
    """One line of a table: one call made back to back, or several (each its own connection
    or stream) made at once from as many threads. In-process rows run on the server's CPU."""

    key: str
    name: str
    calls: list[Callable[[], object]]
    in_process: bool = False
    requests: int | None = None  # this row's request limit, if lower than the run's


@dataclass
class Cpus:
    """Where the in-process rows run (the server's CPU) and where the client runs. Only this
    thread is moved (sched_setaffinity on Linux moves the calling thread); threads it starts
    afterwards inherit its CPU, gRPC's among them."""

    server: set[int]
    client: set[int]

    def take(self, row: Row) -> None:
        os.sched_setaffinity(0, self.server if row.in_process else self.client)


def cpus_for(pin: bool) -> Cpus | None:
    """CPU 0 for the server (as `pin_to_cpu(0)` picks it), CPU 1 for the client."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return Cpus({cpus[0]}, {cpus[1]})


def run_slice(
    calls: list[Callable[[], object]], seconds: float, requests: int
) -> tuple[list[float], float]:
    """One row's share of a round: its calls back to back until `requests` or `seconds`; with
    several calls, one thread each, started together. The latencies and the time taken, in
    seconds, after one untimed call each (the connection, the caches and the CPU are this
    row's again)."""
    for call in calls:
        call()
    clock = time.perf_counter
    if len(calls) == 1:
        call = calls[0]
        samples: list[float] = []
        start = clock()
        deadline = start + seconds
        for _ in range(requests):
            t0 = clock()
            call()
            t1 = clock()
            samples.append(t1 - t0)
            if t1 > deadline:
                break
        return samples, clock() - start
    per_thread = max(1, requests // len(calls))
    outs: list[list[float]] = [[] for _ in calls]
    start = clock()
    stop_at = start + seconds

    def worker(call: Callable[[], object], out: list[float]) -> None:
        clock = time.perf_counter
        for _ in range(per_thread):
            t0 = clock()
            call()
            t1 = clock()
            out.append(t1 - t0)
            if t1 > stop_at:
                break

    pool = [threading.Thread(target=worker, args=(c, o)) for c, o in zip(calls, outs, strict=True)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return [x for out in outs for x in out], clock() - start


def measure(
    rows: list[Row], rounds: int, seconds: float, requests: int, cpus: Cpus | None
) -> dict[str, Figures]:
    """Every row gets `seconds` and `requests` in all, split over `rounds` rounds that visit
    the rows in turn (reversed every other round): other work on a shared machine then
    weighs on every row alike, and the ratios between rows hold though the absolute figures
    move. A row's req/s is its requests over the time its slices took."""
    for row in rows:  # warm-up: up to 50 calls of each, half a second per row
        if cpus:
            cpus.take(row)
        for call in row.calls:
            until = time.perf_counter() + 0.5 / len(row.calls)
            for _ in range(50):
                call()
                if time.perf_counter() > until:
                    break
    samples: dict[str, list[float]] = {row.key: [] for row in rows}
    elapsed = dict.fromkeys(samples, 0.0)
    for i in range(rounds):
        for row in rows if i % 2 == 0 else rows[::-1]:
            if cpus:
                cpus.take(row)
            cap = -(-(row.requests or requests) // rounds)
            got, took = run_slice(row.calls, seconds / rounds, cap)
            samples[row.key] += got
            elapsed[row.key] += took
    if cpus:
        os.sched_setaffinity(0, cpus.client)
    return {row.key: summarise(row.name, samples[row.key], elapsed[row.key]) for row in rows}


# -- the rows ----------------------------------------------------------------------------------


def model_rows(
    case: Case,
    stub: Callable[[bool], Any],
    rest_port: int,
    k: int,
    n: int,
    stack: contextlib.ExitStack,
) -> list[Row]:
    """One model's rows, every path's answer checked first: in-process ONNX Runtime and
    PyTorch eager (one thread each), then gRPC unary, streaming and REST, one call at a time
    and `k` at once. What they open, `stack` closes."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from protos.inference.v2 import grpc_predict_v2_pb2 as pb

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(case.path), so, providers=["CPUExecutionProvider"])
    feeds = {"image": case.image}
    want = session.run(None, feeds)[0]
    tensor = torch.from_numpy(case.image)

    def in_process_ort() -> object:
        return session.run(None, feeds)

    def eager() -> Any:
        with torch.inference_mode():
            return case.net(tensor)

    tol = case.eager_tolerance
    np.testing.assert_allclose(eager().numpy(), want, rtol=tol, atol=tol)

    def check(got: Any) -> None:
        got = np.asarray(got, np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    request = pb.ModelInferRequest(model_name=case.name, raw_input_contents=[case.image.tobytes()])
    request.inputs.add(name="image", datatype="FP32", shape=list(case.image.shape))
    unary_stub = stub(False)

    def unary() -> Any:
        return unary_stub.ModelInfer(request)

    def own_unary() -> Callable[[], object]:
        # Each concurrent caller on its own connection, as separate clients would be.
        own = stub(True)
        return lambda: own.ModelInfer(request)

    # A stream holds a server thread and the agent serves max_workers // 2 (here 4) at once:
    # the one-at-a-time row uses the first of the `k` streams.
    streams = [Stream(stub(True), request) for _ in range(k)]
    rests = [Rest(rest_port, case.name, case.image, binary=True) for _ in range(k)]
    for closes in (*(x.close for x in streams), *(x.close for x in rests)):
        stack.callback(closes)
    check(np.frombuffer(unary().raw_output_contents[0], np.float32))
    for stream in streams:
        check(np.frombuffer(stream().infer_response.raw_output_contents[0], np.float32))
    for rest in rests:
        check(rest.logits())
    rows = [
        Row("ort", "ONNX Runtime, in process", [in_process_ort], in_process=True),
        Row("eager", "PyTorch eager, in process", [eager], in_process=True),
        Row("unary", "gRPC unary ModelInfer", [unary]),
        Row("stream", "gRPC ModelStreamInfer", [streams[0]]),
        Row("rest", "REST, binary tensors", [rests[0]]),
    ]
    if case.json_rest:
        rest_json = Rest(rest_port, case.name, case.image, binary=False)
        stack.callback(rest_json.close)
        check(rest_json.logits())
        rows.append(Row("json", "REST, JSON tensors", [rest_json], requests=n // 4))
    rows += [
        Row("unary_k", f"gRPC unary, {k} at once", [own_unary() for _ in range(k)]),
        Row("stream_k", f"gRPC stream, {k} streams at once", list(streams)),
        Row("rest_k", f"REST binary, {k} connections at once", list(rests)),
    ]
    return rows


def frame_rows(stub: Callable[[bool], Any], stack: contextlib.ExitStack) -> list[Row]:
    """A new 224x224x3 FP32 frame each call, through a registered /dev/shm region or in the
    request's raw contents, to a model that averages it. What they open, `stack` closes."""
    from multiprocessing import shared_memory

    import numpy as np

    from protos.inference.v2 import grpc_predict_v2_pb2 as pb

    frame = np.random.default_rng(1).random(FRAME_SHAPE, dtype=np.float32)
    shm_key = f"/edgefleet-bench-{uuid.uuid4().hex[:8]}"
    region = shared_memory.SharedMemory(name=shm_key[1:], create=True, size=frame.nbytes)
    stack.callback(region.unlink)
    stack.callback(region.close)
    views = {"frame": np.ndarray(FRAME_SHAPE, np.float32, buffer=region.buf)}
    stack.callback(views.clear)  # no view may outlive the mapping
    frame_stub = stub(False)
    frame_stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(
            name="frame", key=shm_key, offset=0, byte_size=frame.nbytes
        )
    )
    stack.callback(
        frame_stub.SystemSharedMemoryUnregister,
        pb.SystemSharedMemoryUnregisterRequest(name="frame"),
    )
    via_shm = pb.ModelInferRequest(model_name=FRAME_MODEL)
    tensor = via_shm.inputs.add(name="image", datatype="FP32", shape=list(FRAME_SHAPE))
    tensor.parameters["shared_memory_region"].string_param = "frame"
    tensor.parameters["shared_memory_byte_size"].int64_param = frame.nbytes
    via_raw = pb.ModelInferRequest(model_name=FRAME_MODEL, raw_input_contents=[b""])
    via_raw.inputs.add(name="image", datatype="FP32", shape=list(FRAME_SHAPE))
    frame_bytes = frame.tobytes()

    def shm_call() -> Any:
        np.copyto(views["frame"], frame)  # the client puts the new frame there
        return frame_stub.ModelInfer(via_shm)

    def raw_call() -> Any:
        via_raw.raw_input_contents[0] = frame_bytes  # ... or into the request
        return frame_stub.ModelInfer(via_raw)

    expect = frame.mean(axis=(1, 2))
    for call in (shm_call, raw_call):
        out = np.frombuffer(call().raw_output_contents[0], np.float32)
        np.testing.assert_allclose(out, expect.ravel(), rtol=1e-4)
    return [
        Row("raw", "224x224x3 frame, raw contents", [raw_call]),
        Row("shm", "224x224x3 frame, shared memory", [shm_call]),
    ]


def ratios_of(rows: dict[str, Figures]) -> dict[str, float]:
    """Every row against in-process ORT of the same run (req/s, and p50 for the one-at-a-time
    rows), and the comparisons the issue asks about."""
    ort_f = rows["ort"]
    out: dict[str, float] = {}
    for key, f in rows.items():
        if key != "ort":
            out[f"{key}_vs_ort_req_per_s"] = f.req_per_s / ort_f.req_per_s
        if key not in ("ort",) and not key.endswith("_k"):
            out[f"{key}_p50_over_ort_ms"] = f.p50_ms - ort_f.p50_ms
    out["stream_vs_unary_req_per_s"] = rows["stream"].req_per_s / rows["unary"].req_per_s
    out["stream_vs_unary_req_per_s_concurrent"] = (
        rows["stream_k"].req_per_s / rows["unary_k"].req_per_s
    )
    out["rest_vs_grpc_req_per_s"] = rows["rest"].req_per_s / rows["unary"].req_per_s
    out["rest_vs_grpc_p50"] = rows["rest"].p50_ms / rows["unary"].p50_ms
    out["rest_vs_grpc_req_per_s_concurrent"] = rows["rest_k"].req_per_s / rows["unary_k"].req_per_s
    if "json" in rows:
        out["rest_json_vs_binary_p50"] = rows["json"].p50_ms / rows["rest"].p50_ms
    return out


def print_against_ort(title: str, rows: dict[str, Figures]) -> None:
    """The model's table with two more columns: req/s over in-process ORT's, and p50 minus
    ORT's (one-at-a-time rows only: with callers at once, p50 includes waiting for the
    others)."""
    ort_f = rows["ort"]
    print(f"\n{title}")
    print(
        f"{'path':<44} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} "
        f"{'x ORT req/s':>11} {'p50-ORT ms':>10}"
    )
    for key, r in rows.items():
        over = "" if key.endswith("_k") else f"{r.p50_ms - ort_f.p50_ms:+.3f}"
        print(
            f"{r.name:<44} {r.requests:>9} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} {r.req_per_s:>9.0f} "
            f"{r.req_per_s / ort_f.req_per_s:>10.2f}x {over:>10}"
        )


def print_summary(case: Case, ratios: dict[str, float], k: int) -> None:
    target = " (target: >= 0.5x)" if case.name == SMALL_CNN else ""
    print(f"\n{case.title}:")
    print(
        f"  served / in-process ORT req/s on the same core: {k} streams at once "
        f"{ratios['stream_k_vs_ort_req_per_s']:.2f}x{target}, {k} unary at once "
        f"{ratios['unary_k_vs_ort_req_per_s']:.2f}x, {k} REST at once "
        f"{ratios['rest_k_vs_ort_req_per_s']:.2f}x; one at a time: stream "
        f"{ratios['stream_vs_ort_req_per_s']:.2f}x, unary {ratios['unary_vs_ort_req_per_s']:.2f}x, "
        f"REST {ratios['rest_vs_ort_req_per_s']:.2f}x"
    )
    print(
        f"  PyTorch eager / in-process ORT req/s: {ratios['eager_vs_ort_req_per_s']:.2f}x "
        f"(p50 {ratios['eager_p50_over_ort_ms']:+.3f} ms)"
    )
    print(
        f"  p50 over in-process ORT: unary {ratios['unary_p50_over_ort_ms']:+.3f} ms, stream "
        f"{ratios['stream_p50_over_ort_ms']:+.3f} ms, REST binary "
        f"{ratios['rest_p50_over_ort_ms']:+.3f} ms"
    )
    print(
        f"  streaming / unary req/s: {ratios['stream_vs_unary_req_per_s']:.2f}x one at a time, "
        f"{ratios['stream_vs_unary_req_per_s_concurrent']:.2f}x with {k} at once"
    )
    json_note = (
        f"; REST JSON p50 / binary p50: {ratios['rest_json_vs_binary_p50']:.1f}x"
        if "rest_json_vs_binary_p50" in ratios
        else ""
    )
    print(
        f"  REST (binary) / gRPC unary: req/s {ratios['rest_vs_grpc_req_per_s']:.2f}x, p50 "
        f"{ratios['rest_vs_grpc_p50']:.2f}x; {k} at once "
        f"{ratios['rest_vs_grpc_req_per_s_concurrent']:.2f}x{json_note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=[*MODELS, "both"],
        default="both",
        help="which model's rows to measure (the frame rows run with every choice)",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="time per row, all rounds")
    parser.add_argument("--requests", type=int, default=3000, help="request limit per row")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the rows alternate in")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="callers at once (1-4: streams the server takes)"
    )
    parser.add_argument("--no-pin", action="store_true", help="let server and client use any CPU")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port_file, not args.no_pin)
        return
    if not 1 <= args.concurrency <= MAX_STREAMS:
        parser.error(f"--concurrency must be 1..{MAX_STREAMS}: the server takes that many streams")

    import grpc
    import torch

    from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

    torch.set_num_threads(1)  # PyTorch eager: one thread, as ORT
    torch.set_num_interop_threads(1)
    n, s, k, rounds = args.requests, args.seconds, args.concurrency, max(1, args.rounds)
    pin = not args.no_pin
    cpus = cpus_for(pin)
    everywhere = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    names = MODELS if args.model == "both" else (args.model,)
    started = time.monotonic()
    machine_at_start = describe_machine()
    print(machine_at_start)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        cases = [build_case(name, models) for name in names]
        frame_model(models / f"{FRAME_MODEL}.onnx")
        print(f"models exported in {time.monotonic() - started:.0f} s")

        proc, grpc_port, rest_port = start_server(models, pin)  # it pins itself to CPU 0
        try:
            # The client (and every thread it starts: gRPC's, the callers') on CPU 1; the
            # in-process rows move this thread to CPU 0 while they run.
            if cpus:
                os.sched_setaffinity(0, cpus.client)
            where = f"pinned to CPU {min(cpus.client)}" if cpus else "not pinned"
            print(f"client {where}; server pid {proc.pid} (gRPC {grpc_port}, REST {rest_port})")
            channels: list[Any] = []
            options = [
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ]

            def stub(own: bool) -> Any:
                extra = [("grpc.use_local_subchannel_pool", 1)] if own else []
                channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=options + extra)
                channels.append(channel)
                return pb_grpc.GRPCInferenceServiceStub(channel)

            for case in cases:
                with contextlib.ExitStack() as stack:
                    rows = model_rows(case, stub, rest_port, k, n, stack)
                    figures = measure(rows, rounds, s, n, cpus)
                results[case.name] = {"rows": figures, "ratios": ratios_of(figures)}
                print(f"{case.name}: measured")
            with contextlib.ExitStack() as stack:
                frames = measure(frame_rows(stub, stack), rounds, s, n, cpus)
            for channel in channels:
                channel.close()
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=30)
            if everywhere is not None:
                os.sched_setaffinity(0, everywhere)

    pinned = "server on one CPU, client on another" if pin else "not pinned"
    for case in cases:
        print_against_ort(
            f"{case.title}, batch 1, one ORT/torch thread; {pinned}; {rounds} rounds",
            results[case.name]["rows"],
        )
    raw_f, shm_f = frames["raw"], frames["shm"]
    frame_bytes = 4 * FRAME_SHAPE[1] * FRAME_SHAPE[2] * FRAME_SHAPE[3]
    print_table(
        f"frame {list(FRAME_SHAPE)} FP32 ({frame_bytes} bytes) to a channel mean",
        [raw_f, shm_f],
    )
    for case in cases:
        print_summary(case, results[case.name]["ratios"], k)
    frame_ratios = {
        "shm_p50_saved_ms": raw_f.p50_ms - shm_f.p50_ms,
        "shm_vs_raw_p50": shm_f.p50_ms / raw_f.p50_ms,
        "shm_vs_raw_req_per_s": shm_f.req_per_s / raw_f.req_per_s,
    }
    print(
        f"\n224x224x3 frame: shared memory saves {frame_ratios['shm_p50_saved_ms']:.3f} ms of p50 "
        f"({shm_f.p50_ms:.3f} vs {raw_f.p50_ms:.3f} ms, {frame_ratios['shm_vs_raw_p50']:.2f}x); "
        f"req/s {frame_ratios['shm_vs_raw_req_per_s']:.2f}x"
    )
    machine_at_end = describe_machine()
    print(f"\nrun took {time.monotonic() - started:.0f} s; at the end: {machine_at_end}")
    write_json(
        args.json,
        {
            "models": {
                name: {"rows": list(r["rows"].values()), "ratios": r["ratios"]}
                for name, r in results.items()
            },
            "frames": [raw_f, shm_f],
            "frame_ratios": frame_ratios,
            "pinned": pin,
            "concurrency": k,
            "rounds": rounds,
            "machine": machine_at_start,
            "machine_at_end": machine_at_end,
        },
    )


if __name__ == "__main__":
    main()
