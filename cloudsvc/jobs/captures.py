"""`captures:MODEL[@VERSION][?since=...&label=...&holdout=...&through=...]`: what devices
captured of a model's inferences, labelled (by the client that sent the request, or by a
labelled export imported back), as a fine-tune's data set. Read in the job's worker from the
cloud's data store, so a job trains on the rows that were there when it started.

`holdout=F` leaves out the held-out share F of the rows, chosen by a hash of each row's
cloud id (`held_out`), so the closed loop can score a candidate on rows it never trained
on; `through=ID` reads rows up to that cloud id only (what the loop counted)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote

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
    holdout: float = 0.0  # the share of rows held out (never read for training)
    through: int = 0  # 0: every row; else rows with a cloud id up to this one

    def query(self) -> CaptureQuery:
        return CaptureQuery(
            self.model, self.version, self.since, labelled_only=True, label=self.label
        )

    def trains_on(self, capture_id: int) -> bool:
        """Whether a (labelled, matching) row with this cloud id is training data."""
        if self.through and capture_id > self.through:
            return False
        return not held_out(capture_id, self.holdout)

    def reference(self) -> str:
        """This source as a `captures:` reference (what `parse` reads back)."""
        text = PREFIX + self.model + (f"@{self.version}" if self.version else "")
        filters = [
            f"{name}={value}"
            for name, value in (
                ("since", repr(self.since) if self.since else ""),
                ("label", quote(self.label, safe="")),
                ("holdout", repr(self.holdout) if self.holdout else ""),
                ("through", str(self.through) if self.through else ""),
            )
            if value
        ]
        return text + ("?" + "&".join(filters) if filters else "")


def held_out(capture_id: int, fraction: float) -> bool:
    """Whether the row with this cloud id is in the held-out share `fraction` of rows: a
    hash of the id, so the same rows are held out every time, by every reader."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"holdout/{capture_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def parse(reference: str) -> CaptureSource:
    """The parts of a `captures:` reference; InvalidRequest saying how to write one."""
    found = _REFERENCE.match(reference)
    if found is None:
        raise InvalidRequest(
            f"{reference[:120]!r}: write captures:MODEL, captures:MODEL@VERSION, and filters "
            "after '?': since=2026-11-30 (or unix seconds), label=NAME, holdout=0.2 (the "
            "held-out share left out), through=ID (rows up to that id)"
        )
    model, version, query = found.group(1), found.group(2), found.group(3) or ""
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(params) - {"since", "label", "holdout", "through"}
    if unknown:
        raise InvalidRequest(f"{reference[:120]!r}: unknown filter(s) {sorted(unknown)}")
    return CaptureSource(
        model,
        int(version or 0),
        _since(params.get("since", "")),
        params.get("label", ""),
        _holdout(reference, params.get("holdout", "")),
        _through(reference, params.get("through", "")),
    )


def _holdout(reference: str, text: str) -> float:
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise InvalidRequest(
            f"{reference[:120]!r}: holdout is the share of rows held out, 0 to below 1 "
            f"(e.g. holdout=0.2), not {text[:20]!r}"
        )
    return value


def _through(reference: str, text: str) -> int:
    if not text:
        return 0
    if not text.isdigit() or len(text) > 18:
        raise InvalidRequest(
            f"{reference[:120]!r}: through is a capture id (a whole number), not {text[:20]!r}"
        )
    return int(text)


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
            if not source.trains_on(row.id):
                continue
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
