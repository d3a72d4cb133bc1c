"""Labelled data sets for fine-tuning: image folders, CSV/Parquet tables, NumPy arrays and
Fashion-MNIST, with a deterministic stratified train/validation split.

Every loader validates before returning (empty, single class, labels missing, mismatched
image sizes), so a bad data set fails in seconds rather than after the feature pass.
Images are float32 NCHW in the pixel range they were stored in (0..255 for image files);
backbones carry their own normalisation.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from transfer.errors import (
    DatasetError,
    DatasetNotFound,
    EmptyDataset,
    LabelsMissing,
    MismatchedImageSizes,
    SingleClassDataset,
)

DataKind = Literal["image", "features", "text"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
PIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True, eq=False)
class Dataset:
    """Inputs and integer labels; `inputs` is (N,C,H,W) float32 for images, (N,D) float32
    for feature tables and an object array of str for text."""

    kind: DataKind
    inputs: npt.NDArray[Any]
    labels: npt.NDArray[np.int64]
    class_names: tuple[str, ...]
    source: str = field(default="arrays")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (empty for text)."""
        return tuple(int(d) for d in self.inputs.shape[1:]) if self.kind != "text" else ()

    @cached_property
    def digest(self) -> str:
        """sha256 over kind, class names, labels and input values: equal data, equal digest."""
        h = hashlib.sha256()
        h.update(self.kind.encode())
        h.update("\0".join(self.class_names).encode())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        if self.kind == "text":
            for text in self.inputs:
                h.update(str(text).encode())
                h.update(b"\0")
        else:
            h.update(str(self.inputs.shape).encode())
            h.update(np.ascontiguousarray(self.inputs, dtype="<f4").tobytes())
        return h.hexdigest()

    def subset(self, indices: npt.NDArray[np.int64]) -> Dataset:
        return Dataset(
            self.kind, self.inputs[indices], self.labels[indices], self.class_names, self.source
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {name: int(counts[i]) for i, name in enumerate(self.class_names)}


@dataclass(frozen=True)
class Split:
    """Two disjoint parts of one data set, and where their examples sit in it."""

    train: Dataset
    validation: Dataset
    seed: int
    validation_fraction: float
    train_indices: npt.NDArray[np.int64]
    validation_indices: npt.NDArray[np.int64]


def validate_dataset(dataset: Dataset) -> Dataset:
    """Raise the DatasetError that says what to fix; return the data set unchanged if fine."""
    src = dataset.source
    if len(dataset.inputs) != len(dataset.labels):
        raise LabelsMissing(
            f"{src}: {len(dataset.inputs)} inputs but {len(dataset.labels)} labels; "
            "give exactly one label per example"
        )
    if len(dataset) == 0:
        raise EmptyDataset(f"{src} holds no examples; point at a data set with labelled examples")
    if dataset.labels.min() < 0 or dataset.labels.max() >= dataset.num_classes:
        raise DatasetError(
            f"{src}: labels must lie in 0..{dataset.num_classes - 1} (one per class name), "
            f"found {int(dataset.labels.min())}..{int(dataset.labels.max())}"
        )
    present = np.unique(dataset.labels)
    if len(present) < 2:
        name = dataset.class_names[int(present[0])]
        raise SingleClassDataset(
            f"{src}: every example has class {name!r}; a classifier needs examples of at "
            "least two classes, so add examples of the other classes"
        )
    if dataset.kind != "text" and not np.isfinite(dataset.inputs).all():
        raise DatasetError(f"{src}: inputs contain NaN or infinite values; clean them first")
    return dataset


def from_arrays(
    inputs: npt.ArrayLike,
    labels: npt.ArrayLike,
    class_names: Sequence[str] | None = None,
    *,
    source: str = "arrays",
) -> Dataset:
    """A validated Dataset from in-memory arrays (kind inferred from dtype and rank)."""
    x = np.asarray(inputs)
    y = np.asarray(labels)
    if y.dtype.kind in "USO":
        names = tuple(sorted({str(v) for v in y})) if class_names is None else tuple(class_names)
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(v) for v in y} - set(index))
        if unknown:
            raise LabelsMissing(f"{source}: labels {unknown[:5]} are not among the class names")
        y = np.array([index[str(v)] for v in y], dtype=np.int64)
    else:
        y = y.astype(np.int64).ravel()
        if class_names is None:
            count = int(y.max()) + 1 if y.size else 0
            class_names = [str(i) for i in range(count)]
        names = tuple(str(n) for n in class_names)
    if x.dtype.kind in "USO":
        return validate_dataset(Dataset("text", x.astype(object).ravel(), y, names, source))
    x = x.astype(np.float32)
    if x.ndim == 3:  # (N, H, W) grey images
        x = x[:, None]
    if x.ndim == 4:
        kind: DataKind = "image"
    elif x.ndim == 2:
        kind = "features"
    else:
        raise DatasetError(
            f"{source}: inputs of shape {x.shape} are neither images (N,C,H,W or N,H,W) "
            "nor feature rows (N,D)"
        )
    return validate_dataset(Dataset(kind, x, y, names, source))


def load_npz(path: str | Path) -> Dataset:
    """`.npz` with arrays `x` (inputs) and `y` (labels), optionally `classes` (names)."""
    p = _existing(path)
    with np.load(p, allow_pickle=False) as data:
        keys = set(data.files)
        if "y" not in keys:
            raise LabelsMissing(
                f"{p} has arrays {sorted(keys)} but no 'y'; save labels with np.savez(path, x=..., y=...)"
            )
        if "x" not in keys:
            raise DatasetError(f"{p} has arrays {sorted(keys)} but no 'x' (the inputs)")
        names = [str(n) for n in data["classes"]] if "classes" in keys else None
        return from_arrays(data["x"], data["y"], names, source=str(p))


def load_image_folder(path: str | Path) -> Dataset:
    """One subfolder per class, each holding images (.npy always; .png/.jpg... with Pillow)."""
    root = _existing(path)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; an image data set is ROOT/<class>/<image>")
    loose = [f for f in root.iterdir() if f.is_file() and _is_image_file(f)]
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if loose and not class_dirs:
        raise LabelsMissing(
            f"{root} holds images but no class subfolders, so they have no labels; move each "
            f"class's images into {root}/<class-name>/"
        )
    files: list[tuple[Path, int]] = []
    names: list[str] = []
    for d in class_dirs:
        images = sorted(f for f in d.iterdir() if f.is_file() and _is_image_file(f))
        if images:
            files.extend((f, len(names)) for f in images)
            names.append(d.name)
    if not files:
        raise EmptyDataset(
            f"{root} has no images in class subfolders (looked for .npy"
            f"{' and ' + ', '.join(sorted(PIL_SUFFIXES)) if _has_pil() else ''})"
        )
    arrays = [_read_image(f) for f, _ in files]
    shapes: dict[tuple[int, ...], Path] = {}
    for (f, _), a in zip(files, arrays, strict=True):
        shapes.setdefault(a.shape, f)
    if len(shapes) > 1:
        listed = "; ".join(f"{s} e.g. {f}" for s, f in list(shapes.items())[:4])
        raise MismatchedImageSizes(
            f"{root}: images differ in size (C,H,W): {listed}; resize them to one size first"
        )
    x = np.stack(arrays)
    y = np.array([label for _, label in files], dtype=np.int64)
    return validate_dataset(Dataset("image", x, y, tuple(names), str(root)))


def load_table(
    path: str | Path,
    *,
    label_column: str = "label",
    text_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
) -> Dataset:
    """A CSV or Parquet table: a label column plus a text column or numeric feature columns."""
    p = _existing(path)
    columns = _read_table(p)
    if label_column not in columns:
        raise LabelsMissing(
            f"{p} has no column {label_column!r} (columns: {sorted(columns)}); "
            "name the label column with label_column="
        )
    raw_labels = [("" if v is None else str(v)).strip() for v in columns[label_column]]
    empty_rows = [i + 1 for i, v in enumerate(raw_labels) if not v]
    if empty_rows:
        raise LabelsMissing(
            f"{p}: {len(empty_rows)} row(s) have no {label_column!r} value (data rows "
            f"{empty_rows[:5]}); label them or drop them"
        )
    if text_column is not None:
        if text_column not in columns:
            raise DatasetError(
                f"{p} has no text column {text_column!r} (columns: {sorted(columns)})"
            )
        texts = np.array(
            [("" if v is None else str(v)) for v in columns[text_column]], dtype=object
        )
        return from_arrays(texts, np.array(raw_labels), source=str(p))
    names = (
        list(feature_columns)
        if feature_columns is not None
        else [c for c in columns if c != label_column]
    )
    missing = [c for c in names if c not in columns]
    if missing or not names:
        raise DatasetError(
            f"{p}: feature columns {missing or '(none)'} not found (columns: {sorted(columns)})"
        )
    x = np.empty((len(raw_labels), len(names)), dtype=np.float32)
    for j, c in enumerate(names):
        for i, v in enumerate(columns[c]):
            try:
                x[i, j] = float(v)
            except (TypeError, ValueError):
                raise DatasetError(
                    f"{p}: column {c!r} row {i + 1} holds {v!r}, not a number; give "
                    "text_column= for text or feature_columns= to pick numeric columns"
                ) from None
    return from_arrays(x, np.array(raw_labels), source=str(p))


def load_fashion_mnist(
    split: Literal["train", "test"] = "train",
    *,
    limit: int | None = None,
    root: Path = FASHION_MNIST_DIR,
) -> Dataset:
    """Fashion-MNIST from Debian's `dataset-fashion-mnist` (1x28x28 grey, pixels 0..255)."""
    prefix = "train" if split == "train" else "t10k"
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise DatasetNotFound(
            f"Fashion-MNIST not found under {root}; install it with "
            "`apt-get install dataset-fashion-mnist` or pass root="
        )
    with gzip.open(images_path, "rb") as f:
        raw = f.read()
    count, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    n = count if limit is None else min(limit, count)
    pixels = np.frombuffer(raw, dtype=np.uint8, count=n * rows * cols, offset=16)
    with gzip.open(labels_path, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, count=n, offset=8)
    x = pixels.reshape(n, 1, rows, cols).astype(np.float32)
    return validate_dataset(
        Dataset(
            "image", x, labels.astype(np.int64), FASHION_MNIST_CLASSES, f"fashion-mnist:{split}"
        )
    )


SYNTHETIC_DEFAULT_COUNT = 2000


def load_synthetic(count: int = SYNTHETIC_DEFAULT_COUNT, seed: int = 0) -> Dataset:
    """The project's generated patterns (4 classes, 3x32x32, pixels 0..255): demos and tests."""
    from transfer.synthetic import CLASSES, synthetic_pixels

    if count < 2:
        raise EmptyDataset(f"synthetic:{count} is too small; ask for at least a few dozen images")
    x, y = synthetic_pixels(count, seed=seed)
    return validate_dataset(Dataset("image", x, y, CLASSES, f"synthetic:{count}:{seed}"))


def load_dataset(spec: str | Path, **options: Any) -> Dataset:
    """Dispatch on what `spec` names: `fashion-mnist[:test]`, `synthetic[:COUNT[:SEED]]`, a
    folder, .csv/.parquet, .npz."""
    text = str(spec)
    if text in ("fashion-mnist", "fashion-mnist:train", "fashion-mnist:test"):
        return load_fashion_mnist("test" if text.endswith(":test") else "train", **options)
    if text == "synthetic" or text.startswith("synthetic:"):
        parts = text.split(":")[1:]
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise DatasetError(
                f"{text!r}: write synthetic, synthetic:COUNT or synthetic:COUNT:SEED"
            ) from None
        if len(numbers) > 2:
            raise DatasetError(
                f"{text!r}: write synthetic, synthetic:COUNT or synthetic:COUNT:SEED"
            )
        return load_synthetic(*numbers)
    p = _existing(spec)
    if p.is_dir():
        return load_image_folder(p)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".parquet", ".pq"):
        return load_table(p, **options)
    if suffix == ".npz":
        return load_npz(p)
    raise DatasetError(
        f"{p}: cannot tell what kind of data set this is; use a folder of class subfolders, "
        "a .csv/.parquet table, a .npz with x and y, or 'fashion-mnist'"
    )


def sample_dataset(dataset: Dataset, limit: int, seed: int = 0) -> Dataset:
    """About `limit` examples (rounding per class may add one each), every class keeping
    its share and at least one example; seeded. The data set itself when no larger."""
    if limit <= 0 or len(dataset) <= limit:
        return dataset
    rng = np.random.default_rng(seed)
    chosen: list[npt.NDArray[np.int64]] = []
    for c in range(dataset.num_classes):
        members = np.flatnonzero(dataset.labels == c)
        if len(members):
            share = max(1, round(len(members) * limit / len(dataset)))
            chosen.append(rng.permutation(members)[:share])
    picked = np.sort(np.concatenate(chosen))
    sampled = dataset.subset(picked.astype(np.int64))
    return validate_dataset(
        Dataset(
            sampled.kind,
            sampled.inputs,
            sampled.labels,
            sampled.class_names,
            f"{dataset.source} (sample of {len(picked)})",
        )
    )


def split_dataset(dataset: Dataset, validation_fraction: float = 0.2, seed: int = 0) -> Split:
    """Stratified split: each class keeps its share in both halves; same seed, same split."""
    if not 0.0 < validation_fraction < 1.0:
        raise DatasetError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
    rng = np.random.default_rng(seed)
    train: list[npt.NDArray[np.int64]] = []
    val: list[npt.NDArray[np.int64]] = []
    for c in range(dataset.num_classes):
        members = rng.permutation(np.flatnonzero(dataset.labels == c))
        if len(members) == 0:
            continue
        n_val = round(len(members) * validation_fraction)
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) >= 2 else 0
        val.append(members[:n_val])
        train.append(members[n_val:])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    train_idx = np.sort(np.concatenate(train)).astype(np.int64)
    if len(val_idx) == 0:
        raise DatasetError(
            f"{dataset.source}: too few examples ({len(dataset)}) to hold any out for "
            "validation; give each class at least two examples"
        )
    return Split(
        dataset.subset(train_idx),
        dataset.subset(val_idx),
        seed,
        validation_fraction,
        train_idx,
        val_idx,
    )


def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetNotFound(f"data set {p} does not exist; check the path")
    return p


def _has_pil() -> bool:
    return importlib.util.find_spec("PIL") is not None


def _is_image_file(f: Path) -> bool:
    suffix = f.suffix.lower()
    return suffix == ".npy" or suffix in PIL_SUFFIXES


def _read_image(f: Path) -> npt.NDArray[np.float32]:
    """One image as float32 (C,H,W)."""
    if f.suffix.lower() == ".npy":
        a: npt.NDArray[np.float32] = np.load(f, allow_pickle=False).astype(np.float32)
        if a.ndim == 2:
            return a[None]
        if a.ndim == 3:
            channels_last = a.shape[-1] in (1, 3) and a.shape[0] not in (1, 3)
            return a.transpose(2, 0, 1).copy() if channels_last else a
        raise DatasetError(f"{f}: an image must be 2-D (H,W) or 3-D (C,H,W), got shape {a.shape}")
    if not _has_pil():
        raise DatasetError(
            f"{f}: reading {f.suffix} images needs Pillow (`pip install pillow`); "
            "or save each image as a .npy array"
        )
    image_module = importlib.import_module("PIL.Image")  # optional: untyped import on purpose

    with image_module.open(f) as img:
        mode = "L" if img.mode in ("L", "1", "I;16", "I", "F") else "RGB"
        pixels: npt.NDArray[np.float32] = np.asarray(img.convert(mode), dtype=np.float32)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy()


def _read_table(p: Path) -> dict[str, list[Any]]:
    if p.suffix.lower() in (".parquet", ".pq"):
        if importlib.util.find_spec("pyarrow") is None:
            raise DatasetError(
                f"{p}: reading Parquet needs pyarrow (`pip install pyarrow`); or use CSV"
            )
        pq = importlib.import_module("pyarrow.parquet")
        table: dict[str, list[Any]] = pq.read_table(p).to_pydict()
        return table
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise EmptyDataset(f"{p} is empty; a table needs a header row and data rows")
        columns: dict[str, list[Any]] = {name: [] for name in reader.fieldnames}
        for row in reader:
            for name in reader.fieldnames:
                columns[name].append(row.get(name))
    return columns
