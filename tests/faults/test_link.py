"""The agent's link to the cloud through a proxy that cuts, throttles, delays, black-holes
and refuses, as a site's link does: downloads resume where they stopped (every byte of the
artifact fetched once), and the agent converges once the link lets it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.cli.processes import ManagedProcess
from tests.faults import figures
from tests.faults.conftest import FAST_AGENT
from tests.faults.netproxy import TcpProxy
from tests.faults.procs import big_model, served, stop_summary
from tests.integration.conftest import Fleet, running

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


@pytest.fixture
def proxy(fleet: Fleet) -> Iterator[TcpProxy]:
    p = TcpProxy(fleet.cloud.address)
    yield p
    p.close()


def _push(fleet: Fleet, tmp_path: Path, n: int) -> int:
    """Push version n (1.6 MB of weights, two 1 MiB chunks); its artifact's bytes."""
    version = fleet.admin.push_model("m", big_model(tmp_path / f"m{n}.onnx", seed=n, bias=n))
    return version.artifacts[0].size_bytes


def _start(fleet: Fleet, proxy: TcpProxy) -> ManagedProcess:
    agent = fleet.start_agent("a1", via=proxy.address, env=FAST_AGENT)
    fleet.wait_for(lambda ds: len(ds) == 1, 60, "enrollment through the proxy")
    return agent


def _converge(fleet: Fleet, version: int, timeout: float = 120) -> None:
    fleet.wait_for(lambda ds: running(ds) == {"a1": version}, timeout, f"a1 on v{version}")


def test_a_cut_link_resumes_and_fetches_every_byte_once(
    fleet: Fleet, proxy: TcpProxy, tmp_path: Path
) -> None:
    proxy.faults.cut_after_bytes = 400_000  # each connection dies a piece and a half in
    agent = _start(fleet, proxy)
    size = _push(fleet, tmp_path, 1)
    fleet.admin.deploy("m", 1)
    _converge(fleet, 1)
    answer = served(agent)
    assert answer is not None and (answer.version, answer.value) == (1, 1.0)
    agent.stop()
    transfer = stop_summary(agent)
    assert proxy.counters.cuts >= 3
    assert transfer.resumed > 0  # a cut chunk continued from its .part file
    assert transfer.fetched == size, (transfer, size)  # never a byte fetched twice
    figures.add("link faults injected", "connection cut mid-download", proxy.counters.cuts)


def test_throttled_delayed_and_flapping_links_converge(
    fleet: Fleet, proxy: TcpProxy, tmp_path: Path
) -> None:
    proxy.faults.down_bytes_per_s = 1_000_000
    proxy.faults.delay_s = 0.02
    agent = _start(fleet, proxy)
    size = _push(fleet, tmp_path, 1)
    fleet.admin.deploy("m", 1)
    flaps = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not running(fleet.admin.devices()).get("a1"):
        time.sleep(0.4)
        proxy.cut_all()  # the link drops every connection at once, again and again
        flaps += 1
        if flaps >= 4:
            break
    _converge(fleet, 1)
    agent.stop()
    transfer = stop_summary(agent)
    assert transfer.fetched == size, (transfer, size)
    figures.add("link faults injected", "link flap (all connections cut)", flaps)
    figures.add("link faults injected", "throttled to 1 MB/s with 20 ms delay")


def test_a_black_holed_link_is_abandoned_and_the_download_resumes(
    fleet: Fleet, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Packets vanish without a reset (a dead route): the chunk deadline ends the stalled
    stream, and the download resumes once the route is back."""
    proxy.faults.down_bytes_per_s = 800_000
    agent = _start(fleet, proxy)
    size = _push(fleet, tmp_path, 1)

    def blackhole_mid_download() -> None:
        time.sleep(1.0)
        proxy.faults.blackhole = True
        time.sleep(5.0)
        proxy.faults.blackhole = False

    fleet.admin.deploy("m", 1)
    hole = threading.Thread(target=blackhole_mid_download)
    hole.start()
    _converge(fleet, 1)
    hole.join()
    agent.stop()
    transfer = stop_summary(agent)
    assert transfer.fetched == size, (transfer, size)
    figures.add("link faults injected", "black hole for 5 s mid-download")


def test_a_refused_link_serves_what_is_on_disk_then_converges(
    fleet: Fleet, proxy: TcpProxy, tmp_path: Path
) -> None:
    agent = _start(fleet, proxy)
    _push(fleet, tmp_path, 1)
    fleet.admin.deploy("m", 1)
    _converge(fleet, 1)
    proxy.faults.refuse = True
    proxy.cut_all()
    _push(fleet, tmp_path, 2)
    fleet.admin.deploy("m", 2)
    agent = fleet.restart_agent("a1")  # a reboot while the site is cut off
    answer = served(agent)
    assert answer is not None and answer.version == 1  # from disk, with no cloud
    time.sleep(2)
    assert served(agent) == answer
    proxy.faults.refuse = False
    _converge(fleet, 2)
    answer = served(agent)
    assert answer is not None and (answer.version, answer.value) == (2, 2.0)
    figures.add("link faults injected", "connections refused across a reboot")
