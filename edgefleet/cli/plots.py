"""Pictures of fine-tuned versions: training curves, confusion matrices, per-class bars, an
HTML page with them inlined, and an export of one version to an MLflow tracking server.

matplotlib and mlflow are optional: each is imported only when asked for, and a missing one
is a clear error saying what to install.
"""

from __future__ import annotations

import base64
import html
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgefleet.core.versions import Evaluation, ModelVersion

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**kwargs: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise click.ClickException(
            "plots need matplotlib: pip install matplotlib (or pip install 'edgefleet[plots]')"
        ) from None
    return Figure(**kwargs)


def class_names(version: ModelVersion) -> tuple[str, ...]:
    if version.lineage and version.lineage.class_names:
        return tuple(version.lineage.class_names)
    if version.evaluation and version.evaluation.per_class:
        return tuple(c.name for c in version.evaluation.per_class)
    size = len(version.evaluation.confusion) if version.evaluation else 0
    return tuple(str(i) for i in range(size))


def plot_curves(name: str, versions: Sequence[ModelVersion], path: Path) -> Path | None:
    """Loss (top) and accuracy (bottom), train dashed and validation solid, one column per
    version; None when no version has a history."""
    with_history = [v for v in versions if v.evaluation and v.evaluation.history]
    if not with_history:
        return None
    cols = len(with_history)
    fig = _figure(figsize=(4.0 * cols, 6.0), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False, sharey="row")
    for col, version in enumerate(with_history):
        assert version.evaluation is not None
        history = version.evaluation.history
        epochs = [h.epoch for h in history]
        loss, acc = axes[0][col], axes[1][col]
        loss.plot(epochs, [h.train_loss for h in history], "--o", label="train")
        loss.plot(epochs, [h.val_loss for h in history], "-o", label="validation")
        acc.plot(epochs, [h.train_accuracy for h in history], "--o", label="train")
        acc.plot(epochs, [h.val_accuracy for h in history], "-o", label="validation")
        loss.set_title(f"v{version.version}")
        loss.set_ylabel("loss")
        acc.set_ylabel("accuracy")
        acc.set_xlabel("epoch")
        acc.set_ylim(0.0, 1.02)
        for ax in (loss, acc):
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(f"{name}: training curves")
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_confusion(name: str, version: ModelVersion, path: Path) -> Path | None:
    evaluation = version.evaluation
    if evaluation is None or not evaluation.confusion:
        return None
    names = class_names(version)
    matrix = [list(row) for row in evaluation.confusion]
    size = len(matrix)
    fig = _figure(figsize=(1.0 + 0.6 * size + 2, 1.0 + 0.6 * size + 1), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    peak = max((n for row in matrix for n in row), default=0)
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            colour = "white" if peak and n > peak / 2 else "black"
            ax.text(j, i, str(n), ha="center", va="center", color=colour, fontsize="small")
    ticks = list(range(size))
    ax.set_xticks(ticks, labels=list(names[:size]), rotation=45, ha="right")
    ax.set_yticks(ticks, labels=list(names[:size]))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name} v{version.version}: confusion ({evaluation.count} examples)")
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_per_class(name: str, version: ModelVersion, path: Path) -> Path | None:
    evaluation = version.evaluation
    if evaluation is None or not evaluation.per_class:
        return None
    scores = evaluation.per_class
    fig = _figure(figsize=(max(5.0, 0.8 * len(scores) + 2), 4.0), layout="constrained")
    ax = fig.subplots()
    xs = list(range(len(scores)))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [c.precision for c in scores], width, label="precision")
    ax.bar([x + width / 2 for x in xs], [c.recall for c in scores], width, label="recall")
    ax.set_xticks(xs, labels=[c.name for c in scores], rotation=45, ha="right")
    ax.set_ylim(0.0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"{name} v{version.version}: precision and recall per class")
    fig.savefig(path, format="png", dpi=100)
    return path


def write_plots(name: str, versions: Sequence[ModelVersion], out: Path) -> list[Path]:
    """Every picture for these versions, written under `out`; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(name, versions, out / f"{name}-curves.png")]
    for v in versions:
        written.append(plot_confusion(name, v, out / f"{name}-v{v.version}-confusion.png"))
        written.append(plot_per_class(name, v, out / f"{name}-v{v.version}-per-class.png"))
    return [p for p in written if p is not None]


def html_page(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]], images: Sequence[Path]
) -> str:
    """One self-contained page: the table, then each PNG inlined as base64."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    pictures = "".join(
        f'<figure><img alt="{html.escape(p.name)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"/>'
        f"<figcaption>{html.escape(p.name)}</figcaption></figure>"
        for p in images
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "img{max-width:100%}figure{margin:1.5em 0}"
        f"</style></head><body><h1>{html.escape(title)}</h1>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"{pictures}</body></html>\n"
    )


# mlflow -------------------------------------------------------------------------------------


def require_mlflow() -> None:
    _mlflow()


def _mlflow() -> Any:
    try:
        return importlib.import_module("mlflow")
    except ImportError:
        raise click.ClickException(
            "export-mlflow needs mlflow, which is not installed: pip install mlflow-skinny "
            '(or pip install "edgefleet[mlflow]")'
        ) from None


def _evaluation_metrics(evaluation: Evaluation, prefix: str = "val") -> dict[str, float]:
    low, high = evaluation.interval()
    metrics = {
        f"{prefix}_accuracy": evaluation.accuracy,
        f"{prefix}_count": float(evaluation.count),
        f"{prefix}_accuracy_ci_low": low,
        f"{prefix}_accuracy_ci_high": high,
    }
    if evaluation.loss:
        metrics[f"{prefix}_loss"] = evaluation.loss
    for c in evaluation.per_class:
        metrics[f"{prefix}_precision_{c.name}"] = c.precision
        metrics[f"{prefix}_recall_{c.name}"] = c.recall
    return metrics


def export_mlflow(
    name: str, version: ModelVersion, tracking_uri: str, experiment: str, workdir: Path
) -> str:
    """Log one version as an MLflow run: parameters, final and per-epoch metrics, and the
    confusion matrix and plots as artifacts. Returns the run id."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    lineage, evaluation = version.lineage, version.evaluation
    params: dict[str, str] = {"model": name, "version": str(version.version)}
    if lineage is not None:
        params.update(
            base_model=lineage.base_model,
            strategy=lineage.strategy,
            dataset=lineage.dataset,
            dataset_digest=lineage.dataset_digest,
            device=lineage.device,
        )
        params.update({k: str(v) for k, v in lineage.hyperparameters.items()})
    with mlflow.start_run(run_name=f"{name}-v{version.version}") as run:
        mlflow.log_params(params)
        for artifact in version.artifacts:
            for key, value in artifact.metrics.items():
                mlflow.log_metric(f"{artifact.target}.{key}", float(value))
        if version.test is not None:
            for key, value in _evaluation_metrics(version.test, "test").items():
                mlflow.log_metric(key, float(value))
        if evaluation is not None:
            for key, value in _evaluation_metrics(evaluation).items():
                mlflow.log_metric(key, float(value))
            for h in evaluation.history:
                for key, value in (
                    ("epoch_train_loss", h.train_loss),
                    ("epoch_train_accuracy", h.train_accuracy),
                    ("epoch_val_loss", h.val_loss),
                    ("epoch_val_accuracy", h.val_accuracy),
                    ("epoch_learning_rate", h.learning_rate),
                ):
                    mlflow.log_metric(key, float(value), step=h.epoch)
            workdir.mkdir(parents=True, exist_ok=True)
            confusion = workdir / "confusion.json"
            confusion.write_text(
                json.dumps(
                    {"classes": list(class_names(version)), "rows": evaluation.confusion},
                    indent=2,
                )
            )
            mlflow.log_artifact(str(confusion))
            try:
                pictures = write_plots(name, [version], workdir)
            except click.ClickException:
                pictures = []  # no matplotlib: numbers and the matrix only
            for picture in pictures:
                mlflow.log_artifact(str(picture), artifact_path="plots")
        run_id: str = run.info.run_id
    return run_id
