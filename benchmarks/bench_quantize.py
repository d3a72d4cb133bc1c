"""INT8 vs FP32 (ONNX Runtime) and PyTorch eager, batch 1, one thread, CNNs and MiniLM-L6.

Two CNNs: EfficientNet-Lite0 fine-tuned on Fashion-MNIST (64 px, head trained on frozen
features, scored on the official test split, which no training or calibration touches) and
the project's SmallCNN trained on generated images; and a transformer: MiniLM-L6 with a head
fine-tuned on generated topic sentences (`--model minilm-l6`).

    python -m benchmarks.bench_quantize [--model efficientnet-lite0|small-cnn|both|minilm-l6|all]
        [--rounds 5] [--seconds 1] [--train-per-class 300] [--test-per-class 200]
        [--text-train-per-class 160] [--text-test-per-class 100] [--json out]

Both artifacts are built by `compilers.compile.compile_target` (the jobs' code):
`onnx-cpu-fp32` and `onnx-cpu-int8` (BatchNorm folded, static QDQ, per-channel weights,
calibrated on a stratified sample of training images, sensitive layers kept in FP32 only
while the 1-point gate fails). Latency: FP32 and INT8 sessions timed in alternating rounds
inside one process, p50 of each round, median over rounds. Accuracy: the same held-out
examples for both, the change with its paired 95% interval and n. Targets: INT8 >= 1.6x
faster than FP32 at batch 1, at most 1 point lost.

MiniLM-L6 follows the fine-tune job's path: head-only `transfer.finetune.fine_tune` with the
job's defaults on a training pool (its stratified validation split early-stops), the job's
export (`cloudsvc.jobs.finetune._export`: dynamo, dynamic batch and sequence, per-tensor
files, parity-checked), then `compile_target` with the job's accuracy gate (validation
split, padded batches of 64) and calibration on a stratified sample of the training split
(`stratified_sample`; dynamic INT8, which AUTO picks for MatMul-heavy graphs, does not read
it). Test set: sentences whose templates, topic nouns and events never occur in training
(`benchmarks._text_data`), scored one sentence at a time (batch 1, no padding: what a device
runs). Also printed: which nodes were quantised, in the INT8 file and in the graph ONNX
Runtime runs.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import numpy.typing as npt

from benchmarks._common import describe_machine, machine, pin_to_cpu, time_calls, write_json

Array = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]
Feed = dict[str, npt.NDArray[Any]]


@dataclass
class Case:
    """One model to build both ways: what to export, score, calibrate and time."""

    title: str
    model: Any  # torch module in eval mode
    test: list[Feed]  # held-out inputs, in batches (positional: graph input order)
    y_test: Labels
    calibration: Any  # compilers.quantize.Calibration
    one: Feed  # the batch-1 example that is timed
    export: Callable[[Path], Path]  # folder -> the source model.onnx in it
    gate: Callable[[Path], Any] | None = None  # compile_target's evaluate; None: the test set
    gate_label: str = ""
    notes: list[str] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--model",
        choices=["efficientnet-lite0", "small-cnn", "both", "minilm-l6", "all"],
        help="both: the two CNNs (the default); all: the CNNs and MiniLM-L6",
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per path per round")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--calibration", type=int, default=256, help="calibration examples")
    parser.add_argument("--image-size", type=int, default=64, help="EfficientNet input side")
    parser.add_argument(
        "--text-train-per-class",
        type=int,
        default=160,
        help="MiniLM: training-pool sentences per topic (20%% of them early-stop)",
    )
    parser.add_argument(
        "--text-test-per-class",
        type=int,
        default=100,
        help="MiniLM: held-out-phrasing test sentences per topic (at most 380)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import torch

    print(pin_to_cpu(1))
    print(describe_machine())
    torch.set_num_threads(1)
    # ONNX Runtime's quantiser logs a warning per integer tensor (token ids, masks, shapes)
    # it cannot type; dozens on a transformer, none of them about the result
    logging.getLogger().addFilter(
        lambda record: not record.getMessage().startswith("Inference failed or unsupported type")
    )
    which = args.model or "both"
    results: dict[str, Any] = {"machine": machine()}
    if which in ("efficientnet-lite0", "both", "all"):
        results["efficientnet-lite0"] = measure(efficientnet_case(args), args)
    if which in ("small-cnn", "both", "all"):
        results["small-cnn"] = measure(small_cnn_case(args), args)
    if which in ("minilm-l6", "all"):
        results["minilm-l6"] = measure(minilm_case(args), args)
    print(f"\nafter the run: {describe_machine()}")
    results["machine_after"] = machine()
    write_json(args.json, results)


def image_export(model: Any, one: Array, checks: Sequence[Array]) -> Callable[[Path], Path]:
    def export(folder: Path) -> Path:
        import torch

        from compilers.export import check_parity, export_onnx

        source = export_onnx(
            model, torch.from_numpy(one), folder / "model.onnx", external_data=True
        )
        check_parity(model, source, list(checks))
        return source

    return export


def image_case(
    title: str, model: Any, x_test: Array, y_test: Labels, calibration: Array, one: Array
) -> Case:
    return Case(
        title=title,
        model=model,
        test=[{"input": x_test[i : i + 200]} for i in range(0, len(x_test), 200)],
        y_test=y_test,
        calibration=calibration,
        one={"input": one},
        export=image_export(model, one, [one, x_test[:16]]),
    )


def efficientnet_case(args: argparse.Namespace) -> Case:
    """The head trained on cached features of a stratified sample of the training split;
    the test split held out."""
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
    return image_case(
        f"EfficientNet-Lite0 fine-tuned on Fashion-MNIST ({args.image_size} px)",
        model,
        x_test,
        test.labels[scored.indices],
        train.inputs[calibrating.indices],
        x_test[:1],
    )


def small_cnn_case(args: argparse.Namespace) -> Case:
    from transfer.models import SmallCNN
    from transfer.synthetic import CLASSES, make_images
    from transfer.train import train_classifier

    train_x, train_y = make_images(3000, seed=1)
    test_x, test_y = make_images(2000, seed=2)
    model = SmallCNN(len(CLASSES), width=64)
    train_classifier(model, train_x, train_y, epochs=4, seed=0)
    return image_case(
        "SmallCNN(width=64) on generated 3x32x32 images",
        model.eval(),
        test_x,
        test_y,
        train_x[: args.calibration],
        test_x[:1],
    )


def minilm_case(args: argparse.Namespace) -> Case:
    """MiniLM-L6 + a head fine-tuned the way the fine-tune job does it, on generated topic
    sentences; the test sentences' phrasing never occurs in training."""
    from benchmarks._text_data import make_text_sets
    from cloudsvc.jobs.data import feed_maker
    from cloudsvc.jobs.events import Reporter
    from cloudsvc.jobs.feeds import accuracy_evaluator, take
    from cloudsvc.jobs.finetune import _export
    from compilers.sampling import stratified_sample
    from transfer.backbones import load_backbone
    from transfer.datasets import split_dataset
    from transfer.finetune import FineTuneConfig, fine_tune

    sets = make_text_sets(args.text_train_per_class, args.text_test_per_class, seed=0)
    print(f"text: {sets.describe()}")
    backbone = load_backbone("minilm-l6")
    config = FineTuneConfig(strategy="head", seed=0)  # the job's defaults (FineTuneParams)
    split = split_dataset(sets.train, config.validation_fraction, config.seed)
    model, result = fine_tune(backbone, sets.train, config, split=split)
    model.eval()
    print(
        f"fine-tuned head: {len(split.train)} training, {len(split.validation)} validation "
        f"sentences; {result.epochs_run} epochs (best {result.best_epoch}), validation "
        f"accuracy {result.metrics.accuracy:.4f}, {result.training_seconds:.1f} s"
    )
    feeds = feed_maker(backbone, "text")
    val_feeds = feeds(split.validation.inputs)  # the job's: every validation sentence, padded
    calibrating = stratified_sample(split.train.labels, args.calibration, seed=1)
    cal = feeds(split.train.inputs[calibrating.indices])
    calibration = [take(cal, i, i + 16) for i in range(0, len(calibrating.indices), 16)]
    print(f"calibration: {calibrating.describe(sets.train.class_names)} (training split)")
    test = [feeds(sets.test.inputs[i : i + 1]) for i in range(len(sets.test))]  # batch 1
    lengths = [f["input_ids"].shape[1] for f in test]
    typical = int(np.argsort(lengths)[len(lengths) // 2])  # a sentence of median length
    one = test[typical]
    log = io.StringIO()

    def export(folder: Path) -> Path:
        _export(model, val_feeds, folder, "text", Reporter(log))
        return folder / "model.onnx"

    return Case(
        title=f"MiniLM-L6 + head fine-tuned on generated topic sentences ({len(sets.test)} "
        "held-out-phrasing test sentences)",
        model=model,
        test=test,
        y_test=sets.test.labels,
        calibration=calibration,
        one=one,
        export=export,
        gate=accuracy_evaluator(val_feeds, split.validation.labels),
        gate_label=f"the job's gate: validation split, n={len(split.validation)}, padded "
        "batches of 64",
        notes=[
            f"timed example: {lengths[typical]} tokens "
            f"({min(lengths)}-{max(lengths)} in the test set): {sets.test.inputs[typical]!r}"
        ],
    )


def census(path: Path, *, optimised: bool = False) -> Counter[str]:
    """Op counts of the graph at `path`; with `optimised`, of the graph ONNX Runtime runs
    for it (extended optimisations, as the compile checks use)."""
    import onnxruntime as ort

    from compilers.quantize import op_census

    if not optimised:
        return op_census(path)
    with tempfile.TemporaryDirectory(prefix="bench-ortopt-") as scratch:
        out = Path(scratch) / "optimised.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return op_census(out)


_MATMUL_FAMILY = (
    "MatMul",
    "Gemm",
    "FusedMatMul",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
    "Attention",
    "QAttention",
    "Gather",
)


def describe_census(counts: Counter[str]) -> str:
    shown = [f"{counts[op]} {op}" for op in _MATMUL_FAMILY if counts.get(op)]
    return ", ".join(shown) or "none of the MatMul family"


def measure(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from compilers.compile import compile_target
    from compilers.quantize import AccuracyChange
    from compilers.sampling import Score, wilson_interval

    model, y_test = case.model, case.y_test

    def session(path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def named(s: ort.InferenceSession, feed: Feed) -> Feed:
        return {i.name: v for i, v in zip(s.get_inputs(), feed.values(), strict=True)}

    def evaluate(path: Path) -> Score:
        s = session(path)
        predicted = np.concatenate([s.run(None, named(s, f))[0].argmax(1) for f in case.test])
        correct = predicted == y_test
        return Score(float(correct.mean()), correct)

    def torch_inputs(feed: Feed) -> list[Any]:
        return [torch.from_numpy(v) for v in feed.values()]

    with torch.no_grad():
        eager_logits = torch.cat([model(*torch_inputs(f)) for f in case.test])
    eager_correct = eager_logits.argmax(1).numpy() == y_test
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as scratch:
        root = Path(scratch)
        source = case.export(root / "src")
        gate = case.gate or evaluate
        fp32 = compile_target(source, "onnx-cpu-fp32", root / "fp32", evaluate=gate)
        int8 = compile_target(
            source,
            "onnx-cpu-int8",
            root / "int8",
            calibration=case.calibration,
            evaluate=gate,
            max_accuracy_drop=1.0,  # measure here; the verdict against the target is below
        )
        quantised = {
            "int8 file": census(int8.entrypoint),
            "int8 as ORT runs it": census(int8.entrypoint, optimised=True),
            "fp32 as ORT runs it": census(fp32.entrypoint, optimised=True),
        }
        s32, s8 = session(fp32.entrypoint), session(int8.entrypoint)
        f32, f8 = named(s32, case.one), named(s8, case.one)
        x1 = torch_inputs(case.one)

        def eager() -> object:
            with torch.no_grad():
                return model(*x1)

        paths: dict[str, Callable[[], object]] = {
            "pytorch eager": eager,
            "onnx-cpu-fp32": lambda: s32.run(None, f32),
            "onnx-cpu-int8": lambda: s8.run(None, f8),
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
    print(f"\n{case.title}, batch 1, one thread, {args.rounds} alternating rounds")
    for note in case.notes:
        print(note)
    print(f"{'path':<16} {'p50 ms':>8} {'accuracy':>9}  95% interval (Wilson, n={n})")
    scores = {"pytorch eager": eager_correct, "onnx-cpu-fp32": fp32_score.correct}
    scores["onnx-cpu-int8"] = int8_score.correct
    accuracy: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    for name, correct in scores.items():
        assert correct is not None
        low, high = wilson_interval(float(correct.sum()), n)
        accuracy[name], intervals[name] = float(correct.mean()), (low, high)
        print(f"{name:<16} {latency[name]:>8.3f} {accuracy[name]:>9.4f}  {low:.4f} - {high:.4f}")
    speedup = latency["onnx-cpu-fp32"] / latency["onnx-cpu-int8"]
    assert change.drop_interval is not None
    low, high = change.drop_interval
    assert fp32_score.correct is not None and int8_score.correct is not None
    flipped = int((fp32_score.correct != int8_score.correct).sum())
    print(
        f"INT8 over FP32: {speedup:.2f}x (rounds {min(ratio_rounds):.2f}-{max(ratio_rounds):.2f}x;"
        f" target >= 1.6x): {'met' if speedup >= 1.6 else 'NOT met'}"
    )
    print(
        f"INT8 accuracy change: {-change.drop * 100 + 0.0:+.2f} points, paired 95% CI "
        f"{-high * 100:+.2f} to {-low * 100:+.2f} (n={n}; target: at most 1 lost): "
        f"{'met' if change.drop <= 0.01 else 'NOT met'}; {flipped} verdict(s) differ"
    )
    print(f"FP32 over eager: {latency['pytorch eager'] / latency['onnx-cpu-fp32']:.2f}x")
    metrics = int8.metrics
    if "integer_convs" in metrics:
        print(
            f"INT8 build: {', '.join(int8.steps)}; "
            f"{metrics.get('integer_convs', 0):.0f} integer / "
            f"{metrics.get('float_convs', 0):.0f} float convs in ORT's graph, "
            f"{metrics.get('batchnorms_folded', 0):.0f} BatchNorm folded; "
            f"sizes fp32 {fp32.metrics['size_bytes'] / 1e6:.2f} MB, "
            f"int8 {metrics['size_bytes'] / 1e6:.2f} MB"
        )
    else:
        print(
            f"INT8 build: {', '.join(int8.steps)}; sizes fp32 "
            f"{fp32.metrics['size_bytes'] / 1e6:.2f} MB, int8 {metrics['size_bytes'] / 1e6:.2f} MB"
        )
        for where, counts in quantised.items():
            print(f"  {where}: {describe_census(counts)}")
    if case.gate is not None:
        print(
            f"{case.gate_label}: FP32 {metrics['accuracy_baseline']:.4f} -> INT8 "
            f"{metrics['accuracy']:.4f} ({-metrics['accuracy_drop'] * 100:+.2f} points)"
        )
    return {
        "title": case.title,
        "latency_p50_ms": latency,
        "latency_rounds_ms": p50,
        "int8_over_fp32": speedup,
        "accuracy": accuracy,
        "accuracy_wilson_95": intervals,
        "n": n,
        "int8_points_lost": change.drop * 100,
        "int8_points_lost_ci": [low * 100, high * 100],
        "verdicts_changed": flipped,
        "int8_steps": int8.steps,
        "int8_metrics": dict(metrics),
        "census": {k: dict(v) for k, v in quantised.items()},
        "size_bytes": {"fp32": fp32.metrics["size_bytes"], "int8": metrics["size_bytes"]},
    }


if __name__ == "__main__":
    main()
