"""`captures:MODEL[@VERSION][?since=...&label=...]`: what devices captured of a model's
inferences, labelled (by the client that sent the request, or by a labelled export imported
back), as a fine-tune's data set. Read in the job's worker from the cloud's data store, so
a job trains on the rows that were there when it started."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np

from cloudsvc.errors import InvalidRequest, NotReady
from cloudsvc.store.data import CaptureQuery
from edgefleet.core.data import parse_since
from edgefleet.core.golden import tensors_from_bytes
from transfer.datasets import Dataset

PREFIX = "captures:"
_REFERENCE = re.compile(r"^captures:([a-z0-9][a-z0-9._-]{0,63})(?:@(\d+))?(?:\?(.*))?$")


@dataclass(frozen=True)
class CaptureSource:
    model: str
    version: int = 0
    since: float = 0.0
    label: str = ""

    def query(self) -> CaptureQuery:
        return CaptureQuery(
            self.model, self.version, self.since, labelled_only=True, label=self.label
        )


def parse(reference: str) -> CaptureSource:
    """The parts of a `captures:` reference; InvalidRequest saying how to write one."""
    found = _REFERENCE.match(reference)
    if found is None:
        raise InvalidRequest(
            f"{reference[:120]!r}: write captures:MODEL, captures:MODEL@VERSION, and filters "
            "after '?': since=2026-11-30 (or unix seconds), label=NAME"
        )
    model, version, query = found.group(1), found.group(2), found.group(3) or ""
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(params) - {"since", "label"}
    if unknown:
        raise InvalidRequest(f"{reference[:120]!r}: unknown filter(s) {sorted(unknown)}")
    return CaptureSource(
        model, int(version or 0), _since(params.get("since", "")), params.get("label", "")
    )


def _since(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as err:
        raise InvalidRequest(f"since={err}") from None


def load_captures(reference: str, data_path: Path | None) -> Dataset:
    """The labelled captured rows `reference` names, stacked into a Dataset (a request of
    several rows gives several examples, each with the request's label)."""
    from cloudsvc.store.data_sqlite import SqliteDataStore

    source = parse(reference)
    if data_path is None or not data_path.exists():
        raise NotReady("this cloud keeps no captured data (it runs with an in-memory store)")
    store = SqliteDataStore(data_path)
    try:
        inputs: list[np.ndarray] = []
        labels: list[str] = []
        name = ""
        for row in store.captures(source.query()):
            arrays = tensors_from_bytes(row.inputs)
            if len(arrays) != 1:
                raise InvalidRequest(
                    f"captures of {source.model} have {len(arrays)} inputs ({', '.join(arrays)}); "
                    "a fine-tune takes one image or feature input. Export them "
                    "(`edgefleet data export`) and build the data set you need"
                )
            ((name, array),) = arrays.items()
            if array.dtype.kind != "f":
                raise InvalidRequest(
                    f"captures of {source.model} hold {array.dtype} input {name!r} (token ids of a "
                    "text model, say): fine-tuning needs the raw text or images; export them "
                    "(`edgefleet data export`) and build the data set from the source data"
                )
            inputs.append(np.asarray(array, dtype=np.float32))
            labels.extend([row.label] * len(array))
    finally:
        store.close()
    if not labels:
        raise NotReady(
            f"{reference} has no labelled rows: label captures by sending a `label` with each "
            "request, or export them, label the CSV and import it with `edgefleet data label`"
        )
    x = np.concatenate(inputs, axis=0)
    class_names = tuple(sorted(set(labels)))
    index = {c: i for i, c in enumerate(class_names)}
    y = np.asarray([index[label] for label in labels], dtype=np.int64)
    return Dataset("image" if x.ndim == 4 else "features", x, y, class_names, source=reference)
