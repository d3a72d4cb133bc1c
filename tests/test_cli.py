"""The `edgefleet` command: every sub-command teaches through --help, and the agent's
commands load without torch."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from edgefleet.cli import LAZY_COMMANDS, cli


def _all_commands(
    group: click.Group, ctx: click.Context, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += _all_commands(command, ctx, (*prefix, name))
    return found


def test_every_command_has_help() -> None:
    runner = CliRunner()
    with click.Context(cli) as ctx:
        commands = _all_commands(cli, ctx)
    assert {c[0] for c in commands} >= set(LAZY_COMMANDS)
    for path in commands:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output
        command_help = result.output.split("Options:")[0]
        assert len(command_help.split()) > 6, (
            f"`edgefleet {' '.join(path)} --help` explains too little"
        )


def test_agent_command_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from edgefleet.cli import cli\n"
        "r = CliRunner().invoke(cli, ['agent', 'run', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "import agent.daemon, agent.reconciler, agent.inference.server\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'cloudsvc', 'compilers', 'transfer'))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_demo_runs_the_whole_loop(tmp_path: object) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo complete" in done.stdout
    assert "moved v1 → v2" in done.stdout
