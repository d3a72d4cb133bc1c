"""Operator commands (models, deploy, devices, enroll-token): thin click layers over
`edgefleet.client.AdminClient`, each ending with a clear summary."""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from edgefleet.client.admin import AdminClient
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.fleet import Device, ModelPhase
from edgefleet.core.versions import Evaluation
from edgefleet.core.wire import to_jsonable

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
# What is not the command's result (the secret a script captures) goes to stderr.
err_console = Console(stderr=True)


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of tables."
    )(fn)


def print_json(value: object) -> None:
    """Domain objects (or lists of them) as JSON on stdout: no colour, no wrapping."""
    click.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=True))


@dataclass(frozen=True)
class Connection:
    """Where the cloud is and how to reach it, from the common options or the environment."""

    address: str
    token_file: Path | None
    ca_file: Path | None
    insecure: bool

    def client(self) -> AdminClient:
        return AdminClient(
            self.address,
            token_file=self.token_file,
            ca_file=self.ca_file,
            insecure=self.insecure or None,
        )


def cloud_options(fn: F) -> F:
    """--cloud, --token-file, --ca-file and --insecure, given to the command as `cloud`."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        cloud: str,
        token_file: Path | None,
        ca_file: Path | None,
        insecure: bool,
        **kwargs: Any,
    ) -> Any:
        return fn(*args, cloud=Connection(cloud, token_file, ca_file, insecure), **kwargs)

    for option in (
        click.option(
            "--insecure",
            is_flag=True,
            help="Plain text: for a cloud started with --insecure on a trusted network only "
            "[env EDGEFLEET_INSECURE=1].",
        ),
        click.option(
            "--ca-file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="CA bundle that verifies the cloud's certificate (its DATA_DIR/trust/ca.pem) "
            "[env EDGEFLEET_CA_FILE].",
        ),
        click.option(
            "--token-file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="File holding an admin token (`edgefleet cloud serve` prints where the first "
            "one is kept) [env EDGEFLEET_ADMIN_TOKEN_FILE, or EDGEFLEET_ADMIN_TOKEN].",
        ),
        click.option(
            "--cloud",
            envvar="EDGEFLEET_CLOUD",
            default="127.0.0.1:50051",
            show_default=True,
            help="Cloud service address HOST:PORT [env EDGEFLEET_CLOUD].",
        ),
    ):
        wrapper = option(wrapper)
    return cast(F, wrapper)


@contextmanager
def admin(cloud: Connection) -> Iterator[AdminClient]:
    """An AdminClient whose errors end the command with their message and a non-zero exit."""
    try:
        with cloud.client() as client:
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


def scored(ev: Evaluation, loss: bool = True) -> str:
    """An accuracy as a user can weigh it: its 95% interval, n, what one example is worth
    (with 88 examples, 1.1 points), and the loss where measured."""
    low, high = ev.interval()
    text = (
        f"{ev.accuracy:.2%} (95% CI {low:.1%}-{high:.1%}, n={ev.count}; one example = "
        f"{ev.example_points:.2g} pts)"
    )
    return text + (f", loss {ev.loss:.4f}" if loss and ev.loss else "")


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
    cloud: Connection,
) -> None:
    """Upload MODEL_FILE (ONNX) as the next version of NAME.

    The cloud checks that the model loads in ONNX Runtime, records its input and output
    signature, makes golden samples for the on-device smoke test by running it, cuts it into
    content-addressed chunks and signs the manifest.
    """
    metadata = parse_pairs(meta, "--meta")
    with (
        admin(cloud) as client,
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
def list_models(as_json: bool, cloud: Connection) -> None:
    """List models with their latest version."""
    with admin(cloud) as client:
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
def versions(name: str, as_json: bool, cloud: Connection) -> None:
    """List the versions of NAME with lineage, signature and artifacts."""
    with admin(cloud) as client:
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


@models.command("download")
@click.argument("name")
@click.option("--version", "version", type=int, required=True, help="Version to download.")
@click.option("--target", default="", help="Compile profile [default: onnx-cpu-fp32].")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace FOLDER even when it is not empty.")
@click.option(
    "--root-key",
    default=None,
    metavar="sha256:HEX",
    help="Fingerprint of the cloud's root key (its DATA_DIR/trust/root-key.txt) to check the "
    "manifest's signature against; without it the key is taken from the cloud's answer.",
)
@json_option
@cloud_options
def download(
    name: str,
    version: int,
    target: str,
    folder: Path,
    force: bool,
    root_key: str | None,
    as_json: bool,
    cloud: Connection,
) -> None:
    """Write NAME's verified artifact into FOLDER, to serve it elsewhere: its files as a
    device assembles them (model.onnx, per-tensor files, golden samples...) and manifest.pb,
    the signed manifest. Every file is checked against the manifest's sha256 and the
    signature against the root key; nothing is written unless all of it checks out."""
    with (
        admin(cloud) as client,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err_console,
            transient=True,
        ) as bar,
    ):
        task = bar.add_task(f"downloading {name} v{version}", total=None)
        result = client.download(
            name,
            version,
            folder,
            target=target,
            root_key=root_key,
            force=force,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    if as_json:
        print_json(result)
        return
    checked = (
        f"signature checked against pinned root key {result.key_fingerprint[:23]}…"
        if result.signature_pinned
        else f"signature checked against the cloud's key {result.key_fingerprint[:23]}… "
        "(not pinned: pass --root-key to pin it)"
    )
    console.print(
        f"[green]downloaded[/] {result.model} v{result.version} ({result.target}): "
        f"{result.files} files, {human_bytes(result.bytes)} into {escape(result.folder)}, "
        f"manifest sha256:{result.digest[:16]}; every file matches its sha256, {checked}"
    )


@models.command("show")
@click.argument("name")
@click.argument("version", type=int)
@json_option
@cloud_options
def show(name: str, version: int, as_json: bool, cloud: Connection) -> None:
    """One version in full: lineage, held-out metrics with the confusion matrix, and each
    artifact with what its compile measured."""
    with admin(cloud) as client:
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
    if lin and (lin.test_examples or lin.final):
        console.print(
            "  "
            + (f"{lin.test_examples} test examples kept apart" if lin.test_examples else "")
            + ("; " if lin.test_examples and lin.final else "")
            + (
                f"final run: trained on training + validation data for {lin.epochs_run} "
                "epoch(s), the validation run's best"
                if lin.final
                else ""
            )
        )
    ev = v.evaluation
    if ev:
        console.print(f"  validation (chose the epoch and settings): {scored(ev)} [{ev.split}]")
    if v.test:
        console.print(
            f"  [bold]test[/] (never trained on nor chosen with): {scored(v.test)} [{v.test.split}]"
        )
    elif ev:
        console.print(
            "  [yellow]no test set was kept[/]: the validation figure chose this version, so it "
            "is optimistic; fine-tune with --test DATA or --test-split 0.2, or score it with "
            f"`edgefleet evaluate {name} --version {version} --data DATA`"
        )
    for later in v.evaluations:
        console.print(
            f"  evaluated {ago(later.created_at)} on {later.data} ({later.target}, "
            f"{later.sample}): {scored(later)}"
        )
    shown = v.test or ev
    if shown:
        what = "test" if v.test else "validation"
        per_class = Table("class", "precision", "recall", "support", title=f"{what} per class")
        for c in shown.per_class:
            per_class.add_row(c.name, f"{c.precision:.1%}", f"{c.recall:.1%}", str(c.support))
        console.print(per_class)
        names = [c.name for c in shown.per_class]
        matrix = Table("true \\ predicted", *names, title=f"{what} confusion matrix")
        for name_, row in zip(names, shown.confusion, strict=True):
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


def move(
    cloud: Connection,
    name: str,
    version: int,
    selector: tuple[str, ...],
    target: str,
    wait: bool,
    timeout: float,
    *,
    rollback: bool,
) -> None:
    """What `deploy` and `rollback` do: set the version, say where, and follow if asked."""
    labels = parse_pairs(selector, "--selector")
    with admin(cloud) as client:
        call = client.rollback if rollback else client.deploy
        generations = call(name, version, selector=labels, target=target)
        where = ", ".join(f"{k}={v}" for k, v in labels.items()) or "every device"
        verb = "rolled back" if rollback else "deployed"
        console.print(
            f"[green]{verb}[/] {name} v{version} to {len(generations)} device(s) ({where})"
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


def version_options(selector_help: str) -> Callable[[F], F]:
    """The options `deploy` and `rollback` share."""

    def decorate(fn: F) -> F:
        for option in (
            cloud_options,
            click.option(
                "--timeout", default=300.0, show_default=True, help="Seconds to wait with --wait."
            ),
            click.option(
                "--wait/--no-wait", default=False, help="Wait until every selected device runs it."
            ),
            click.option(
                "--target", default="", help="Artifact target [default: the device's best]."
            ),
            click.option(
                "--selector", "-l", multiple=True, metavar="KEY=VALUE", help=selector_help
            ),
        ):
            fn = option(fn)
        return fn

    return decorate


@click.command()
@click.argument("name")
@click.option("--version", "version", type=int, required=True, help="Version to run.")
@version_options("Only devices with this label (repeatable; all must match). None: every device.")
def deploy(
    name: str,
    version: int,
    selector: tuple[str, ...],
    target: str,
    wait: bool,
    timeout: float,
    cloud: Connection,
) -> None:
    """Set version VERSION of model NAME as the desired state of every matching device.

    Each device's desired-state generation moves on by one; agents converge on their own
    (download what they lack, verify, smoke-test, switch) and report back. Watch with
    `edgefleet devices` or pass --wait.
    """
    move(cloud, name, version, selector, target, wait, timeout, rollback=False)


# devices --------------------------------------------------------------------------------


class DefaultList(click.Group):
    """A group whose `list` runs when no sub-command is named: `edgefleet devices --json`
    lists, as it did before the group had other commands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultList)
def devices() -> None:
    """Devices: list them, show one, set the labels deployments select by, revoke one.

    \b
      edgefleet devices                       every device (same as `devices list`)
      edgefleet devices show dev-1
      edgefleet devices label dev-1 site=plant-2 --remove line
      edgefleet devices revoke dev-1          refuse its every later call
    """


@devices.command("list")
@click.option(
    "--selector", "-l", multiple=True, metavar="KEY=VALUE", help="Only devices with this label."
)
@json_option
@cloud_options
def list_devices(selector: tuple[str, ...], as_json: bool, cloud: Connection) -> None:
    """List devices: labels, online state, inference address, running versions, desired vs
    reported generation, and the last error."""
    with admin(cloud) as client:
        rows = client.devices(parse_pairs(selector, "--selector"))
    if as_json:
        print_json(rows)
        return
    console.print(render_devices(rows))
    online = sum(1 for d in rows if d.online)
    converged = sum(1 for d in rows if d.converged)
    failing = sum(1 for d in rows if d.errors)
    revoked = sum(1 for d in rows if d.revoked)
    console.print(
        f"{len(rows)} device(s): {online} online, {converged} converged, {failing} with errors"
        + (f", {revoked} revoked" if revoked else "")
    )


@devices.command("show")
@click.argument("device_id")
@json_option
@cloud_options
def show_device(device_id: str, as_json: bool, cloud: Connection) -> None:
    """One device in full: labels, capabilities, desired and reported state."""
    with admin(cloud) as client:
        device = client.device(device_id)
    if as_json:
        print_json(device)
        return
    console.print(render_devices([device]))
    caps = device.capabilities
    console.print(
        f"enrolled {ago(device.enrolled_at)}; runtime {caps.onnxruntime_version or '?'} with "
        f"{', '.join(caps.execution_providers) or 'no providers reported'}"
        + ("; [red]REVOKED[/]" if device.revoked else "")
    )


@devices.command("label")
@click.argument("device_id")
@click.argument("labels", nargs=-1, metavar="KEY=VALUE...")
@click.option("--remove", multiple=True, metavar="KEY", help="A label to remove (repeatable).")
@json_option
@cloud_options
def label_device(
    device_id: str,
    labels: tuple[str, ...],
    remove: tuple[str, ...],
    as_json: bool,
    cloud: Connection,
) -> None:
    """Set a device's labels: the ones deployments select by. Labels belong to the operator
    (from the enroll token or this command); what a device reports is advisory. Standing
    deployments that now match it apply at once."""
    if not labels and not remove:
        raise click.UsageError("give KEY=VALUE labels to set, or --remove KEY")
    with admin(cloud) as client:
        device = client.label_device(device_id, parse_pairs(labels, "labels"), list(remove))
    if as_json:
        print_json(device)
        return
    shown = ",".join(f"{k}={v}" for k, v in sorted(device.labels.items())) or "(none)"
    console.print(
        f"device {device_id} labels: {shown}; desired generation {device.desired.generation}"
    )


@devices.command("revoke")
@click.argument("device_id")
@json_option
@cloud_options
def revoke_device(device_id: str, as_json: bool, cloud: Connection) -> None:
    """Refuse every later call of a device (a stolen or retired one). It keeps serving what
    it has, offline. To take it back, make a re-enroll token for it (`edgefleet tokens
    create --reenroll ID`) and run `edgefleet agent reenroll` on it."""
    with admin(cloud) as client:
        device = client.revoke_device(device_id)
    if as_json:
        print_json(device)
        return
    console.print(f"device {device_id} revoked: the cloud refuses its every call from now on")


def render_devices(rows: list[Device], reasons: bool = True) -> Table:
    """The devices table; `reasons=False` names each model's target without the why (for
    narrow output that says it once, as the demo does)."""
    table = Table(
        "device",
        "labels",
        "online",
        "inference at",
        "running",
        "target (why)" if reasons else "target",
        "generation",
        "last error",
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
            (target_reasons(d) if reasons else targets(d)) or "-",
            gen,
            "[red]" + escape("; ".join(d.errors)) + "[/]" if d.errors else "",
        )
    return table


def targets(device: Device) -> str:
    return "\n".join(f"{a.model}: {a.target}" for a in device.desired.assignments)


def target_reasons(device: Device) -> str:
    """Per model the device is told to run: which target, and why the cloud chose it."""
    return "\n".join(
        f"{a.model}: {a.target}" + (f" ({escape(a.target_reason)})" if a.target_reason else "")
        for a in device.desired.assignments
    )


@click.command()
@json_option
@cloud_options
def deployments(as_json: bool, cloud: Connection) -> None:
    """Standing deployments: which version each selector's devices run, those that enroll
    later included. A newer deployment of a model replaces one with the same selector."""
    with admin(cloud) as client:
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


# tokens and keys -------------------------------------------------------------------------

DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> int:
    """'90', '90s', '15m', '12h', '7d', '2w' as seconds; '0' or 'never' as 0."""
    if text.strip().lower() in ("never", "0"):
        return 0
    match = DURATION.match(text.strip().lower())
    if not match:
        raise click.BadParameter(f"{text!r}: write a duration like 90s, 15m, 12h, 7d or never")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "never"


@click.group()
def tokens() -> None:
    """Enrollment tokens: what a device needs, once, to join the fleet.

    \b
      edgefleet tokens create --label site=plant-1 --max-uses 20 --ttl 7d > token
      edgefleet tokens list
      edgefleet tokens revoke 3f9a1c2b7d4e
      edgefleet tokens create --reenroll dev-1 > reenroll-token   (after a revocation)
    """


@tokens.command("create")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="A label every device enrolling with it gets (repeatable): what deployments select by.",
)
@click.option("--max-uses", type=int, default=0, help="Enrollments it allows (0: any number).")
@click.option("--ttl", default="1d", show_default=True, help="Valid for: 90s, 15m, 12h, 7d, never.")
@click.option("--note", default="", help="What the token is for.")
@click.option(
    "--reenroll",
    metavar="DEVICE_ID",
    default="",
    help="A re-enroll token: only that enrolled device may use it, once, for a new credential.",
)
@json_option
@cloud_options
def create_token(
    labels: tuple[str, ...],
    max_uses: int,
    ttl: str,
    note: str,
    reenroll: str,
    as_json: bool,
    cloud: Connection,
) -> None:
    """Create an enrollment token; the secret goes to stdout (alone, for `> file`), once."""
    if max_uses < 0:
        raise click.BadParameter("--max-uses must be 0 or more")
    with admin(cloud) as client:
        secret, record = client.create_enroll_token(
            ttl_seconds=parse_duration(ttl),
            note=note,
            max_uses=max_uses,
            labels=parse_pairs(labels, "--label"),
            reenroll=reenroll,
        )
    if as_json:
        click.echo(json.dumps({"secret": secret, "token": to_jsonable(record)}, indent=2))
        return
    click.echo(secret)
    what = f"re-enroll token for {record.device_id}" if record.device_id else "enroll token"
    grants = ",".join(f"{k}={v}" for k, v in sorted(record.labels.items())) or "no labels"
    uses = f"{record.max_uses} use(s)" if record.max_uses else "any number of uses"
    err_console.print(
        f"{what} {record.token_id}: {grants}, {uses}, expires {when(record.expires_at)}; "
        "the secret is shown only now: keep it in a file readable by its device only",
        style="dim",
        highlight=False,
    )


@tokens.command("list")
@json_option
@cloud_options
def list_tokens(as_json: bool, cloud: Connection) -> None:
    """Enrollment tokens (never their secrets): use counts, expiry, labels, revoked."""
    with admin(cloud) as client:
        rows = client.enroll_tokens()
    if as_json:
        print_json(rows)
        return
    table = Table("token", "labels", "uses", "expires", "note", "state")
    now = time.time()
    for t in rows:
        refusal = t.refusal(now)
        table.add_row(
            t.token_id,
            ",".join(f"{k}={v}" for k, v in sorted(t.labels.items()))
            or (f"re-enroll {t.device_id}" if t.device_id else "-"),
            f"{t.uses}/{t.max_uses}" if t.max_uses else str(t.uses),
            when(t.expires_at),
            escape(t.note),
            f"[red]{escape(refusal)}[/]" if refusal else "[green]usable[/]",
        )
    console.print(table)
    usable = sum(1 for t in rows if not t.refusal(now))
    console.print(f"{len(rows)} token(s), {usable} usable")


@tokens.command("revoke")
@click.argument("token_id")
@cloud_options
def revoke_token(token_id: str, cloud: Connection) -> None:
    """Revoke an enrollment token: no device enrolls with it again (enrolled ones stay)."""
    with admin(cloud) as client:
        record = client.revoke_enroll_token(token_id)
    console.print(f"enroll token {record.token_id} revoked after {record.uses} use(s)")


@click.group("admin-tokens")
def admin_tokens() -> None:
    """Admin tokens with roles: viewer (read), operator (push, deploy, jobs, labels), admin
    (tokens, revocations, keys). Stored hashed; the secret is shown once.

    \b
      edgefleet admin-tokens create ci-pipeline --role operator > ci-token
      edgefleet admin-tokens list
      edgefleet admin-tokens revoke 5d1e0a7c9b2f
    """


@admin_tokens.command("create")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["viewer", "operator", "admin"]),
    default="viewer",
    show_default=True,
    help="What the token may do.",
)
@json_option
@cloud_options
def create_admin_token(name: str, role: str, as_json: bool, cloud: Connection) -> None:
    """Create an admin token; the secret goes to stdout (alone, for `> file`), once."""
    with admin(cloud) as client:
        secret, record = client.create_admin_token(name, role)
    if as_json:
        click.echo(json.dumps({"secret": secret, "token": to_jsonable(record)}, indent=2))
        return
    click.echo(secret)
    err_console.print(
        f"admin token {record.token_id} ({record.name}, {record.role.value}); the secret is "
        "shown only now",
        style="dim",
        highlight=False,
    )


@admin_tokens.command("list")
@json_option
@cloud_options
def list_admin_tokens(as_json: bool, cloud: Connection) -> None:
    """Admin tokens (never their secrets)."""
    with admin(cloud) as client:
        rows = client.admin_tokens()
    if as_json:
        print_json(rows)
        return
    table = Table("token", "name", "role", "created", "state")
    for t in rows:
        table.add_row(
            t.token_id,
            escape(t.name),
            t.role.value,
            when(t.created_at),
            "[red]revoked[/]" if t.revoked else "[green]active[/]",
        )
    console.print(table)
    console.print(f"{len(rows)} admin token(s), {sum(1 for t in rows if not t.revoked)} active")


@admin_tokens.command("revoke")
@click.argument("token_id")
@cloud_options
def revoke_admin_token(token_id: str, cloud: Connection) -> None:
    """Revoke an admin token: every later call with it is refused."""
    with admin(cloud) as client:
        record = client.revoke_admin_token(token_id)
    console.print(f"admin token {record.token_id} ({record.name}) revoked")


@click.group()
def keys() -> None:
    """The root key that signs manifests and desired states."""


@keys.command("rotate")
@json_option
@cloud_options
def rotate_keys(as_json: bool, cloud: Connection) -> None:
    """Make a new root key, signed by the current one (TUF's root rotation): devices follow
    the signed chain without re-enrolling; new devices may be provisioned with either
    fingerprint."""
    with admin(cloud) as client:
        key = client.rotate_root_key()
    if as_json:
        click.echo(json.dumps({**to_jsonable(key), "fingerprint": key.fingerprint}, indent=2))
        return
    console.print(f"root key v{key.version}: {key.fingerprint}")
    console.print("devices move to it on their next pass; nothing to re-provision")


@click.command()
@click.argument("name")
@click.option("--to", "version", type=int, required=True, help="The older version to go back to.")
@version_options("Devices with this label (repeatable; none: every device).")
def rollback(
    name: str,
    version: int,
    selector: tuple[str, ...],
    target: str,
    wait: bool,
    timeout: float,
    cloud: Connection,
) -> None:
    """Take devices back to an older version. Devices never move below the newest version
    they ran unless the signed desired state says it is an operator's rollback: this is
    that. `edgefleet devices` then shows what the devices report.

    \b
      edgefleet rollback defect-classifier --to 3 --selector site=plant-1 --wait
    """
    move(cloud, name, version, selector, target, wait, timeout, rollback=True)
