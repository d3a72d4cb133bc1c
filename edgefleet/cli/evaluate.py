"""`edgefleet evaluate`: score a version's artifact on labelled data as a cloud job, and
show the accuracy with its interval, the loss, the sample drawn and the weakest classes.
The result is kept with the version (`models show`, `runs compare`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import click
from rich.markup import escape

from edgefleet.cli.admin import Connection, admin, cloud_options, console, json_option, print_json
from edgefleet.cli.jobs import _check_local_data, _upload_local, follow
from edgefleet.core.jobs import Job, JobState
from edgefleet.core.versions import Evaluation, ModelVersion

DEFAULT_SAMPLE = 2000
WORST_SHOWN = 3


@click.command("evaluate")
@click.argument("name")
@click.option("--version", "number", type=int, required=True, help="The version to score.")
@click.option(
    "--data",
    required=True,
    help="Labelled data: fashion-mnist[:test], synthetic[:COUNT[:SEED]], captures:MODEL, or a "
    "local folder of class subfolders, .npz, .csv/.parquet (checked, then uploaded).",
)
@click.option(
    "--target",
    default="",
    help="The artifact to score, e.g. onnx-cpu-int8 [default: onnx-cpu-fp32 where the version "
    "has it, else its first].",
)
@click.option(
    "--sample",
    type=click.IntRange(1, 1_000_000),
    default=DEFAULT_SAMPLE,
    show_default=True,
    help="Examples scored at most, drawn per class in proportion (stratified, seed 0).",
)
@click.option("--label-column", default="", help="Tables: the label column [default: label].")
@click.option("--text-column", default="", help="Tables of text: the column holding the text.")
@click.option("--detach", is_flag=True, help="Submit and return; do not follow the job.")
@json_option
@cloud_options
def evaluate(
    name: str,
    number: int,
    data: str,
    target: str,
    sample: int,
    label_column: str,
    text_column: str,
    detach: bool,
    as_json: bool,
    cloud: Connection,
) -> None:
    """Score version VERSION of NAME on labelled data, on any of its artifacts, and keep the
    result with the version. The accuracy comes with its 95% interval; the sample's size
    and class counts are stated.

    \b
      edgefleet evaluate shapes --version 3 --data synthetic:2000:7
      edgefleet evaluate shapes --version 3 --target onnx-cpu-int8 --data ./holdout
      edgefleet evaluate apparel --version 2 --data fashion-mnist:test --sample 5000
      edgefleet evaluate reviews --version 1 --data new.csv --text-column review
      edgefleet evaluate apparel --version 2 --data captures:apparel --json

    With --json the Evaluation is printed on stdout (progress goes to stderr).
    """
    with admin(cloud) as client, _quiet(as_json):
        version = client.version(name, number)  # a missing model or version ends here
        if target and version.artifact(target) is None:
            have = ", ".join(a.target for a in version.artifacts) or "none"
            raise click.ClickException(
                f"{name} v{number} has no {target} artifact (it has: {have}); build it with "
                f"`edgefleet compile {name} --version {number} --target {target}`, or pick one "
                "of those with --target"
            )
        local = Path(data).expanduser()
        if local.exists():
            _check_local_data(local, label_column, text_column, 0)
            data = _upload_local(client, local, "data set")
        job = client.evaluate(
            name,
            number,
            data=data,
            target=target,
            sample=sample,
            label_column=label_column,
            text_column=text_column,
        )
        scored = job.request.get("target", "") or target
        console.print(
            f"submitted [bold]{job.job_id}[/]: evaluate {name} v{number} {scored} on "
            f"{escape(data)}",
            emoji=False,
        )
        if detach:
            console.print(f"follow it with `edgefleet jobs logs -f {job.job_id}`")
            return
        job = follow(client, job.job_id)
        if job.state is not JobState.SUCCEEDED:
            raise click.ClickException(f"{job.job_id} {job.state.value}: {job.error}")
        version = client.version(name, number)
        evaluation = recorded(version, job)
    if as_json:
        print_json(evaluation)
        return
    show(version, evaluation)


@contextlib.contextmanager
def _quiet(as_json: bool) -> Iterator[None]:
    """With --json, what the command says on its way (checks, upload, progress) goes to
    stderr, so stdout holds the JSON alone."""
    if not as_json:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def recorded(version: ModelVersion, job: Job) -> Evaluation:
    """The evaluation `job` recorded with `version`: the latest of its target and data."""
    request = job.request
    mine = [
        e
        for e in version.evaluations
        if e.target == request.get("target") and e.data == request.get("data")
    ]
    if not mine and not version.evaluations:
        raise click.ClickException(
            f"{job.job_id} succeeded, but {version.model} v{version.version} holds no "
            f"evaluation; see `edgefleet jobs logs {job.job_id}`"
        )
    return (mine or list(version.evaluations))[-1]


def show(version: ModelVersion, e: Evaluation) -> None:
    """The scores as a user reads them: accuracy, interval and resolution, loss, sample,
    weakest classes, and where the result is kept."""
    low, high = e.interval()
    title = f"{version.model} v{version.version} {e.target} on {escape(e.data)}"
    console.print(f"[bold]{title}[/]", highlight=False, emoji=False)
    console.print(
        f"  accuracy  [bold]{e.accuracy:.2%}[/] (95% CI {low:.1%} to {high:.1%}, n={e.count}; "
        f"with {e.count} examples one example is {e.example_points:.2f} points)",
        highlight=False,
        emoji=False,
    )
    console.print(f"  loss      {e.loss:.4f} (mean cross-entropy)", highlight=False, emoji=False)
    console.print(
        f"  sample    {escape(e.sample)} (stratified, seed 0)", highlight=False, emoji=False
    )
    if version.evaluation is not None:
        console.print(
            f"  at fine-tune: validation accuracy {version.evaluation.accuracy:.2%} "
            f"(n={version.evaluation.count})",
            highlight=False,
            emoji=False,
        )
    scored = sorted((c for c in e.per_class if c.support), key=lambda c: (c.recall, c.name))
    if scored and scored[0].recall == 1.0:
        console.print(
            f"  recall    100% in every class ({len(scored)})", highlight=False, emoji=False
        )
    elif scored:
        worst = ", ".join(
            f"{escape(c.name)} {c.recall:.1%} ({round(c.recall * c.support)}/{c.support}, "
            f"precision {c.precision:.1%})"
            for c in scored[:WORST_SHOWN]
        )
        console.print(f"  worst recall: {worst}", highlight=False, emoji=False)
    unseen = [c.name for c in e.per_class if not c.support]
    if unseen:
        console.print(
            f"  not in the data (no recall measured): {escape(', '.join(unseen))}",
            highlight=False,
            emoji=False,
        )
    console.print(
        f"recorded with {version.model} v{version.version} (its evaluation "
        f"#{len(version.evaluations)}); see `edgefleet models show "
        f"{version.model} {version.version}` and `edgefleet runs compare {version.model}`",
        highlight=False,
        emoji=False,
    )
