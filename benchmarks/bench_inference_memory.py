"""Resident memory of the agent's inference server under concurrent maximum-size requests,
on a real backbone (EfficientNet-Lite0 + a 10-class head, FP32, batch up to 64 rows).

    python benchmarks/bench_inference_memory.py [--concurrent 16] [--json out.json]

Two servers, each in its own process, get the same load in the same run:
- baseline: what the agent did before its limits (no per-model cap, every large request in
  flight at once, freed memory kept by glibc and by ONNX Runtime's arena);
- bounded: the agent's defaults (a cap per model from its input shapes, 2 large requests in
  flight, the arena shrunk after large runs and freed memory handed back).

Two loads: `--concurrent` requests of the largest size the model accepts (64 rows: 38.5 MB
each), then 8 requests of 62 MB (103 rows: the review's attack; legal for the baseline,
over the model's cap for the bounded server). Reported: RSS idle, peak while serving, and
after (what is retained), per server and load; the ratio bounded / baseline.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import write_json

ROWS_MAX = 64
ATTACK_ROWS = 103  # 103 x 3 x 224 x 224 x 4 bytes = 62 MB


def export_model(path: Path) -> Path:
    import torch

    from compilers.export import export_onnx
    from transfer.backbones import load_backbone
    from transfer.finetune import Classifier

    backbone = load_backbone("efficientnet-lite0")
    model = Classifier(
        backbone.module,
        torch.nn.Linear(backbone.feature_dim, 10),
        tuple(str(n) for n in range(10)),
        backbone.preprocessing,
    ).eval()
    return export_onnx(model, torch.zeros(1, 3, 224, 224), path)


def serve(model: Path, port_file: Path, bounded: bool) -> None:
    """The child: an inference server with the model loaded, until stdin closes."""
    from agent.inference.server import RequestLimits, start_inference_server
    from agent.runtime import ModelRepository, SessionOptions, load_model

    options = SessionOptions(
        providers=("CPUExecutionProvider",), intra_op_threads=1, shrink_after_large_runs=bounded
    )
    repository = ModelRepository()
    repository.publish(load_model("effnet", 1, "sha256:bench", model, options))
    limits = (
        RequestLimits()
        if bounded
        else RequestLimits(max_rows=1 << 20, large_in_flight=64, give_back_memory=False)
    )
    server = start_inference_server(repository, "127.0.0.1", 0, limits=limits)
    port_file.write_text(str(server.port))
    sys.stdin.read()
    server.stop(0)


def rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def load(port: int, rows: int, count: int) -> tuple[int, int, float]:
    """`count` concurrent requests of `rows` rows: (answered, refused, seconds)."""
    import numpy as np

    from edgefleet.client.inference import InferenceClient
    from edgefleet.core.errors import EdgefleetError

    x = np.random.default_rng(0).standard_normal((rows, 3, 224, 224)).astype(np.float32)
    results: list[bool] = []
    lock = threading.Lock()

    def one() -> None:
        with InferenceClient(f"127.0.0.1:{port}", timeout=600) as client:
            try:
                client.infer("effnet", {"input": x})
                ok = True
            except EdgefleetError:
                ok = False
        with lock:
            results.append(ok)

    started = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results), len(results) - sum(results), time.perf_counter() - started


def measure(model: Path, bounded: bool, concurrent: int, work: Path) -> dict[str, Any]:
    port_file = work / f"port-{bounded}"
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(model), str(port_file), str(int(bounded))],
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        time.sleep(0.3)
        port = int(port_file.read_text())
        figures: dict[str, Any] = {"idle_mb": rss_mb(child.pid)}
        for name, rows, count in (
            ("max_size", ROWS_MAX, concurrent),
            ("attack_62mb", ATTACK_ROWS, 8),
        ):
            peak = [0.0]
            done = threading.Event()

            def sample(peak: list[float] = peak, done: threading.Event = done) -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss_mb(child.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            answered, refused, seconds = load(port, rows, count)
            done.set()
            sampler.join()
            time.sleep(1.0)
            figures[name] = {
                "answered": answered,
                "refused": refused,
                "seconds": round(seconds, 1),
                "peak_mb": round(peak[0], 1),
                "after_mb": round(rss_mb(child.pid), 1),
            }
        return figures
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(30)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-infer-mem-") as tmp:
        work = Path(tmp)
        model = export_model(work / "effnet.onnx")
        baseline = measure(model, False, args.concurrent, work)
        bounded = measure(model, True, args.concurrent, work)
    print(
        f"EfficientNet-Lite0 FP32, {args.concurrent} concurrent {ROWS_MAX}-row requests, then 8 of 62 MB"
    )
    print(
        f"{'server':10} {'load':12} {'answered':>8} {'refused':>8} {'s':>6} {'idle MB':>8} {'peak MB':>8} {'after MB':>9}"
    )
    for label, figures in (("baseline", baseline), ("bounded", bounded)):
        for name in ("max_size", "attack_62mb"):
            f = figures[name]
            print(
                f"{label:10} {name:12} {f['answered']:>8} {f['refused']:>8} {f['seconds']:>6} "
                f"{figures['idle_mb']:>8.1f} {f['peak_mb']:>8.1f} {f['after_mb']:>9.1f}"
            )
    for name in ("max_size", "attack_62mb"):
        print(
            f"{name}: peak bounded/baseline = "
            f"{bounded[name]['peak_mb'] / baseline[name]['peak_mb']:.2f}, after = "
            f"{bounded[name]['after_mb'] / baseline[name]['after_mb']:.2f}"
        )
    write_json(args.json, {"baseline": baseline, "bounded": bounded})


if __name__ == "__main__":
    main()
