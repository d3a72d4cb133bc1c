"""Real cloud and agent processes for the fault suite, and what a user would check of them:
which version answers inference (and that its answer is that version's), what the agent's
stop summary says it fetched, and whether the versions on its disk verify."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.artifacts import verify_files
from agent.state import StateStore
from edgefleet.cli.processes import ManagedProcess
from edgefleet.client.inference import InferenceClient
from edgefleet.core.manifests import verify_manifest
from protos.artifact.v1 import artifact_pb2

FEATURES = 16
SUMMARY = re.compile(
    r"fetched (\d+) bytes in (\d+) chunk\(s\), skipped (\d+) bytes already held, "
    r"resumed (\d+) bytes; (\d+) manifest bytes"
)


def big_model(path: Path, seed: int, bias: float, columns: int = 25_000) -> Path:
    """y = mean(x @ W) + bias with W random [16, columns] (1.6 MB at the default): a model
    whose download takes long enough to interrupt, whose inputs stay small (the golden
    samples the cloud makes are tiny) and whose answer to x = 0 names its version."""
    w = np.random.default_rng(seed).standard_normal((FEATURES, columns)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["z"]),
            helper.make_node("ReduceMean", ["z"], ["m"], axes=[1], keepdims=0),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.array([bias], dtype=np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@dataclass(frozen=True)
class Answer:
    version: int
    value: float


def served(proc: ManagedProcess, model: str = "m") -> Answer | None:
    """What the agent answers for x = 0 now (None: it serves no version of `model`)."""
    with InferenceClient(proc.address, timeout=10) as client:
        if not client.model_ready(model):
            return None
        result = client.infer(model, {"x": np.zeros((1, FEATURES), np.float32)})
    return Answer(int(result.model_version), float(result.outputs["y"][0]))


@dataclass(frozen=True)
class Transfer:
    fetched: int
    chunks: int
    skipped: int
    resumed: int
    manifest: int


def stop_summary(proc: ManagedProcess, since: int = 0) -> Transfer:
    """The figures of the agent's last stop summary in its log (after byte `since`)."""
    text = proc.log_path.read_bytes()[since:].decode(errors="replace")
    found = SUMMARY.findall(text)
    if not found:
        raise AssertionError(f"{proc.name} printed no stop summary:\n{proc.log_tail(30)}")
    return Transfer(*(int(v) for v in found[-1]))


def verify_disk(data_dir: Path) -> dict[str, list[int]]:
    """Every version the agent's state names as active or previous, checked as its restart
    would: manifest signature and every file's size and sha256. Model -> versions checked;
    AssertionError naming what does not verify."""
    state = StateStore(data_dir / "agent.db")
    try:
        keys = state.trusted_keys()
        checked: dict[str, list[int]] = {}
        for record in state.models():
            for slot in (record.active, record.previous):
                if slot is None:
                    continue
                raw = state.manifest(slot.digest)
                assert raw is not None, f"{record.model} v{slot.version}: no stored manifest"
                signed = artifact_pb2.SignedManifest.FromString(raw)
                manifest = verify_manifest(signed, keys, slot.digest)
                verify_files(slot.dir, manifest)
                checked.setdefault(record.model, []).append(slot.version)
        return checked
    finally:
        state.close()
