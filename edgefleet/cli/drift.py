"""`edgefleet drift NAME`: how far devices' inputs moved from what each version was trained
on, per version, for the fleet and per device (cloudsvc.drift computes it)."""

from __future__ import annotations

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
    print_json,
)
from edgefleet.core.data import (
    PSI_DRIFTED,
    PSI_MODERATE,
    ChannelDrift,
    DriftReport,
    DriftScope,
)

WORST = 3  # channels named per row
VERDICT_STYLE = {"stable": "green", "moderate": "yellow", "drifted": "bold red"}


def _window(text: str | None) -> int:
    # parse_duration reads "never" as 0 too; here 0 means the cloud's own window.
    return parse_duration(text) if text else 0


def _channel(c: ChannelDrift) -> str:
    return f"{c.input}[{c.channel}] {c.psi:.3f}"


def _ks(scope: DriftScope) -> str:
    """KS of the worst channel that has captured values."""
    found = next((c for c in scope.channels if c.ks_samples), None)
    if found is None:
        return "-"
    p = "p<0.001" if found.ks_pvalue < 0.001 else f"p={found.ks_pvalue:.3f}"
    return f"{found.input}[{found.channel}] D={found.ks:.3f} {p} (n={found.ks_samples:,})"


def _row(table: Table, version: str, name: str, scope: DriftScope) -> None:
    style = VERDICT_STYLE.get(scope.verdict, "dim")
    table.add_row(
        version,
        escape(name),
        str(scope.windows),
        f"{scope.psi:.3f}" if scope.windows else "-",
        f"[{style}]{scope.verdict}[/{style}]",
        escape(", ".join(_channel(c) for c in scope.channels[:WORST] if c.count)) or "-",
        escape(_ks(scope)),
    )


def print_report(report: DriftReport, devices: int) -> None:
    span = int(report.until - report.since)
    console.print(
        f"{escape(report.model)}: inputs of the last {span // 3600}h{span % 3600 // 60:02d}m "
        f"against each version's training baseline (PSI: stable < {PSI_MODERATE} <= moderate "
        f"< {PSI_DRIFTED} <= drifted; the cloud alerts at {report.threshold:g})"
    )
    if not report.versions:
        console.print(
            f"no version of {escape(report.model)} has a training baseline: versions made by "
            "`edgefleet finetune` have one, pushed ONNX files do not"
        )
        return
    table = Table("version", "scope", "windows", "PSI", "verdict", "worst channels", "KS")
    for v in report.versions:
        _row(table, f"v{v.version}", "fleet", v.fleet)
        for d in v.devices[:devices] if devices else v.devices:
            _row(table, "", d.device_id, d)
        hidden = len(v.devices) - devices if devices else 0
        if hidden > 0:
            table.add_row("", f"(+{hidden} more devices, --devices 0 for all)", *[""] * 5)
    console.print(table)


@click.command("drift")
@click.argument("model")
@click.option("--version", type=click.IntRange(0), default=0, help="One version (0: every one).")
@click.option(
    "--window",
    default=None,
    help="How far back: 90m, 6h, 7d (default: the cloud's drift.window_s, an hour).",
)
@click.option(
    "--devices",
    type=click.IntRange(0),
    default=20,
    help="Device rows per version, worst first (0: all).",
)
@json_option
@cloud_options
def drift(
    model: str,
    version: int,
    window: str | None,
    devices: int,
    as_json: bool,
    cloud: Connection,
) -> None:
    """How far MODEL's inputs on devices moved from each version's training baseline: per
    version a fleet row and per-device rows, the worst channels by PSI, KS of sampled
    captures where there are some, and a verdict (stable < 0.1 <= moderate < 0.2 <= drifted).

    \b
      edgefleet drift defect-classifier
      edgefleet drift defect-classifier --version 3 --window 6h --json
    """
    with admin(cloud) as client:
        report = client.drift(model, version=version, window_s=_window(window))
    if as_json:
        print_json(report)
        return
    print_report(report, devices)
