"""The agent's serving surface on one server core: unary vs streaming gRPC vs in-process ONNX
Runtime (the limit), REST vs gRPC, and a 224x224x3 frame through shared memory vs raw bytes.

    python benchmarks/bench_serving.py [--seconds 3] [--requests 3000] [--concurrency 4]
                                       [--no-pin] [--json out.json]

The server (``start_inference_server`` with the REST port beside it, the same data plane) runs
in a child process pinned to one CPU, the client on another (sched_setaffinity, what taskset
does), so they share no core and no GIL; the in-process ONNX Runtime baseline runs pinned to
the server's CPU. Model: the small CNN of bench_inference.py (3x64x64 in, 10 classes), batch 1,
one ORT thread. Figures: sequential calls (p50, p99, req/s) and `--concurrency` callers at
once (req/s: what one server core answers). The shared-memory rows send a new 224x224x3 FP32
frame (588 KiB) each call, written into a registered /dev/shm region or put into the
request's raw contents, to a model that averages it (so the model's time is small and the
transport's shows). Default run: well under 2 minutes.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    INPUT_SHAPE,
    Figures,
    describe_machine,
    export_small_cnn,
    pin_to_cpu,
    print_table,
    summarise,
    time_calls,
    write_json,
)

MODEL = "small-cnn"
FRAME_MODEL = "frame-mean"
FRAME_SHAPE = (1, 224, 224, 3)


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
    """Child process: publish both models, serve gRPC and REST, write the ports, run until
    stdin closes."""
    if pin:
        print(f"server {pin_to_cpu(0)}", file=sys.stderr)
    from agent.inference.rest import start_rest_server
    from agent.inference.server import start_inference_server
    from agent.runtime import ModelRepository, SessionOptions, load_model

    options = SessionOptions(
        providers=("CPUExecutionProvider",), intra_op_threads=1, inter_op_threads=1
    )
    repository = ModelRepository()
    repository.publish(load_model(MODEL, 1, "bench", models / "small_cnn.onnx", options))
    repository.publish(load_model(FRAME_MODEL, 1, "bench", models / "frame.onnx", options))
    server = start_inference_server(repository, "127.0.0.1", 0, max_workers=8)
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
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the inference server process did not start")
        time.sleep(0.05)
    grpc_port, rest_port = (int(p) for p in port_file.read_text().split())
    return proc, grpc_port, rest_port


# -- clients ---------------------------------------------------------------------------------


def concurrently(
    name: str,
    make_call: Callable[[], Callable[[], object]],
    threads: int,
    seconds: float,
    requests: int,
) -> Figures:
    """`threads` callers, each with its own call (connection or stream), back to back."""
    calls = [make_call() for _ in range(threads)]
    for call in calls:
        for _ in range(10):
            call()
    samples: list[list[float]] = [[] for _ in range(threads)]
    per_thread = max(1, requests // threads)
    stop_at = time.perf_counter() + seconds

    def worker(call: Callable[[], object], out: list[float]) -> None:
        clock = time.perf_counter
        for _ in range(per_thread):
            t0 = clock()
            call()
            t1 = clock()
            out.append(t1 - t0)
            if t1 > stop_at:
                break

    pool = [
        threading.Thread(target=worker, args=(c, s)) for c, s in zip(calls, samples, strict=True)
    ]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return summarise(name, [x for s in samples for x in s], time.perf_counter() - start)


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

    def __init__(self, port: int, image: Any, *, binary: bool) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
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

    def __call__(self) -> bytes:
        self._conn.request("POST", f"/v2/models/{MODEL}/infer", self._body, self._headers)
        response = self._conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(body.decode())
        return body

    def close(self) -> None:
        self._conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time limit per measurement")
    parser.add_argument("--requests", type=int, default=3000, help="request limit per measurement")
    parser.add_argument("--concurrency", type=int, default=4, help="callers at once")
    parser.add_argument("--no-pin", action="store_true", help="let server and client use any CPU")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port_file, not args.no_pin)
        return

    import grpc
    import numpy as np
    import onnxruntime as ort

    from protos.inference.v2 import grpc_predict_v2_pb2 as pb
    from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc

    n, s, k = args.requests, args.seconds, args.concurrency
    pin = not args.no_pin
    print(describe_machine())
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        export_small_cnn(models / "small_cnn.onnx")
        frame_model(models / "frame.onnx")
        image = np.random.default_rng(0).standard_normal(INPUT_SHAPE, dtype=np.float32)
        frame = np.random.default_rng(1).random(FRAME_SHAPE, dtype=np.float32)

        # The limit: ONNX Runtime in process, on the core the server will use.
        everywhere = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        where = pin_to_cpu(0) if pin else "not pinned"
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(models / "small_cnn.onnx"), so, providers=["CPUExecutionProvider"]
        )
        feeds = {"image": image}
        want = session.run(None, feeds)[0]
        rows = [
            time_calls(
                "ONNX Runtime, in process", lambda: session.run(None, feeds), requests=n, seconds=s
            )
        ]
        print(f"in-process ONNX Runtime {where}")
        if everywhere is not None:
            os.sched_setaffinity(0, everywhere)  # the server pins itself from all of them

        proc, grpc_port, rest_port = start_server(models, pin)
        shm_key = f"/edgefleet-bench-{uuid.uuid4().hex[:8]}"
        try:
            where = pin_to_cpu(1) if pin else "not pinned"
            print(f"client {where}; server pid {proc.pid} (gRPC {grpc_port}, REST {rest_port})")
            options = [
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ]
            channels: list[Any] = []

            def stub(own: bool = False) -> Any:
                # Each concurrent caller on its own connection, as separate clients would be.
                extra = [("grpc.use_local_subchannel_pool", 1)] if own else []
                channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=options + extra)
                channels.append(channel)
                return pb_grpc.GRPCInferenceServiceStub(channel)

            request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[image.tobytes()])
            request.inputs.add(name="image", datatype="FP32", shape=list(image.shape))
            unary_stub = stub()

            def unary() -> Any:
                return unary_stub.ModelInfer(request)

            got = np.frombuffer(unary().raw_output_contents[0], np.float32).reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            stream = Stream(stub(), request)
            got = stream().infer_response.raw_output_contents[0]
            np.testing.assert_allclose(
                np.frombuffer(got, np.float32).reshape(want.shape), want, rtol=1e-5, atol=1e-5
            )
            rest_binary = Rest(rest_port, image, binary=True)
            rest_json = Rest(rest_port, image, binary=False)
            answer = json.loads(rest_json())
            np.testing.assert_allclose(
                np.array(answer["outputs"][0]["data"]).reshape(want.shape),
                want,
                rtol=1e-5,
                atol=1e-5,
            )
            streams: list[Stream] = []
            rests: list[Rest] = []

            def new_stream() -> Stream:
                streams.append(Stream(stub(own=True), request))
                return streams[-1]

            def new_unary() -> Callable[[], object]:
                own = stub(own=True)
                return lambda: own.ModelInfer(request)

            def new_rest() -> Rest:
                rests.append(Rest(rest_port, image, binary=True))
                return rests[-1]

            rows += [
                time_calls("gRPC unary ModelInfer", unary, requests=n, seconds=s),
                time_calls("gRPC ModelStreamInfer", stream, requests=n, seconds=s),
                time_calls("REST, binary tensors", rest_binary, requests=n, seconds=s),
                time_calls("REST, JSON tensors", rest_json, requests=n // 4, seconds=s),
            ]
            # A stream holds a server thread: the agent serves max_workers // 2 (here 4) at
            # once, so this one closes before the concurrent ones open.
            stream.close()
            rows += [
                concurrently(f"gRPC unary, {k} at once", new_unary, k, s, n),
                concurrently(f"gRPC stream, {k} streams at once", new_stream, k, s, n),
                concurrently(f"REST binary, {k} connections at once", new_rest, k, s, n),
            ]

            # A camera frame: shared memory vs raw contents.
            from multiprocessing import shared_memory

            region = shared_memory.SharedMemory(name=shm_key[1:], create=True, size=frame.nbytes)
            try:
                views = {"frame": np.ndarray(FRAME_SHAPE, np.float32, buffer=region.buf)}
                frame_stub = stub()
                frame_stub.SystemSharedMemoryRegister(
                    pb.SystemSharedMemoryRegisterRequest(
                        name="frame", key=shm_key, offset=0, byte_size=frame.nbytes
                    )
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
                frames = [
                    time_calls("224x224x3 frame, raw contents", raw_call, requests=n, seconds=s),
                    time_calls("224x224x3 frame, shared memory", shm_call, requests=n, seconds=s),
                ]
                frame_stub.SystemSharedMemoryUnregister(
                    pb.SystemSharedMemoryUnregisterRequest(name="frame")
                )
                views.clear()  # no view may outlive the mapping
            finally:
                region.close()
                region.unlink()
            for item in streams:
                item.close()
            for r in (rest_binary, rest_json, *rests):
                r.close()
            for channel in channels:
                channel.close()
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=30)

    (ort_f, unary_f, stream_f, rest_f, json_f, unary_k, stream_k, rest_k) = rows
    raw_f, shm_f = frames
    pinned = "server on one CPU, client on another" if pin else "not pinned"
    print_table(f"small CNN {list(INPUT_SHAPE)}, batch 1, one ORT thread; {pinned}", rows)
    print_table(f"frame {list(FRAME_SHAPE)} FP32 ({frame.nbytes} bytes) to a channel mean", frames)
    ratios = {
        "stream_vs_unary_req_per_s": stream_f.req_per_s / unary_f.req_per_s,
        "stream_vs_unary_req_per_s_concurrent": stream_k.req_per_s / unary_k.req_per_s,
        "unary_vs_ort_req_per_s_concurrent": unary_k.req_per_s / ort_f.req_per_s,
        "stream_vs_ort_req_per_s_concurrent": stream_k.req_per_s / ort_f.req_per_s,
        "stream_vs_ort_req_per_s_sequential": stream_f.req_per_s / ort_f.req_per_s,
        "rest_vs_grpc_req_per_s": rest_f.req_per_s / unary_f.req_per_s,
        "rest_vs_grpc_p50": rest_f.p50_ms / unary_f.p50_ms,
        "rest_vs_grpc_req_per_s_concurrent": rest_k.req_per_s / unary_k.req_per_s,
        "rest_json_vs_binary_p50": json_f.p50_ms / rest_f.p50_ms,
        "shm_p50_saved_ms": raw_f.p50_ms - shm_f.p50_ms,
        "shm_vs_raw_p50": shm_f.p50_ms / raw_f.p50_ms,
    }
    print()
    print(
        f"streaming / unary req/s: {ratios['stream_vs_unary_req_per_s']:.2f}x sequential, "
        f"{ratios['stream_vs_unary_req_per_s_concurrent']:.2f}x with {k} at once"
    )
    print(
        f"served / in-process ORT on the same core, {k} at once: stream "
        f"{ratios['stream_vs_ort_req_per_s_concurrent']:.2f}x, unary "
        f"{ratios['unary_vs_ort_req_per_s_concurrent']:.2f}x (target: stream >= 0.5x); "
        f"sequential stream {ratios['stream_vs_ort_req_per_s_sequential']:.2f}x"
    )
    print(
        f"REST (binary) / gRPC unary: req/s {ratios['rest_vs_grpc_req_per_s']:.2f}x, p50 "
        f"{ratios['rest_vs_grpc_p50']:.2f}x; {k} at once {ratios['rest_vs_grpc_req_per_s_concurrent']:.2f}x; "
        f"REST JSON p50 / binary p50: {ratios['rest_json_vs_binary_p50']:.1f}x"
    )
    print(
        f"224x224x3 frame: shared memory saves {ratios['shm_p50_saved_ms']:.3f} ms of p50 "
        f"({shm_f.p50_ms:.3f} vs {raw_f.p50_ms:.3f} ms, {ratios['shm_vs_raw_p50']:.2f}x)"
    )
    write_json(
        args.json,
        {
            "rows": rows,
            "frames": frames,
            "ratios": ratios,
            "pinned": pin,
            "concurrency": k,
            "machine": describe_machine(),
        },
    )


if __name__ == "__main__":
    main()
