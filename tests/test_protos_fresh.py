"""The checked-in generated code must be what the pinned generator makes of the .protos."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the protos")
    gen = _load_generator()
    gen.generate(tmp_path, ROOT)
    fresh = sorted(
        p.relative_to(tmp_path)
        for p in (tmp_path / "protos").rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    )
    checked_in = sorted(
        p.relative_to(ROOT)
        for p in (ROOT / "protos").rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    )
    assert fresh == checked_in, (
        "generated files differ from the checked-in set; run scripts/gen_protos.py"
    )
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"stale generated code: {stale}; run `python scripts/gen_protos.py`"


def test_every_proto_is_under_its_import_path() -> None:
    for proto in (ROOT / "protos").rglob("*.proto"):
        rel = proto.relative_to(ROOT)
        assert rel.parts[0] == "protos" and len(rel.parts) == 4, (
            f"{rel}: expected protos/<api>/<vN>/x.proto"
        )
