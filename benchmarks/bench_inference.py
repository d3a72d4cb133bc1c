"""Serving overhead: a small CNN at batch 1 through PyTorch eager, ONNX Runtime in process, and
the agent's Open Inference Protocol server (in its own process) via edgefleet.client.inference.

    python benchmarks/bench_inference.py [--seconds 5] [--requests 5000] [--json out.json]
                                         [--batching]

The server runs in a child process pinned to one CPU, the client (and the in-process
baselines) on another, so they do not share a GIL or a core. Targets: served p50 overhead over
in-process ONNX Runtime < 0.3 ms; served throughput >= 2x PyTorch eager. --batching turns on
the server's dynamic batching (off by default, as in the agent), to compare.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    INPUT_SHAPE,
    Figures,
    export_small_cnn,
    pin_to_cpu,
    print_table,
    summarise,
    time_calls,
    write_json,
)

MODEL_NAME = "small-cnn"


def serve(model_path: Path, port_file: Path, workers: int, pin: bool, batching: bool) -> None:
    """Child process: publish the model, serve it, write the port, run until stdin closes."""
    if pin:
        print(f"server {pin_to_cpu(0)}", file=sys.stderr)
    from agent.inference.server import start_inference_server
    from agent.runtime import ModelRepository, SessionOptions, load_model

    options = SessionOptions(
        providers=("CPUExecutionProvider",), intra_op_threads=1, inter_op_threads=1
    )
    repository = ModelRepository()
    repository.publish(load_model(MODEL_NAME, 1, "bench", model_path, options))
    server = start_inference_server(
        repository, "127.0.0.1", 0, max_workers=workers, batching=batching
    )
    port_file.write_text(str(server.port))
    sys.stdin.read()  # the parent closes our stdin when it is done
    server.stop(0)


def start_server_process(
    model_path: Path, workdir: Path, workers: int, pin: bool, batching: bool
) -> tuple[subprocess.Popen[bytes], int]:
    port_file = workdir / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            str(model_path),
            "--port-file",
            str(port_file),
            "--workers",
            str(workers),
        ]
        + ([] if pin else ["--no-pin"])
        + (["--batching"] if batching else []),
        stdin=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the inference server process did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def in_flight(
    client: object, request: object, threads: int, seconds: float, requests: int
) -> Figures:
    """`threads` callers each sending requests back to back over one shared channel."""
    from edgefleet.client.inference import InferenceClient

    assert isinstance(client, InferenceClient)
    samples: list[list[float]] = [[] for _ in range(threads)]
    per_thread = max(1, requests // threads)
    stop_at = time.perf_counter() + seconds

    def worker(out: list[float]) -> None:
        clock = time.perf_counter
        for _ in range(per_thread):
            t0 = clock()
            client.infer_prepared(request)  # type: ignore[arg-type]
            t1 = clock()
            out.append(t1 - t0)
            if t1 > stop_at:
                break

    pool = [threading.Thread(target=worker, args=(s,)) for s in samples]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    return summarise(
        f"served, {threads} in flight (shared channel)", [x for s in samples for x in s], elapsed
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time limit per measurement")
    parser.add_argument("--requests", type=int, default=5000, help="request limit per measurement")
    parser.add_argument("--workers", type=int, default=8, help="server thread pool size")
    parser.add_argument("--no-pin", action="store_true", help="let server and client use any CPU")
    parser.add_argument("--batching", action="store_true", help="serve with dynamic batching")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port_file, args.workers, not args.no_pin, args.batching)
        return

    import numpy as np
    import onnxruntime as ort
    import torch

    from edgefleet.client.inference import InferenceClient

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path = workdir / "small_cnn.onnx"
        net = export_small_cnn(model_path)
        batching = args.batching
        proc, port = start_server_process(
            model_path, workdir, args.workers, not args.no_pin, batching
        )
        try:
            pinned = "not pinned" if args.no_pin else pin_to_cpu(1)
            print(
                f"client {pinned}; server pid {proc.pid} on port {port}; "
                f"batching {'on' if batching else 'off'}"
            )
            image = np.random.default_rng(0).standard_normal(INPUT_SHAPE, dtype=np.float32)
            n, s = args.requests, args.seconds

            tensor = torch.from_numpy(image)

            def eager() -> object:
                with torch.inference_mode():
                    return net(tensor)

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
            feeds = {"image": image}

            def onnxruntime() -> object:
                return session.run(None, feeds)

            client = InferenceClient(f"127.0.0.1:{port}")
            request = client.prepare(MODEL_NAME, {"image": image})

            def served() -> object:
                return client.infer(MODEL_NAME, {"image": image})

            def served_prepared() -> object:
                return client.infer_prepared(request)

            live = client.live

            # The answers agree before anything is timed.
            want = session.run(None, feeds)[0]
            got = client.infer(MODEL_NAME, {"image": image}).outputs["logits"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(eager().numpy(), want, rtol=1e-4, atol=1e-4)  # type: ignore[attr-defined]

            rows = [
                time_calls("PyTorch eager, in process", eager, requests=n, seconds=s),
                time_calls("ONNX Runtime, in process", onnxruntime, requests=n, seconds=s),
                time_calls("served, client.infer()", served, requests=n, seconds=s),
                time_calls(
                    "served, client.infer_prepared()", served_prepared, requests=n, seconds=s
                ),
                in_flight(client, request, 8, s, n),
                in_flight(client, request, 16, s, n),
                time_calls(
                    "served, ServerLive (empty call: gRPC floor)", live, requests=n, seconds=s
                ),
            ]
            client.close()
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=30)

    eager_f, ort_f, served_f, prepared_f, flight_f, flight16_f, floor_f = rows
    print_table(
        f"batch 1, input {list(INPUT_SHAPE)}, one thread per runtime, {os.cpu_count()} CPUs", rows
    )
    overhead = served_f.p50_ms - ort_f.p50_ms
    overhead_prepared = prepared_f.p50_ms - ort_f.p50_ms
    ratios = {
        "served_p50_overhead_ms": overhead,
        "served_prepared_p50_overhead_ms": overhead_prepared,
        "served_vs_eager_throughput": served_f.req_per_s / eager_f.req_per_s,
        "served_prepared_vs_eager_throughput": prepared_f.req_per_s / eager_f.req_per_s,
        "served_8_in_flight_vs_eager_throughput": flight_f.req_per_s / eager_f.req_per_s,
        "served_16_in_flight_vs_eager_throughput": flight16_f.req_per_s / eager_f.req_per_s,
        "ort_vs_eager_throughput": ort_f.req_per_s / eager_f.req_per_s,
        # What this machine's Python gRPC costs for an empty unary call on the same server.
        "grpc_floor_p50_ms": floor_f.p50_ms,
        "served_prepared_p50_over_floor_and_ort_ms": prepared_f.p50_ms
        - floor_f.p50_ms
        - ort_f.p50_ms,
    }
    print()
    print(
        f"served p50 overhead over in-process ORT: {overhead:.3f} ms "
        f"(prepared request: {overhead_prepared:.3f} ms; target < 0.3 ms)"
    )
    print(
        f"served throughput / eager throughput: {ratios['served_vs_eager_throughput']:.2f}x "
        f"(prepared: {ratios['served_prepared_vs_eager_throughput']:.2f}x, "
        f"8 in flight: {ratios['served_8_in_flight_vs_eager_throughput']:.2f}x, "
        f"16 in flight: {ratios['served_16_in_flight_vs_eager_throughput']:.2f}x; target >= 2x)"
    )
    print(
        f"gRPC floor (empty ServerLive call) p50: {floor_f.p50_ms:.3f} ms; served (prepared) p50 "
        f"beyond floor + ORT: {ratios['served_prepared_p50_over_floor_and_ort_ms']:.3f} ms"
    )
    print(f"in-process ORT / eager throughput: {ratios['ort_vs_eager_throughput']:.2f}x")
    write_json(
        args.json,
        {
            "rows": rows,
            "ratios": ratios,
            "workers": args.workers,
            "pinned": not args.no_pin,
            "batching": args.batching,
        },
    )


if __name__ == "__main__":
    main()
