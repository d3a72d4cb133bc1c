"""What the inference worker processes buy: requests a second and latency of the agent's
inference port served by one process (inference_workers = 1, the default) and by N worker
processes sharing the port (inference_workers = N), and the memory each extra worker costs.

    python benchmarks/bench_workers.py [--workers 1,2] [--seconds 8] [--clients 2]
                                       [--threads 4] [--json out.json]

The model is the small CNN of bench_inference.py (3x64x64 in, 10 classes, batch 1, one ONNX
Runtime thread per session). Each server runs as its own process tree, as the agent runs it:
one process (``start_inference_server`` with the agent's recorder), or a control process
with N workers (``WorkerPool``: shared statistics, recorder hand-overs, the switch barrier).
The load comes from `--clients` client processes of `--threads` threads each, every thread on
a connection of its own (so the kernel spreads them over the workers), sending the same
pre-serialized request back to back (the cheapest Python client there is) for `--seconds`
after a one-second warm-up. Nothing is pinned: the clients run on the same cores as the
server (on this 2-core machine they take a good part of them, which caps what more workers
can show; the CPU time each side used is printed). Memory: resident (RSS) and proportional
(PSS: shared pages divided among the processes that map them) set size of each server
process after the run; "per extra worker" is the sum of the workers' RSS minus one worker's.
Servers are measured in `--rounds` rounds that visit each in turn. About 90 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    INPUT_SHAPE,
    describe_machine,
    export_small_cnn,
    print_table,
    summarise,
    write_json,
)

MODEL = "small-cnn"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


# -- the server, in its own process ---------------------------------------------------------


def serve(model_path: Path, workers: int, port_file: Path) -> None:
    """Child process: serve the model as the agent does (0 workers: one process), write the
    port, run until stdin closes."""
    from agent.inference.server import start_inference_server
    from agent.inference.worker import WorkerConfig
    from agent.inference.workers import WorkerPool, WorkerRepository
    from agent.recorder import Recorder
    from agent.runtime import ModelRepository, SessionOptions, load_model
    from agent.spool import Spool

    options = SessionOptions(providers=("CPUExecutionProvider",), intra_op_threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        recorder = Recorder(Spool(Path(tmp) / "spool.db")).start()
        model = load_model(MODEL, 1, "bench", model_path, options)
        stop: Any
        if workers == 0:
            repository = ModelRepository()
            repository.publish(model)
            server = start_inference_server(repository, "127.0.0.1", 0, recorder=recorder)
            port, stop = server.port, server.stop
        else:
            shared = WorkerRepository()
            shared.publish(model)
            config = WorkerConfig(
                count=workers, host="127.0.0.1", port=0, stats_dir="", options=options
            )
            pool = WorkerPool(shared, config, recorder=recorder)
            pool.start()
            port, stop = pool.port, pool.stop
        port_file.write_text(str(port))
        sys.stdin.read()  # the parent closes our stdin when it is done
        stop(0)
        recorder.stop()


def start_server(
    model_path: Path, workers: int, workdir: Path
) -> tuple[subprocess.Popen[str], int]:
    port_file = workdir / f"port-{workers}"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(model_path), "--serve-workers", str(workers),
         "--port-file", str(port_file)],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server ({workers} workers) did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


# -- the clients, each in its own process ---------------------------------------------------


def request_bytes() -> bytes:
    import numpy as np

    from protos.inference.v2 import grpc_predict_v2_pb2 as pb

    image = np.random.default_rng(0).standard_normal(INPUT_SHAPE, dtype=np.float32)
    request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[image.tobytes()])
    request.inputs.add(name="image", datatype="FP32", shape=list(INPUT_SHAPE))
    return request.SerializeToString()


def client(port: int, threads: int, start_at: float, seconds: float, out: Path) -> None:
    """Child process: `threads` callers from `start_at` (wall clock) for `seconds`, after a
    second of warm-up; their latencies and this process's CPU time (after the warm-up) go to
    `out`."""
    import grpc

    body = request_bytes()
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def caller(samples: list[float]) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
            call: Any = channel.unary_unary(METHOD)  # bytes in, bytes out: nothing parsed
            clock = time.perf_counter
            while time.time() < start_at - 1.0:
                time.sleep(0.01)
            while time.time() < start_at:  # warm-up
                call(body, timeout=30)
            end = clock() + seconds
            while True:
                t0 = clock()
                call(body, timeout=30)
                t1 = clock()
                samples.append(t1 - t0)
                if t1 >= end:
                    break

    pool = [threading.Thread(target=caller, args=(s,)) for s in latencies]
    for t in pool:
        t.start()
    while time.time() < start_at:
        time.sleep(0.005)
    cpu0 = sum(os.times()[:2])  # from the end of the warm-up
    for t in pool:
        t.join()
    cpu = sum(os.times()[:2]) - cpu0
    if any(not s for s in latencies):
        raise SystemExit("a caller got no answer")
    out.write_text(json.dumps({"latencies": [x for s in latencies for x in s], "cpu_s": cpu}))


@dataclass
class Memory:
    control_rss_mb: float  # the agent's own process (0: one process serves)
    workers_rss_mb: list[float]  # each serving process
    total_rss_mb: float  # every process of the server (the resource tracker included)
    total_pss_mb: float


def memory_of(pid: int) -> Memory:
    import psutil

    root = psutil.Process(pid)
    children = root.children(recursive=True)
    servers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]

    def rss(p: psutil.Process) -> float:
        return float(p.memory_info().rss) / 2**20

    def pss(p: psutil.Process) -> float:
        try:
            return float(getattr(p.memory_full_info(), "pss", p.memory_info().rss)) / 2**20
        except psutil.Error:
            return rss(p)

    everything = [root, *children]
    if not servers:  # one process serves
        return Memory(0.0, [rss(root)], rss(root), pss(root))
    return Memory(
        rss(root),
        [rss(p) for p in servers],
        sum(rss(p) for p in everything),
        sum(pss(p) for p in everything),
    )


def cpu_of(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def name_of(workers: int) -> str:
    if workers == 0:
        return "one process (inference_workers = 1)"
    return f"{workers} worker process{'es' if workers > 1 else ''}"


def load(
    server: int, port: int, seconds: float, args: argparse.Namespace, workdir: Path
) -> tuple[list[float], float, float]:
    """`--clients` client processes on `port` for `seconds`: their latencies, their CPU time
    and the server's (process `server` and its children) meanwhile."""
    start_at = time.time() + 2.0  # every client imported and connected by then
    outs = [workdir / f"client-{port}-{i}.json" for i in range(args.clients)]
    command = [sys.executable, __file__, "--client", str(port), "--threads", str(args.threads),
               "--start-at", repr(start_at), "--seconds", str(seconds)]  # fmt: skip
    clients = [subprocess.Popen([*command, "--out", str(out)]) for out in outs]
    while time.time() < start_at:
        time.sleep(0.005)
    before = cpu_of(server)
    for c in clients:
        if c.wait() != 0:
            raise SystemExit("a client process failed")
    server_cpu = cpu_of(server) - before
    results = [json.loads(out.read_text()) for out in outs]
    latencies = [x for r in results for x in r["latencies"]]
    return latencies, sum(r["cpu_s"] for r in results), server_cpu


def check_answers(model_path: Path, ports: list[int]) -> None:
    """Every server gives in-process ONNX Runtime's answer (before anything is timed)."""
    import grpc
    import numpy as np
    import onnxruntime as ort

    from protos.inference.v2 import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest.FromString(request_bytes())
    image = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(INPUT_SHAPE)
    want = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(
        None, {"image": image}
    )[0]
    for port in ports:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
            call: Any = channel.unary_unary(
                METHOD, response_deserializer=pb.ModelInferResponse.FromString
            )
            answer = call(request.SerializeToString(), timeout=30)
        got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, e.g. 1,2,4")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per server")
    parser.add_argument("--rounds", type=int, default=4, help="rounds the time is split over")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=4, help="callers per client process")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.serve_workers, args.port_file)
        return
    if args.client:
        client(args.client, args.threads, args.start_at, args.seconds, args.out)
        return

    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    print(f"machine: {describe_machine()}")
    print(
        f"load: {args.clients} client processes x {args.threads} callers (one connection "
        f"each), {args.seconds:g} s per server in {args.rounds} rounds; clients and servers "
        f"share the same {os.cpu_count()} cores (nothing pinned)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path = workdir / "small_cnn.onnx"
        export_small_cnn(model_path)
        configs = [0, *counts]
        servers = {w: start_server(model_path, w, workdir) for w in configs}
        try:
            check_answers(model_path, [port for _, port in servers.values()])
            samples: dict[int, list[float]] = {w: [] for w in configs}
            cpu: dict[str, tuple[float, float]] = {name_of(w): (0.0, 0.0) for w in configs}
            # Rounds that visit every server in turn (reversed every other round), so that
            # other work on the shared machine weighs on each alike.
            for round_ in range(args.rounds):
                for w in configs if round_ % 2 == 0 else configs[::-1]:
                    proc, port = servers[w]
                    latencies, client_cpu, server_cpu = load(
                        proc.pid, port, args.seconds / args.rounds, args, workdir
                    )
                    had = cpu[name_of(w)]
                    cpu[name_of(w)] = (had[0] + server_cpu, had[1] + client_cpu)
                    samples[w] += latencies
            memory = {name_of(w): memory_of(proc.pid) for w, (proc, _) in servers.items()}
        finally:
            for proc, _ in servers.values():
                assert proc.stdin is not None
                proc.stdin.close()
            for proc, _ in servers.values():
                proc.wait(timeout=60)
        rows = [summarise(name_of(w), samples[w], args.seconds) for w in configs]

    if hasattr(os, "getloadavg"):
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print_table("requests under load (batch 1, small CNN)", rows)
    print(f"\n{'server':<44} {'server CPU s':>12} {'client CPU s':>12}")
    for name, (server_cpu, client_cpu) in cpu.items():
        print(f"{name:<44} {server_cpu:>12.1f} {client_cpu:>12.1f}")
    print(
        f"\n{'memory (MB)':<44} {'control':>8} {'each worker RSS':>18} {'total RSS':>10} {'PSS':>8}"
    )
    for name, m in memory.items():
        each = ", ".join(f"{x:.0f}" for x in m.workers_rss_mb)
        print(
            f"{name:<44} {m.control_rss_mb:>8.0f} {each:>18} {m.total_rss_mb:>10.0f} "
            f"{m.total_pss_mb:>8.0f}"
        )

    base = rows[0]
    ratios: dict[str, float] = {}
    print(f"\nratios against {base.name}:")
    for row in rows[1:]:
        ratios[f"{row.name} req/s"] = row.req_per_s / base.req_per_s
        ratios[f"{row.name} p50"] = row.p50_ms / base.p50_ms
        ratios[f"{row.name} p99"] = row.p99_ms / base.p99_ms
        print(
            f"  {row.name:<30} req/s {row.req_per_s / base.req_per_s:5.2f}x   "
            f"p50 {row.p50_ms / base.p50_ms:5.2f}x   p99 {row.p99_ms / base.p99_ms:5.2f}x"
        )
    extra: dict[str, float] = {}
    for name, m in memory.items():
        if len(m.workers_rss_mb) > 1:
            extra[name] = sum(m.workers_rss_mb) - m.workers_rss_mb[0]
            per = extra[name] / (len(m.workers_rss_mb) - 1)
            print(f"  memory per extra worker ({name}): {per:.0f} MB RSS")
    write_json(
        args.json,
        {
            "machine": describe_machine(),
            "rows": rows,
            "ratios": ratios,
            "memory_mb": {k: asdict(v) for k, v in memory.items()},
            "cpu_s": cpu,
            "extra_workers_rss_mb": extra,
        },
    )


if __name__ == "__main__":
    main()
