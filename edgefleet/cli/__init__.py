"""The `edgefleet` command. Each sub-command's module is imported only when it runs, so
`edgefleet agent run` works with only the agent extra installed (no torch, no onnx)."""

from __future__ import annotations

import importlib
import logging
from typing import Any

import click

from edgefleet import __version__
from edgefleet.core.logs import configure as configure_logs

# command name -> "module:attribute" of a click command or group.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "edgefleet.cli.demo:demo",
        "Run the whole loop on this machine: cloud, 3 agents, v1 -> v2.",
    ),
    "cloud": ("cloudsvc.cli:cloud", "Run the cloud service (registry, fleet, agent API)."),
    "agent": ("agent.cli:agent", "Run the device agent (reconcile, serve inference)."),
    "models": ("edgefleet.cli.admin:models", "Push and inspect models and their versions."),
    "deploy": ("edgefleet.cli.admin:deploy", "Set the version a group of devices should run."),
    "deployments": (
        "edgefleet.cli.admin:deployments",
        "Standing deployments: what each selector's devices run.",
    ),
    "devices": (
        "edgefleet.cli.admin:devices",
        "List, show, label and revoke devices.",
    ),
    "rollback": (
        "edgefleet.cli.admin:rollback",
        "Take devices back to an older version (an operator's rollback).",
    ),
    "rollout": (
        "edgefleet.cli.rollouts:rollout",
        "Move a version in waves gated on device figures; status, pause, abort.",
    ),
    "tokens": (
        "edgefleet.cli.admin:tokens",
        "Enrollment tokens: create (labels, uses, expiry), list, revoke.",
    ),
    "admin-tokens": (
        "edgefleet.cli.admin:admin_tokens",
        "Admin tokens with roles (viewer, operator, admin).",
    ),
    "keys": ("edgefleet.cli.admin:keys", "Rotate the root key devices trust."),
    "capture": (
        "edgefleet.cli.data:capture",
        "Set what devices capture of a model's inferences.",
    ),
    "data": (
        "edgefleet.cli.data:data",
        "Captured data sets: list, show, export, label.",
    ),
    "telemetry": (
        "edgefleet.cli.data:telemetry",
        "How a model serves across the fleet, per version, and its cost.",
    ),
    "traffic": (
        "edgefleet.cli.traffic:traffic",
        "A/B split or shadow of a second version beside a model's primary.",
    ),
    "drift": (
        "edgefleet.cli.drift:drift",
        "How far devices' inputs moved from each version's training baseline.",
    ),
    "loop": (
        "edgefleet.cli.loop:loop",
        "The closed loop: drift -> fine-tune -> held-out check -> canary.",
    ),
    "certs": ("edgefleet.cli.certs:certs", "Make a private CA and server certificate (TLS)."),
    "mqtt": (
        "cloudsvc.mqtt.cli:mqtt",
        "MQTT notices: write the broker's password and ACL files.",
    ),
    "finetune": (
        "edgefleet.cli.jobs:finetune",
        "Fine-tune a backbone on your data as a cloud job: new version + artifacts.",
    ),
    "compile": ("edgefleet.cli.jobs:compile_command", "Build one more target for a version."),
    "evaluate": (
        "edgefleet.cli.evaluate:evaluate",
        "Score a version's artifact on labelled data; the result is kept with it.",
    ),
    "jobs": ("edgefleet.cli.jobs:jobs", "List, follow, cancel and retry fine-tune/compile jobs."),
    "runs": ("edgefleet.cli.jobs:runs", "Compare versions: settings, metrics, size, latency."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module_name, attr = LAZY_COMMANDS[cmd_name][0].split(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise click.ClickException(
                    f"`edgefleet {cmd_name}` needs a package that is not installed ({err.name}). "
                    f"Install the extra it belongs to, e.g. pip install 'edgefleet[cloud]'."
                ) from err
            command: click.Command = getattr(module, attr)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help comes from the table above so that `--help` imports no command module.
        rows = [(name, LAZY_COMMANDS[name][1]) for name in sorted(LAZY_COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """edgefleet: fine-tune, compile and roll out ML models to a fleet of edge devices.

    \b
    Start here:
      edgefleet demo                      the whole loop on this machine in under a minute
      edgefleet cloud serve               run the cloud service
      edgefleet agent run --cloud H:P     run an agent on a device
      edgefleet models push NAME m.onnx   upload a model version
      edgefleet finetune NAME --base small-cnn --data DATA
                                          or fine-tune one in the cloud
      edgefleet runs compare NAME         pick the best version
      edgefleet deploy NAME --version 1   put it on devices
      edgefleet rollout start NAME --version 2 --waves 10%,100% --gate "error_rate<1%"
                                          or move a fleet in gated waves
      edgefleet devices                   see where every device stands

    Admin commands reach the cloud over TLS: --cloud, --token-file and --ca-file, or
    EDGEFLEET_CLOUD, EDGEFLEET_ADMIN_TOKEN_FILE and EDGEFLEET_CA_FILE.
    """
    level = logging.WARNING - 10 * verbose
    configure_logs("text", max(level, logging.DEBUG))


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv, prog_name="edgefleet")
