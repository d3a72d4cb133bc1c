"""Job specs are checked before a job is queued: settings, search grids, targets, data and
backbone references, uploads. All torch-free and fast."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from cloudsvc.errors import Forbidden, InvalidRequest, NotReady, TooLarge, UnknownResource
from cloudsvc.jobs.spec import (
    CompileSpec,
    FineTuneSpec,
    check_base,
    check_data,
    check_targets,
    default_targets,
    parse_spec,
    spec_from_json,
)
from cloudsvc.jobs.uploads import UploadKind, UploadStore, safe_name
from compilers.errors import UnknownTargetError


def finetune(**fields: object) -> FineTuneSpec:
    spec = parse_spec(
        FineTuneSpec, {"model": "m", "base": "small-cnn", "data": "synthetic", **fields}
    )
    assert isinstance(spec, FineTuneSpec)
    return spec


def test_params_take_strings_and_name_the_bad_one() -> None:
    spec = finetune(params={"epochs": "7", "lr": "1e-3", "strategy": "last-n"})
    assert (spec.params.epochs, spec.params.lr, spec.params.strategy) == (7, 1e-3, "last-n")
    with pytest.raises(InvalidRequest, match=r"params\.epochs"):
        finetune(params={"epochs": "0"})
    with pytest.raises(InvalidRequest, match=r"params\.strategy"):
        finetune(params={"strategy": "everything"})
    with pytest.raises(InvalidRequest, match=r"params\.learning_rate"):
        finetune(params={"learning_rate": "0.1"})


def test_a_search_is_every_combination_in_grid_order_cut_to_the_budget() -> None:
    spec = finetune(
        search=[("lr", ("1e-3", "3e-4")), ("strategy", ("head", "last-n"))],
        params={"epochs": "3"},
    )
    trials = spec.trials()
    assert [(t.lr, t.strategy) for t in trials] == [
        (1e-3, "head"),
        (1e-3, "last-n"),
        (3e-4, "head"),
        (3e-4, "last-n"),
    ]
    assert all(t.epochs == 3 for t in trials)
    assert len(finetune(search=[("lr", ("1", "2", "3"))], max_trials=2).trials()) == 2
    assert finetune().trials() == [finetune().params]


def test_a_search_refuses_settings_that_must_be_the_same_for_every_trial() -> None:
    with pytest.raises(InvalidRequest, match="every trial uses one split"):
        finetune(search=[("seed", ("0", "1"))])
    with pytest.raises(InvalidRequest, match="searchable"):
        finetune(search=[("dropout", ("0.1",))])
    with pytest.raises(InvalidRequest, match="twice"):
        finetune(search=[("lr", ("1",)), ("lr", ("2",))])
    with pytest.raises(InvalidRequest, match="search lr=fast"):
        finetune(search=[("lr", ("fast",))]).trials()


def test_specs_round_trip_through_json_as_stored() -> None:
    spec = finetune(search=[("lr", ("0.1", "0.2"))], targets=("onnx-cpu-fp32",))
    assert spec_from_json(spec.model_dump_json()) == spec
    compile_spec = CompileSpec(model="m", version=2, target="onnx-cpu-int8")
    assert spec_from_json(compile_spec.model_dump_json()) == compile_spec


def test_slot_kind_follows_device_and_targets() -> None:
    assert finetune().slot_kind(gpu_slots=0) == "cpu"
    assert finetune().slot_kind(gpu_slots=2) == "gpu"
    assert finetune(params={"device": "cpu"}).slot_kind(gpu_slots=2) == "cpu"
    assert finetune(params={"device": "cuda"}).slot_kind(gpu_slots=0) == "gpu"
    assert finetune(targets=("onnx-gpu-fp16",)).slot_kind(gpu_slots=0) == "gpu"


def test_targets_are_checked_against_the_cloud() -> None:
    assert check_targets(("ONNX-CPU-INT8",), 0) == ("onnx-cpu-int8",)
    with pytest.raises(UnknownTargetError, match="onnx-cpu-fp32"):
        check_targets(("onnx-cpu-fp64",), 0)
    with pytest.raises(NotReady, match="no GPU worker"):
        check_targets(("onnx-gpu-fp16",), 0)
    with pytest.raises(InvalidRequest, match="twice"):
        check_targets(("onnx-cpu-fp32", "onnx-cpu-fp32"), 0)
    assert default_targets(0) == ("onnx-cpu-fp32", "onnx-cpu-int8")
    assert default_targets(1) == ("onnx-cpu-fp32", "onnx-cpu-int8", "onnx-gpu-fp16")


def test_backbone_and_data_references_must_exist(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    check_base("efficientnet-lite0", uploads)
    with pytest.raises(UnknownResource, match="small-cnn, efficientnet-lite0, minilm-l6"):
        check_base("resnet-50", uploads)
    with pytest.raises(UnknownResource, match="upload it again"):
        check_base("upload:abc123/model.pt", uploads)
    with pytest.raises(InvalidRequest, match="upload reference"):
        check_base("upload:../../etc/passwd", uploads)
    check_data("synthetic:500", uploads, tmp_path)
    # A path on the cloud machine: only under the operator's jobs.data_roots, links and
    # `..` resolved first, and whether it exists is told only there.
    (tmp_path / "sets" / "parts").mkdir(parents=True)
    roots = (tmp_path / "sets",)
    check_data(str(tmp_path / "sets" / "parts"), uploads, tmp_path, roots)
    with pytest.raises(UnknownResource, match="does not exist"):
        check_data(str(tmp_path / "sets" / "gone"), uploads, tmp_path, roots)
    (tmp_path / "sets" / "escape").symlink_to("/etc")
    for outside in (
        "/etc/passwd",
        str(tmp_path / "sets" / ".." / ".."),
        str(tmp_path / "sets" / "escape"),
        "./imagenet",
        "/etc/pass\0wd",
    ):
        with pytest.raises(Forbidden, match="neither built in"):
            check_data(outside, uploads, tmp_path, roots)
    with pytest.raises(Forbidden, match="neither built in"):
        check_data(str(tmp_path / "sets" / "parts"), uploads, tmp_path)  # no roots: none
    with pytest.raises(UnknownResource, match="neither built in"):
        check_data("imagenet", uploads, tmp_path, roots)  # a name, not a path: unknown
    with pytest.raises(NotReady, match="apt-get install dataset-fashion-mnist"):
        check_data("fashion-mnist", uploads, tmp_path / "nowhere")
    with pytest.raises(InvalidRequest, match="needs a data set"):
        check_data("", uploads, tmp_path)


def test_uploads_are_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "uploads", max_bytes=1 << 20)
    data = b"label,text\na,hello\nb,world\n"
    first = store.receive("my data.csv", UploadKind.FILE, len(data), [data[:10], data[10:]])
    assert first.reference.startswith("upload:") and first.reference.endswith("/my_data.csv")
    assert first.path.read_bytes() == data and not first.existed
    again = store.receive("my data.csv", UploadKind.FILE, len(data), [data])
    assert again.reference == first.reference and again.existed
    renamed = store.receive("other.csv", UploadKind.FILE, len(data), [data])
    assert renamed.path.read_bytes() == data and first.path.exists()
    check_data(first.reference, tmp_path / "uploads", tmp_path)


def test_folder_uploads_unpack_a_tar_of_the_folder_contents(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("cat/1.npy", "dog/1.npy"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    body = buffer.getvalue()
    store = UploadStore(tmp_path / "uploads", max_bytes=1 << 20)
    upload = store.receive("pets", UploadKind.FOLDER_TAR, len(body), [body])
    assert sorted(p.name for p in upload.path.iterdir()) == ["cat", "dog"]
    assert (upload.path / "cat" / "1.npy").read_bytes() == b"abc"


def test_uploads_refuse_wrong_sizes_escaping_tars_and_too_much(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "uploads", max_bytes=100)
    with pytest.raises(TooLarge, match="max_upload_bytes"):
        store.receive("big.bin", UploadKind.FILE, 101, [b""])
    with pytest.raises(InvalidRequest, match="ended after 3 of 5"):
        store.receive("short.bin", UploadKind.FILE, 5, [b"abc"])
    with pytest.raises(TooLarge, match="more bytes"):
        store.receive("long.bin", UploadKind.FILE, 2, [b"abc"])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    body = buffer.getvalue()
    big = UploadStore(tmp_path / "uploads2", max_bytes=1 << 20)
    with pytest.raises(InvalidRequest, match="tar"):
        big.receive("evil", UploadKind.FOLDER_TAR, len(body), [body])
    assert not (tmp_path / "escape.txt").exists()
    assert not list((tmp_path / "uploads2").glob(".*"))  # nothing half-written left behind
    assert safe_name("../a b/c?.csv") == "c_.csv"
