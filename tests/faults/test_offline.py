"""A device offline, for real: an agent process whose only way to the cloud is a proxy that
refuses every connection, serving and capturing all the while, then let back on.

- A day offline, time-compressed (1,440 telemetry windows of 10 ms stand for a day of
  minutes, with thousands of captures): after reconnecting, every row arrives, once, in
  order (the cloud's ids follow the sequence numbers, and the request ids follow the order
  they were sent in), the telemetry backlog before any capture, and the upload never
  beyond its bandwidth cap (bytes through the proxy over the time they took).
- A spool that reaches its disk budget: the oldest unsynced captures are evicted (a log line
  says so), counted on the device (DeviceWindow.captures_dropped) and by the cloud as lost
  (its cursors), never an error; the newest captures and every telemetry row arrive.

Bad input to Sync through the cloud's gRPC port is tests/cloudsvc/test_ingest.py's.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.cli.processes import ManagedProcess
from edgefleet.client.inference import InferenceClient
from tests.faults import figures
from tests.faults.conftest import FAST_AGENT
from tests.faults.netproxy import TcpProxy
from tests.faults.rows import cursors, read_cloud, read_spool, wait_until
from tests.integration.conftest import Fleet, running
from tests.onnx_models import linear_model

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

WINDOWS = 1440  # a day of one-minute windows
WINDOW_S = 0.01
CAP = 150_000  # bytes per second of upload
BUDGET = 400_000  # the small spool's disk budget
IMAGE = (1, 1, 32, 64)


@pytest.fixture
def proxy(fleet: Fleet) -> Iterator[TcpProxy]:
    p = TcpProxy(fleet.cloud.address)
    yield p
    p.close()


def _start(
    fleet: Fleet, proxy: TcpProxy, name: str, model: Path, env: dict[str, str]
) -> ManagedProcess:
    """An agent serving `model` (captured whole: sample rate 1.0), reaching the cloud
    through `proxy` only."""
    agent = fleet.start_agent(name, env={**FAST_AGENT, **env}, via=proxy.address)
    fleet.wait_for(lambda ds: len(ds) == 1, 60, "enrollment")
    fleet.admin.push_model("m", model)
    fleet.admin.set_capture_policy("m", sample_rate=1.0)
    fleet.admin.deploy("m", 1)
    fleet.wait_for(lambda ds: running(ds) == {name: 1}, 60, f"{name} on v1")
    return agent


def _image_model(path: Path) -> Path:
    """A one-channel 32x64 image in (8 KiB: what a capture holds), 3 scores out; its
    telemetry stays small (input statistics per channel: one)."""
    w = np.random.default_rng(6).normal(size=(IMAGE[2] * IMAGE[3], 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["f"], axis=1),
            helper.make_node("MatMul", ["f", "w"], ["y"]),
        ],
        "image",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *IMAGE[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _offline(proxy: TcpProxy) -> None:
    proxy.faults.refuse = True
    proxy.cut_all()


def _send(agent: ManagedProcess, x: np.ndarray, count: int, seconds: float) -> list[str]:
    """`count` requests with unique ids, spread over `seconds`; the ids, in order."""
    ids = [f"q{n}" for n in range(count)]
    start = time.monotonic()
    with InferenceClient(agent.address, timeout=10) as client:
        for n, request_id in enumerate(ids):
            client.infer("m", {"x": x}, request_id=request_id, label=f"class-{n % 3}")
            ahead = start + seconds * (n + 1) / count - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return ids


def test_a_day_offline_arrives_complete_in_order_and_under_the_upload_cap(
    fleet: Fleet, proxy: TcpProxy, tmp_path: Path
) -> None:
    env = {
        "EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S": str(WINDOW_S),
        "EDGEFLEET_AGENT_SYNC_INTERVAL_S": "0.2",
        "EDGEFLEET_AGENT_UPLOAD_BYTES_PER_S": str(CAP),
    }
    agent = _start(fleet, proxy, "o1", linear_model(tmp_path / "m.onnx", seed=5), env)
    spool_db, cloud_db = tmp_path / "o1" / "spool.db", fleet.trust.data_dir / "data.db"
    # Whatever was spooled while it came up is synced before the link goes.
    spool_id = read_spool(spool_db, readonly=True).spool_id
    wait_until(
        lambda: cursors(cloud_db, "o1", spool_id).get("telemetry", 0) > 0, 30, "a first sync"
    )
    _offline(proxy)
    before = read_spool(spool_db, readonly=True)
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)
    day = WINDOWS * WINDOW_S
    ids = _send(agent, x, 3000, day)
    time.sleep(0.5)  # the recorder's last batch and window
    backlog = read_spool(spool_db, readonly=True)
    telemetry_backlog = backlog.last["telemetry"]
    windows = telemetry_backlog - before.last["telemetry"]
    assert windows >= WINDOWS, f"{windows} telemetry rows written offline"
    assert backlog.last["captures"] == before.last["captures"] + len(ids)
    assert backlog.acked["captures"] == before.last["captures"]  # nothing went out
    payload = sum(len(r.SerializeToString()) for r in backlog.captures.values()) + sum(
        len(r.SerializeToString())
        for seq, r in backlog.telemetry.items()
        if seq > backlog.acked["telemetry"]
    )

    # Back online: watch the cloud's marks and the bytes through the proxy.
    samples: list[tuple[float, int, dict[str, int]]] = []
    up_before = proxy.counters.bytes_up
    proxy.faults.refuse = False
    reconnected = time.monotonic()
    deadline = reconnected + 120
    while time.monotonic() < deadline:
        marks = cursors(cloud_db, "o1", spool_id)
        samples.append((time.monotonic(), proxy.counters.bytes_up - up_before, marks))
        if marks.get("captures", 0) >= backlog.last["captures"]:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"the backlog did not arrive: {samples[-1]}\n{agent.log_tail()}")
    # Telemetry first: no capture of the backlog was stored before all its telemetry was.
    for _, _, marks in samples:
        if marks.get("captures", 0) > before.last["captures"]:
            assert marks.get("telemetry", 0) >= telemetry_backlog, marks
    # The cap held, from the first byte up to the last. Allowed beyond cap x time: the
    # bucket's second's worth, and one batch (at most a second's worth under a cap) whose
    # wait may have begun before the link came back; 10% more is TLS and HTTP/2 framing
    # and the agent's reports.
    first = next(t for t, sent, _ in samples if sent > 0)
    took, sent = samples[-1][0] - first, samples[-1][1]
    assert sent >= payload, (sent, payload)
    assert sent <= CAP * (took + 2.0) * 1.1, f"{sent} bytes in {took:.1f}s over a {CAP} B/s cap"
    assert took >= (payload - CAP) / CAP * 0.9, "the cap did not slow the upload down"

    agent.stop()
    exported = list(fleet.admin.export_captures("m"))
    report = fleet.admin.telemetry("m")
    fleet.cloud.stop()
    (held,) = read_cloud(cloud_db).values()
    # Complete and in order: the request ids in the order they were sent, each once, with
    # their labels; the cloud's ids follow the sequence numbers.
    offline = [r for r in exported if r.seq > before.last["captures"]]
    assert [r.request_id for r in offline] == ids
    assert [r.label for r in offline] == [f"class-{n % 3}" for n in range(len(ids))]
    assert [r.seq for r in held.captures] == list(range(1, backlog.last["captures"] + 1))
    assert [r.id for r in held.captures] == sorted(r.id for r in held.captures)
    # Every telemetry row, in order; every request counted once in the model's windows.
    through = held.through["telemetry"]
    assert [t.seq for t in held.telemetry] == list(range(1, through + 1))
    assert through >= telemetry_backlog and held.lost == {"captures": 0, "telemetry": 0}
    ends = [t.model.end if t.HasField("model") else t.device.end for t in held.telemetry]
    assert ends == sorted(ends)
    (version,) = report
    assert version.requests == version.captured == len(exported)
    figures.add("way back offline", "rows synced after a day offline", len(ids) + windows)
    print(
        f"\n{len(ids)} captures and {windows} telemetry rows offline ({payload} bytes); "
        f"{sent} bytes up in {took:.1f}s after reconnecting: {sent / took:.0f} B/s, "
        f"{sent / (took + 1):.0f} B/s counting the bucket's second (cap {CAP})"
    )


def test_a_full_spool_evicts_the_oldest_captures_counted_lost_never_telemetry(
    fleet: Fleet, proxy: TcpProxy, tmp_path: Path
) -> None:
    env = {
        "EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S": "0.05",
        "EDGEFLEET_AGENT_SYNC_INTERVAL_S": "0.2",
        "EDGEFLEET_AGENT_SPOOL_BUDGET_BYTES": str(BUDGET),
    }
    agent = _start(fleet, proxy, "b1", _image_model(tmp_path / "image.onnx"), env)
    spool_db, cloud_db = tmp_path / "b1" / "spool.db", fleet.trust.data_dir / "data.db"
    _offline(proxy)
    x = np.random.default_rng(1).normal(size=IMAGE).astype(np.float32)
    ids = _send(agent, x, 400, 4.0)
    time.sleep(0.5)
    offline = read_spool(spool_db, readonly=True)
    evicted = offline.dropped
    assert evicted > 0 and offline.written == len(ids)
    # The oldest went first: what is left is the newest, contiguous up to the last, and
    # it fills the budget (no more was evicted than room needed).
    assert sorted(offline.captures) == list(range(evicted + 1, len(ids) + 1))
    kept = sum(len(r.SerializeToString()) for r in offline.captures.values())
    assert kept >= BUDGET // 2, f"{kept} bytes of captures kept on a {BUDGET}-byte budget"
    files = sum(p.stat().st_size for p in spool_db.parent.glob("spool.db*"))
    assert files <= 2 * BUDGET, f"the spool takes {files} bytes on a {BUDGET} budget"

    proxy.faults.refuse = False
    wait_until(
        lambda: cursors(cloud_db, "b1", offline.spool_id).get("captures", 0) >= len(ids),
        60,
        "the newest captures synced",
    )
    time.sleep(0.3)  # a window or two more, with the spool's counts after the sync
    agent.stop()
    exported = list(fleet.admin.export_captures("m"))
    fleet.cloud.stop()
    held = read_cloud(cloud_db)[("b1", offline.spool_id)]

    # Telemetry written since took room too: a few more of the oldest captures may have
    # gone before the sync reached them.
    final = read_spool(spool_db)
    assert final.dropped >= evicted
    evicted = final.dropped
    # The cloud counts the evicted rows lost, stores the rest once, and keeps every
    # telemetry row.
    assert held.lost == {"captures": evicted, "telemetry": 0}
    assert [r.request_id for r in exported] == ids[evicted:]
    assert [r.seq for r in held.captures] == list(range(evicted + 1, len(ids) + 1))
    through = held.through["telemetry"]
    assert [t.seq for t in held.telemetry] == list(range(1, through + 1))
    assert sorted(final.telemetry) == list(range(through + 1, final.last["telemetry"] + 1))
    # Each device window counts the captures evicted in it: together, every one.
    dropped = [t.device.captures_dropped for t in held.telemetry if t.HasField("device")]
    dropped += [t.device.captures_dropped for t in final.telemetry.values()]
    assert sum(dropped) == evicted, dropped
    # A log line says what happened; the sync never failed over it.
    log = agent.log_path.read_text()
    found = re.findall(r"spool over its budget \(\d+ bytes\): evicted the (\d+) oldest", log)
    assert sum(int(n) for n in found) == evicted, found
    assert "sync:" not in log and "sync failed" not in log
    figures.add("way back offline", "captures evicted over the disk budget, counted", evicted)
    print(f"\n{len(ids)} captured offline on a {BUDGET}-byte budget: {evicted} evicted, counted")


def test_serving_goes_on_while_the_spool_cannot_sync(
    fleet: Fleet, proxy: TcpProxy, tmp_path: Path
) -> None:
    """Offline, a request is answered as fast as online: nothing on its path waits for the
    link (the sync runs on its own thread, off a spool the recorder writes in batches)."""
    env = {"EDGEFLEET_AGENT_SYNC_INTERVAL_S": "0.1"}
    agent = _start(fleet, proxy, "l1", linear_model(tmp_path / "m.onnx", seed=7), env)
    x = np.zeros((1, 8), np.float32)

    def timed() -> float:
        start = time.perf_counter()
        _send(agent, x, 200, 0.0)
        return time.perf_counter() - start

    timed()  # warm
    online = timed()
    proxy.faults.blackhole = True  # a dead route: the sync's calls hang until their deadline
    errors: list[BaseException] = []

    def measure() -> None:
        try:
            assert timed() < max(1.0, 3 * online)
        except BaseException as err:
            errors.append(err)

    worker = threading.Thread(target=measure)
    worker.start()
    worker.join(60)
    proxy.faults.blackhole = False
    assert not errors, errors
