"""`edgefleet traffic`: serve a second version of a model beside its primary on the devices
of a selector, as an A/B share of its requests or as a shadow (a copy of every request,
outputs compared with the primary's, never returned)."""

from __future__ import annotations

import json

import click

from edgefleet.cli.admin import Connection, admin, cloud_options, console, json_option
from edgefleet.core.fleet import TrafficVariant


def parse_share(text: str) -> TrafficVariant:
    """`VERSION=WEIGHT%` (or a fraction, `2=0.1`) -> an A/B variant."""
    version, sep, weight = text.partition("=")
    try:
        if not sep:
            raise ValueError
        share = float(weight.removesuffix("%")) / 100 if weight.endswith("%") else float(weight)
        return TrafficVariant(int(version), share, False)
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: write VERSION=WEIGHT%, e.g. 2=10% (or 2=0.1)", param_hint="--ab"
        ) from None


@click.command("traffic")
@click.argument("model")
@click.option(
    "--selector", "-l", multiple=True, metavar="KEY=VALUE", help="Only devices with this label."
)
@click.option(
    "--ab", metavar="VERSION=WEIGHT%", default=None, help="Send this share of requests to VERSION."
)
@click.option(
    "--shadow", type=int, metavar="VERSION", default=None, help="Copy every request to VERSION."
)
@click.option("--clear", is_flag=True, help="Serve the primary alone again.")
@json_option
@cloud_options
def traffic(
    model: str,
    selector: tuple[str, ...],
    ab: str | None,
    shadow: int | None,
    clear: bool,
    as_json: bool,
    cloud: Connection,
) -> None:
    """Serve a second version of MODEL beside its primary on the devices that run it.

    With --ab, requests that name no version go to VERSION with that probability (the same
    `routing_key` request parameter always lands on the same version); with --shadow, every
    request is also run on VERSION off the request's path, its outputs compared with the
    primary's and never returned. `edgefleet telemetry MODEL` shows each version's figures
    and the shadow's agreement. A deploy of MODEL clears the split.

    \b
      edgefleet traffic defect-classifier --ab 3=10% -l site=plant-1
      edgefleet traffic defect-classifier --shadow 3
      edgefleet traffic defect-classifier --clear
    """
    from edgefleet.cli.admin import parse_pairs

    if sum((ab is not None, shadow is not None, clear)) != 1:
        raise click.UsageError(
            "give exactly one of --ab VERSION=WEIGHT%, --shadow VERSION, --clear"
        )
    variants: list[TrafficVariant] = []
    if ab is not None:
        variants.append(parse_share(ab))
    elif shadow is not None:
        variants.append(TrafficVariant(shadow, 0.0, True))
    with admin(cloud) as client:
        generations = client.set_traffic(
            model, variants, selector=parse_pairs(selector, "--selector")
        )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "model": model,
                    "variants": [
                        {"version": v.version, "weight": v.weight, "shadow": v.shadow}
                        for v in variants
                    ],
                    "devices": generations,
                },
                indent=2,
                sort_keys=True,
            )
        )
        return
    if clear:
        what = "the primary alone"
    elif variants[0].shadow:
        what = f"the primary, with v{variants[0].version} as its shadow"
    else:
        what = f"v{variants[0].version} on {variants[0].weight:.1%} of requests, the primary on the rest"
    changed = f"{len(generations)} device(s) told" if generations else "no device changed"
    console.print(f"{model}: devices serve {what}; {changed}")
