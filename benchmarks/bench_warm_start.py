"""Warm start vs cold start: epochs and time a second fine-tune needs to a test accuracy.

A second fine-tune on new data, from the parent version's weights vs from the base model:
epochs and wall time to the same held-out test accuracy.

    python -m benchmarks.bench_warm_start [--backbone efficientnet-lite0|small-cnn]
        [--strategy head|last-n] [--image-size 64] [--a-per-class 100] [--b-per-class 100]
        [--test-per-class 200] [--new-class ankle-boot] [--seeds 5] [--epochs 20]
        [--target 0.98] [--json out.json]

Fashion-MNIST. v1 is fine-tuned on data set A: `--a-per-class` training images of every
class but `--new-class`. v2 is fine-tuned on data set B: `--b-per-class` other training
images of every class, the new one included, two ways with the same data, split and seed:

- warm: from v1, the way a `--warm-start` job does it (`cloudsvc.jobs.finetune.WarmStart`
  over v1's weights under their state_dict names, as its export names them: the head's rows
  taken by class name, so the new class's row starts fresh; backbone tensors where names
  and shapes match);
- cold (the baseline): from the base backbone with a fresh head.

Both use the job's defaults (`FineTuneConfig`: Adam 3e-3, batch 64, 20 epochs, early
stopping with patience 5 on a stratified 20% validation split of B). After every epoch the
head is scored on the official test split (`--test-per-class` per class, stratified), which
neither run trains or early-stops on; that scoring sits outside the timed figure
(`EpochProgress.seconds` is taken before the callback runs). Target: `--target` (98%) of
the cold run's final test accuracy (the model `fine_tune` returns: its best validation
epoch). Reported per seed: epochs and seconds until the test accuracy first reaches the
target, the ratio cold / warm, and each run's final test accuracy with its 95% Wilson
interval.

Head-only (the default strategy): B's backbone features are computed once before both runs
and left in the feature cache, so both runs read the same cached features; the feature
pass is timed once and added to both runs' time to target (it is the same work for both).
`--strategy last-n` trains the last backbone block too (no feature cache; much slower).
One torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import numpy.typing as npt

from benchmarks._common import describe_machine, machine, write_json


@dataclass
class Run:
    """One v2 fine-tune: per-epoch test accuracy and timing, and the final model's score."""

    label: str
    seed: int
    test_accuracy: list[float] = field(default_factory=list)  # after each epoch
    epoch_seconds: list[float] = field(default_factory=list)  # the training loop's own
    val_accuracy: list[float] = field(default_factory=list)
    final_correct: int = 0
    n: int = 0
    verdicts: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))
    best_epoch: int = 0
    wall_seconds: float = 0.0  # fine_tune's wall time less the test scoring

    @property
    def final(self) -> float:
        return self.final_correct / self.n if self.n else 0.0

    def reached(self, target: float) -> int | None:
        """The first epoch whose test accuracy is at least `target` (None: never)."""
        return next((i + 1 for i, a in enumerate(self.test_accuracy) if a >= target), None)

    def seconds_to(self, epoch: int | None) -> float | None:
        return None if epoch is None else sum(self.epoch_seconds[:epoch])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--backbone", choices=["efficientnet-lite0", "small-cnn"], default="efficientnet-lite0"
    )
    parser.add_argument("--strategy", choices=["head", "last-n"], default="head")
    parser.add_argument("--image-size", type=int, default=64, help="side the backbone sees, px")
    parser.add_argument("--a-per-class", type=int, default=100, help="v1's training images")
    parser.add_argument("--b-per-class", type=int, default=100, help="v2's (other) images")
    parser.add_argument("--test-per-class", type=int, default=200, help="official test split")
    parser.add_argument("--new-class", default="ankle-boot", help="the class A lacks")
    parser.add_argument("--seeds", type=int, default=5, help="v2 pairs, seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=20, help="at most (early stopping on)")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.98, help="share of cold's final")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import torch

    from cloudsvc.jobs.finetune import WarmStart
    from compilers.sampling import stratified_sample
    from transfer.datasets import FASHION_MNIST_CLASSES, Dataset, load_fashion_mnist
    from transfer.finetune import (
        FineTuneConfig,
        extract_features,
        feature_cache_path,
        fine_tune,
    )

    torch.set_num_threads(1)
    print(describe_machine())
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    new = FASHION_MNIST_CLASSES.index(args.new_class)
    names = FASHION_MNIST_CLASSES
    old = np.flatnonzero(train.labels != new)
    a_pick = old[stratified_sample(train.labels[old], 9 * args.a_per_class, seed=0).indices]
    b_pick = stratified_sample(train.labels, 10 * args.b_per_class, seed=1, exclude=a_pick)
    scored = stratified_sample(test.labels, 10 * args.test_per_class, seed=0)
    # A: v1's classes only (labels renumbered to them); B: all ten, other images.
    a_names = tuple(n for n in names if n != args.new_class)
    a_labels = np.array([a_names.index(names[y]) for y in train.labels[a_pick]], dtype=np.int64)
    data_a = Dataset("image", train.inputs[a_pick], a_labels, a_names, "fashion-mnist:A")
    data_b = train.subset(b_pick.indices.astype(np.int64))
    x_test, y_test = test.inputs[scored.indices], test.labels[scored.indices]
    print(
        f"A (v1): {len(data_a)} training images of {len(a_names)} classes (no {args.new_class}); "
        f"B (v2): {b_pick.describe(names)}, none of A's; test: {scored.describe()} of the "
        "official test split"
    )

    def backbone() -> Any:
        from transfer.backbones import load_backbone

        return load_backbone(args.backbone, input_shape=(1, 28, 28), image_size=args.image_size)

    def config(seed: int, cache: Path | None) -> FineTuneConfig:
        return FineTuneConfig(
            strategy=args.strategy,
            epochs=args.epochs,
            patience=args.patience or None,
            seed=seed,
            cache_dir=cache if args.strategy == "head" else None,
        )

    print(
        f"backbone {args.backbone} at {args.image_size} px, strategy {args.strategy}, "
        f"job defaults (lr 3e-3, batch 64, up to {args.epochs} epochs, patience "
        f"{args.patience}), 1 torch thread"
    )
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as scratch:
        cache = Path(scratch) / "features"
        base = backbone()
        feature_seconds = 0.0
        test_features = torch.zeros(0)
        if args.strategy == "head":  # the backbone stays as loaded: score the head alone
            t0 = time.perf_counter()
            test_features = torch.from_numpy(extract_features(base, x_test))
            print(f"test features: {len(x_test)} images, {time.perf_counter() - t0:.1f} s")
            # The feature pass both v2 runs would make: once, into the cache both then read.
            t0 = time.perf_counter()
            feats = extract_features(base, data_b.inputs)
            feature_seconds = time.perf_counter() - t0
            path = feature_cache_path(cache, base, data_b, amp=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, feats)
            print(f"B's feature pass: {len(data_b)} images in {feature_seconds:.1f} s")

        backbone_of: dict[int, Any] = {}  # classifier -> its Backbone (for `prepare`)

        def score(model: Any) -> npt.NDArray[np.bool_]:
            with torch.no_grad():
                if args.strategy == "head":
                    logits = model.head(test_features)
                else:
                    module = backbone_of[id(model)]
                    logits = torch.cat(
                        [
                            model(*module.prepare(x_test[i : i + 200]))
                            for i in range(0, len(x_test), 200)
                        ]
                    )
            verdicts: npt.NDArray[np.bool_] = logits.argmax(1).numpy() == y_test
            return verdicts

        def train_v2(label: str, seed: int, warm: WarmStart | None) -> Run:
            loaded = backbone()
            if warm is not None:
                warm.load_backbone(loaded)
            run = Run(label, seed)
            holder: list[Any] = []
            scoring = [0.0]

            def init(model: Any) -> None:
                holder.append(model)
                backbone_of[id(model)] = loaded
                if warm is not None:
                    warm.load_head(model)

            def on_epoch(p: Any) -> None:
                t = time.perf_counter()
                model = holder[0]
                was = model.training
                model.eval()
                run.test_accuracy.append(float(score(model).mean()))
                model.train(was)
                run.epoch_seconds.append(p.seconds)
                run.val_accuracy.append(p.val_accuracy)
                print(
                    f"  {label} seed {seed} epoch {p.epoch:>2}: loss {p.loss:.3f}, validation "
                    f"{p.val_accuracy:.4f}, test {run.test_accuracy[-1]:.4f}, {p.seconds:.2f} s"
                )
                scoring[0] += time.perf_counter() - t

            t0 = time.perf_counter()
            model, result = fine_tune(
                loaded, data_b, config(seed, cache), on_epoch=on_epoch, init=init
            )
            run.wall_seconds = time.perf_counter() - t0 - scoring[0]
            model.eval()
            backbone_of[id(model)] = loaded
            correct = score(model)
            run.verdicts = correct
            run.final_correct, run.n, run.best_epoch = (
                int(correct.sum()),
                len(correct),
                result.best_epoch,
            )
            return run

        # v1 on A, seed 0: its weights, under the names its export gives them, are the parent.
        t0 = time.perf_counter()
        v1_model, v1 = fine_tune(base, data_a, config(0, None))
        parent = {k: v.detach().numpy().copy() for k, v in v1_model.state_dict().items()}
        print(
            f"v1 on A: validation accuracy {v1.metrics.accuracy:.4f} after {v1.epochs_run} "
            f"epochs, {time.perf_counter() - t0:.1f} s"
        )
        pairs: list[tuple[Run, Run]] = []
        for seed in range(args.seeds):
            warm = WarmStart(1, parent, a_names)
            if seed % 2 == 0:  # alternate which goes first
                cold_run = train_v2("cold", seed, None)
                warm_run = train_v2("warm", seed, warm)
            else:
                warm_run = train_v2("warm", seed, warm)
                cold_run = train_v2("cold", seed, None)
            if seed == 0:
                print(f"  ({warm.describe(names)})")
            pairs.append((cold_run, warm_run))

    results |= summarise(pairs, args.target, feature_seconds)
    results |= {
        "feature_seconds": feature_seconds,
        "target_share": args.target,
        "machine_after": machine(),
    }
    print(f"\nafter the run: {describe_machine()}")
    write_json(args.json, results)


def summarise(pairs: list[tuple[Run, Run]], share: float, feature_seconds: float) -> dict[str, Any]:
    from compilers.sampling import paired_difference_interval
    from edgefleet.core.stats import wilson_interval

    def fmt(value: float | None, spec: str) -> str:
        return "never" if value is None else format(value, spec)

    def ratio(cold: float | None, warm: float | None) -> float | None:
        return None if cold is None or warm is None or warm <= 0 else cold / warm

    added = (
        f"'with features' adds B's one feature pass ({feature_seconds:.1f} s) to both"
        if feature_seconds
        else "no feature pass (the backbone trains): 'with features' is the loop's"
    )
    print(
        f"\ntime to the target test accuracy ({share:.0%} of the cold run's final), per seed; "
        f"seconds: the training loop's own (test scoring excluded); {added}"
    )
    header = (
        f"{'seed':>4} {'run':<5} {'target':>7} {'epochs':>6} {'loop s':>7} {'with features s':>16}"
        f" {'epochs run':>10} {'best':>4} {'final test acc (95% Wilson)':>30}"
    )
    print(header)
    rows: list[dict[str, Any]] = []
    for cold, warm in pairs:
        target = share * cold.final
        row: dict[str, Any] = {"seed": cold.seed, "target": target}
        for run in (cold, warm):
            epoch = run.reached(target)
            seconds = run.seconds_to(epoch)
            total = None if seconds is None else seconds + feature_seconds
            low, high = wilson_interval(run.final_correct, run.n)
            print(
                f"{run.seed:>4} {run.label:<5} {target:>7.4f} {fmt(epoch, 'd'):>6} "
                f"{fmt(seconds, '.2f'):>7} {fmt(total, '.2f'):>16} {len(run.test_accuracy):>10} "
                f"{run.best_epoch:>4} {run.final:>10.4f} ({low:.4f}-{high:.4f}, n={run.n})"
            )
            row[run.label] = {
                "epochs_to_target": epoch,
                "loop_seconds_to_target": seconds,
                "seconds_to_target_with_features": total,
                "epochs_run": len(run.test_accuracy),
                "best_epoch": run.best_epoch,
                "final_test_accuracy": run.final,
                "final_wilson_95": [low, high],
                "n": run.n,
                "test_accuracy_per_epoch": run.test_accuracy,
                "validation_accuracy_per_epoch": run.val_accuracy,
                "epoch_seconds": run.epoch_seconds,
                "wall_seconds": run.wall_seconds,
            }
        c, w = row["cold"], row["warm"]
        row["cold_over_warm"] = {
            "epochs": ratio(c["epochs_to_target"], w["epochs_to_target"]),
            "loop_seconds": ratio(c["loop_seconds_to_target"], w["loop_seconds_to_target"]),
            "seconds_with_features": ratio(
                c["seconds_to_target_with_features"], w["seconds_to_target_with_features"]
            ),
            "wall_seconds": ratio(c["wall_seconds"], w["wall_seconds"]),
        }
        # warm - cold on the same test images: minus (cold - warm)'s paired interval
        low, high = paired_difference_interval(cold.verdicts, warm.verdicts)
        row["final_warm_minus_cold"] = warm.final - cold.final
        row["final_warm_minus_cold_ci"] = [-high, -low]
        rows.append(row)
    print("\ncold / warm (the baseline over warm start; > 1: warm start is faster)")
    print(
        f"{'seed':>4} {'epochs':>7} {'loop s':>7} {'with features':>14} {'whole run':>10} "
        f"{'final acc warm - cold, points (paired 95% CI)':>46}"
    )
    for row in rows:
        r = row["cold_over_warm"]
        low, high = row["final_warm_minus_cold_ci"]
        gap = f"{row['final_warm_minus_cold'] * 100:+.2f} ({low * 100:+.2f} to {high * 100:+.2f})"
        print(
            f"{row['seed']:>4} {fmt(r['epochs'], '.2f'):>7} {fmt(r['loop_seconds'], '.2f'):>7} "
            f"{fmt(r['seconds_with_features'], '.2f'):>14} {fmt(r['wall_seconds'], '.2f'):>10} "
            f"{gap:>46}"
        )
    medians: dict[str, float | None] = {}
    for key in ("epochs", "loop_seconds", "seconds_with_features", "wall_seconds"):
        values = [r["cold_over_warm"][key] for r in rows if r["cold_over_warm"][key] is not None]
        medians[key] = statistics.median(values) if values else None
    gaps = [r["final_warm_minus_cold"] * 100 for r in rows]
    print(
        f"{'med.':>4} {fmt(medians['epochs'], '.2f'):>7} {fmt(medians['loop_seconds'], '.2f'):>7} "
        f"{fmt(medians['seconds_with_features'], '.2f'):>14} "
        f"{fmt(medians['wall_seconds'], '.2f'):>10} {statistics.median(gaps):>+46.2f}"
    )
    never = sum(1 for r in rows for k in ("cold", "warm") if r[k]["epochs_to_target"] is None)
    if never:
        print(f"{never} run(s) never reached the target: no ratio for them")
    return {"runs": rows, "median_cold_over_warm": medians}


if __name__ == "__main__":
    main()
