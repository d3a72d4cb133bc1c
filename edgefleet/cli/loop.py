"""`edgefleet loop`: the closed loop per model (enable, disable, run, status, list)."""

from __future__ import annotations

import time

import click
from rich.markup import escape
from rich.table import Table

from edgefleet.cli.admin import (
    Connection,
    admin,
    cloud_options,
    console,
    json_option,
    parse_duration,
    parse_pairs,
    print_json,
)
from edgefleet.core.loop import (
    DEFAULT_COOLDOWN_S,
    DEFAULT_GATES,
    DEFAULT_HOLDOUT,
    DEFAULT_MIN_NEW_ROWS,
    Loop,
    LoopConfig,
    LoopRun,
)
from edgefleet.core.rollouts import parse_waves


def _share(text: str, option: str) -> float:
    try:
        value = float(text.strip().removesuffix("%")) / (100 if text.strip().endswith("%") else 1)
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: write a share like 20% or 0.2", param_hint=option
        ) from None
    return value


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


@click.group()
def loop() -> None:
    """The closed loop: drift starts a fine-tune of the running version on labelled captures
    plus its original data, warm-started from its weights; the candidate is rolled out as a
    canary only if it beats the running version on held-out captures it never trained on.

    \b
      edgefleet loop enable defect-classifier --on-drift \\
          --data captures:defect-classifier --min-new-rows 200 --holdout 20%
      edgefleet loop run defect-classifier        (a run now, without waiting for drift)
      edgefleet loop status defect-classifier
      edgefleet loop disable defect-classifier --reason "labelling backlog"
    """


@loop.command("enable")
@click.argument("model")
@click.option(
    "--data",
    required=True,
    help="captures:MODEL[@V][?since=...&label=...]: its labelled rows train and are held out.",
)
@click.option(
    "--on-drift/--manual",
    default=True,
    show_default=True,
    help="A drift alert starts a run (--manual: only `edgefleet loop run`).",
)
@click.option(
    "--min-new-rows",
    type=click.IntRange(1),
    default=DEFAULT_MIN_NEW_ROWS,
    show_default=True,
    help="Labelled rows new since the last run needed to train again.",
)
@click.option(
    "--holdout",
    default=f"{DEFAULT_HOLDOUT:.0%}",
    show_default=True,
    help="Share of labelled rows held out (by capture id) to compare the versions on.",
)
@click.option(
    "--margin",
    default="0",
    show_default=True,
    help="Held-out accuracy the candidate must beat the running version by (2%: two "
    "points; 0: strictly better, a tie keeps the running version).",
)
@click.option(
    "--cooldown",
    default=f"{int(DEFAULT_COOLDOWN_S)}s",
    show_default=True,
    help="No drift-started run within this of the last run (90s, 15m, 6h, 0).",
)
@click.option("--waves", default="", help="Rollout waves, e.g. 5%,50%,100% (default: see below).")
@click.option(
    "--gate",
    "gates",
    multiple=True,
    metavar="GATE",
    help="Rollout gate (repeat it); default: the model's last rollout's, else "
    + " and ".join(DEFAULT_GATES)
    + ".",
)
@click.option("--bake", default="", help="How long each wave serves before its gates (10m).")
@click.option(
    "--selector", "-l", multiple=True, metavar="KEY=VALUE", help="Devices the rollout moves."
)
@json_option
@cloud_options
def enable(
    model: str,
    data: str,
    on_drift: bool,
    min_new_rows: int,
    holdout: str,
    margin: str,
    cooldown: str,
    waves: str,
    gates: tuple[str, ...],
    bake: str,
    selector: tuple[str, ...],
    as_json: bool,
    cloud: Connection,
) -> None:
    """Turn on (or change) MODEL's loop. Rollout settings left out are the model's last
    rollout's, else waves 10%,50%,100%, a 10-minute bake, and the devices running it."""
    try:
        shares = parse_waves(waves) if waves else ()
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--waves") from None
    config = LoopConfig(
        model,
        data,
        on_drift=on_drift,
        min_new_rows=min_new_rows,
        holdout=_share(holdout, "--holdout"),
        margin=_share(margin, "--margin"),
        cooldown_s=parse_duration(cooldown),
        waves=shares,
        gates=gates,
        bake_s=parse_duration(bake) if bake else 0.0,
        selector=parse_pairs(selector, "--selector"),
    )
    with admin(cloud) as client:
        found = client.enable_loop(config)
    if as_json:
        print_json(found)
        return
    _show(found)


@loop.command("disable")
@click.argument("model")
@click.option("--reason", default="", help="Recorded with the stopped run.")
@json_option
@cloud_options
def disable(model: str, reason: str, as_json: bool, cloud: Connection) -> None:
    """Turn MODEL's loop off: a run under way stops, its fine-tune is cancelled and no
    rollout starts. A rollout the loop already started is an ordinary one (`edgefleet
    rollout pause/abort`)."""
    with admin(cloud) as client:
        found = client.disable_loop(model, reason)
    if as_json:
        print_json(found)
        return
    _show(found)


@loop.command("run")
@click.argument("model")
@json_option
@cloud_options
def run(model: str, as_json: bool, cloud: Connection) -> None:
    """Start a run of MODEL's loop now, without waiting for drift (or the cooldown)."""
    with admin(cloud) as client:
        found = client.run_loop(model)
    if as_json:
        print_json(found)
        return
    _show(found)


@loop.command("status")
@click.argument("model")
@click.option("--runs", type=click.IntRange(1, 1000), default=10, show_default=True)
@json_option
@cloud_options
def status(model: str, runs: int, as_json: bool, cloud: Connection) -> None:
    """MODEL's loop: its settings and its runs, newest first."""
    with admin(cloud) as client:
        found = client.loop(model, runs)
    if as_json:
        print_json(found)
        return
    _show(found)


@loop.command("list")
@json_option
@cloud_options
def list_loops(as_json: bool, cloud: Connection) -> None:
    """Every model's loop with its latest run."""
    with admin(cloud) as client:
        loops = client.loops()
    if as_json:
        print_json(loops)
        return
    table = Table("model", "loop", "data", "latest run", "state", "decision")
    for item in loops:
        last = item.runs[0] if item.runs else None
        table.add_row(
            item.config.model,
            ("on" + (", on drift" if item.config.on_drift else ", manual"))
            if item.config.enabled
            else "off",
            escape(item.config.data),
            f"{last.number} ({_when(last.started_at)})" if last else "-",
            last.state.value if last else "-",
            last.decision if last else "",
        )
    console.print(table)


def _show(found: Loop) -> None:
    c = found.config
    state = "on" if c.enabled else "off"
    console.print(
        f"[bold]{c.model}[/] loop {state}: {escape(c.data)}, "
        f"{'drift starts runs' if c.on_drift else 'runs only by `loop run`'}, "
        f"{c.min_new_rows} new labelled rows, holdout {c.holdout:.0%}, margin {c.margin:.1%}, "
        f"cooldown {c.cooldown_s:g}s"
    )
    if found.note:
        console.print(f"  note: {escape(found.note)}")
    for r in found.runs:
        _show_run(r)


def _show_run(r: LoopRun) -> None:
    console.print(
        f"run {r.number} [{r.state.value}] {_when(r.started_at)}: {escape(r.trigger.describe())}"
    )
    console.print(
        f"  v{r.parent_version}: {r.labelled_rows} of {r.captured_rows} rows labelled, "
        f"{r.new_rows} new; {r.train_rows} train, {r.holdout_rows} held out"
        + (f"; job {r.job_id}" if r.job_id else "")
        + (f" -> v{r.candidate_version}" if r.candidate_version else "")
        + (f"; rollout {r.rollout_id}" if r.rollout_id else "")
    )
    for label, score in (("running", r.running), ("candidate", r.candidate)):
        if score is not None:
            console.print(f"  {label}: {score.describe()}")
    if r.reason:
        console.print(f"  {escape(r.reason)}")
