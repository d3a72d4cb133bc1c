"""A/B and shadow on one device, for real: a gRPC server on loopback over ONNX Runtime
sessions of two classifiers with different weights, called through the client."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from agent.inference.server import InferenceServer, start_inference_server
from agent.inference.shadow import agree
from agent.recorder import Recorder
from agent.runtime import LoadedModel, ModelRepository, SessionOptions, bucket, load_model
from agent.spool import TELEMETRY, Spool
from edgefleet.client.inference import InferenceClient
from edgefleet.core.data import ModelWindow, TelemetryRecord
from edgefleet.core.fleet import Variant
from edgefleet.core.wire import from_proto
from protos.fleet.v1 import data_pb2
from tests.onnx_models import expected_logits, linear_model

FEATURES = 8


def load(tmp_path: Path, version: int, seed: int) -> LoadedModel:
    path = linear_model(tmp_path / f"v{version}-{seed}.onnx", features=FEATURES, seed=seed)
    return load_model("clf", version, f"{version:064x}", path, SessionOptions(intra_op_threads=1))


def split(share: float, *, shadow: bool = False, version: int = 2) -> tuple[Variant, ...]:
    return (Variant(version, "onnx-cpu-fp32", f"{version:064x}", share, shadow),)


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repository = ModelRepository()
    repository.publish(load(tmp_path, 1, seed=1))
    repository.add(load(tmp_path, 2, seed=2))
    return repository


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[Recorder]:
    spool = Spool(tmp_path / "spool.db")
    yield Recorder(spool, telemetry_interval_s=3600)
    spool.close()


@pytest.fixture
def server(repo: ModelRepository, recorder: Recorder) -> Iterator[InferenceServer]:
    running = start_inference_server(repo, "127.0.0.1", 0, max_workers=8, recorder=recorder)
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def client(server: InferenceServer) -> Iterator[InferenceClient]:
    with InferenceClient(f"127.0.0.1:{server.port}") as c:
        yield c


def x_of(n: int, rows: int = 1) -> npt.NDArray[np.float32]:
    return np.random.default_rng(n).normal(size=(rows, FEATURES)).astype(np.float32)


def test_ab_split_holds_its_weight_over_10000_requests(
    repo: ModelRepository, client: InferenceClient
) -> None:
    share, n = 0.3, 10_000
    repo.set_traffic("clf", split(share))
    request = client.prepare("clf", {"x": x_of(0)})
    served = [client.infer_prepared(request).model_version for _ in range(n)]
    to_v2 = served.count("2")
    assert set(served) == {"1", "2"}
    # Binomial: within 4 standard deviations (a false alarm about once in 16,000 runs).
    sigma = math.sqrt(n * share * (1 - share))
    assert abs(to_v2 - n * share) < 4 * sigma, (to_v2, n * share, sigma)


def test_routing_key_is_sticky_and_keys_split_by_weight(
    repo: ModelRepository, client: InferenceClient
) -> None:
    share = 0.25
    repo.set_traffic("clf", split(share))
    x = {"x": x_of(1)}
    for key in ("camera-7", "user-42", "session-x"):
        seen = {client.infer("clf", x, routing_key=key).model_version for _ in range(30)}
        assert len(seen) == 1, (key, seen)
        assert seen == {"2" if bucket(key) < share else "1"}
    keys = [f"user-{i}" for i in range(4000)]
    sigma = math.sqrt(len(keys) * share * (1 - share))
    on_v2 = sum(repo.route("clf", k)[0].version == 2 for k in keys)
    assert abs(on_v2 - len(keys) * share) < 4 * sigma
    # A larger share only adds keys to the variant: those on it stay on it.
    before = {k for k in keys if repo.route("clf", k)[0].version == 2}
    repo.set_traffic("clf", split(0.5))
    after = {k for k in keys if repo.route("clf", k)[0].version == 2}
    assert before <= after and len(after) > len(before)


def test_explicit_versions_are_still_addressed(
    repo: ModelRepository, client: InferenceClient, tmp_path: Path
) -> None:
    repo.set_traffic("clf", split(0.5))
    x = x_of(2, rows=3)
    for version, seed in ((1, 1), (2, 2)):
        for key in ("a", "b", "c", ""):
            result = client.infer("clf", {"x": x}, version=version, routing_key=key)
            assert result.model_version == str(version)
            reference = expected_logits(tmp_path / f"v{version}-{seed}.onnx", x)
            np.testing.assert_allclose(result.outputs["logits"], reference, rtol=1e-5)


def test_routing_key_must_be_a_short_string(client: InferenceClient) -> None:
    from edgefleet.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="routing_key"):
        client.infer("clf", {"x": x_of(0)}, routing_key="k" * 300)


def windows(recorder: Recorder) -> dict[int, ModelWindow]:
    """The recorder's model windows now, by version, as the spool holds them."""
    recorder.flush_telemetry()
    pending = recorder.spool.pending(TELEMETRY, 100, 1 << 20)
    assert pending is not None
    rows = [
        from_proto(data_pb2.TelemetryRecord.FromString(b), TelemetryRecord) for b in pending.bodies
    ]
    return {r.model.version: r.model for r in rows if r.model is not None}


def test_shadow_answers_nothing_and_its_agreement_is_counted(
    repo: ModelRepository,
    server: InferenceServer,
    client: InferenceClient,
    recorder: Recorder,
    tmp_path: Path,
) -> None:
    repo.set_traffic("clf", split(0.0, shadow=True))
    xs = [x_of(100 + n) for n in range(200)]
    for x in xs:
        result = client.infer("clf", {"x": x})
        # Always the primary's answer, never the shadow's.
        assert result.model_version == "1"
        np.testing.assert_allclose(
            result.outputs["logits"], expected_logits(tmp_path / "v1-1.onnx", x), rtol=1e-5
        )
    assert server.shadow.drain()
    stats = server.shadow.stats
    assert stats.run + stats.skipped == len(xs) and stats.failed == 0
    # Two classifiers with different weights: the same class sometimes, not always.
    assert 0 < stats.agreed < stats.compared
    seen = windows(recorder)
    w1, w2 = seen[1], seen[2]
    assert (w1.requests, w1.compared) == (len(xs), 0)
    assert (w2.requests, w2.compared, w2.agreed, w2.compared_with) == (
        stats.run,
        stats.compared,
        stats.agreed,
        1,
    )
    assert w2.latency.count == stats.run and w2.latency.sum_ms > 0
    if not stats.skipped:  # every copy compared: the count is exact
        batch = np.concatenate(xs)
        v1, v2 = (expected_logits(tmp_path / p, batch) for p in ("v1-1.onnx", "v2-2.onnx"))
        assert stats.agreed == int((v1.argmax(axis=1) == v2.argmax(axis=1)).sum())


def test_same_weights_agree_always(
    repo: ModelRepository, server: InferenceServer, client: InferenceClient, tmp_path: Path
) -> None:
    repo.add(load(tmp_path, 3, seed=1))  # v1's weights again
    repo.set_traffic("clf", split(0.0, shadow=True, version=3))
    for n in range(50):
        client.infer("clf", {"x": x_of(n)})
    assert server.shadow.drain()
    assert server.shadow.stats.agreed == server.shadow.stats.compared > 0


class Slow:
    """A shadow model that takes `delay` seconds per run and then answers as `model`."""

    def __init__(self, model: LoadedModel, delay: float) -> None:
        self.model, self.delay = model, delay
        self.name, self.version, self.digest = model.name, model.version, model.digest
        self.started = threading.Event()

    def run(self, feeds: object, names: object = None) -> list[npt.NDArray[np.generic]]:
        self.started.set()
        time.sleep(self.delay)
        return self.model.run(feeds, names)  # type: ignore[arg-type]


def test_a_slow_shadow_does_not_slow_answers_and_a_full_queue_skips(
    repo: ModelRepository, tmp_path: Path
) -> None:
    slow = Slow(load(tmp_path, 2, seed=2), delay=0.2)
    repo.add(slow)  # type: ignore[arg-type]
    repo.set_traffic("clf", split(0.0, shadow=True))
    server = start_inference_server(repo, "127.0.0.1", 0, max_workers=4)
    server._servicer.shadow.stop()  # a small queue for the test
    from agent.inference.shadow import ShadowRunner

    server._servicer.shadow = ShadowRunner(None, queue_size=2)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as c:
            started = time.perf_counter()
            for n in range(20):
                assert c.infer("clf", {"x": x_of(n)}).model_version == "1"
            elapsed = time.perf_counter() - started
        # 20 shadow runs would take 4 s; the answers did not wait for them.
        assert elapsed < 2.0, elapsed
        stats = server.shadow.stats
        assert stats.skipped >= 15 and stats.queued <= 5
    finally:
        server.stop(grace=0.5)


def test_a_failing_shadow_is_counted_and_the_primary_answers(
    repo: ModelRepository,
    server: InferenceServer,
    client: InferenceClient,
    recorder: Recorder,
    tmp_path: Path,
) -> None:
    # A shadow built for 4 features: every copy of an 8-feature request fails inside ONNX
    # Runtime, as a version with another signature would.
    path = linear_model(tmp_path / "narrow.onnx", features=4, seed=3)
    repo.add(load_model("clf", 2, "2" * 64, path, SessionOptions(intra_op_threads=1)))
    repo.set_traffic("clf", split(0.0, shadow=True))
    for n in range(10):
        assert client.infer("clf", {"x": x_of(n)}).model_version == "1"
    assert server.shadow.drain()
    stats = server.shadow.stats
    assert stats.failed == 10 and stats.compared == 0
    w2 = windows(recorder)[2]
    assert (w2.requests, w2.errors, w2.compared) == (10, 10, 0)


def test_an_unloaded_variant_leaves_its_share_to_the_primary(tmp_path: Path) -> None:
    repository = ModelRepository()
    repository.publish(load(tmp_path, 1, seed=1))
    repository.set_traffic("clf", split(0.9))  # v2 never loaded (its download failed, say)
    assert {repository.route("clf", str(k))[0].version for k in range(200)} == {1}


def test_agreement_rules() -> None:
    a = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    assert agree([a], [a * 3])  # scaled scores, same classes
    assert not agree([a], [a[:, ::-1]])
    assert not agree([a], [a[:1]])  # another shape
    y = np.array([1.0, 2.0, 3.0], dtype=np.float32)  # not a classifier's: closeness
    assert agree([y], [y + 1e-5]) and not agree([y], [y + 0.1])
    labels = np.array([3, 1], dtype=np.int64)
    assert agree([labels], [labels.copy()]) and not agree([labels], [labels[::-1]])
