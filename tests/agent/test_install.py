"""`edgefleet agent install`: the unit and a commented agent.toml written into temp dirs, the
commands left printed (or run, with --now, through a stand-in for the real ones)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import agent.cli
from agent.cli import agent as agent_group
from agent.settings import load
from agent.systemd import render_unit

ROOT_KEY = "sha256:" + "ab" * 32


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EDGEFLEET_AGENT_* variable of the shell, no edgefleet user, not root."""
    for name in list(os.environ):
        if name.startswith("EDGEFLEET_AGENT_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(agent.cli, "_service_user", lambda: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def install(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(
        agent_group,
        [
            "install",
            "--cloud", "cloud.plant-1.example:50051",
            "--root-key", ROOT_KEY,
            "--unit-dir", str(tmp_path / "units"),
            "--config-dir", str(tmp_path / "etc"),
            *args,
        ],
    )  # fmt: skip


def test_dry_run_prints_everything_and_writes_nothing(tmp_path: Path) -> None:
    result = install(tmp_path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "units").exists() and not (tmp_path / "etc").exists()
    unit = tmp_path / "units" / "edgefleet-agent.service"
    config = tmp_path / "etc" / "agent.toml"
    assert f"--- {unit} (0644)" in result.output
    assert f"--- {config} (0600)" in result.output
    assert f"agent run --config {config}" in result.output
    assert 'cloud = "cloud.plant-1.example:50051"' in result.output
    assert f'ca_file = "{tmp_path / "etc" / "ca.pem"}"' in result.output
    assert f'enroll_token_file = "{tmp_path / "etc" / "enroll-token"}"' in result.output
    for command in (
        "useradd --system",
        f"chown edgefleet: {config} {tmp_path / 'etc' / 'enroll-token'}",
        "systemctl daemon-reload",
        "systemctl enable --now edgefleet-agent",
    ):
        assert command in result.output, command
    assert "ca.pem does not exist yet" in result.output


def test_install_writes_the_unit_and_settings_the_agent_reads(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "enroll-token").write_text("secret\n")
    result = install(tmp_path, "--ca-file", str(tmp_path / "ca.pem"))
    assert result.exit_code == 0, result.output
    unit = tmp_path / "units" / "edgefleet-agent.service"
    config = tmp_path / "etc" / "agent.toml"
    assert unit.stat().st_mode & 0o777 == 0o644
    assert config.stat().st_mode & 0o777 == 0o600
    assert unit.read_text() == render_unit(agent.cli._agent_command(), config)
    settings = load(config)
    assert settings.cloud == "cloud.plant-1.example:50051"
    assert settings.root_key == ROOT_KEY
    assert settings.ca_file == tmp_path / "ca.pem" and not settings.insecure
    assert settings.enroll_token_file == tmp_path / "etc" / "enroll-token"
    assert settings.enroll_secret() == "secret"
    assert settings.data_dir == Path("/var/lib/edgefleet-agent")
    assert "secret" not in config.read_text()
    lines = result.output.splitlines()
    left = lines[lines.index("left to do, as root:") + 1 :]
    assert [line.split()[0:2] for line in left] == [
        ["useradd", "--system"],
        ["chown", "edgefleet:"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable"],
    ]
    assert "enroll-token does not exist" not in result.output


def test_an_existing_agent_toml_is_kept_unless_forced(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "agent.toml"
    config.parent.mkdir()
    config.write_text("# mine\n")
    dry = install(tmp_path, "--dry-run")
    assert "exists: kept, --force replaces it" in dry.output
    kept = install(tmp_path)
    assert kept.exit_code == 0, kept.output
    assert config.read_text() == "# mine\n"
    assert f"kept {config}" in kept.output
    assert (tmp_path / "units" / "edgefleet-agent.service").exists()
    forced = install(tmp_path, "--force")
    assert forced.exit_code == 0, forced.output
    assert 'cloud = "cloud.plant-1.example:50051"' in config.read_text()
    assert config.stat().st_mode & 0o777 == 0o600


def test_insecure_settings_and_what_is_refused(tmp_path: Path) -> None:
    result = install(tmp_path, "--insecure")
    assert result.exit_code == 0, result.output
    settings = load(tmp_path / "etc" / "agent.toml")
    assert settings.insecure and settings.ca_file is None
    both = install(tmp_path, "--insecure", "--ca-file", "ca.pem")
    assert both.exit_code != 0 and "contradict" in both.output
    bad_key = CliRunner().invoke(
        agent_group,
        ["install", "--cloud", "c:1", "--root-key", "abc", "--config-dir", str(tmp_path / "x"),
         "--unit-dir", str(tmp_path / "y")],
    )  # fmt: skip
    assert bad_key.exit_code != 0 and "root key" in bad_key.output
    bad_cloud = install(tmp_path, "--cloud", "no-port", "--force")
    assert bad_cloud.exit_code != 0 and "host:port" in bad_cloud.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_now_needs_root(tmp_path: Path) -> None:
    result = install(tmp_path, "--now")
    assert result.exit_code != 0 and "as root" in result.output
    assert not (tmp_path / "etc").exists()


def test_now_as_root_creates_the_user_gives_it_the_files_and_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[list[str]] = []
    users: list[tuple[int, int] | None] = [None]  # none until useradd ran
    chowned: list[Path] = []

    def run_command(argv: list[str]) -> None:
        ran.append(argv)
        if argv[0] == "useradd":
            users[0] = (os.getuid(), os.getgid())

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(agent.cli, "_service_user", lambda: users[0])
    monkeypatch.setattr(agent.cli, "_run_command", run_command)
    monkeypatch.setattr(os, "chown", lambda path, uid, gid: chowned.append(Path(path)))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "enroll-token").write_text("secret\n")
    result = install(tmp_path, "--now")
    assert result.exit_code == 0, result.output
    assert [argv[:2] for argv in ran] == [
        ["useradd", "--system"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable"],
    ]
    assert ran[-1] == ["systemctl", "enable", "--now", "edgefleet-agent"]
    assert chowned == [tmp_path / "etc" / "agent.toml", tmp_path / "etc" / "enroll-token"]

    # Again, with the user there: no useradd, the files go to it as they are written.
    ran.clear()
    chowned.clear()
    again = install(tmp_path, "--now", "--force")
    assert again.exit_code == 0, again.output
    assert [argv[1] for argv in ran] == ["daemon-reload", "enable"]
    assert chowned == [tmp_path / "etc" / "enroll-token"]  # agent.toml: fchown on write


# The container image ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "packaging" / "container"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuations joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        found.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "a continuation runs off the end"
    return found


def agent_dependencies() -> set[str]:
    """Every distribution `pip install "edgefleet[agent]"` brings, from the installed metadata
    (`pip install -e .` writes it from pyproject.toml)."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = [Requirement(r) for r in metadata.requires("edgefleet") or []]
    todo = [r for r in todo if r.marker is None or r.marker.evaluate({"extra": "agent"})]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:  # markers were evaluated when it was added
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return seen


def test_the_agent_extra_brings_no_torch() -> None:
    dependencies = agent_dependencies()
    assert {"onnxruntime", "grpcio", "pydantic"} <= dependencies
    assert not {"torch", "onnx", "onnxscript", "transformers"} & dependencies, dependencies


def test_the_agent_image() -> None:
    steps = instructions(CONTAINER / "Dockerfile")
    kinds = [kind for kind, _ in steps]
    assert kinds[0] in ("ARG", "FROM") and "FROM" in kinds
    args = {rest.partition("=")[0]: rest.partition("=")[2] for kind, rest in steps if kind == "ARG"}
    assert args["BASE"].startswith("python:3.1") and "slim" in args["BASE"]
    assert steps[kinds.index("FROM")][1] == "${BASE}"
    assert args["ONNXRUNTIME"] == "onnxruntime"
    # Runs as a user that is not root, from the last USER on.
    users = [rest for kind, rest in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k in ("RUN", "COPY"))
    # The agent extra, nothing with torch in it.
    runs = " ".join(rest for kind, rest in steps if kind == "RUN")
    installs = [c for c in re.split(r";|&&", runs) if re.search(r"\bpip3? install\b", c)]
    assert any('"/tmp/src[agent]"' in c for c in installs), installs
    assert not any("torch" in c or re.search(r"\[(cloud|dev|vision|text)", c) for c in installs)
    assert "if pip show torch" in runs  # and the build fails if anything pulled it anyway
    for kind, rest in steps:
        if kind == "COPY":
            *sources, _target = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
    assert [rest.strip('[]" ') for kind, rest in steps if kind == "VOLUME"] == [
        "/var/lib/edgefleet"
    ]
    health = [rest for kind, rest in steps if kind == "HEALTHCHECK"]
    assert len(health) == 1 and "healthcheck.py" in health[0] and "CMD" in health[0]
    assert ("ENTRYPOINT", '["edgefleet", "agent", "run"]') in steps
    ignore = (CONTAINER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore and {"!edgefleet/", "!agent/", "!protos/"} <= set(ignore)


def test_the_health_check_answers_for_a_live_port_and_not_a_dead_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    spec = importlib.util.spec_from_file_location("healthcheck", CONTAINER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setattr(check, "TIMEOUT_S", 2.0)

    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        monkeypatch.setenv("EDGEFLEET_AGENT_INFERENCE_PORT", str(port))
        assert check.main() == 0
    finally:
        server.stop(None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("EDGEFLEET_AGENT_INFERENCE_PORT", str(dead))
    assert check.main() == 1
