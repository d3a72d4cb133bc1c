"""INT8 vs FP32 (ONNX Runtime) and PyTorch eager, batch 1, one CPU thread, on two CNNs:
EfficientNet-Lite0 fine-tuned on Fashion-MNIST (64 px, head trained on frozen features,
scored on the official test split, which no training or calibration touches) and the
project's SmallCNN trained on generated images.

    python benchmarks/bench_quantize.py [--model efficientnet-lite0|small-cnn|both]
        [--rounds 5] [--seconds 1] [--train-per-class 300] [--test-per-class 200] [--json out]

Both artifacts are built by `compilers.compile.compile_target` (the jobs' code):
`onnx-cpu-fp32` and `onnx-cpu-int8` (BatchNorm folded, static QDQ, per-channel weights,
calibrated on a stratified sample of training images, sensitive layers kept in FP32 only
while the 1-point gate fails). Latency: FP32 and INT8 sessions timed in alternating rounds
inside one process, p50 of each round, median over rounds. Accuracy: the same held-out
examples for both, the change with its paired 95% interval and n. Targets: INT8 >= 1.6x
faster than FP32 at batch 1, at most 1 point lost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import numpy.typing as npt

from benchmarks._common import pin_to_cpu, time_calls, write_json

Array = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=["efficientnet-lite0", "small-cnn", "both"])
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per path per round")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=256, help="calibration examples")
    parser.add_argument("--image-size", type=int, default=64, help="EfficientNet input side")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import torch

    print(pin_to_cpu(1))
    torch.set_num_threads(1)
    which = args.model or "both"
    results: dict[str, Any] = {}
    if which in ("efficientnet-lite0", "both"):
        results["efficientnet-lite0"] = measure(
            f"EfficientNet-Lite0 fine-tuned on Fashion-MNIST ({args.image_size} px)",
            *efficientnet_case(args),
            args,
        )
    if which in ("small-cnn", "both"):
        results["small-cnn"] = measure(
            "SmallCNN(width=64) on generated 3x32x32 images", *small_cnn_case(args), args
        )
    write_json(args.json, results)


def efficientnet_case(
    args: argparse.Namespace,
) -> tuple[Any, Array, Labels, Array, Array]:
    """(model, test x, test y, calibration x, one example): the head trained on cached
    features of a stratified sample of the training split; the test split held out."""
    import torch
    from torch import nn

    from compilers.sampling import stratified_sample
    from transfer.backbones import load_backbone
    from transfer.datasets import load_fashion_mnist

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    picked = stratified_sample(train.labels, 10 * args.train_per_class, seed=0)
    scored = stratified_sample(test.labels, 10 * args.test_per_class, seed=0)
    calibrating = stratified_sample(train.labels, args.calibration, seed=1, exclude=picked.indices)
    print(f"train: {picked.describe()}; test: {scored.describe()} (official test split)")
    print(f"calibration: {calibrating.describe()} (training split, not trained on)")
    backbone = load_backbone(
        "efficientnet-lite0", input_shape=(1, 28, 28), image_size=args.image_size
    )
    features = backbone.module.eval()
    for p in features.parameters():
        p.requires_grad_(False)
    x_train = torch.from_numpy(train.inputs[picked.indices])
    with torch.no_grad():
        cached = torch.cat([features(x_train[i : i + 128]) for i in range(0, len(x_train), 128)])
    y_train = torch.from_numpy(train.labels[picked.indices])
    head = nn.Linear(backbone.feature_dim, 10)
    optimiser = torch.optim.Adam(head.parameters(), 1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        order = torch.randperm(len(cached), generator=generator)
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(head(cached[batch]), y_train[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    model = nn.Sequential(features, head).eval()
    x_test = test.inputs[scored.indices]
    return (
        model,
        x_test,
        test.labels[scored.indices],
        train.inputs[calibrating.indices],
        x_test[:1],
    )


def small_cnn_case(args: argparse.Namespace) -> tuple[Any, Array, Labels, Array, Array]:
    from transfer.models import SmallCNN
    from transfer.synthetic import CLASSES, make_images
    from transfer.train import train_classifier

    train_x, train_y = make_images(3000, seed=1)
    test_x, test_y = make_images(2000, seed=2)
    model = SmallCNN(len(CLASSES), width=64)
    train_classifier(model, train_x, train_y, epochs=4, seed=0)
    return model.eval(), test_x, test_y, train_x[: args.calibration], test_x[:1]


def measure(
    title: str,
    model: Any,
    x_test: Array,
    y_test: Labels,
    calibration: Array,
    one: Array,
    args: argparse.Namespace,
) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from compilers.compile import compile_target
    from compilers.export import check_parity, export_onnx
    from compilers.quantize import AccuracyChange
    from compilers.sampling import Score, wilson_interval

    def session(path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def evaluate(path: Path) -> Score:
        s = session(path)
        name = s.get_inputs()[0].name
        predicted = np.concatenate(
            [
                s.run(None, {name: x_test[i : i + 200]})[0].argmax(1)
                for i in range(0, len(x_test), 200)
            ]
        )
        correct = predicted == y_test
        return Score(float(correct.mean()), correct)

    with torch.no_grad():
        eager_logits = torch.cat(
            [model(torch.from_numpy(x_test[i : i + 200])) for i in range(0, len(x_test), 200)]
        )
    eager_correct = eager_logits.argmax(1).numpy() == y_test
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as scratch:
        root = Path(scratch)
        source = export_onnx(
            model, torch.from_numpy(one), root / "src" / "model.onnx", external_data=True
        )
        check_parity(model, source, [one, x_test[:16]])
        fp32 = compile_target(source, "onnx-cpu-fp32", root / "fp32", evaluate=evaluate)
        int8 = compile_target(
            source,
            "onnx-cpu-int8",
            root / "int8",
            calibration=calibration,
            evaluate=evaluate,
            max_accuracy_drop=1.0,  # measure here; the verdict against the target is below
        )
        s32, s8 = session(fp32.entrypoint), session(int8.entrypoint)
        n32, n8 = s32.get_inputs()[0].name, s8.get_inputs()[0].name
        x1 = torch.from_numpy(one)

        def eager() -> object:
            with torch.no_grad():
                return model(x1)

        paths: dict[str, Callable[[], object]] = {
            "pytorch eager": eager,
            "onnx-cpu-fp32": lambda: s32.run(None, {n32: one}),
            "onnx-cpu-int8": lambda: s8.run(None, {n8: one}),
        }
        p50: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(args.rounds):  # alternate, so that load from others hits all alike
            for name, call in paths.items():
                p50[name].append(
                    time_calls(name, call, requests=100_000, seconds=args.seconds).p50_ms
                )
        fp32_score, int8_score = evaluate(fp32.entrypoint), evaluate(int8.entrypoint)
    latency = {k: statistics.median(v) for k, v in p50.items()}
    ratio_rounds = [a / b for a, b in zip(p50["onnx-cpu-fp32"], p50["onnx-cpu-int8"], strict=True)]
    change = AccuracyChange.between(fp32_score, int8_score)
    n = len(y_test)
    print(f"\n{title}, batch 1, one thread, {args.rounds} alternating rounds")
    print(f"{'path':<16} {'p50 ms':>8} {'accuracy':>9}  95% interval (Wilson, n={n})")
    scores = {"pytorch eager": eager_correct, "onnx-cpu-fp32": fp32_score.correct}
    scores["onnx-cpu-int8"] = int8_score.correct
    accuracy: dict[str, float] = {}
    for name, correct in scores.items():
        assert correct is not None
        low, high = wilson_interval(float(correct.sum()), n)
        accuracy[name] = float(correct.mean())
        print(f"{name:<16} {latency[name]:>8.3f} {accuracy[name]:>9.4f}  {low:.4f} - {high:.4f}")
    speedup = latency["onnx-cpu-fp32"] / latency["onnx-cpu-int8"]
    assert change.drop_interval is not None
    low, high = change.drop_interval
    print(
        f"INT8 over FP32: {speedup:.2f}x (rounds {min(ratio_rounds):.2f}-{max(ratio_rounds):.2f}x;"
        f" target >= 1.6x): {'met' if speedup >= 1.6 else 'NOT met'}"
    )
    print(
        f"INT8 accuracy change: {-change.drop * 100 + 0.0:+.2f} points, paired 95% CI "
        f"{-high * 100:+.2f} to {-low * 100:+.2f} (n={n}; target: at most 1 lost): "
        f"{'met' if change.drop <= 0.01 else 'NOT met'}"
    )
    print(f"FP32 over eager: {latency['pytorch eager'] / latency['onnx-cpu-fp32']:.2f}x")
    print(
        f"INT8 build: {', '.join(int8.steps)}; "
        f"{int8.metrics.get('integer_convs', 0):.0f} integer / "
        f"{int8.metrics.get('float_convs', 0):.0f} float convs in ORT's graph, "
        f"{int8.metrics.get('batchnorms_folded', 0):.0f} BatchNorm folded; "
        f"sizes fp32 {fp32.metrics['size_bytes'] / 1e6:.2f} MB, "
        f"int8 {int8.metrics['size_bytes'] / 1e6:.2f} MB"
    )
    return {
        "latency_p50_ms": latency,
        "latency_rounds_ms": p50,
        "int8_over_fp32": speedup,
        "accuracy": accuracy,
        "n": n,
        "int8_points_lost": change.drop * 100,
        "int8_points_lost_ci": [low * 100, high * 100],
        "int8_steps": int8.steps,
        "int8_metrics": dict(int8.metrics),
        "size_bytes": {"fp32": fp32.metrics["size_bytes"], "int8": int8.metrics["size_bytes"]},
    }


if __name__ == "__main__":
    main()
