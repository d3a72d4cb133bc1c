"""SIGKILL of real agent processes at random moments of download, verification and
activation, again and again (120 kill points by default): after every kill the versions on
disk verify, every restart serves a whole verified version (its answer is that version's),
and each device converges to what the cloud says once it is left running.

EDGEFLEET_FAULT_KILLS sets the number of kill points (CI uses the default).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgefleet.cli.processes import ManagedProcess
from edgefleet.core.fleet import Device as FleetDevice
from tests.faults import figures
from tests.faults.conftest import FAST_AGENT
from tests.faults.procs import Answer, big_model, served, verify_disk
from tests.integration.conftest import Fleet, running

KILLS = int(os.environ.get("EDGEFLEET_FAULT_KILLS", "120"))
AGENTS = 3
CHECK_EVERY = 6  # steps between full convergence checks
# Downloads are slowed to this so that a random moment lands inside them often.
RATE = 600_000

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

# The agent's log lines that say where it is, latest wins: the phase a kill interrupted.
PHASES = (
    ("downloading", "download"),
    ("downloaded", "download"),
    ("activating", "verification and activation"),
    (" on CPUExecutionProvider", "just after the switch"),
)


def phase_of(log: str) -> str:
    found, at = "start-up (restoring from disk)", -1
    for marker, phase in PHASES:
        where = log.rfind(marker)
        if where > at:
            found, at = phase, where
    return found


def on_target(devices: list[FleetDevice], names: set[str], target: int) -> bool:
    return {k: v for k, v in running(devices).items() if k in names} == dict.fromkeys(names, target)


@dataclass
class Device:
    proc: ManagedProcess
    data_dir: Path
    rng: random.Random
    kills: dict[str, int] = field(default_factory=dict)
    answers: list[Answer] = field(default_factory=list)

    def check_restart(self) -> None:
        """Started after a kill: whatever it serves is a whole version."""
        answer = served(self.proc)
        if answer is not None:
            assert answer.value == pytest.approx(answer.version), (
                f"{self.proc.name} answered {answer.value} as v{answer.version}: a partial or "
                f"mixed model is served\n{self.proc.log_tail(20)}"
            )
            self.answers.append(answer)

    def kill_once(self, window: float) -> None:
        """Start, check what it serves, then SIGKILL it at a random moment: inside its
        download, inside its verification and activation, or anywhere."""
        offset = self.proc.log_path.stat().st_size if self.proc.log_path.exists() else 0
        self.proc.start().wait_ready(60)
        self.check_restart()
        aim = self.rng.choice(("downloading", "downloading", "activating", ""))
        if aim:
            # Wait for the phase aimed at (or the first step of the change, when its chunks
            # are all held and there is nothing to download), then kill inside it.
            deadline = time.monotonic() + window + 2
            seen = ""
            while time.monotonic() < deadline and not seen:
                log = self._log(offset)
                seen = next((m for m in (aim, "activating", "on CPU") if m in log), "")
                time.sleep(0.005)
            downloading = seen == "downloading"
            # Activation takes tens of milliseconds, a download about a second.
            time.sleep(self.rng.uniform(0.0, window / 3 if downloading else 0.04))
        else:
            time.sleep(self.rng.uniform(0.0, window))
        self.proc.kill()
        phase = phase_of(self._log(offset))
        self.kills[phase] = self.kills.get(phase, 0) + 1
        verify_disk(self.data_dir)  # raises naming a version that does not verify

    def _log(self, offset: int) -> str:
        return self.proc.log_path.read_bytes()[offset:].decode(errors="replace")


def test_random_kills_never_serve_a_partial_model_and_always_converge(
    fleet: Fleet, tmp_path: Path
) -> None:
    rng = random.Random(20261201)
    env = {**FAST_AGENT, "EDGEFLEET_AGENT_MAX_DOWNLOAD_BYTES_PER_S": str(RATE)}
    devices: list[Device] = []
    for n in range(AGENTS):
        proc = fleet.start_agent(f"k{n}", env=env)
        devices.append(Device(proc, tmp_path / f"k{n}", random.Random(rng.random())))
    fleet.wait_for(lambda ds: len(ds) == AGENTS, 60, "enrollment")
    names = {d.proc.name for d in devices}
    for d in devices:
        d.proc.stop()
    for n in (1, 2, 3):
        fleet.admin.push_model("m", big_model(tmp_path / f"m{n}.onnx", seed=n, bias=n))
    # A download of one version at RATE (the limiter lets a second's worth through at
    # once) plus its verification: the window kills aim at.
    window = (1.6e6 - RATE) / RATE + 0.6
    steps = max(1, -(-KILLS // AGENTS))
    current = 0

    def in_parallel(work: Callable[[Device], None]) -> None:
        errors: list[BaseException] = []

        def run(device: Device) -> None:
            try:
                work(device)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=run, args=(d,)) for d in devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    for step in range(steps):
        # Every kill interrupts a change: the desired version moves while the devices are down.
        target = (1, 2, 3)[step % 3]
        if target < current:
            fleet.admin.rollback("m", target)  # going back is the operator's rollback
        else:
            fleet.admin.deploy("m", target)
        current = target
        in_parallel(lambda d: d.kill_once(window))
        if (step + 1) % CHECK_EVERY and step != steps - 1:
            continue

        # Left alone, every device converges to the target and answers as it.
        def settle(d: Device) -> None:
            d.proc.start().wait_ready(60)
            d.check_restart()

        in_parallel(settle)

        def done(ds: list[FleetDevice], target: int = target) -> bool:
            return on_target(ds, names, target)

        fleet.wait_for(done, 120, f"every device on v{target} after step {step}")
        for d in devices:
            answer = served(d.proc)
            assert answer is not None and (answer.version, answer.value) == (target, target)
            d.proc.stop()
            verify_disk(d.data_dir)
    total: dict[str, int] = {}
    for d in devices:
        for phase, n in d.kills.items():
            total[phase] = total.get(phase, 0) + n
            figures.add("kill points (SIGKILL)", phase, n)
    assert sum(total.values()) >= KILLS
    # The kills landed in every phase the test is about, not only at start-up.
    assert total.get("download", 0) > 0, total
    print(f"kill points by phase: {total}")
