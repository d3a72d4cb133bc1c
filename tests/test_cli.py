"""The `edgefleet` command: every sub-command teaches through --help, and the agent's
commands load without torch."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.integration
def test_demo_on_sigterm_stops_its_children_and_keeps_a_users_folder(tmp_path: Path) -> None:
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("the user's own file")
    # Started with SIGTERM blocked, as some CI runners and init scripts start processes: the
    # demo (and its children) must still stop on it. (A child inherits this thread's mask.)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        demo = subprocess.Popen(
            [sys.executable, "-m", "edgefleet.cli", "demo", "--workdir", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    try:
        deadline = time.monotonic() + 120
        # Once the agents' ports are written, the cloud and three agents run as children.
        while len(list(workdir.glob("edge-*.port"))) < 3:
            assert demo.poll() is None, demo.communicate()[0]
            assert time.monotonic() < deadline, "the demo did not start its agents"
            time.sleep(0.2)
        assert len(_processes_mentioning(str(workdir))) >= 4
        demo.send_signal(signal.SIGTERM)
        output, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 128 + signal.SIGTERM, output
    assert "demo stopped by SIGTERM" in output
    assert _processes_mentioning(str(workdir)) == []  # no orphaned cloud, agent or worker
    assert (workdir / "notes.txt").read_text() == "the user's own file"
    assert (workdir / "cloud.log").exists()  # what the demo wrote stays for the user to read
