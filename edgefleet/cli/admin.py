"""Operator commands (models, deploy, devices, enroll-token): thin click layers over
`edgefleet.client.AdminClient`, each ending with a clear summary."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from edgefleet.client.admin import AdminClient
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.fleet import Device, ModelPhase
from edgefleet.core.wire import to_jsonable

F = TypeVar("F", bound=Callable[..., Any])

console = Console()


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of tables."
    )(fn)


def print_json(value: object) -> None:
    """Domain objects (or lists of them) as JSON on stdout: no colour, no wrapping."""
    click.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=True))


def cloud_options(fn: F) -> F:
    fn = click.option(
        "--token",
        envvar="EDGEFLEET_ADMIN_TOKEN",
        help="Admin token [env EDGEFLEET_ADMIN_TOKEN]; `edgefleet cloud serve` prints where it is kept.",
    )(fn)
    fn = click.option(
        "--cloud",
        envvar="EDGEFLEET_CLOUD",
        default="127.0.0.1:50051",
        show_default=True,
        help="Cloud service address HOST:PORT [env EDGEFLEET_CLOUD].",
    )(fn)
    return fn


@contextmanager
def admin(cloud: str, token: str | None) -> Iterator[AdminClient]:
    """An AdminClient whose errors end the command with their message and a non-zero exit."""
    try:
        with AdminClient(cloud, token) as client:
            yield client
    except EdgefleetError as err:
        raise click.ClickException(f"{err.message} [{err.code.value}]") from None


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: write {what} as key=value, e.g. site=plant-1")
        out[key.strip()] = value.strip()
    return out


def ago(ts: float) -> str:
    if not ts:
        return "never"
    s = max(0, int(time.time()) - ts)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def points(drop: float) -> str:
    """An accuracy drop (0.01 = one point) as a signed change, e.g. '-0.40 pts'."""
    change = -drop * 100
    return f"{change + 0.0:+.2f} pts" if abs(change) >= 0.005 else "±0.00 pts"


def update_size(metrics: Mapping[str, float], size: int) -> str:
    """What a device running the parent version downloads, and its share of the whole."""
    if "update_bytes" not in metrics:
        return "-"
    update = metrics["update_bytes"]
    return f"{human_bytes(int(update))} ({update / max(size, 1):.1%})"


# models ---------------------------------------------------------------------------------


@click.group()
def models() -> None:
    """Push model versions to the registry and inspect them.

    \b
      edgefleet models push defect-classifier model.onnx -d "first cut"
      edgefleet models list
      edgefleet models versions defect-classifier
    """


@models.command("push")
@click.argument("name")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-d", "--description", default="", help="What changed in this version.")
@click.option("--target", default="", help="Compile profile of the file [default: onnx-cpu-fp32].")
@click.option(
    "--meta", "meta", multiple=True, metavar="KEY=VALUE", help="Metadata to record (repeatable)."
)
@click.option("--parent", type=int, default=0, help="Version this one derives from (lineage).")
@click.option(
    "--skip-verify",
    is_flag=True,
    help="Do not load the model in the cloud (for models only the device runtime can load); "
    "golden samples are then not made.",
)
@cloud_options
def push(
    name: str,
    model_file: Path,
    description: str,
    target: str,
    meta: tuple[str, ...],
    parent: int,
    skip_verify: bool,
    cloud: str,
    token: str | None,
) -> None:
    """Upload MODEL_FILE (ONNX) as the next version of NAME.

    The cloud checks that the model loads in ONNX Runtime, records its input and output
    signature, makes golden samples for the on-device smoke test by running it, cuts it into
    content-addressed chunks and signs the manifest.
    """
    metadata = parse_pairs(meta, "--meta")
    with (
        admin(cloud, token) as client,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=True,
        ) as bar,
    ):
        task = bar.add_task(f"uploading {model_file.name}", total=model_file.stat().st_size)
        version = client.push_model(
            name,
            model_file,
            description=description,
            target=target,
            metadata=metadata,
            skip_verify=skip_verify,
            parent_version=parent,
            progress=lambda sent, _total: bar.update(task, completed=sent),
        )
    art = version.artifacts[0] if version.artifacts else None
    console.print(
        f"[green]pushed[/] {version.model} [bold]v{version.version}[/]"
        f" ({human_bytes(art.size_bytes) if art else '?'}, {art.chunk_count if art else 0} chunks,"
        f" {version.golden_sample_count} golden samples)"
    )
    console.print(f"  inputs:  {', '.join(str(s) for s in version.inputs)}")
    console.print(f"  outputs: {', '.join(str(s) for s in version.outputs)}")
    if art:
        console.print(f"  artifact {art.target}: manifest sha256:{art.manifest_digest[:16]}")
    console.print(
        f"next: edgefleet deploy {version.model} --version {version.version} --selector KEY=VALUE"
    )


@models.command("list")
@json_option
@cloud_options
def list_models(as_json: bool, cloud: str, token: str | None) -> None:
    """List models with their latest version."""
    with admin(cloud, token) as client:
        rows = client.models()
    if as_json:
        print_json(rows)
        return
    table = Table("model", "latest", "versions", "created", "description")
    for m in rows:
        table.add_row(
            m.name, f"v{m.latest_version}", str(m.version_count), ago(m.created_at), m.description
        )
    console.print(table)
    console.print(f"{len(rows)} model(s)")


@models.command("versions")
@click.argument("name")
@json_option
@cloud_options
def versions(name: str, as_json: bool, cloud: str, token: str | None) -> None:
    """List the versions of NAME with lineage, signature and artifacts."""
    with admin(cloud, token) as client:
        rows = client.versions(name)
    if as_json:
        print_json(rows)
        return
    table = Table("version", "parent", "created", "inputs", "outputs", "artifacts", "description")
    for v in rows:
        arts = ", ".join(f"{a.target} ({human_bytes(a.size_bytes)})" for a in v.artifacts)
        table.add_row(
            f"v{v.version}",
            f"v{v.parent_version}" if v.parent_version else "-",
            ago(v.created_at),
            ", ".join(str(s) for s in v.inputs),
            ", ".join(str(s) for s in v.outputs),
            arts,
            v.description,
        )
    console.print(table)
    console.print(f"{len(rows)} version(s) of {name}")


@models.command("show")
@click.argument("name")
@click.argument("version", type=int)
@json_option
@cloud_options
def show(name: str, version: int, as_json: bool, cloud: str, token: str | None) -> None:
    """One version in full: lineage, held-out metrics with the confusion matrix, and each
    artifact with what its compile measured."""
    with admin(cloud, token) as client:
        v = client.version(name, version)
    if as_json:
        print_json(v)
        return
    console.print(f"[bold]{v.model} v{v.version}[/]: {escape(v.description)}")
    console.print(
        f"  created {ago(v.created_at)} by {v.created_by or '?'}"
        + (f", parent v{v.parent_version}" if v.parent_version else "")
    )
    console.print(f"  inputs:  {', '.join(str(s) for s in v.inputs)}")
    console.print(f"  outputs: {', '.join(str(s) for s in v.outputs)}")
    lin = v.lineage
    if lin:
        console.print(
            f"  base {lin.base_model} (sha256 {lin.base_digest[:12]}), {lin.strategy} fine-tune "
            f"on {lin.dataset} (sha256 {lin.dataset_digest[:12]}), seed {lin.seed}"
        )
        console.print(
            f"  trained on {lin.device} in {lin.training_seconds:.1f}s: {lin.epochs_run} epoch(s), "
            f"best at {lin.best_epoch}; {lin.train_examples} training / "
            f"{lin.validation_examples} validation examples; job {lin.job_id}"
        )
        settings = ", ".join(f"{k}={val}" for k, val in sorted(lin.hyperparameters.items()))
        console.print(f"  settings: {settings}")
    ev = v.evaluation
    if ev:
        console.print(
            f"  validation accuracy [bold]{ev.accuracy:.2%}[/] on {ev.count} ({ev.split})"
        )
        per_class = Table("class", "precision", "recall", "support")
        for c in ev.per_class:
            per_class.add_row(c.name, f"{c.precision:.1%}", f"{c.recall:.1%}", str(c.support))
        console.print(per_class)
        names = [c.name for c in ev.per_class]
        matrix = Table("true \\ predicted", *names, title="confusion matrix")
        for name_, row in zip(names, ev.confusion, strict=True):
            matrix.add_row(
                name_,
                *(
                    f"[bold]{n}[/]" if i == names.index(name_) else str(n)
                    for i, n in enumerate(row)
                ),
            )
        console.print(matrix)
    arts = Table(
        "target",
        "format",
        "size",
        "files",
        f"update from v{v.parent_version}" if v.parent_version else "update",
        "p50 batch 1",
        "accuracy change",
        "steps",
    )
    for a in v.artifacts:
        m = a.metrics
        arts.add_row(
            a.target,
            a.format,
            human_bytes(a.size_bytes),
            str(a.file_count),
            update_size(a.metrics, a.size_bytes),
            f"{m['latency_p50_ms']:.3f} ms" if "latency_p50_ms" in m else "-",
            points(m["accuracy_drop"]) if "accuracy_drop" in m else "-",
            ", ".join(a.steps),
        )
    console.print(arts)
    console.print(
        f"{len(v.artifacts)} artifact(s); deploy with `edgefleet deploy {name} --version {version}`"
    )


# deploy ---------------------------------------------------------------------------------


@click.command()
@click.argument("name")
@click.option("--version", "version", type=int, required=True, help="Version to run.")
@click.option(
    "--selector",
    "-l",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only devices with this label (repeatable; all must match). None: every device.",
)
@click.option("--target", default="", help="Artifact target [default: the device's best].")
@click.option("--wait/--no-wait", default=False, help="Wait until every selected device runs it.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait with --wait.")
@cloud_options
def deploy(
    name: str,
    version: int,
    selector: tuple[str, ...],
    target: str,
    wait: bool,
    timeout: float,
    cloud: str,
    token: str | None,
) -> None:
    """Set version VERSION of model NAME as the desired state of every matching device.

    Each device's desired-state generation moves on by one; agents converge on their own
    (download what they lack, verify, smoke-test, switch) and report back. Watch with
    `edgefleet devices` or pass --wait.
    """
    labels = parse_pairs(selector, "--selector")
    with admin(cloud, token) as client:
        generations = client.deploy(name, version, selector=labels, target=target)
        where = ", ".join(f"{k}={v}" for k, v in labels.items()) or "every device"
        console.print(
            f"[green]deployed[/] {name} v{version} to {len(generations)} device(s) ({where})"
        )
        for device_id, gen in sorted(generations.items()):
            console.print(f"  {device_id}: desired generation {gen}")
        if wait:
            with console.status(f"waiting for {len(generations)} device(s)...") as status:

                def show(devs: list[Device]) -> None:
                    done = sum(1 for d in devs if d.running(name) == version)
                    status.update(f"{done}/{len(generations)} device(s) run {name} v{version}")

                client.wait_converged(
                    name, version, list(generations), timeout=timeout, on_change=show
                )
            console.print(f"all {len(generations)} device(s) run {name} v{version}")


# devices --------------------------------------------------------------------------------


@click.command()
@click.option(
    "--selector", "-l", multiple=True, metavar="KEY=VALUE", help="Only devices with this label."
)
@json_option
@cloud_options
def devices(selector: tuple[str, ...], as_json: bool, cloud: str, token: str | None) -> None:
    """List devices: labels, online state, inference address, running versions, desired vs
    reported generation, and the last error."""
    with admin(cloud, token) as client:
        rows = client.devices(parse_pairs(selector, "--selector"))
    if as_json:
        print_json(rows)
        return
    console.print(render_devices(rows))
    online = sum(1 for d in rows if d.online)
    converged = sum(1 for d in rows if d.converged)
    failing = sum(1 for d in rows if d.errors)
    console.print(
        f"{len(rows)} device(s): {online} online, {converged} converged, {failing} with errors"
    )


def render_devices(rows: list[Device]) -> Table:
    table = Table(
        "device", "labels", "online", "inference at", "running", "generation", "last error"
    )
    for d in rows:
        running = (
            ", ".join(
                f"{m.model} v{m.active_version}"
                + (
                    f" ({m.phase} v{m.desired_version})"
                    if m.phase not in (ModelPhase.READY, ModelPhase.UNSPECIFIED)
                    else ""
                )
                for m in d.models
            )
            or "-"
        )
        gen = f"{d.reported_generation}/{d.desired.generation}"
        if d.reported_generation < d.desired.generation:
            gen = f"[yellow]{gen}[/]"
        table.add_row(
            d.device_id,
            ",".join(f"{k}={v}" for k, v in sorted(d.labels.items())),
            "[green]yes[/]" if d.online else f"[red]no[/] ({ago(d.last_seen_at)})",
            d.inference_endpoint or "-",
            running,
            gen,
            "[red]" + escape("; ".join(d.errors)) + "[/]" if d.errors else "",
        )
    return table


@click.command()
@json_option
@cloud_options
def deployments(as_json: bool, cloud: str, token: str | None) -> None:
    """Standing deployments: which version each selector's devices run, those that enroll
    later included. A newer deployment of a model replaces one with the same selector."""
    with admin(cloud, token) as client:
        rows = client.deployments()
    if as_json:
        print_json(rows)
        return
    table = Table("model", "version", "selector", "target", "since")
    for d in rows:
        selector = ",".join(f"{k}={v}" for k, v in sorted(d.selector.items()))
        table.add_row(
            d.model,
            f"v{d.version}",
            selector or "(every device)",
            d.target or "best",
            ago(d.created_at),
        )
    console.print(table)
    console.print(f"{len(rows)} standing deployment(s)")


@click.command("enroll-token")
@click.option("--ttl", type=int, default=0, help="Seconds the token is valid (0: no expiry).")
@click.option("--note", default="", help="What the token is for.")
@cloud_options
def enroll_token(ttl: int, note: str, cloud: str, token: str | None) -> None:
    """Create a token that agents enroll with (`edgefleet agent run --enroll-token ...`)."""
    with admin(cloud, token) as client:
        value, expires = client.create_enroll_token(ttl, note)
    click.echo(value)
    console.print(
        f"expires: {time.ctime(expires) if expires else 'never'}", style="dim", highlight=False
    )
