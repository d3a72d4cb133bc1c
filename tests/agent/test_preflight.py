"""A signed manifest that does not make sense is refused before one byte it names is
downloaded, and the running version keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.core.manifests import file_chunks
from protos.artifact.v1 import artifact_pb2
from tests.agent.conftest import Rig
from tests.agent.fakes import build_artifact

Edit = Callable[[artifact_pb2.Manifest], None]


def _one_chunk_listed_96_times(m: artifact_pb2.Manifest) -> None:
    # The attack the review found: a 1 MiB file whose single chunk is listed 96 times.
    entry = m.files[0]
    entry.size = 1 << 20
    del entry.chunks[:]
    for _ in range(96):
        entry.chunks.add(sha256="ab" * 32, size=1 << 20)


def _sizes_do_not_add_up(m: artifact_pb2.Manifest) -> None:
    m.files[0].size += 1


def _absolute_entrypoint(m: artifact_pb2.Manifest) -> None:
    m.entrypoint = "/etc/passwd"


def _entrypoint_not_a_file(m: artifact_pb2.Manifest) -> None:
    m.entrypoint = "other.onnx"


def _path_escape(m: artifact_pb2.Manifest) -> None:
    m.files[0].path = "../../outside.onnx"
    m.entrypoint = "../../outside.onnx"


def _duplicate_path(m: artifact_pb2.Manifest) -> None:
    m.files.add().CopyFrom(m.files[0])


def _bad_model_name(m: artifact_pb2.Manifest) -> None:
    m.model = "../m"


def _golden_file_missing(m: artifact_pb2.Manifest) -> None:
    m.golden[0].outputs = "golden/9.outputs.pb"


def _huge_chunk(m: artifact_pb2.Manifest) -> None:
    entry = m.files[0]
    entry.size = 128 << 20
    del entry.chunks[:]
    entry.chunks.add(sha256="cd" * 32, size=128 << 20)


CASES: dict[str, tuple[Edit, str]] = {
    "one chunk listed 96 times": (_one_chunk_listed_96_times, "add up"),
    "sizes that do not add up": (_sizes_do_not_add_up, "add up"),
    "absolute entrypoint": (_absolute_entrypoint, "entrypoint"),
    "entrypoint not among the files": (_entrypoint_not_a_file, "entrypoint"),
    "path escaping the artifact": (_path_escape, "not a relative path"),
    "a path listed twice": (_duplicate_path, "twice"),
    "model name that is no name": (_bad_model_name, "no valid model"),
    "golden file not listed": (_golden_file_missing, "golden"),
    "a chunk over the limit": (_huge_chunk, "size outside"),
}


def _file_and_folder(m: artifact_pb2.Manifest) -> None:
    extra = m.files.add()
    extra.CopyFrom(m.files[1])
    extra.path = "golden"  # a file named like the folder golden/ the samples live in


def _one_chunk_two_sizes(m: artifact_pb2.Manifest) -> None:
    # A chunk of one file named again by another with a larger size: which bytes are right?
    chunk = file_chunks(m.files[1])[0]
    second = m.files[2]
    second.size = chunk.size + 1
    del second.chunks[:]
    second.chunks.add(sha256=chunk.sha256, size=chunk.size + 1)


def _case_twins(m: artifact_pb2.Manifest) -> None:
    twin = m.files.add()
    twin.CopyFrom(m.files[0])
    twin.path = "MODEL.onnx"


CASES.update(
    {
        "a path that is a file and a folder": (_file_and_folder, "as a file and as a folder"),
        "one chunk with two sizes": (_one_chunk_two_sizes, "two sizes"),
        "names that differ only in case": (_case_twins, "letter case"),
    }
)


@pytest.mark.parametrize("case", list(CASES))
def test_nonsense_manifests_are_refused_before_downloading(
    rig: Rig, tmp_path: Path, case: str
) -> None:
    edit, expected = CASES[case]
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 1))
    assert rig.reconciler.reconcile_once().converged
    fetched = len(rig.cloud.fetch_offsets)
    rig.cloud.assign(build_artifact(tmp_path, rig.cloud.key, "m", 2, edit=edit))
    result = rig.reconciler.reconcile_once()
    assert not result.converged
    assert expected in result.errors[0], result.errors
    assert len(rig.cloud.fetch_offsets) == fetched  # not one byte of v2 was asked for
    assert rig.repository.default_version("m") == 1  # v1 serves on
    assert not any(p.name.endswith(".part") for p in rig.chunks.root.iterdir())
