"""`edgefleet rollout`: move a version across the fleet in waves gated on what devices
report; status, pause, resume and abort."""

from __future__ import annotations

import time

import click
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
from edgefleet.core.rollouts import (
    DeadlineAction,
    DevicePhase,
    Rollout,
    RolloutSpec,
    RolloutState,
    WaveState,
    parse_gate,
    parse_waves,
)


def _percent(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: write a share like 5%") from None
    return value / 100 if text.strip().endswith("%") or value > 1 else value


@click.group()
def rollout() -> None:
    """Move a model version across the fleet in waves, each gated on the new version's
    figures on the devices it moved; on a breach, every moved device goes back.

    \b
      edgefleet rollout start defect-classifier --version 4 --selector site=plant-1 \\
          --waves 1%,10%,50%,100% --bake 10m --max-failure 5% \\
          --gate "p95_latency_ms<+20%" --gate "error_rate<0.5%"
      edgefleet rollout status r-3 --watch
      edgefleet rollout abort r-3 --reason "customer complaint"
    """


@rollout.command("start")
@click.argument("model")
@click.option("--version", "version", type=int, required=True, help="The version to move to.")
@click.option(
    "--selector", "-l", multiple=True, metavar="KEY=VALUE", help="Devices with these labels."
)
@click.option(
    "--waves",
    default="1%,10%,50%,100%",
    show_default=True,
    help="Cumulative shares of the devices, the last 100%.",
)
@click.option(
    "--bake",
    default="10m",
    show_default=True,
    help="How long a wave serves before its gates are judged (90s, 10m, 1h).",
)
@click.option(
    "--max-failure",
    default="5%",
    show_default=True,
    help="Share of the moved devices that may fail to install before the rollout aborts.",
)
@click.option(
    "--gate",
    "gates",
    multiple=True,
    metavar="GATE",
    help="METRIC OP VALUE on the new version's figures: absolute ('error_rate<0.5%', "
    "'agreement>=0.97', 'p95_latency_ms<40') or relative to the previous version on the same "
    "devices ('p95_latency_ms<+20%'). Metrics: p50_latency_ms, p95_latency_ms, "
    "p99_latency_ms, error_rate, agreement (needs a shadow).",
)
@click.option(
    "--wave-deadline",
    default="30m",
    show_default=True,
    help="How long a wave waits for its devices to report the version.",
)
@click.option(
    "--on-deadline",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="Devices not on the version at the deadline (offline ones too): count them as "
    "failed, or skip them and go on (they converge when they come back).",
)
@click.option("--target", default="", help="An artifact target for every device (default: best).")
@click.option("--watch", is_flag=True, help="Follow the rollout until it ends.")
@json_option
@cloud_options
def start(
    model: str,
    version: int,
    selector: tuple[str, ...],
    waves: str,
    bake: str,
    max_failure: str,
    gates: tuple[str, ...],
    wave_deadline: str,
    on_deadline: str,
    target: str,
    watch: bool,
    as_json: bool,
    cloud: Connection,
) -> None:
    """Start moving MODEL to --version in waves; nothing moves if anything is wrong."""
    try:
        spec = RolloutSpec(
            model,
            version,
            parse_pairs(selector, "--selector"),
            parse_waves(waves),
            float(parse_duration(bake)),
            _percent(max_failure),
            tuple(parse_gate(g) for g in gates),
            float(parse_duration(wave_deadline)),
            DeadlineAction(on_deadline),
            target,
        )
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    with admin(cloud) as client:
        started = client.start_rollout(spec)
        if watch:
            started = _follow(client, started.rollout_id, as_json)
            if as_json:
                print_json(started)
            return
    if as_json:
        print_json(started)
        return
    console.print(
        f"rollout {started.rollout_id}: {model} v{version} to {len(started.devices)} device(s) "
        f"in {len(started.waves)} wave(s) "
        f"({', '.join(str(w.size) for w in started.waves)}); "
        f"follow it with `edgefleet rollout status {started.rollout_id} --watch`"
    )


@rollout.command("status")
@click.argument("rollout_id")
@click.option("--watch", is_flag=True, help="Refresh until the rollout ends.")
@click.option("--devices", "show_devices", is_flag=True, help="One row per device too.")
@json_option
@cloud_options
def status(
    rollout_id: str, watch: bool, show_devices: bool, as_json: bool, cloud: Connection
) -> None:
    """Waves, devices per state, gate values against their limits, time left."""
    with admin(cloud) as client:
        found = _follow(client, rollout_id, as_json) if watch else client.rollout(rollout_id)
    if as_json:
        print_json(found)
        return
    if not watch:
        show(found, show_devices)


@rollout.command("list")
@click.argument("model", required=False, default="")
@json_option
@cloud_options
def list_rollouts(model: str, as_json: bool, cloud: Connection) -> None:
    """Rollouts (of MODEL), oldest first."""
    with admin(cloud) as client:
        found = client.rollouts(model)
    if as_json:
        print_json(found)
        return
    if not found:
        console.print("no rollouts yet: `edgefleet rollout start MODEL --version N ...`")
        return
    table = Table("id", "model", "version", "state", "wave", "devices", "reason")
    for r in found:
        table.add_row(
            r.rollout_id,
            r.spec.model,
            f"v{r.spec.version}",
            r.state.value,
            f"{min(r.current_wave + 1, len(r.waves))}/{len(r.waves)}",
            str(len(r.devices)),
            r.reason[:80],
        )
    console.print(table)


def _action(name: str, help_text: str) -> click.Command:
    @click.command(name, help=help_text)
    @click.argument("rollout_id")
    @click.option("--reason", default="", help="Why (recorded with the rollout).")
    @json_option
    @cloud_options
    def command(rollout_id: str, reason: str, as_json: bool, cloud: Connection) -> None:
        with admin(cloud) as client:
            method = {
                "pause": client.pause_rollout,
                "resume": client.resume_rollout,
                "abort": client.abort_rollout,
            }[name]
            found = method(rollout_id, reason)
        if as_json:
            print_json(found)
            return
        console.print(f"rollout {found.rollout_id} is {found.state.value}: {found.reason}")

    return command


rollout.add_command(_action("pause", "Hold the rollout where it is (devices stay as they are)."))
rollout.add_command(
    _action("resume", "Go on: a waiting wave gets a fresh deadline, a baking one bakes again.")
)
rollout.add_command(
    _action("abort", "Stop and send every moved device back to the version it ran.")
)


def _follow(client: object, rollout_id: str, quiet: bool) -> Rollout:
    """Poll until the rollout ends, printing each change (not with --json)."""
    from edgefleet.client.admin import AdminClient

    assert isinstance(client, AdminClient)
    last = ""
    while True:
        found = client.rollout(rollout_id)
        line = _line(found)
        if line != last and not quiet:
            console.print(line)
            last = line
        if found.state.finished or found.state == RolloutState.PAUSED:
            if not quiet:
                show(found, False)
            return found
        time.sleep(1.0)


def _line(r: Rollout) -> str:
    wave = r.waves[min(r.current_wave, len(r.waves) - 1)]
    counts = r.counts(r.moved())
    shown = ", ".join(f"{n} {phase}" for phase, n in counts.items() if n)
    return (
        f"{r.rollout_id} {r.state.value}: wave {wave.index + 1}/{len(r.waves)} {wave.state.value}"
        + (f" ({shown})" if shown else "")
    )


def show(r: Rollout, show_devices: bool) -> None:
    now = time.time()
    spec = r.spec
    console.print(
        f"rollout {r.rollout_id}: {spec.model} v{spec.version}, {r.state.value}"
        + (f" — {r.reason}" if r.reason else "")
    )
    table = Table("wave", "share", "devices", "state", *[p.value for p in _PHASES], "time left")
    for w in r.waves:
        counts = r.counts(r.wave_devices(w.index))
        left = ""
        if r.state == RolloutState.RUNNING and w.state == WaveState.MOVING:
            left = f"{max(0, w.deadline_at - now):.0f}s to the deadline"
        elif r.state == RolloutState.RUNNING and w.state == WaveState.BAKING:
            left = f"{max(0, w.bake_until - now):.0f}s of bake"
        table.add_row(
            str(w.index + 1),
            f"{w.share:.0%}",
            str(w.size),
            w.state.value,
            *[str(counts.get(p.value, 0)) for p in _PHASES],
            left,
        )
    console.print(table)
    checks = next((w.checks for w in reversed(r.waves) if w.checks), ())
    if spec.gates:
        gates = Table("gate", "value", "limit", "previous version", "verdict")
        judged = {c.gate: c for c in checks}
        for gate in spec.gates:
            c = judged.get(gate.text)
            if c is None:
                gates.add_row(gate.text, "", "", "", "not judged yet")
            elif not c.evaluated:
                gates.add_row(gate.text, "", "", "", f"not judged: {c.detail}")
            else:
                gates.add_row(
                    gate.text,
                    f"{c.value:.4g}",
                    f"{c.limit:.4g}",
                    f"{c.baseline:.4g}" if c.baseline else "",
                    "held" if c.passed else "[red]breached[/red]",
                )
        console.print(gates)
    if show_devices:
        rows = Table("device", "wave", "previous", "phase", "error")
        for d in r.devices:
            rows.add_row(
                d.device_id,
                str(d.wave + 1),
                f"v{d.previous_version}" if d.previous_version else "-",
                d.phase.value,
                d.error[:80],
            )
        console.print(rows)


_PHASES = [p for p in DevicePhase if p != DevicePhase.UNSPECIFIED]
