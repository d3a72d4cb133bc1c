from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from transfer.datasets import (
    FASHION_MNIST_DIR,
    Dataset,
    from_arrays,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
    load_table,
    split_dataset,
)
from transfer.errors import (
    DatasetError,
    DatasetNotFound,
    EmptyDataset,
    LabelsMissing,
    MismatchedImageSizes,
    SingleClassDataset,
)


def _write_images(root: Path, per_class: dict[str, int], shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            np.save(root / name / f"{i}.npy", rng.integers(0, 256, size=shape).astype(np.uint8))


def test_npz_round_trip_and_digest(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(20, 3, 8, 8)).astype(np.float32)
    y = np.arange(20) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(["no", "yes"]))
    ds = load_npz(tmp_path / "d.npz")
    assert (ds.kind, len(ds), ds.class_names, ds.input_shape) == (
        "image",
        20,
        ("no", "yes"),
        (3, 8, 8),
    )
    assert ds.digest == load_dataset(tmp_path / "d.npz").digest
    x[0, 0, 0, 0] += 1
    assert from_arrays(x, y, ["no", "yes"]).digest != ds.digest


def test_npz_without_labels_says_how_to_save_them(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)))
    with pytest.raises(LabelsMissing, match=r"np\.savez"):
        load_npz(tmp_path / "d.npz")


def test_empty_and_single_class_are_refused() -> None:
    with pytest.raises(EmptyDataset):
        from_arrays(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), ["a", "b"])
    with pytest.raises(SingleClassDataset, match="at least two classes"):
        from_arrays(np.zeros((5, 3)), np.ones(5, dtype=np.int64), ["a", "b"])


def test_image_folder_of_npy_files(tmp_path: Path) -> None:
    _write_images(tmp_path, {"bolt": 3, "nut": 4}, (28, 28))
    ds = load_dataset(tmp_path)
    assert ds.class_names == ("bolt", "nut")
    assert ds.inputs.shape == (7, 1, 28, 28)
    assert ds.class_counts() == {"bolt": 3, "nut": 4}


def test_image_folder_with_mixed_sizes_names_the_sizes(tmp_path: Path) -> None:
    _write_images(tmp_path, {"bolt": 2}, (3, 16, 16))
    _write_images(tmp_path, {"nut": 2}, (3, 20, 16))
    with pytest.raises(MismatchedImageSizes, match=r"\(3, 20, 16\)"):
        load_image_folder(tmp_path)


def test_images_without_class_folders_have_no_labels(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((8, 8)))
    with pytest.raises(LabelsMissing, match="class subfolders"):
        load_image_folder(tmp_path)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    with pytest.raises(EmptyDataset):
        load_image_folder(empty)


@pytest.mark.skipif(importlib.util.find_spec("PIL") is None, reason="Pillow is not installed")
def test_image_folder_of_png_files(tmp_path: Path) -> None:
    image = importlib.import_module("PIL.Image")  # optional, untyped

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            image.new("RGB", (12, 10), (i * 50, 0, 0)).save(tmp_path / name / f"{i}.png")
    ds = load_image_folder(tmp_path)
    assert ds.inputs.shape == (4, 3, 10, 12)


def test_csv_features_and_text(tmp_path: Path) -> None:
    (tmp_path / "f.csv").write_text("a,b,label\n1,2,x\n3,4,y\n5,6,x\n")
    ds = load_table(tmp_path / "f.csv")
    assert (ds.kind, ds.inputs.tolist(), ds.labels.tolist()) == (
        "features",
        [[1, 2], [3, 4], [5, 6]],
        [0, 1, 0],
    )
    (tmp_path / "t.csv").write_text('text,label\n"good, very",pos\nbad,neg\n')
    ds = load_dataset(tmp_path / "t.csv", text_column="text")
    assert ds.kind == "text" and list(ds.inputs) == ["good, very", "bad"]


def test_csv_label_problems_are_reported(tmp_path: Path) -> None:
    (tmp_path / "f.csv").write_text("a,b\n1,2\n")
    with pytest.raises(LabelsMissing, match="label_column="):
        load_table(tmp_path / "f.csv")
    (tmp_path / "g.csv").write_text("a,label\n1,x\n2,\n3,y\n")
    with pytest.raises(LabelsMissing, match=r"\[2\]"):
        load_table(tmp_path / "g.csv")
    (tmp_path / "h.csv").write_text("a,label\n1,x\nhello,y\n")
    with pytest.raises(DatasetError, match="text_column="):
        load_table(tmp_path / "h.csv")
    (tmp_path / "e.csv").write_text("a,label\n")
    with pytest.raises(EmptyDataset):
        load_table(tmp_path / "e.csv")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_parquet_table(tmp_path: Path) -> None:
    pa = importlib.import_module("pyarrow")  # optional, untyped
    pq = importlib.import_module("pyarrow.parquet")

    pq.write_table(
        pa.table({"f": [1.0, 2.0, 3.0], "label": ["a", "b", "a"]}), tmp_path / "d.parquet"
    )
    assert load_dataset(tmp_path / "d.parquet").labels.tolist() == [0, 1, 0]


def test_unknown_and_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound):
        load_dataset(tmp_path / "nope.npz")
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(DatasetError, match="fashion-mnist"):
        load_dataset(tmp_path / "d.json")
    with pytest.raises(DatasetNotFound, match="apt-get install"):
        load_fashion_mnist(root=tmp_path)


def test_split_is_stratified_disjoint_and_deterministic(pixels: Dataset) -> None:
    a = split_dataset(pixels, 0.25, seed=3)
    b = split_dataset(pixels, 0.25, seed=3)
    c = split_dataset(pixels, 0.25, seed=4)
    assert np.array_equal(a.validation_indices, b.validation_indices)
    assert not np.array_equal(a.validation_indices, c.validation_indices)
    assert not set(a.train_indices) & set(a.validation_indices)
    assert len(a.train) + len(a.validation) == len(pixels)
    for name, count in pixels.class_counts().items():
        assert abs(a.validation.class_counts()[name] - count * 0.25) <= 1


def test_split_needs_two_examples_somewhere() -> None:
    ds = from_arrays(np.zeros((2, 3)), np.array([0, 1]), ["a", "b"])
    with pytest.raises(DatasetError, match="at least two examples"):
        split_dataset(ds)


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.exists(), reason="apt package dataset-fashion-mnist is not installed"
)
def test_fashion_mnist() -> None:
    ds = load_fashion_mnist("test", limit=50)
    assert ds.inputs.shape == (50, 1, 28, 28)
    assert ds.inputs.max() <= 255 and ds.num_classes == 10
