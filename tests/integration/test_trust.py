"""Trust operations as an operator runs them, with the `edgefleet` command against real
processes over TLS: tokens with labels and uses, relabelling, a key rotation that no device
re-enrolls for, a revocation and the re-enroll that undoes it, and an operator's rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from edgefleet.cli.processes import agent_process, write_secret_file
from tests.faults.procs import big_model, served
from tests.integration.conftest import Fleet, running


def cli(fleet: Fleet, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", *args, *fleet.admin_args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _push(fleet: Fleet, tmp_path: Path, n: int) -> None:
    fleet.admin.push_model("m", big_model(tmp_path / f"m{n}.onnx", seed=n, bias=n, columns=500))


def test_tokens_labels_rotation_revocation_and_rollback(fleet: Fleet, tmp_path: Path) -> None:
    # A single-use token granting site=plant-1, made and listed with the command.
    made = cli(fleet, "tokens", "create", "--label", "site=plant-1", "--max-uses", "1")
    secret = made.stdout.strip()
    assert secret.startswith("enr_") and "\n" not in secret  # the secret alone on stdout
    token_file = write_secret_file(tmp_path / "token-a1", secret)

    agent = agent_process(
        fleet.workdir, "a1", fleet.cloud.address, fleet.trust, token_file,
        env={"EDGEFLEET_AGENT_REPORT_INTERVAL_S": "0.5", "EDGEFLEET_AGENT_BACKOFF_CAP_S": "1"},
    )  # fmt: skip
    fleet.agents["a1"] = agent
    agent.start().wait_ready(60)
    fleet.wait_for(lambda ds: len(ds) == 1, 60, "enrollment")
    listed = json.loads(cli(fleet, "tokens", "list", "--json").stdout)
    assert [(t["uses"], t["max_uses"], t["labels"]) for t in listed] == [
        (1, 1, {"site": "plant-1"})
    ]
    assert secret not in json.dumps(listed)

    # Deploys select by the operator's labels; relabelling moves the device.
    _push(fleet, tmp_path, 1)
    cli(fleet, "deploy", "m", "--version", "1", "--selector", "site=plant-1", "--wait")
    cli(fleet, "devices", "label", "a1", "line=3")
    (device,) = fleet.admin.devices()
    assert device.labels == {"site": "plant-1", "line": "3"}

    # The root key rotates; the device follows the signed chain and takes v2 signed by the
    # new key, without re-enrolling.
    rotated = json.loads(cli(fleet, "keys", "rotate", "--json").stdout)
    assert rotated["version"] == 2
    enrolled_at = device.enrolled_at
    _push(fleet, tmp_path, 2)
    cli(fleet, "deploy", "m", "--version", "2", "--wait", "--timeout", "60")
    answer = served(agent)
    assert answer is not None and (answer.version, answer.value) == (2, 2.0)
    assert "rotated its root key" in agent.log_tail(200)
    assert "enrolled as device" not in agent.log_tail(200).split("rotated")[-1]
    assert fleet.admin.device("a1").enrolled_at == enrolled_at

    # Going back is an operator's rollback; a plain deploy of an older version is refused.
    refused = cli(fleet, "deploy", "m", "--version", "1", check=False)
    assert refused.returncode != 0 and "rollback" in refused.stderr
    cli(fleet, "rollback", "m", "--to", "1", "--wait", "--timeout", "60")
    answer = served(agent)
    assert answer is not None and (answer.version, answer.value) == (1, 1.0)

    # Revoked, the device's calls are refused; it keeps serving and says what to do.
    cli(fleet, "devices", "revoke", "a1")
    fleet.wait_for(
        lambda ds: "reenroll" in " ".join(ds[0].errors) or not ds[0].online, 60, "refusal"
    )
    log = ""
    for _ in range(100):
        log = agent.log_tail(40)
        if "edgefleet agent reenroll" in log:
            break
        time.sleep(0.2)
    assert "edgefleet agent reenroll" in log
    answer = served(agent)
    assert answer is not None and answer.version == 1
    # The operator's re-enroll token, used on the device, brings it back.
    again = cli(fleet, "tokens", "create", "--reenroll", "a1").stdout.strip()
    reenroll_file = write_secret_file(tmp_path / "reenroll-a1", again)
    args = agent.args
    done = subprocess.run(
        [
            sys.executable, "-m", "edgefleet.cli", "agent", "reenroll",
            "--cloud", fleet.cloud.address, *fleet.trust.agent_args(),
            "--data-dir", args[args.index("--data-dir") + 1],
            "--enroll-token-file", str(reenroll_file),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "re-enrolled" in done.stdout
    _push(fleet, tmp_path, 3)
    cli(fleet, "deploy", "m", "--version", "3", "--wait", "--timeout", "60")
    assert not fleet.admin.device("a1").revoked
    answer = served(agent)
    assert answer is not None and (answer.version, answer.value) == (3, 3.0)
    assert running(fleet.admin.devices()) == {"a1": 3}
