"""A real agent on a small filesystem the test makes (tmpfs): a version that cannot fit is
refused before a byte is fetched, a disk that fills up during the download gives a clear
error and leaves nothing half-written, and in both cases the old version keeps serving;
once there is room the device converges."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.cli.processes import ManagedProcess
from tests.faults import figures
from tests.faults.conftest import FAST_AGENT
from tests.faults.procs import big_model, served
from tests.integration.conftest import Fleet, running

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

SIZE = 8 << 20  # two versions of the 1.6 MB model (chunks + assembled files) and the state


def _mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(path)],
        capture_output=True,
    )
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "small-disk"
    if os.geteuid() != 0 or shutil.which("mount") is None or not _mount_tmpfs(disk):
        pytest.skip(
            "making a small filesystem needs root with the right to mount (CAP_SYS_ADMIN); "
            "this run has neither, so the disk-full faults are not injected here"
        )
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _leftovers(data_dir: Path) -> list[str]:
    """Half-written things: partial chunks and half-built version folders."""
    return sorted(
        str(p.relative_to(data_dir))
        for p in data_dir.rglob("*")
        if p.name.endswith((".part", ".staging", ".tmp"))
    )


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all but `leave` bytes of the filesystem."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with filler.open("wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return filler


def _wait_error(fleet: Fleet, fragment: str, timeout: float = 60) -> str:
    devices = fleet.wait_for(
        lambda ds: any(fragment in e for d in ds for e in d.errors), timeout, repr(fragment)
    )
    return " ".join(devices[0].errors)


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_half_written(
    fleet: Fleet, small_disk: Path, tmp_path: Path
) -> None:
    data_dir = small_disk / "agent"
    env = {**FAST_AGENT, "EDGEFLEET_AGENT_MAX_DOWNLOAD_BYTES_PER_S": "400000"}
    agent: ManagedProcess = fleet.start_agent("a1", env=env, extra=["--data-dir", str(data_dir)])
    fleet.wait_for(lambda ds: len(ds) == 1, 60, "enrollment")
    for n in (1, 2):
        fleet.admin.push_model("m", big_model(tmp_path / f"m{n}.onnx", seed=n, bias=n))
    fleet.admin.deploy("m", 1)
    fleet.wait_for(lambda ds: running(ds) == {"a1": 1}, 90, "a1 on v1")
    assert (data_dir / "agent.db").is_file()  # it lives on the small disk

    # 1. Not enough room for v2 at all: refused before one byte of it is fetched.
    filler = _fill(small_disk, leave=1 << 20)
    fleet.admin.deploy("m", 2)
    error = _wait_error(fleet, "not enough disk")
    assert "needs" in error and "free" in error
    assert _leftovers(data_dir) == []
    answer = served(agent)
    assert answer is not None and (answer.version, answer.value) == (1, 1.0)
    figures.add("faults injected", "disk too small for the next version")

    # 2. Room when the download starts, none a moment later (another process fills it).
    filler.unlink()
    offset = agent.log_path.stat().st_size
    deadline = time.monotonic() + 60
    while "m v2: downloading" not in agent.log_path.read_bytes()[offset:].decode(errors="replace"):
        assert time.monotonic() < deadline, agent.log_tail(20)
        time.sleep(0.01)
    # Less than a chunk (1 MiB) left, enough for the agent's state database to record why.
    filler = _fill(small_disk, leave=256 << 10)
    deadline = time.monotonic() + 60
    log = ""
    while "filled up" not in log:
        assert time.monotonic() < deadline, agent.log_tail(30)
        time.sleep(0.05)
        log = agent.log_path.read_bytes()[offset:].decode(errors="replace")
    assert "the partial download was deleted" in log
    assert "Traceback" not in log  # a clear error, not a crash
    _wait_error(fleet, "disk")  # the device says so (then, each retry: not enough disk)
    assert _leftovers(data_dir) == []
    answer = served(agent)
    assert answer is not None and (answer.version, answer.value) == (1, 1.0)
    figures.add("faults injected", "disk filled up during a download")

    # 3. Room again: the device converges, and the restart after it serves v2 from disk.
    filler.unlink()
    fleet.wait_for(lambda ds: running(ds) == {"a1": 2}, 90, "a1 on v2")
    agent = fleet.restart_agent("a1")
    answer = served(agent)
    assert answer is not None and (answer.version, answer.value) == (2, 2.0)
    assert _leftovers(data_dir) == []
