"""A/B and shadow on the device: what splitting traffic and shadowing cost the inference
server, against serving one version.

    python benchmarks/bench_ab.py [--seconds 3] [--rounds 2] [--no-pin] [--json out.json]

The agent's real inference server and recorder (a spool in a temporary folder) serve the
project's small CNN (3x64x64 in) at batch 1 as v1, and a second export of it with other
weights as v2, in a child process pinned to one CPU with the client on the other; sequential
requests and 8 in flight, for three splits switched in the running server:

- one version: v1 alone (the baseline);
- A/B 50/50: requests without a routing key split at random between v1 and v2;
- primary + shadow: v1 answers, and a copy of each request runs on v2 on the shadow's
  thread (bounded queue of 64; a copy that finds it full is skipped and counted), its
  outputs compared with v1's.

Each split is compared with one version measured beside it in ABBA rounds (one, split,
split, one), the best of each counting. Expected: A/B ~1.0x (routing is a hash or a random
draw; both versions cost the same); the shadow doubles the work per request on the one CPU
the server has, so its served rate drops towards 0.5x where the CPU is the limit, less where
the client and the network are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    INPUT_SHAPE,
    Figures,
    export_small_cnn,
    pin_to_cpu,
    print_table,
    write_json,
)
from benchmarks.bench_spool import _sequential, in_flight

MODEL = "small-cnn"
SPLITS = ("one version", "A/B 50/50", "primary + shadow")


def serve(v1: Path, v2: Path, port_file: Path, pin: bool) -> None:
    """Child process: the inference server with a recorder; reads a split's name from
    stdin and switches the model's traffic to it."""
    if pin:
        print(f"server {pin_to_cpu(0)}", file=sys.stderr)
    from agent.inference.server import start_inference_server
    from agent.recorder import Recorder
    from agent.runtime import ModelRepository, SessionOptions, load_model
    from agent.settings import AgentSettings
    from agent.spool import Spool
    from edgefleet.core.fleet import Variant

    defaults = AgentSettings.model_fields
    options = SessionOptions(
        providers=("CPUExecutionProvider",), intra_op_threads=1, inter_op_threads=1
    )
    repository = ModelRepository()
    repository.publish(load_model(MODEL, 1, "v1", v1, options))
    repository.add(load_model(MODEL, 2, "v2", v2, options))
    spool = Spool(port_file.parent / "agent" / "spool.db", defaults["spool_budget_bytes"].default)
    recorder = Recorder(
        spool,
        telemetry_interval_s=defaults["telemetry_interval_s"].default,
        stats_per_second=defaults["input_stats_per_second"].default,
    ).start()
    server = start_inference_server(repository, "127.0.0.1", 0, recorder=recorder)
    port_file.write_text(str(server.port))
    variants = {
        "one version": (),
        "A/B 50/50": (Variant(2, "onnx-cpu-fp32", "v2", 0.5),),
        "primary + shadow": (Variant(2, "onnx-cpu-fp32", "v2", 0.0, True),),
    }
    for line in sys.stdin:
        repository.set_traffic(MODEL, variants[line.strip()])
        print(json.dumps({"split": line.strip()}), flush=True)
    server.shadow.drain(30)
    stats = server.shadow.stats
    server.stop(0)
    recorder.stop()
    print(json.dumps({"shadow": vars(stats)}), flush=True)


def served(v1: Path, v2: Path, workdir: Path, seconds: float, rounds: int, pin: bool) -> Any:
    import numpy as np

    from edgefleet.client.inference import InferenceClient

    port_file = workdir / "port"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(v1), str(v2), "--port-file", str(port_file)]
        + ([] if pin else ["--no-pin"]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the inference server process did not start")
        time.sleep(0.05)
    print(f"client {'not pinned' if not pin else pin_to_cpu(1)}; server pid {proc.pid}")
    image = np.random.default_rng(0).standard_normal(INPUT_SHAPE, dtype=np.float32)
    # block (the split compared) -> split -> kind -> the best figures
    best: dict[str, dict[str, dict[str, Figures]]] = {}
    client = InferenceClient(f"127.0.0.1:{port_file.read_text()}")
    request = client.prepare(MODEL, {"image": image})
    try:
        for _ in range(50):
            client.infer_prepared(request)
        for block in SPLITS[1:]:
            for _ in range(rounds):
                for split in (SPLITS[0], block, block, SPLITS[0]):
                    proc.stdin.write(f"{split}\n")
                    proc.stdin.flush()
                    proc.stdout.readline()  # switched
                    figures = {
                        "sequential": _sequential(client, request, seconds),
                        "8 in flight": in_flight(client, request, 8, seconds),
                    }
                    for kind, f in figures.items():
                        f.name = f"{split}, {kind}"
                        have = best.setdefault(block, {}).setdefault(split, {}).get(kind)
                        if have is None or f.req_per_s > have.req_per_s:
                            best[block][split][kind] = f
    finally:
        client.close()
        proc.stdin.close()
        summary = json.loads(proc.stdout.read().strip().splitlines()[-1])
        proc.wait(timeout=60)
    return {"best": best, "server": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per served measurement")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds per split")
    parser.add_argument("--no-pin", action="store_true", help="let server and client float")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--serve", type=Path, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], args.port_file, not args.no_pin)
        return

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        v1, v2 = workdir / "v1.onnx", workdir / "v2.onnx"
        export_small_cnn(v1)
        export_small_cnn(v2)
        _perturb(v2)
        found = served(v1, v2, workdir, args.seconds, args.rounds, not args.no_pin)
    kinds = ("sequential", "8 in flight")
    table: list[Figures] = []
    ratios: dict[str, float] = {}
    for block, splits in found["best"].items():
        for split in (SPLITS[0], block):
            for kind in kinds:
                f = splits[split][kind]
                if split == SPLITS[0]:
                    f.name = f"one version ({block} block), {kind}"
                table.append(f)
        for kind in kinds:
            ratios[f"{block}, {kind}"] = (
                splits[block][kind].req_per_s / splits[SPLITS[0]][kind].req_per_s
            )
    print_table(
        f"served, small CNN {list(INPUT_SHAPE)} batch 1, best of {args.rounds} ABBA rounds",
        table,
    )
    for name, value in ratios.items():
        print(f"{name} / one version: {value:.3f}x")
    print(f"server: {found['server']}")
    write_json(args.json, {"rows": table, "ratios": ratios, "server": found["server"]})


def _perturb(path: Path) -> None:
    """Other weights for v2 (a retrained version): every float initializer scaled and
    shifted a little, so the shadow's answers differ from v1's now and then."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    rng = np.random.default_rng(1)
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 1:
            noisy = array * np.float32(1.05) + rng.normal(0, 0.05, array.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(path))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
