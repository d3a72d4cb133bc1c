"""The cloud's end of A/B and shadow: Fleet.set_traffic checks everything before anything
moves, puts the variants in the desired states in one transaction, lets the devices read
their manifests, and the telemetry of shadows adds up to an agreement."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudsvc.errors import InvalidRequest, NotReady, UnknownResource
from cloudsvc.fleet import Fleet
from cloudsvc.ingest import _check_window
from cloudsvc.registry import Registry
from cloudsvc.store.memory import MemoryMetadataStore
from cloudsvc.store.sqlite import SqliteMetadataStore
from cloudsvc.telemetry import aggregate
from edgefleet.core.data import LatencyHistogram, ModelWindow, TelemetryRecord
from edgefleet.core.fleet import Assignment, TrafficVariant, Variant
from edgefleet.core.wire import to_proto
from protos.fleet.v1 import data_pb2

from .test_fleet import join

AB = TrafficVariant(2, 0.2)
SHADOW = TrafficVariant(2, 0.0, True)


@pytest.fixture
def two_versions(fleet: Fleet, registry: Registry, model_path: Path) -> Fleet:
    registry.push("clf", model_path)
    registry.push("clf", model_path)
    join(fleet, "a1", site="a")
    join(fleet, "a2", site="a")
    join(fleet, "b1", site="b")
    fleet.deploy("clf", 1)
    return fleet


def test_a_split_reaches_the_selected_devices_in_their_desired_state(
    two_versions: Fleet,
) -> None:
    fleet = two_versions
    v2 = fleet.registry.get_version("clf", 2).artifacts[0]
    assert fleet.set_traffic("clf", {"site": "a"}, [AB]) == [("a1", 2), ("a2", 2)]
    a1 = fleet.desired_state("a1").assignment("clf")
    assert a1 is not None and a1.version == 1
    assert a1.variants == (Variant(2, v2.target, v2.manifest_digest, 0.2, False),)
    assert fleet.desired_state("b1").assignment("clf").variants == ()  # type: ignore[union-attr]
    # The device may read the variant's manifest and chunks; another device may not.
    fleet.readable("a1", v2.manifest_digest)
    digests = fleet.desired_state("a1").digests()
    assert v2.manifest_digest in digests and a1.manifest_digest in digests
    # The same split again changes nothing; a shadow replaces it; empty clears it.
    assert fleet.set_traffic("clf", {"site": "a"}, [AB]) == []
    assert fleet.set_traffic("clf", {"site": "a"}, [SHADOW]) == [("a1", 3), ("a2", 3)]
    assert fleet.desired_state("a2").assignment("clf").variants[0].shadow  # type: ignore[union-attr]
    assert fleet.set_traffic("clf", {"site": "a"}, []) == [("a1", 4), ("a2", 4)]
    assert fleet.desired_state("a1").assignment("clf").variants == ()  # type: ignore[union-attr]
    # A device may send telemetry of a version it served beside (v2 was never its primary).
    assert fleet.metadata.peaks("a1") == {"clf": 2}


def test_validation_errors_say_what_to_fix_and_nothing_moves(
    two_versions: Fleet, registry: Registry, model_path: Path
) -> None:
    fleet = two_versions
    before = {d: fleet.desired_state(d).generation for d in ("a1", "a2", "b1")}
    cases: list[tuple[type[Exception], str, str, list[TrafficVariant]]] = [
        (UnknownResource, "no model is named", "nope", [AB]),
        (UnknownResource, "no version 9", "clf", [TrafficVariant(9, 0.1)]),
        (InvalidRequest, r"outside \[0, 1\)", "clf", [TrafficVariant(2, 1.5)]),
        (InvalidRequest, r"outside \[0, 1\)", "clf", [TrafficVariant(2, -0.1)]),
        (InvalidRequest, r"outside \[0, 1\)", "clf", [TrafficVariant(2, float("nan"))]),
        (InvalidRequest, "weight 0 and is no shadow", "clf", [TrafficVariant(2, 0.0)]),
        (InvalidRequest, "a shadow with weight", "clf", [TrafficVariant(2, 0.3, True)]),
        (InvalidRequest, "at most 2 versions", "clf", [AB, TrafficVariant(3, 0.1)]),
        (InvalidRequest, "as its primary", "clf", [TrafficVariant(1, 0.5)]),
        (InvalidRequest, "names no version", "clf", [TrafficVariant(0, 0.5)]),
    ]
    for error, message, model, variants in cases:
        with pytest.raises(error, match=message):
            fleet.set_traffic(model, {}, variants)
    with pytest.raises(NotReady, match="no device matches"):
        fleet.set_traffic("clf", {"site": "zzz"}, [AB])
    registry.push("det", model_path)
    with pytest.raises(NotReady, match="runs det: deploy it first"):
        fleet.set_traffic("det", {}, [TrafficVariant(1, 0.5)])
    assert {d: fleet.desired_state(d).generation for d in before} == before


def test_any_share_below_one_is_a_split() -> None:
    from cloudsvc.fleet import _check_split

    for share in (1e-6, 0.5, 0.999):
        _check_split([TrafficVariant(2, share)])
    _check_split([])


def test_sqlite_store_keeps_variants_and_allows_their_digests(tmp_path: Path) -> None:
    store = SqliteMetadataStore(tmp_path / "meta.db")
    memory = MemoryMetadataStore()
    variant = Variant(4, "onnx-cpu-fp32", "cd" * 32, 0.25)
    for s in (store, memory):
        s.assign({"d1": Assignment("m", 3, "onnx-cpu-fp32", "ab" * 32, variants=(variant,))})
        assert s.get_desired("d1").assignment("m").variants == (variant,)  # type: ignore[union-attr]
        assert s.allowed_digests("d1") == {"ab" * 32, "cd" * 32}
        assert s.peaks("d1") == {"m": 4}


def window(requests: int, compared: int, agreed: int, version: int = 2) -> ModelWindow:
    latency = LatencyHistogram((), (requests,) + (0,) * 24, 1.0 * requests)
    return ModelWindow(
        "m", version, 10.0, 20.0, requests, 0, latency, compared=compared, agreed=agreed,
        compared_with=1,
    )  # fmt: skip


def test_ingest_refuses_impossible_agreement_counts() -> None:
    _check_window(1, to_proto(window(10, 10, 7), data_pb2.ModelWindow))
    for requests, compared, agreed in ((10, 10, 11), (10, 11, 3)):
        row = to_proto(window(requests, compared, agreed), data_pb2.ModelWindow)
        with pytest.raises(InvalidRequest, match="agreed of"):
            _check_window(1, row)


def test_telemetry_aggregates_agreement_per_version() -> None:
    rows = [
        TelemetryRecord(1, window(10, 10, 7), device_id="d1"),
        TelemetryRecord(2, window(30, 30, 30), device_id="d2"),
        TelemetryRecord(3, window(50, 0, 0, version=1), device_id="d1"),
    ]
    v2, v1 = aggregate(rows)
    assert (v2.compared, v2.agreed, v2.compared_with) == (40, 37, 1)
    assert v2.agreement == pytest.approx(37 / 40)
    assert v1.agreement is None and v1.compared == 0
