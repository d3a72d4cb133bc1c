"""TensorRT cannot be installed on these machines. The builder code is exercised here
against a FAKE `tensorrt` module that records the calls (a unit test of the call sequence
written from TensorRT's documented Python API, not of TensorRT itself); the selection and
error paths run for real."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from compilers.compile import compile_target
from compilers.errors import CompileError, TargetUnavailableError
from compilers.tensorrt import BatchProfile, build_engine, tensorrt_available
from tests.compilers.models import conv_model


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []


def fake_tensorrt(
    recorder: _Recorder, *, input_shape: tuple[int, ...], parses: bool = True
) -> types.ModuleType:
    """A stand-in exposing only the API surface build_engine uses, recording each call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"  # type: ignore[attr-defined]
    rec = recorder.calls

    class Logger:
        WARNING = "warning"

        def __init__(self, level: str) -> None:
            rec.append(("Logger", level))

    class Tensor:
        name = "image"
        shape = input_shape

    class Network:
        num_inputs = 1

        def get_input(self, index: int) -> Tensor:
            return Tensor()

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data + b"+timings"

    class Config:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            rec.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag: str) -> None:
            rec.append(("set_flag", flag))

        def add_optimization_profile(self, profile: Profile) -> int:
            rec.append(("add_optimization_profile", dict(profile.shapes)))
            return 0

        def create_timing_cache(self, data: bytes) -> TimingCache:
            rec.append(("create_timing_cache", data))
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            rec.append(("set_timing_cache", ignore_mismatch))
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            assert self.cache is not None
            return self.cache

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[Any, ...]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger: Logger) -> None:
            rec.append(("Builder",))

        def create_network(self, flags: int) -> Network:
            rec.append(("create_network", flags))
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            rec.append(("build_serialized_network",))
            return b"ENGINE"

    class OnnxParser:
        num_errors = 0 if parses else 1

        def __init__(self, network: Network, logger: Logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            rec.append(("parse_from_file", Path(path).name))
            return parses

        def get_error(self, index: int) -> str:
            return "Unsupported ONNX op FancyOp"

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Builder = Builder  # type: ignore[attr-defined]
    trt.OnnxParser = OnnxParser  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16")  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    return trt


def test_fake_builder_call_sequence_fp16_profile_and_timing_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder()
    monkeypatch.setitem(
        sys.modules, "tensorrt", fake_tensorrt(recorder, input_shape=(-1, 3, 16, 16))
    )
    source = conv_model(tmp_path / "model.onnx")
    cache = tmp_path / "cache" / "timing.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"previous")

    engine = build_engine(
        source, tmp_path / "out" / "model.plan", timing_cache=cache, batch=BatchProfile(1, 4, 32)
    )

    assert engine.read_bytes() == b"ENGINE"
    assert cache.read_bytes() == b"previous+timings"  # loaded, then saved after the build
    names = [c[0] for c in recorder.calls]
    assert names.index("parse_from_file") < names.index("build_serialized_network")
    assert ("create_network", 0) in recorder.calls  # TensorRT 10: explicit batch implied
    assert ("set_flag", "FP16") in recorder.calls
    assert ("create_timing_cache", b"previous") in recorder.calls
    assert ("set_timing_cache", False) in recorder.calls
    assert (
        "add_optimization_profile",
        {"image": ((1, 3, 16, 16), (4, 3, 16, 16), (32, 3, 16, 16))},
    ) in recorder.calls


def test_fake_builder_reports_parser_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_tensorrt(_Recorder(), input_shape=(-1, 3, 16, 16), parses=False)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    source = conv_model(tmp_path / "model.onnx")
    with pytest.raises(CompileError, match="Unsupported ONNX op FancyOp"):
        build_engine(source, tmp_path / "model.plan", timing_cache=tmp_path / "t.cache")


def test_fake_builder_refuses_inputs_without_a_dynamic_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        sys.modules, "tensorrt", fake_tensorrt(_Recorder(), input_shape=(1, 3, 16, 16))
    )
    source = conv_model(tmp_path / "model.onnx")
    with pytest.raises(CompileError, match="dynamic batch"):
        build_engine(source, tmp_path / "model.plan", timing_cache=tmp_path / "t.cache")


def test_compile_target_selects_the_engine_builder_when_tensorrt_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder()
    monkeypatch.setitem(
        sys.modules, "tensorrt", fake_tensorrt(recorder, input_shape=(-1, 3, 16, 16))
    )
    source = conv_model(tmp_path / "model.onnx")
    scores = iter([0.9, 0.895])  # the source, then the engine
    artifact = compile_target(
        source,
        "tensorrt-fp16",
        tmp_path / "out",
        evaluate=lambda _path: next(scores),
        timing_cache=tmp_path / "t.cache",
    )
    assert list(artifact.files) == ["model.plan"] and artifact.format == "tensorrt-plan"
    assert artifact.metrics["accuracy_drop"] == pytest.approx(0.005)
    assert artifact.steps == ("tensorrt-engine-fp16",)


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_compile_target_refuses_tensorrt_before_any_work_where_it_is_missing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    with pytest.raises(TargetUnavailableError, match="use onnx-gpu-fp16 or onnx-cpu-fp32"):
        compile_target(tmp_path / "missing.onnx", "tensorrt-fp16", out)
    assert not out.exists()
