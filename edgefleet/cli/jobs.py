"""Fine-tune, compile, watch jobs and compare runs: thin click layers over AdminClient.

Local data sets and backbone files are checked here, before any upload, then uploaded;
following a job shows a live progress bar with its log above it, and Ctrl-C only stops
watching (the job runs on in the cloud).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from edgefleet.cli import plots
from edgefleet.cli.admin import (
    Connection,
    admin,
    ago,
    cloud_options,
    console,
    human_bytes,
    json_option,
    points,
    print_json,
    scored,
    update_size,
)
from edgefleet.client.admin import AdminClient
from edgefleet.core.jobs import Job, JobEvent, JobState
from edgefleet.core.versions import ModelVersion
from edgefleet.core.wire import to_jsonable

STATE_STYLE = {
    JobState.QUEUED: "yellow",
    JobState.RUNNING: "cyan",
    JobState.SUCCEEDED: "green",
    JobState.FAILED: "red",
    JobState.CANCELLED: "magenta",
}
TARGET_NAMES = ("onnx-cpu-fp32", "onnx-cpu-int8", "onnx-gpu-fp16", "tensorrt-fp16")


def _duration(seconds: float) -> str:
    s = int(max(0, seconds))
    return (
        f"{s}s"
        if s < 120
        else f"{s // 60}m{s % 60:02d}s"
        if s < 7200
        else f"{s // 3600}h{s % 3600 // 60:02d}m"
    )


def _state(state: JobState) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state.value}[/]"


def _upload_local(client: AdminClient, path: Path, what: str) -> str:
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"uploading {what} {path.name}", total=None)
        reference = client.upload(
            path, progress=lambda sent, total: bar.update(task, completed=sent, total=total)
        )
    console.print(f"uploaded {what} {path} as [bold]{reference}[/]")
    return reference


def _check_local_data(path: Path, label_column: str, text_column: str, limit: int) -> None:
    """Load a local data set the way the cloud will (torch-free), so that an empty,
    single-class or unlabelled data set fails here, before the upload."""
    from transfer.datasets import load_dataset

    table = path.suffix.lower() in (".csv", ".parquet", ".pq")
    options: dict[str, Any] = (
        {"label_column": label_column or "label", "text_column": text_column or None}
        if table
        else {}
    )
    with console.status(f"checking {path}..."):
        dataset = load_dataset(path, **options)
    used = f", {limit} will be used" if limit and limit < len(dataset) else ""
    console.print(
        f"data set {path}: {len(dataset)} {dataset.kind} examples, "
        f"{dataset.num_classes} classes{used}"
    )


def _data_reference(
    client: AdminClient, data: str, label_column: str, text_column: str, limit: int, what: str
) -> str:
    """A data set as the cloud names it: a local path is checked here and uploaded;
    cloud:/path names a path on the cloud machine; anything else goes as it is."""
    path = Path(data).expanduser()
    if data.startswith("cloud:"):
        return data.removeprefix("cloud:")
    if path.exists():
        _check_local_data(path, label_column, text_column, limit)
        return _upload_local(client, path, what)
    return data


def follow(client: AdminClient, job_id: str) -> Job:
    """Show the job live until it ends; Ctrl-C detaches. The finished (or current) job."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"{job_id} queued", total=None, detail="")

            def show(event: JobEvent) -> None:
                if event.kind == "progress" and event.progress is not None:
                    p = event.progress
                    label = p.phase + (f" trial {p.trial}/{p.trials}" if p.trials > 1 else "")
                    detail = ""
                    if p.phase == "training" and p.epochs:
                        detail = (
                            f"epoch {p.epoch}/{p.epochs} loss {p.loss:.4f} val {p.val_accuracy:.1%}"
                        )
                        if p.eta_seconds:
                            detail += f" · {_duration(p.eta_seconds)} left"
                        bar.update(task, total=p.epochs, completed=p.epoch)
                    else:
                        detail = p.message
                        bar.update(task, total=None, completed=0)
                    bar.update(task, description=f"{job_id} {label}", detail=detail)
                elif event.kind == "log":
                    # emoji=False: "synthetic:100:3" must not print as an emoji
                    bar.console.print(f"[dim]{escape(event.message)}[/]", emoji=False)
                elif event.kind == "state":
                    style = STATE_STYLE.get(event.state, "white")
                    bar.console.print(f"[{style}]{escape(event.message)}[/]", emoji=False)

            return client.wait_job(job_id, on_event=show)
    except KeyboardInterrupt:
        console.print(
            f"\nstopped watching; {job_id} keeps running in the cloud. Follow it again with "
            f"`edgefleet jobs logs -f {job_id}`, stop it with `edgefleet jobs cancel {job_id}`"
        )
        raise SystemExit(130) from None


def _targets_table(job: Job) -> Table:
    table = Table("target", "status", "size", "p50 batch 1", "accuracy change", "note")
    for o in job.targets:
        m = o.metrics
        table.add_row(
            o.target,
            "[green]built[/]" if o.status == "built" else f"[red]{o.status}[/]",
            human_bytes(int(m["size_bytes"])) if "size_bytes" in m else "-",
            f"{m['latency_p50_ms']:.3f} ms" if "latency_p50_ms" in m else "-",
            points(m["accuracy_drop"]) if "accuracy_drop" in m else "-",
            escape(o.reason[:160]),
        )
    return table


def _trials_table(job: Job) -> Table:
    names = sorted({k for t in job.trials for k in t.params})
    varying = [n for n in names if len({t.params.get(n) for t in job.trials}) > 1] or names[:3]
    seeded = any(t.seeds > 1 for t in job.trials)
    spread = ("seeds: min-max",) if seeded else ()
    table = Table(
        "trial",
        *varying,
        "val accuracy" + (" (mean)" if seeded else ""),
        *spread,
        "val loss",
        "epochs",
        "time",
        "",
        caption="ranked by validation accuracy; ties: lower validation loss, then earlier trial",
    )
    for t in job.trials:
        table.add_row(
            str(t.number),
            *(t.params.get(n, "") for n in varying),
            f"{t.val_accuracy:.2%}" if not t.error else f"[red]{escape(t.error[:60])}[/]",
            *((f"{t.seeds}: {t.val_accuracy_min:.1%}-{t.val_accuracy_max:.1%}",) if seeded else ()),
            f"{t.val_loss:.4f}" if t.val_loss else "-",
            str(t.epochs_run),
            _duration(t.seconds),
            "[green]best[/]" if t.best else "",
        )
    return table


def summarise(client: AdminClient, job: Job) -> None:
    """The end of a followed job: what it made, or why it did not, and what to do next."""
    took = _duration((job.finished_at or time.time()) - (job.started_at or job.created_at))
    if job.trials:
        console.print(_trials_table(job))
    if job.targets:
        console.print(_targets_table(job))
    if job.state is not JobState.SUCCEEDED:
        console.print(f"{job.job_id} {_state(job.state)} after {took}: {escape(job.error)}")
        if job.state is JobState.FAILED:
            console.print(f"run it again with `edgefleet jobs retry {job.job_id}`")
        raise SystemExit(1)
    version = client.version(job.model, job.result_version)
    if job.kind == "evaluate":
        last = version.evaluations[-1] if version.evaluations else None
        result = f": {last.target} on {last.data}: {scored(last)}" if last else ""
        console.print(
            f"[green]{job.job_id} succeeded[/] in {took}: {job.model} v{version.version}{result}",
            emoji=False,
        )
        return
    accuracy = (
        f", validation accuracy {version.evaluation.accuracy:.2%}" if version.evaluation else ""
    )
    console.print(
        f"[green]{job.job_id} succeeded[/] in {took}: {job.model} [bold]v{version.version}[/]"
        f"{accuracy}; artifacts {', '.join(a.target for a in version.artifacts)}"
    )
    if version.test is not None:
        console.print(f"  test accuracy {scored(version.test)}")
    else:
        console.print(
            "  [yellow]no test set kept[/]: the validation figure chose this version and "
            "flatters it (use --test or --test-split)"
        )
    fp32 = version.artifact("onnx-cpu-fp32") or version.artifacts[0]
    if "update_bytes" in fp32.metrics:
        console.print(
            f"a device running v{version.parent_version} downloads "
            f"{update_size(fp32.metrics, fp32.size_bytes)} of the {fp32.target} artifact to "
            "move to it (unchanged weights are chunks it holds already)"
        )
    console.print(
        f"next: edgefleet models show {job.model} {version.version} · "
        f"edgefleet runs compare {job.model} · "
        f"edgefleet deploy {job.model} --version {version.version}"
    )


# finetune -------------------------------------------------------------------------------


def _parse_search(values: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in values:
        key, sep, rest = item.partition("=")
        choices = [v.strip() for v in rest.split(",") if v.strip()]
        if not sep or not key or not choices:
            raise click.BadParameter(
                f"{item!r}: write --search NAME=V1,V2, e.g. --search lr=1e-3,3e-4",
                param_hint="--search",
            )
        out[key.strip().replace("-", "_")] = choices
    return out


@click.command()
@click.argument("name")
@click.option(
    "--base",
    required=True,
    help="Backbone: small-cnn, efficientnet-lite0, minilm-l6, or a local TorchScript / "
    "torch.export file (uploaded).",
)
@click.option(
    "--data",
    required=True,
    help="Data set: fashion-mnist, synthetic[:COUNT], captures:MODEL[@VERSION][?since=DATE] "
    "(what devices captured, labelled), a local folder of class subfolders, "
    ".csv/.parquet or .npz (checked here, then uploaded), or cloud:/path on the cloud machine "
    "(under the folders its jobs.data_roots setting lists).",
)
@click.option(
    "--strategy",
    type=click.Choice(["head", "last-n", "full"]),
    help="What trains: the new head only (fast: backbone features computed once), the last "
    "N blocks too, or everything [default: head].",
)
@click.option("--epochs", type=int, help="Most epochs to train [default: 20].")
@click.option("--lr", type=float, help="Learning rate of the head [default: 3e-3].")
@click.option("--batch-size", type=int, help="[default: 64]")
@click.option(
    "--unfreeze-blocks", type=int, help="last-n: how many last blocks train [default: 1]."
)
@click.option("--backbone-lr-scale", type=float, help="Backbone rate = lr x this [default: 0.1].")
@click.option("--weight-decay", type=float, help="[default: 0]")
@click.option(
    "--patience",
    type=int,
    help="Stop after this many epochs without improvement (0: never) [default: 5].",
)
@click.option(
    "--seed", type=int, help="Seed of the split, initialisation and shuffling [default: 0]."
)
@click.option("--validation-fraction", type=float, help="Held-out share [default: 0.2].")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train [default: auto]."
)
@click.option("--image-size", type=int, help="Resize images to SIZE x SIZE inside the model.")
@click.option(
    "--search",
    multiple=True,
    metavar="NAME=V1,V2",
    help="Try each value (repeatable; every combination is a trial); keep the best by "
    "validation accuracy.",
)
@click.option("--max-trials", type=int, default=0, help="Budget of a search [default: 8].")
@click.option(
    "--target",
    "targets",
    multiple=True,
    type=click.Choice(TARGET_NAMES),
    help="Targets to compile (repeatable) [default: the cloud's: onnx-cpu-fp32, onnx-cpu-int8, "
    "plus onnx-gpu-fp16 on a GPU cloud].",
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    help="Largest accuracy loss INT8/FP16 may cost, 0.01 = one point [default: 0.01].",
)
@click.option("--label-column", default="", help="Tables: the label column [default: label].")
@click.option("--text-column", default="", help="Tables: the text column (text models).")
@click.option("--limit", type=int, default=0, help="Use a stratified sample of this many examples.")
@click.option(
    "--test",
    "test_data",
    default="",
    help="A labelled data set kept as the test set: nothing trains, stops early, searches or "
    "chooses on it; the chosen version is scored on it once (same forms as --data).",
)
@click.option(
    "--test-split",
    type=float,
    default=0.0,
    help="Or keep this share of --data apart as the test set (stratified), e.g. 0.2.",
)
@click.option(
    "--final",
    is_flag=True,
    help="After choosing settings and epochs on the validation split, train once more on "
    "training + validation data for that many epochs and keep the last epoch.",
)
@click.option(
    "--from-parent/--from-base",
    "from_parent",
    default=None,
    help="Start from the parent version's trained weights, or from the base backbone with a "
    "fresh head [default: from the parent where it was fine-tuned from the same base].",
)
@click.option(
    "--seeds",
    type=click.IntRange(1, 8),
    default=1,
    help="Run each trial with this many seeds; trials rank by their mean, the spread is shown.",
)
@click.option("--parent", type=int, default=0, help="Lineage parent [default: the latest version].")
@click.option("-d", "--description", default="", help="What this version is for.")
@click.option("--detach", is_flag=True, help="Submit and return; do not follow the job.")
@cloud_options
def finetune(
    name: str,
    base: str,
    data: str,
    search: tuple[str, ...],
    max_trials: int,
    targets: tuple[str, ...],
    max_accuracy_drop: float | None,
    label_column: str,
    text_column: str,
    limit: int,
    test_data: str,
    test_split: float,
    final: bool,
    from_parent: bool | None,
    seeds: int,
    parent: int,
    description: str,
    detach: bool,
    cloud: Connection,
    **settings: Any,
) -> None:
    """Fine-tune BASE with a new head on a data set; the result is the next version of NAME.

    The cloud runs it as a job: validate, train (on its GPU if it has one), export to ONNX
    checked against torch, compile each target with its accuracy measured, register the
    version with lineage and held-out metrics. This command follows the job live; Ctrl-C
    stops watching, not the job.

    \b
      edgefleet finetune shapes --base small-cnn --data synthetic:2000
      edgefleet finetune apparel --base efficientnet-lite0 --data fashion-mnist --limit 2000 --image-size 64
      edgefleet finetune tickets --base minilm-l6 --data tickets.csv --text-column text
      edgefleet finetune apparel --base small-cnn --data ./images --search lr=1e-3,3e-3 --search strategy=head,last-n
      edgefleet finetune apparel --base small-cnn --data ./train --test ./test --final
      edgefleet finetune tickets --base minilm-l6 --data tickets.csv --text-column text --test-split 0.2 --seeds 3

    Validation figures chose the epoch and the settings, so they flatter the model; keep a
    test set (--test or --test-split) for a figure you can trust.
    """
    params = {k: v for k, v in settings.items() if v is not None}
    with admin(cloud) as client:
        if Path(base).expanduser().is_file():
            base = _upload_local(client, Path(base).expanduser(), "backbone")
        data = _data_reference(client, data, label_column, text_column, limit, "data set")
        if test_data:
            test_data = _data_reference(client, test_data, label_column, text_column, 0, "test set")
        job = client.finetune(
            name,
            base=base,
            data=data,
            params=params,
            search=_parse_search(search),
            max_trials=max_trials,
            targets=targets,
            description=description,
            parent_version=parent,
            label_column=label_column,
            text_column=text_column,
            limit=limit,
            max_accuracy_drop=max_accuracy_drop,
            test_data=test_data,
            test_fraction=test_split,
            final=final,
            from_parent={None: "auto", True: "parent", False: "base"}[from_parent],
            seeds=seeds,
        )
        console.print(f"submitted [bold]{job.job_id}[/]: fine-tune {name} from {base} on {data}")
        if detach:
            console.print(f"follow it with `edgefleet jobs logs -f {job.job_id}`")
            return
        summarise(client, follow(client, job.job_id))


@click.command("compile")
@click.argument("name")
@click.option("--version", "version", type=int, required=True, help="Version to compile.")
@click.option("--target", required=True, type=click.Choice(TARGET_NAMES), help="Target to build.")
@click.option(
    "--data",
    default="",
    help="Labelled data to measure INT8/FP16 accuracy on, for versions pushed as ONNX files "
    "(fine-tuned versions keep their own).",
)
@click.option("--limit", type=int, default=0, help="Use at most this many examples of --data.")
@click.option(
    "--max-accuracy-drop",
    type=float,
    help="Largest accuracy loss allowed [default: 0.01 = one point].",
)
@click.option("--detach", is_flag=True, help="Submit and return; do not follow the job.")
@cloud_options
def compile_command(
    name: str,
    version: int,
    target: str,
    data: str,
    limit: int,
    max_accuracy_drop: float | None,
    detach: bool,
    cloud: Connection,
) -> None:
    """Build the TARGET artifact of NAME's VERSION as a job, with its accuracy change and
    latency measured; refused when it costs more accuracy than allowed.

    \b
      edgefleet compile shapes --version 3 --target onnx-cpu-int8
      edgefleet compile detector --version 1 --target onnx-cpu-int8 --data ./val-images
    """
    with admin(cloud) as client:
        if data and Path(data).expanduser().exists():
            _check_local_data(Path(data).expanduser(), "", "", limit)
            data = _upload_local(client, Path(data).expanduser(), "data set")
        job = client.compile(
            name, version, target, data=data, limit=limit, max_accuracy_drop=max_accuracy_drop
        )
        console.print(f"submitted [bold]{job.job_id}[/]: compile {name} v{version} for {target}")
        if detach:
            console.print(f"follow it with `edgefleet jobs logs -f {job.job_id}`")
            return
        summarise(client, follow(client, job.job_id))


# jobs -------------------------------------------------------------------------------------


@click.group()
def jobs() -> None:
    """Watch and control fine-tune and compile jobs.

    \b
      edgefleet jobs list
      edgefleet jobs logs -f job-7
      edgefleet jobs show job-7
      edgefleet jobs cancel job-7
      edgefleet jobs retry job-7
    """


@jobs.command("list")
@click.option("--model", default="", help="Only this model's jobs.")
@click.option("--active", is_flag=True, help="Only queued and running jobs.")
@click.option("--limit", type=int, default=30, show_default=True)
@json_option
@cloud_options
def list_jobs(model: str, active: bool, limit: int, as_json: bool, cloud: Connection) -> None:
    """Jobs, newest first, with where each one is."""
    with admin(cloud) as client:
        rows = client.jobs(model, active_only=active, limit=limit)
    if as_json:
        print_json(rows)
        return
    table = Table("job", "kind", "model", "state", "progress", "result", "slot", "created", "took")
    for j in rows:
        end = j.finished_at or time.time()
        table.add_row(
            j.job_id,
            j.kind,
            j.model,
            _state(j.state),
            escape(j.progress.describe()) if j.state is JobState.RUNNING else "",
            f"v{j.result_version}" if j.result_version else escape(j.error[:50]),
            j.slot,
            ago(j.created_at),
            _duration(end - j.started_at) if j.started_at else "",
        )
    console.print(table)
    running = sum(1 for j in rows if j.state is JobState.RUNNING)
    queued = sum(1 for j in rows if j.state is JobState.QUEUED)
    console.print(f"{len(rows)} job(s): {running} running, {queued} queued")


@jobs.command("show")
@click.argument("job_id")
@json_option
@cloud_options
def show_job(job_id: str, as_json: bool, cloud: Connection) -> None:
    """Everything about one job: request, state, progress, trials, targets, error."""
    with admin(cloud) as client:
        job = client.job(job_id)
    if as_json:
        print_json(job)
        return
    console.print(f"[bold]{job.job_id}[/] {job.kind} of {job.model}: {_state(job.state)}")
    request = {k: v for k, v in job.request.items() if v not in (None, "", [], {}, 0)}
    console.print(f"  request: {escape(json.dumps(request, sort_keys=True))}")
    console.print(
        f"  created {ago(job.created_at)}"
        + (f", ran on {job.slot}" if job.slot else "")
        + (
            f", took {_duration(job.finished_at - job.started_at)}"
            if job.finished_at and job.started_at
            else ""
        )
        + (f", retry of {job.retry_of}" if job.retry_of else "")
    )
    if job.state is JobState.RUNNING:
        console.print(f"  now: {escape(job.progress.describe())}")
        if job.progress.eta_seconds:
            console.print(f"  about {_duration(job.progress.eta_seconds)} left")
    if job.error:
        console.print(f"  [red]{escape(job.error)}[/]")
    if job.result_version:
        console.print(f"  result: {job.model} v{job.result_version}")
    if job.trials:
        console.print(_trials_table(job))
    if job.targets:
        console.print(_targets_table(job))


@jobs.command("logs")
@click.argument("job_id")
@click.option("-f", "--follow", "follow_", is_flag=True, help="Keep printing until the job ends.")
@json_option
@cloud_options
def job_logs(job_id: str, follow_: bool, as_json: bool, cloud: Connection) -> None:
    """The job's log: its messages, state changes and (with -f) live progress."""
    with admin(cloud) as client:
        if as_json:
            # One event a line, as they come (with -f, until the job ends).
            for event in client.watch_job(job_id, follow=follow_):
                click.echo(json.dumps(to_jsonable(event), sort_keys=True))
            return
        if follow_:
            job = follow(client, job_id)
            summarise(client, job)
            return
        count = 0
        for event in client.watch_job(job_id, follow=False):
            if event.kind == "progress":
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
            style = STATE_STYLE.get(event.state, "white") if event.kind == "state" else "white"
            console.print(f"[dim]{stamp}[/] [{style}]{escape(event.message)}[/]", emoji=False)
            count += 1
        job = client.job(job_id)
    console.print(f"{count} line(s); {job_id} is {_state(job.state)}")


@jobs.command("cancel")
@click.argument("job_id")
@cloud_options
def cancel_job(job_id: str, cloud: Connection) -> None:
    """Stop a queued or running job (its worker process is ended)."""
    with admin(cloud) as client:
        job = client.cancel_job(job_id)
        if not job.finished:
            with console.status(f"stopping {job_id}..."):
                deadline = time.monotonic() + 30
                while not job.finished and time.monotonic() < deadline:
                    time.sleep(0.2)
                    job = client.job(job_id)
    console.print(
        f"{job_id} is {_state(job.state)}" + (f": {escape(job.error)}" if job.error else "")
    )


@jobs.command("retry")
@click.argument("job_id")
@click.option("--detach", is_flag=True, help="Submit and return; do not follow the new job.")
@cloud_options
def retry_job(job_id: str, detach: bool, cloud: Connection) -> None:
    """Submit a finished job's request again as a new job."""
    with admin(cloud) as client:
        job = client.retry_job(job_id)
        console.print(f"submitted [bold]{job.job_id}[/] (retry of {job_id})")
        if not detach:
            summarise(client, follow(client, job.job_id))


# runs ---------------------------------------------------------------------------------------


@click.group()
def runs() -> None:
    """Compare fine-tuned versions like runs of an experiment tracker.

    \b
      edgefleet runs compare apparel
      edgefleet runs compare apparel --versions 3,4,7
      edgefleet runs compare apparel --html apparel.html
      edgefleet runs plot apparel --versions 3,4 --out plots/
      edgefleet runs export-mlflow apparel --version 4 --tracking-uri http://mlflow:5000
    """


def _pick(versions: Sequence[ModelVersion], wanted: str) -> list[ModelVersion]:
    if not wanted:
        return list(versions)
    try:
        numbers = {int(v.strip().lstrip("v")) for v in wanted.split(",") if v.strip()}
    except ValueError:
        raise click.BadParameter("write versions as 1,3,4", param_hint="--versions") from None
    chosen = [v for v in versions if v.version in numbers]
    missing = numbers - {v.version for v in chosen}
    if missing:
        raise click.BadParameter(f"no version(s) {sorted(missing)}", param_hint="--versions")
    return chosen


@runs.command("compare")
@click.argument("name")
@click.option("--versions", default="", help="Only these versions, e.g. 2,5,6 [default: all].")
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write one self-contained HTML page: this table and the plots (needs matplotlib).",
)
@json_option
@cloud_options
def compare(
    name: str, versions: str, html_out: Path | None, as_json: bool, cloud: Connection
) -> None:
    """Versions of NAME side by side: lineage, settings that differ, held-out metrics, and
    per target the size, latency and accuracy change. The best accuracy is marked."""
    with admin(cloud) as client:
        rows = _pick(client.versions(name), versions)
    if not rows:
        raise click.ClickException(f"{name} has no versions yet")
    if as_json and html_out is None:
        print_json(rows)
        return
    table = Table("", *(f"v{v.version}" for v in rows), title=f"{name}: {len(rows)} version(s)")
    hyper_names = sorted({k for v in rows if v.lineage for k in v.lineage.hyperparameters})
    shown = [
        k
        for k in hyper_names
        if len({v.lineage.hyperparameters.get(k) if v.lineage else None for v in rows}) > 1
        or k in ("strategy", "lr", "epochs")
    ]
    # Versions are chosen among on test figures where every version has them: validation
    # figures chose each version's epoch and settings, and flatter it.
    on_test = all(v.test for v in rows)
    figure = {v.version: (v.test if on_test else v.evaluation) for v in rows}
    best = max((f.accuracy for f in figure.values() if f), default=None)

    def lineage_row(label: str, get: Any) -> None:
        table.add_row(label, *(escape(str(get(v.lineage))) if v.lineage else "-" for v in rows))

    def mark(v: ModelVersion, text: str) -> str:
        f = figure[v.version]
        return f"[bold green]{text}[/]" if f and f.accuracy == best else text

    table.add_row("parent", *(f"v{v.parent_version}" if v.parent_version else "-" for v in rows))
    table.add_row("created", *(ago(v.created_at) for v in rows))
    lineage_row("base", lambda lin: lin.base_model)
    lineage_row("data", lambda lin: lin.dataset)
    lineage_row("data digest", lambda lin: lin.dataset_digest[:12])
    for key in shown:
        lineage_row(key, lambda lin, key=key: lin.hyperparameters.get(key, "-"))
    lineage_row(
        "epochs run (best)",
        lambda lin: f"{lin.epochs_run} ({lin.best_epoch})" + (", final" if lin.final else ""),
    )
    lineage_row(
        "examples train/val/test",
        lambda lin: f"{lin.train_examples}/{lin.validation_examples}/{lin.test_examples}",
    )
    lineage_row(
        "warm start", lambda lin: f"from v{lin.warm_start_from}" if lin.warm_start_from else "-"
    )
    lineage_row("trained on", lambda lin: f"{lin.device}, {_duration(lin.training_seconds)}")
    table.add_row(
        "val accuracy (chose it)",
        *(
            (
                mark(v, f"{v.evaluation.accuracy:.2%}")
                if not on_test
                else f"{v.evaluation.accuracy:.2%}"
            )
            + f" n={v.evaluation.count}"
            if v.evaluation
            else "-"
            for v in rows
        ),
    )
    table.add_row(
        "val loss",
        *(f"{v.evaluation.loss:.4f}" if v.evaluation and v.evaluation.loss else "-" for v in rows),
    )
    table.add_row(
        "test accuracy",
        *(
            mark(v, f"{v.test.accuracy:.2%}") + " (95% CI {:.1%}-{:.1%})".format(*v.test.interval())
            if v.test
            else "-"
            for v in rows
        ),
    )
    table.add_row(
        "test n (one example =)",
        *(f"{v.test.count} ({v.test.example_points:.2g} pts)" if v.test else "-" for v in rows),
    )
    table.add_row(
        "worst class recall",
        *(
            (lambda c: f"{c.recall:.1%} {c.name}")(min(f.per_class, key=lambda c: c.recall))
            if (f := figure[v.version]) and f.per_class
            else "-"
            for v in rows
        ),
    )
    table.add_row(
        "later evaluations",
        *(
            "; ".join(
                f"{e.accuracy:.1%} on {e.data} ({e.target}, n={e.count})" for e in v.evaluations
            )
            or "-"
            for v in rows
        ),
    )
    targets = [t for t in TARGET_NAMES if any(v.artifact(t) for v in rows)]
    targets += sorted({a.target for v in rows for a in v.artifacts} - set(targets))
    for target in targets:
        cells = []
        for v in rows:
            a = v.artifact(target)
            if a is None:
                cells.append("-")
                continue
            parts = [human_bytes(a.size_bytes)]
            if "update_bytes" in a.metrics:
                parts.append(f"update {update_size(a.metrics, a.size_bytes)}")
            if "latency_p50_ms" in a.metrics:
                parts.append(f"{a.metrics['latency_p50_ms']:.3f} ms")
            if "accuracy_drop" in a.metrics:
                parts.append(points(a.metrics["accuracy_drop"]))
            cells.append(", ".join(parts))
        table.add_row(target, *cells)
    if html_out is not None:
        _write_html(name, table, rows, html_out)
        if as_json:
            print_json({"html": str(html_out), "versions": to_jsonable(rows)})
            return
        console.print(f"wrote {html_out}")
    console.print(table)
    if best is not None:
        leaders = [v.version for v in rows if (f := figure[v.version]) and f.accuracy == best]
        if on_test:
            smallest = min((v.test.count for v in rows if v.test), default=0)
            console.print(
                f"best test accuracy: {best:.2%} (v{', v'.join(map(str, leaders))}); on "
                f"{smallest} test examples one example is {100 / max(smallest, 1):.2g} points: "
                "versions whose intervals overlap are not told apart by this test set."
            )
        else:
            console.print(
                f"best validation accuracy: {best:.2%} (v{', v'.join(map(str, leaders))}). "
                "[yellow]Not every version has a test set[/]: validation figures chose each "
                "version's epoch and settings and flatter it; score them alike with "
                f"`edgefleet evaluate {name} --version N --data TEST-DATA`."
            )
        console.print(
            "target cells: size, download from the parent version, p50 latency at batch 1 on "
            "the cloud's CPU, accuracy change vs FP32. Deploy with `edgefleet deploy "
            f"{name} --version {leaders[-1]}`"
        )
    else:
        console.print("no version here was fine-tuned by a job, so there are no metrics to compare")


def _write_html(name: str, table: Table, rows: Sequence[ModelVersion], out: Path) -> None:
    """The comparison table as plain text cells, and every plot inlined, in one page."""
    header = [str(c.header) for c in table.columns]
    cells = [
        [Text.from_markup(c) if isinstance(c, str) else Text(str(c)) for c in column._cells]
        for column in table.columns
    ]
    body = [[cells[col][r].plain for col in range(len(cells))] for r in range(table.row_count)]
    with tempfile.TemporaryDirectory(prefix="edgefleet-plots-") as tmp:
        pictures = plots.write_plots(name, rows, Path(tmp))
        page = plots.html_page(f"{name}: {len(rows)} version(s)", header, body, pictures)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")


@runs.command("plot")
@click.argument("name")
@click.option("--versions", default="", help="Only these versions, e.g. 2,3 [default: all].")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to write the PNG files to.",
)
@json_option
@cloud_options
def plot(name: str, versions: str, out_dir: Path, as_json: bool, cloud: Connection) -> None:
    """PNG pictures of versions of NAME: training curves side by side (loss and accuracy,
    train and validation), and per version a confusion matrix and per-class precision and
    recall. Prints the paths written. Needs matplotlib."""
    with admin(cloud) as client:
        rows = _pick(client.versions(name), versions)
    if not rows:
        raise click.ClickException(f"{name} has no versions yet")
    written = plots.write_plots(name, rows, out_dir)
    if as_json:
        print_json({"files": [str(p) for p in written]})
        return
    if not written:
        console.print("nothing to plot: no version here was fine-tuned by a job")
    for path in written:
        console.print(str(path), highlight=False)


@runs.command("export-mlflow")
@click.argument("name")
@click.option("--version", "number", type=int, required=True, help="The version to export.")
@click.option(
    "--tracking-uri",
    required=True,
    help="MLflow tracking URI: a server (http://mlflow:5000), sqlite:///mlflow.db (full mlflow), "
    "or a folder (file:./mlruns; MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE=true).",
)
@click.option("--experiment", default="", help="MLflow experiment [default: NAME].")
@json_option
@cloud_options
def export_mlflow(
    name: str, number: int, tracking_uri: str, experiment: str, as_json: bool, cloud: Connection
) -> None:
    """Log version N of NAME as an MLflow run: parameters, final and per-epoch metrics (epochs
    as steps), and the confusion matrix and plots as artifacts. Needs mlflow."""
    plots.require_mlflow()
    with admin(cloud) as client:
        (version,) = _pick(client.versions(name), str(number))
    with tempfile.TemporaryDirectory(prefix="edgefleet-mlflow-") as tmp:
        try:
            run_id = plots.export_mlflow(name, version, tracking_uri, experiment or name, Path(tmp))
        except Exception as err:  # MLflow's own errors: a refused store, an unreachable server
            if type(err).__module__.split(".")[0] != "mlflow":
                raise
            raise click.ClickException(f"MLflow refused the export: {err}") from None
    if as_json:
        print_json({"run_id": run_id, "tracking_uri": tracking_uri})
        return
    console.print(f"logged {name} v{number} to {tracking_uri} as run {run_id}", highlight=False)
