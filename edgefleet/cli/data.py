"""What comes back from the devices: `edgefleet capture` (what they capture), `edgefleet
data` (the captured data sets: list, show, export, label) and `edgefleet telemetry` (how a
model serves across the fleet, and what it costs)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.markup import escape
from rich.table import Table

from edgefleet.cli.admin import (
    Connection,
    admin,
    ago,
    cloud_options,
    console,
    human_bytes,
    json_option,
    print_json,
)
from edgefleet.core.data import DataSet, VersionTelemetry, parse_since
from edgefleet.core.golden import tensors_from_bytes
from edgefleet.core.wire import to_jsonable

PREFIX = "captures:"


def model_of(name: str) -> str:
    """`captures:MODEL` or `MODEL` -> MODEL."""
    return name.removeprefix(PREFIX).split("@")[0].split("?")[0]


def since_option(text: str | None) -> float:
    try:
        return parse_since(text or "")
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


# capture ------------------------------------------------------------------------------


@click.command("capture")
@click.argument("model")
@click.option(
    "--sample",
    "sample_rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Fraction of requests captured at random (0.1: one in ten).",
)
@click.option(
    "--below-confidence",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Also capture every request whose top-1 probability is under this.",
)
@click.option(
    "--max-row-bytes", type=int, default=0, help="Skip requests larger than this (0: default)."
)
@cloud_options
def capture(
    model: str,
    sample_rate: float,
    below_confidence: float,
    max_row_bytes: int,
    cloud: Connection,
) -> None:
    """Set what devices capture of MODEL's inferences (both options 0: nothing).

    Devices running it get the policy in their next desired state; captures wait in each
    device's spool (through days offline) and come back with its telemetry.

    \b
      edgefleet capture defect-classifier --sample 0.05 --below-confidence 0.6
    """
    with admin(cloud) as client:
        generations = client.set_capture_policy(
            model,
            sample_rate=sample_rate,
            below_confidence=below_confidence,
            max_row_bytes=max_row_bytes,
        )
    what = (
        f"{sample_rate:.0%} of requests" if sample_rate else ""
    ) + (f"{' and ' if sample_rate else ''}every request under {below_confidence:.0%} confidence"
         if below_confidence else "")  # fmt: skip
    console.print(
        f"{model}: devices capture {what or 'nothing'}; {len(generations)} device(s) told"
    )


# data ---------------------------------------------------------------------------------


@click.group()
def data() -> None:
    """Data devices captured: list, show, export, label. A data set is `captures:MODEL`, and
    `edgefleet finetune NAME --data captures:MODEL` trains on its labelled rows.

    \b
      edgefleet data list
      edgefleet data show captures:defect-classifier
      edgefleet data export captures:defect-classifier --out ./captured
      (edit ./captured/index.csv's label column)
      edgefleet data label captures:defect-classifier ./captured/index.csv
    """


@data.command("list")
@json_option
@cloud_options
def list_data(as_json: bool, cloud: Connection) -> None:
    """Every model with captured rows: rows, labelled, size, devices, newest."""
    with admin(cloud) as client:
        rows = client.data_sets()
    if as_json:
        print_json(rows)
        return
    table = Table("data set", "rows", "labelled", "size", "devices", "versions", "newest")
    for d in rows:
        table.add_row(
            d.name,
            f"{d.rows:,}",
            f"{d.labelled:,}",
            human_bytes(d.bytes),
            str(d.devices),
            ", ".join(f"v{v.version}" for v in d.versions),
            ago(d.last_at),
        )
    console.print(table)
    console.print(f"{len(rows)} data set(s), {sum(d.rows for d in rows):,} rows")


def _find(client_sets: list[DataSet], name: str) -> DataSet:
    model = model_of(name)
    found = next((d for d in client_sets if d.model == model), None)
    if found is None:
        raise click.ClickException(
            f"no captured rows of {model!r}: set a capture policy with `edgefleet capture "
            f"{model} --sample 0.1` and let devices serve"
        )
    return found


@data.command("show")
@click.argument("name")
@json_option
@cloud_options
def show_data(name: str, as_json: bool, cloud: Connection) -> None:
    """One data set: rows per version, labels, time span."""
    with admin(cloud) as client:
        found = _find(client.data_sets(), name)
    if as_json:
        print_json(found)
        return
    span = f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(found.first_at))} to " + (
        time.strftime("%Y-%m-%d %H:%M", time.localtime(found.last_at))
    )
    console.print(
        f"[bold]{found.name}[/]: {found.rows:,} rows ({human_bytes(found.bytes)}) from "
        f"{found.devices} device(s), {span}"
    )
    table = Table("version", "rows")
    for v in found.versions:
        table.add_row(f"v{v.version}", f"{v.rows:,}")
    console.print(table)
    labels = Table("label", "rows")
    for label, n in sorted(found.labels.items(), key=lambda kv: -kv[1]):
        labels.add_row(escape(label), f"{n:,}")
    console.print(labels)
    console.print(f"{found.labelled:,} of {found.rows:,} rows labelled")


@data.command("export")
@click.argument("name")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder."
)
@click.option("--version", type=int, default=0, help="Only this version's rows.")
@click.option("--since", default=None, help="Only rows captured since (2026-11-30 or unix s).")
@click.option("--labelled-only", is_flag=True, help="Only rows with a label.")
@click.option("--limit", type=int, default=0, help="At most this many rows (0: all).")
@cloud_options
def export_data(
    name: str,
    out: Path,
    version: int,
    since: str | None,
    labelled_only: bool,
    limit: int,
    cloud: Connection,
) -> None:
    """Write a data set to a folder: inputs.npz and outputs.npz (one array per tensor, the
    rows of every capture stacked) and index.csv (one line per row: the capture's id,
    device, version, time, confidence, label). Label rows by editing index.csv's label
    column, then `edgefleet data label NAME index.csv`."""
    model = model_of(name)
    out.mkdir(parents=True, exist_ok=True)
    inputs: dict[str, list[np.ndarray]] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    count = rows = 0
    with admin(cloud) as client, (out / "index.csv").open("w", newline="") as index:
        writer = csv.writer(index)
        writer.writerow(
            ["id", "row", "device_id", "seq", "version", "at", "request_id", "confidence",
             "reason", "label"]
        )  # fmt: skip
        with console.status(f"exporting {PREFIX}{model}...") as status:
            for capture in client.export_captures(
                model,
                version=version,
                since=since_option(since),
                labelled_only=labelled_only,
                limit=limit,
            ):
                ins = tensors_from_bytes(capture.inputs)
                outs = tensors_from_bytes(capture.outputs)
                n = len(next(iter(ins.values()))) if ins else 0
                for key, array in ins.items():
                    inputs.setdefault(key, []).append(array)
                for key, array in outs.items():
                    outputs.setdefault(key, []).append(array)
                for r in range(n):
                    writer.writerow(
                        [capture.id, r, capture.device_id, capture.seq, capture.version,
                         capture.at, capture.request_id, f"{capture.confidence:.4f}",
                         capture.reason, capture.label]
                    )  # fmt: skip
                count += 1
                rows += n
                if count % 500 == 0:
                    status.update(f"exporting {PREFIX}{model}: {count:,} captures")
    for file, arrays in (("inputs.npz", inputs), ("outputs.npz", outputs)):
        stacked: dict[str, Any] = {k: np.concatenate(v) for k, v in arrays.items()}
        np.savez(out / file, **stacked)
    console.print(
        f"exported {count:,} captures ({rows:,} rows) of {model} to {out}: inputs.npz, "
        "outputs.npz, index.csv"
    )


@data.command("label")
@click.argument("name")
@click.argument("labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@cloud_options
def label_data(name: str, labels_csv: Path, cloud: Connection) -> None:
    """Import labels: a CSV with `id` and `label` columns (an export's index.csv, labelled).
    A capture's rows share one label; an empty label leaves the capture as it was."""
    labels: dict[int, str] = {}
    with labels_csv.open(newline="") as f:
        for line, record in enumerate(csv.DictReader(f), start=2):
            try:
                capture_id = int(record["id"])
            except (KeyError, TypeError, ValueError):
                raise click.ClickException(
                    f"{labels_csv}:{line}: needs an integer `id` column (from `data export`)"
                ) from None
            label = (record.get("label") or "").strip()
            if label:
                labels[capture_id] = label
    with admin(cloud) as client:
        labelled, unknown = client.label_captures(labels)
    console.print(
        f"labelled {labelled:,} capture(s) of {model_of(name)}"
        + (f"; {unknown:,} id(s) name no stored capture" if unknown else "")
    )


# telemetry -------------------------------------------------------------------------------


@click.command("telemetry")
@click.argument("model")
@click.option("--since", default=None, help="Only windows since (2026-11-30 or unix s).")
@click.option(
    "--selector", "-l", multiple=True, metavar="KEY=VALUE", help="Only devices with this label."
)
@click.option(
    "--price-per-device-hour",
    type=float,
    default=None,
    help="What a device-hour costs you: adds the cost of 1,000 inferences per version.",
)
@json_option
@cloud_options
def telemetry(
    model: str,
    since: str | None,
    selector: tuple[str, ...],
    price_per_device_hour: float | None,
    as_json: bool,
    cloud: Connection,
) -> None:
    """How MODEL serves across the fleet, per version: request rate, errors, p50/p95/p99
    latency, input statistics, a shadow's agreement with the primary and, given a price, the
    cost of 1,000 inferences."""
    from edgefleet.cli.admin import parse_pairs

    with admin(cloud) as client:
        rows = client.telemetry(
            model, since=since_option(since), selector=parse_pairs(selector, "--selector")
        )
    if as_json:
        payload = [
            {
                **to_jsonable(v),
                "requests_per_s": v.requests_per_s,
                "agreement": v.agreement,
                **(
                    {"cost_per_1000": v.cost_per_1000(price_per_device_hour)}
                    if price_per_device_hour is not None
                    else {}
                ),
            }
            for v in rows
        ]
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
        return
    if not rows:
        console.print(f"no telemetry of {model} yet: devices send it every telemetry window")
        return
    columns = ["version", "target", "devices", "requests", "req/s", "errors", "p50", "p95", "p99"]
    shadowed = any(v.compared for v in rows)
    if shadowed:
        columns.append("agreement")
    if price_per_device_hour is not None:
        columns.append("per 1,000")
    table = Table(*columns)
    for v in rows:
        cells = [
            f"v{v.version}",
            v.target or "-",
            str(v.devices),
            f"{v.requests:,}",
            f"{v.requests_per_s:.1f}",
            f"{v.errors:,} ({v.errors / v.requests:.1%})" if v.requests else "0",
            f"{v.p50_ms:.2f} ms",
            f"{v.p95_ms:.2f} ms",
            f"{v.p99_ms:.2f} ms",
        ]
        if shadowed:
            cells.append(
                f"{v.agreement:.1%} of {v.compared:,} vs v{v.compared_with}"
                if v.agreement is not None
                else "-"
            )
        if price_per_device_hour is not None:
            cells.append(f"{v.cost_per_1000(price_per_device_hour):.4f}")
        table.add_row(*cells)
    console.print(table)
    _print_inputs(rows[0])


def _print_inputs(version: VersionTelemetry) -> None:
    """The newest version's input statistics, channel by channel (the first few)."""
    for stats in version.inputs:
        shown = stats.channels[:8]
        means = ", ".join(f"{c.mean:.3g}±{c.std:.3g}" for c in shown)
        more = f" (+{len(stats.channels) - len(shown)} more)" if len(stats.channels) > 8 else ""
        console.print(f"v{version.version} input {stats.input}: mean±std per channel {means}{more}")
