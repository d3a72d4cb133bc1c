"""The worker-process mode (inference_workers > 1), for real: an agent whose two worker
processes share the inference port, serving a real ONNX model the (fake, in-process) cloud
deploys, and switching version together while a client hammers it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from agent.daemon import Agent
from agent.errors import ArtifactRejected
from agent.inference import workers as workers_module
from agent.inference.shm import SHM_ROOT
from agent.inference.worker import WorkerConfig
from agent.inference.workers import WorkerPool, WorkerRepository, reuse_port_supported
from agent.runtime import LoadedModel, ModelRepository, SessionOptions, load_model
from agent.settings import AgentSettings
from edgefleet.core.fleet import ReportedState, Variant
from edgefleet.core.tensors import to_raw
from protos.artifact.v1 import artifact_pb2
from protos.inference.v2 import grpc_predict_v2_pb2 as pb
from protos.inference.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.agent.fakes import WIDTH, FakeCloud, build_artifact, model_bytes

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not reuse_port_supported(),
    reason="inference workers share the port with SO_REUSEPORT (Linux)",
)

OPTIONS = SessionOptions(providers=("CPUExecutionProvider",), intra_op_threads=1)
# A connection of its own for each channel: gRPC otherwise shares one between the channels
# of a process that name the same target, and every request would reach one worker.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION)


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout} s: {what or 'the condition'}")
        time.sleep(0.05)


def request(model: str = "m", key: str = "") -> pb.ModelInferRequest:
    x = np.zeros((1, WIDTH), dtype=np.float32)
    r = pb.ModelInferRequest(model_name=model, raw_input_contents=[to_raw(x)])
    r.inputs.add(name="x", datatype="FP32", shape=[1, WIDTH])
    if key:
        r.parameters["routing_key"].string_param = key
    return r


def infer(port: int, n: int = 1, *, key: str = "") -> list[str]:
    """`n` requests on one new connection; the version of each answer."""
    with channel(port) as c:
        stub = pb_grpc.GRPCInferenceServiceStub(c)
        return [stub.ModelInfer(request(key=key), timeout=10).model_version for _ in range(n)]


def rest_infer(port: int, key: str) -> str:
    """A KServe v2 REST inference on a new connection; the version that answered."""
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, WIDTH], "data": [0.0] * WIDTH}],
        "parameters": {"routing_key": key},
    }
    post = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/m/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(post, timeout=10) as answer:
        return str(json.loads(answer.read())["model_version"])


def statistics(port: int, model: str = "m") -> dict[str, int]:
    """Successful requests by version, as ModelStatistics answers on a new connection."""
    with channel(port) as c:
        stub = pb_grpc.GRPCInferenceServiceStub(c)
        answer = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return {s.version: s.inference_stats.success.count for s in answer.model_stats}


def scrape(port: int) -> dict[str, float]:
    """The /metrics samples, by name and labels as printed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def synced_requests(cloud: FakeCloud, model: str = "m") -> int:
    return sum(
        t.model.requests
        for t in list(cloud.synced_telemetry.values())
        if t.WhichOneof("body") == "model" and t.model.model == model
    )


@pytest.fixture
def worker_settings(settings: AgentSettings) -> AgentSettings:
    return settings.model_copy(
        update={
            "inference_workers": 2,
            "rest_port": 0,
            "metrics_port": 0,
            "telemetry_interval_s": 0.3,
            "sync_interval_s": 0.2,
        }
    )


@pytest.fixture
def agent(worker_settings: AgentSettings, cloud: FakeCloud) -> Iterator[Agent]:
    a = Agent(worker_settings, link=cloud)
    a.start()
    try:
        yield a
    finally:
        a.stop()


class Hammer:
    """Client threads sending requests, a few on each new connection, until stopped; each
    answer's version with the time its request was sent."""

    def __init__(self, port: int, threads: int = 4, per_connection: int = 4) -> None:
        self.port = port
        self.per_connection = per_connection
        self.answers: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            with channel(self.port) as c:
                stub = pb_grpc.GRPCInferenceServiceStub(c)
                for _ in range(self.per_connection):
                    sent = time.monotonic()
                    try:
                        version = stub.ModelInfer(request(), timeout=10).model_version
                    except grpc.RpcError as err:
                        with self._lock:
                            self.errors.append(f"{err.code()}: {err.details()}")
                        continue
                    with self._lock:
                        self.answers.append((sent, version))

    @property
    def sent(self) -> int:
        with self._lock:
            return len(self.answers) + len(self.errors)


def test_both_workers_answer_switch_together_and_every_request_is_counted_once(
    agent: Agent, cloud: FakeCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert agent.workers is not None and len(set(agent.workers.pids)) == 2
    cloud.assign(build_artifact(tmp_path, cloud.key, "m", 1))
    wait_for(lambda: agent.repository.names() == ["m"], what="v1 served")
    port = agent.inference_port

    # Many connections: the kernel spreads them over both workers.
    with ThreadPoolExecutor(8) as pool:
        first = [v for answers in pool.map(lambda _: infer(port, 3), range(40)) for v in answers]
    assert first == ["1"] * 120
    per_worker = [w.requests for w in agent.workers.figures().workers]
    assert sum(per_worker) == 120 and min(per_worker) > 0, per_worker
    metrics = scrape(agent.metrics.port)  # type: ignore[union-attr]
    assert metrics["edgefleet_agent_inference_workers"] == 2
    assert [
        metrics[f'edgefleet_inference_worker_requests_total{{worker="{i}"}}'] for i in (0, 1)
    ] == [float(n) for n in per_worker]

    # v2 while a client hammers: once the agent reports v2, no answer is v1.
    reported: list[float] = []
    report_state = cloud.report_state

    def watch_reports(report: ReportedState) -> int:
        if not reported and any(m.model == "m" and m.active_version == 2 for m in report.models):
            reported.append(time.monotonic())
        return report_state(report)

    monkeypatch.setattr(cloud, "report_state", watch_reports)
    # The switch reaches worker 1 a second late (a busy worker): the report waits for it,
    # and worker 1 serves v1 meanwhile, to requests sent before the report only.
    send = workers_module._Process.send
    late: list[int] = []

    def send_late(proc: workers_module._Process, message: tuple[object, ...]) -> None:
        if message[1] == "publish" and proc.pid == pids[1] and not late:
            late.append(proc.pid)
            threading.Timer(1.0, send, (proc, message)).start()
        else:
            send(proc, message)

    pids = agent.workers.pids
    monkeypatch.setattr(workers_module._Process, "send", send_late)
    with Hammer(port) as hammer:
        wait_for(lambda: hammer.sent > 50, what="requests on v1")
        cloud.assign(build_artifact(tmp_path, cloud.key, "m", 2))
        wait_for(lambda: bool(reported), what="v2 reported")
        at = hammer.sent
        wait_for(lambda: hammer.sent > at + 100, what="requests after the report")
    assert not hammer.errors
    after = [version for sent, version in hammer.answers if sent > reported[0]]
    assert len(after) >= 90 and set(after) == {"2"}
    assert {v for _, v in hammer.answers} == {"1", "2"} and late

    # Every request counted once: Triton's statistics (whichever worker answers them, as
    # each sums the shared counters), /metrics, and the telemetry synced to the cloud.
    total = 120 + len(hammer.answers)
    by_version = statistics(port)
    assert sum(by_version.values()) == total
    assert all(statistics(port) == by_version for _ in range(6))
    assert sum(w.requests for w in agent.workers.figures().workers) == total

    def counted() -> float:
        m = scrape(agent.metrics.port)  # type: ignore[union-attr]
        return sum(v for k, v in m.items() if k.startswith("edgefleet_inference_requests_total"))

    wait_for(lambda: counted() == total, what=f"/metrics counting {total}")
    wait_for(lambda: synced_requests(cloud) == total, what=f"telemetry counting {total}")
    time.sleep(1.0)  # nothing more arrives later (counted twice)
    assert counted() == total and synced_requests(cloud) == total
    # The device windows carry the workers' CPU time and memory.
    devices = [
        t.device for t in cloud.synced_telemetry.values() if t.WhichOneof("body") == "device"
    ]
    assert sum(d.cpu_seconds for d in devices) > 0


def test_ab_keys_stay_sticky_across_workers(agent: Agent, cloud: FakeCloud, tmp_path: Path) -> None:
    cloud.assign(build_artifact(tmp_path, cloud.key, "m", 1))
    v2 = build_artifact(tmp_path, cloud.key, "m", 2)
    cloud.publish(v2)
    cloud.variants["m"] = (Variant(2, "onnx-cpu-fp32", v2.digest, weight=0.5),)
    cloud.generation += 1
    agent.reconciler.wake()
    wait_for(lambda: agent.repository.traffic("m").slices != (), what="the A/B split served")
    port = agent.inference_port
    keys = [f"camera-{i}" for i in range(24)]
    # Each key on 6 new connections (the kernel spreads them over both workers).
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda k: (k, [infer(port, 1, key=k)[0] for _ in range(6)]), keys))
    assert all(len(set(versions)) == 1 for _, versions in answers), answers
    assert {versions[0] for _, versions in answers} == {"1", "2"}
    # The REST port too: served by the same workers, the same version for a key.
    assert agent.rest_port is not None
    for key, versions in answers[:8]:
        assert rest_infer(agent.rest_port, key) == versions[0]
    assert agent.workers is not None
    assert min(w.requests for w in agent.workers.figures().workers) > 0


def test_a_killed_worker_is_restarted_and_serving_goes_on(
    agent: Agent, cloud: FakeCloud, tmp_path: Path
) -> None:
    pool = agent.workers
    assert pool is not None
    cloud.assign(build_artifact(tmp_path, cloud.key, "m", 1))
    wait_for(lambda: agent.repository.names() == ["m"], what="v1 served")
    port = agent.inference_port
    for _ in range(20):
        infer(port, 2)
    victim = pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    answered = 40
    deadline = time.monotonic() + 30
    while pool.restarts < 1 or 0 in pool.pids:
        assert time.monotonic() < deadline, "the worker was not restarted"
        # The other worker serves all along (a connection the killed one held fails).
        with contextlib.suppress(grpc.RpcError):
            answered += len(infer(port, 1))
        time.sleep(0.02)
    assert pool.pids[0] not in (0, victim) and pool.restarts == 1
    with ThreadPoolExecutor(8) as workers:
        answered += sum(len(a) for a in workers.map(lambda _: infer(port, 3), range(30)))
    # What the killed worker counted stays counted (its shared counters outlive it).
    assert sum(statistics(port).values()) == answered
    figures = pool.figures()
    assert figures.serving == 2 and min(w.requests for w in figures.workers) > 0
    metrics = scrape(agent.metrics.port)  # type: ignore[union-attr]
    assert metrics["edgefleet_agent_inference_worker_restarts_total"] == 1


def _pool(repository: WorkerRepository, count: int = 2) -> WorkerPool:
    config = WorkerConfig(count=count, host="127.0.0.1", port=0, stats_dir="", options=OPTIONS)
    return WorkerPool(repository, config, command_timeout_s=60)


def test_a_worker_that_cannot_load_fails_the_activation_everywhere(tmp_path: Path) -> None:
    for version in (1, 2):
        (tmp_path / f"m{version}.onnx").write_bytes(model_bytes(float(version)))
    repository = WorkerRepository()
    repository.publish(load_model("m", 1, "d1", tmp_path / "m1.onnx", OPTIONS))
    pool = _pool(repository)
    pool.start()
    try:
        folder = tmp_path / "v2"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(model_bytes(2.0))

        def loads_here_only(
            manifest: artifact_pb2.Manifest, digest: str, where: Path, options: SessionOptions
        ) -> LoadedModel:
            model = load_model("m", 2, digest, where / "model.onnx", options)
            (where / "model.onnx").write_bytes(b"not a model")  # what the workers find
            return model

        manifest = artifact_pb2.Manifest(model="m", version=2, entrypoint="model.onnx")
        with pytest.raises(ArtifactRejected, match="did not load in every inference worker"):
            pool.loader(loads_here_only)(manifest, "d2", folder, OPTIONS)
        with ThreadPoolExecutor(8) as workers:
            versions = {v for a in workers.map(lambda _: infer(pool.port, 2), range(20)) for v in a}
        assert versions == {"1"} and repository.default_version("m") == 1
        assert min(w.requests for w in pool.figures().workers) > 0  # both asked, both v1
        # A version every worker loads switches everywhere.
        (folder / "model.onnx").write_bytes(model_bytes(2.0))
        loaded = pool.loader(lambda m, d, f, o: load_model("m", 2, d, f / "model.onnx", o))(
            manifest, "d2", folder, OPTIONS
        )
        repository.publish(loaded, keep=[1])
        with ThreadPoolExecutor(8) as workers:
            versions = {v for a in workers.map(lambda _: infer(pool.port, 2), range(20)) for v in a}
        assert versions == {"2"}
    finally:
        pool.stop(1)


@pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="no /dev/shm here")
def test_shared_memory_regions_work_per_connection_in_each_worker(tmp_path: Path) -> None:
    (tmp_path / "m1.onnx").write_bytes(model_bytes(1.0))
    repository = WorkerRepository()
    repository.publish(load_model("m", 1, "d1", tmp_path / "m1.onnx", OPTIONS))
    pool = _pool(repository)
    pool.start()
    key = f"edgefleet-test-{uuid.uuid4().hex[:12]}"
    (SHM_ROOT / key).write_bytes(np.full((1, WIDTH), 2.0, np.float32).tobytes())
    try:

        def through_shared_memory(_: int) -> float:
            with channel(pool.port) as c:
                stub = pb_grpc.GRPCInferenceServiceStub(c)
                stub.SystemSharedMemoryRegister(
                    pb.SystemSharedMemoryRegisterRequest(
                        name="frame", key=f"/{key}", byte_size=4 * WIDTH
                    ),
                    timeout=10,
                )
                r = pb.ModelInferRequest(model_name="m")
                x = r.inputs.add(name="x", datatype="FP32", shape=[1, WIDTH])
                x.parameters["shared_memory_region"].string_param = "frame"
                x.parameters["shared_memory_byte_size"].int64_param = 4 * WIDTH
                y = stub.ModelInfer(r, timeout=10).raw_output_contents[0]
                return float(np.frombuffer(y, np.float32)[0])

        # Each connection registers its own region and uses it, on whichever worker serves it.
        with ThreadPoolExecutor(6) as workers:
            assert list(workers.map(through_shared_memory, range(12))) == [3.0] * 12
        assert min(w.requests for w in pool.figures().workers) > 0
    finally:
        (SHM_ROOT / key).unlink()
        pool.stop(1)


def test_a_second_agent_cannot_join_the_port(tmp_path: Path) -> None:
    (tmp_path / "m1.onnx").write_bytes(model_bytes(1.0))
    repository = WorkerRepository()
    repository.publish(load_model("m", 1, "d1", tmp_path / "m1.onnx", OPTIONS))
    first = _pool(repository, count=1)
    first.start()
    try:
        other = WorkerPool(
            WorkerRepository(),
            WorkerConfig(count=2, host="127.0.0.1", port=first.port, stats_dir="", options=OPTIONS),
        )
        with pytest.raises(Exception, match="another agent's inference workers"):
            other.start()
    finally:
        first.stop(0)


def test_the_workers_end_with_the_control_process(tmp_path: Path) -> None:
    """`edgefleet agent run --inference-workers 2`, then SIGKILL: the workers follow."""
    port_file = tmp_path / "port"
    env = {**os.environ, "EDGEFLEET_AGENT_PROVIDERS": '["CPUExecutionProvider"]'}
    control = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.cli", "agent", "run", "--cloud", "127.0.0.1:1",
         "--insecure", "--data-dir", str(tmp_path / "agent"), "--inference-port", "0",
         "--inference-workers", "2", "--port-file", str(port_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: port_file.exists() or control.poll() is not None, timeout=60)
        assert control.poll() is None, control.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        port = int(port_file.read_text())
        workers = [
            p
            for p in psutil.Process(control.pid).children()
            if "spawn_main" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            live = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                pb.ServerLiveRequest(), timeout=10
            )
        assert live.live
        control.kill()
        control.wait()
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers {[p.pid for p in alive]} outlived the control process"
    finally:
        if control.poll() is None:
            control.kill()
            control.wait()
        if control.stderr is not None:
            control.stderr.close()


def test_one_worker_is_the_single_process(settings: AgentSettings) -> None:
    """The default stays one process: no pool, the plain repository."""
    assert settings.inference_workers == 1
    agent = Agent(settings)
    assert agent.workers is None and type(agent.repository) is ModelRepository
