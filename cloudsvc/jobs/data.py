"""The data a job names, as a Dataset, and as the exported graph's named inputs. Torch-free
except for a text backbone's tokenizer, which the caller passes in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloudsvc.errors import JobFailed
from cloudsvc.jobs.captures import PREFIX as CAPTURES_PREFIX
from cloudsvc.jobs.captures import load_captures
from cloudsvc.jobs.env import WorkerEnv
from cloudsvc.jobs.feeds import Feeds
from cloudsvc.jobs.spec import UPLOAD_PREFIX, DataOptions, resolve_upload
from transfer.datasets import Dataset, load_dataset, load_fashion_mnist, sample_dataset

OUTPUT_NAME = "logits"
IMAGE_INPUT = "image"
TEXT_INPUTS = ("input_ids", "attention_mask")
# Kept with the source for later compiles: enough to score INT8 within a fraction of a
# point, small enough to store with every version.
MAX_EVALUATION_EXAMPLES = 1000
MAX_CALIBRATION_EXAMPLES = 256


def load_job_data(reference: str, options: DataOptions, env: WorkerEnv, seed: int) -> Dataset:
    """The data set a job names, sampled down to `options.limit` examples when set."""
    if reference.startswith(CAPTURES_PREFIX):
        dataset = load_captures(reference, env.data_path)
    elif reference.startswith("fashion-mnist"):
        dataset = load_fashion_mnist(
            "test" if reference.endswith(":test") else "train", root=env.fashion_mnist_dir
        )
    else:
        path: str | Path = reference
        if reference.startswith(UPLOAD_PREFIX):
            path = resolve_upload(reference, env.uploads_dir)
        table = str(path).lower().endswith((".csv", ".parquet", ".pq"))
        table_options: dict[str, Any] = (
            {"label_column": options.label_column, "text_column": options.text_column}
            if table
            else {}
        )
        dataset = load_dataset(path, **table_options)
    return sample_dataset(dataset, options.limit, seed) if options.limit else dataset


def load_all_data(
    references: tuple[str, ...], options: DataOptions, env: WorkerEnv, seed: int
) -> Dataset:
    """The data sets a job names, as one: each loaded (and sampled down to `options.limit`)
    on its own, then stacked, with the union of their classes (the first's order, then new
    ones as they come). JobFailed when they do not fit together."""
    datasets = [load_job_data(r, options, env, seed) for r in references]
    return combine_datasets(datasets) if len(datasets) > 1 else datasets[0]


def combine_datasets(datasets: list[Dataset]) -> Dataset:
    first = datasets[0]
    for other in datasets[1:]:
        if other.kind != first.kind:
            raise JobFailed(
                f"{other.source} holds {other.kind} examples and {first.source} {first.kind} "
                "ones: data sets trained on together must be of one kind"
            )
        if other.input_shape != first.input_shape:
            raise JobFailed(
                f"{other.source} has examples of shape {list(other.input_shape)} and "
                f"{first.source} of {list(first.input_shape)}: data sets trained on together "
                "must share one input shape"
            )
    names: list[str] = []
    for d in datasets:
        names.extend(c for c in d.class_names if c not in names)
    index = {c: i for i, c in enumerate(names)}
    labels = [
        np.asarray([index[d.class_names[i]] for i in d.labels], dtype=np.int64) for d in datasets
    ]
    inputs = (
        np.concatenate([np.asarray(d.inputs, dtype=object) for d in datasets])
        if first.kind == "text"
        else np.concatenate([np.asarray(d.inputs, dtype=np.float32) for d in datasets])
    )
    return Dataset(
        first.kind,
        inputs,
        np.concatenate(labels),
        tuple(names),
        source=" + ".join(d.source for d in datasets),
    )


def feed_maker(backbone: Any, kind: str) -> Callable[[npt.NDArray[Any]], Feeds]:
    """Raw examples (pixels or strings) -> the exported graph's named inputs."""
    if kind == "text":

        def text_feeds(texts: npt.NDArray[Any]) -> Feeds:
            ids, mask = backbone.prepare(texts)
            return {
                TEXT_INPUTS[0]: ids.numpy().astype(np.int64),
                TEXT_INPUTS[1]: mask.numpy().astype(np.int64),
            }

        return text_feeds

    def image_feeds(images: npt.NDArray[Any]) -> Feeds:
        return {IMAGE_INPUT: np.ascontiguousarray(images, dtype=np.float32)}

    return image_feeds
