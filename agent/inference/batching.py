"""Opportunistic dynamic batching: requests that arrive while a model is busy share its next run.

Like Triton's dynamic batcher, but it never waits to fill a batch. A request that finds its
model idle runs at once on its own thread (the path a lone client takes costs two uncontended
lock operations and nothing else). Requests that arrive while a run is in progress queue up;
when the run ends, the next one takes every queued request that fits (same non-batch
dimensions, up to ``max_batch`` rows in all), concatenates their inputs along dimension 0,
runs once, and hands each request its own rows of every output.

A queued batch is run by the thread of one of its own requests, so no thread is dedicated to
the batcher and the thread that finished the previous run returns to its caller at once.

Only models whose every input and output has the same symbolic first dimension (the
exporter's declared batch axis, e.g. ``batch``) are batched, and only requests with 1 to
``max_batch`` rows; anything else runs on its own, exactly as without a batcher. If a batched
run fails, or answers with outputs whose first dimension is not the batch's row count, each of
its requests is run again on its own, so batching never changes what a request gets back.

    batcher = DynamicBatcher.for_model(model, max_batch=32)
    outputs = batcher.run(feeds, output_names)  # from any number of threads
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.errors import Unavailable
from agent.runtime import LoadedModel

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]
RunFn = Callable[[dict[str, Array], Sequence[str]], list[Array]]

DEFAULT_MAX_BATCH = 32


def batch_axis(model: LoadedModel) -> str | None:
    """The symbolic first dimension that every input and output of `model` shares, if any.

    A shared symbolic name is the exporter saying "dimension 0 is the batch everywhere";
    an unnamed dynamic dimension, a fixed one, a scalar, or two different names is not.
    """
    names: set[object] = set()
    for node in (*model.session.get_inputs(), *model.session.get_outputs()):
        shape = node.shape
        if not shape:
            return None
        names.add(shape[0])
    if len(names) != 1:
        return None
    (name,) = names
    # ORT names dimensions it inferred itself "unk__N"; those promise nothing.
    if not isinstance(name, str) or not name or name.startswith("unk__"):
        return None
    return name


@dataclass(frozen=True)
class BatchStats:
    """Counts since the batcher was made."""

    runs: int  # model runs made by the batcher (alone or batched)
    requests: int  # requests answered by those runs
    largest: int  # most requests answered by one run


@dataclass(eq=False)
class _Pending:
    feeds: dict[str, Array]
    output_names: tuple[str, ...]
    rows: int
    key: tuple[tuple[int, ...], ...]  # non-batch dimensions of each input, in model order
    # Held from creation until this request is answered or told to run `batch`.
    wake: threading.Lock = field(default_factory=threading.Lock)
    batch: list[_Pending] | None = None
    result: list[Array] | None = None
    error: Exception | None = None


class DynamicBatcher:
    """Runs requests for one model, batching those that arrive while it is busy. Thread-safe."""

    def __init__(
        self,
        run: RunFn,
        input_names: Sequence[str],
        *,
        batchable: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
        name: str = "model",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._run = run
        self._input_names = tuple(input_names)
        self._batchable = batchable and bool(self._input_names) and max_batch > 1
        self._max_batch = max_batch
        self._name = name
        self._lock = threading.Lock()
        self._busy = False
        self._queue: list[_Pending] = []
        self._runs = 0
        self._requests = 0
        self._largest = 0

    @classmethod
    def for_model(cls, model: LoadedModel, *, max_batch: int = DEFAULT_MAX_BATCH) -> DynamicBatcher:
        axis = batch_axis(model)
        return cls(
            model.run,
            [t.name for t in model.inputs],
            batchable=axis is not None,
            max_batch=max_batch,
            name=f"{model.name} v{model.version}",
        )

    @property
    def batchable(self) -> bool:
        return self._batchable

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def queued(self) -> int:
        """Requests waiting for the run in progress to end."""
        with self._lock:
            return len(self._queue)

    def stats(self) -> BatchStats:
        with self._lock:
            return BatchStats(self._runs, self._requests, self._largest)

    def run(self, feeds: dict[str, Array], output_names: Sequence[str]) -> list[Array]:
        """The outputs `output_names` for `feeds`, as the model's own run would answer them."""
        rows = self._rows(feeds)
        if not rows:
            return self._run(feeds, output_names)
        with self._lock:
            if not self._busy:
                self._busy = True
                self._count(1)
                pending = None
            else:
                key = tuple(feeds[n].shape[1:] for n in self._input_names)
                pending = _Pending(feeds, tuple(output_names), rows, key)
                pending.wake.acquire()
                self._queue.append(pending)
        if pending is None:
            try:
                return self._run(feeds, output_names)
            finally:
                self._next()
        pending.wake.acquire()  # released by the run that answers us, or that we must run
        if pending.batch is not None:
            self._lead(pending.batch)
        if pending.error is not None:
            raise pending.error
        if pending.result is None:  # only if the leading thread died mid-run (BaseException)
            raise Unavailable(
                f"the batched run of model {self._name} was interrupted; send the request again"
            )
        return pending.result

    def _rows(self, feeds: dict[str, Array]) -> int:
        """The request's row count if it can join a batch, else 0."""
        if not self._batchable:
            return 0
        rows = -1
        for name in self._input_names:
            array = feeds.get(name)
            if array is None or array.ndim == 0:
                return 0
            if rows < 0:
                rows = array.shape[0]
            elif array.shape[0] != rows:
                return 0  # inputs disagree on the batch size; let the model say so alone
        return rows if 0 < rows <= self._max_batch else 0

    def _count(self, requests: int) -> None:
        # Called with self._lock held.
        self._runs += 1
        self._requests += requests
        if requests > self._largest:
            self._largest = requests

    def _next(self) -> None:
        """A run has ended: give the next batch to one of its requests, or mark the model idle."""
        with self._lock:
            if not self._queue:
                self._busy = False
                return
            batch = self._take()
            self._count(len(batch))
        batch[0].batch = batch
        batch[0].wake.release()

    def _take(self) -> list[_Pending]:
        # Called with self._lock held. The oldest request always goes, so none starves.
        first = self._queue[0]
        batch = [first]
        rows = first.rows
        rest: list[_Pending] = []
        for item in self._queue[1:]:
            if item.key == first.key and rows + item.rows <= self._max_batch:
                batch.append(item)
                rows += item.rows
            else:
                rest.append(item)
        self._queue = rest
        return batch

    def _lead(self, batch: list[_Pending]) -> None:
        """Run `batch` on this thread, pass the model on, then answer the others."""
        try:
            self._run_batch(batch)
        except Exception as err:  # every request of the batch must hear of it
            for item in batch:
                if item.result is None and item.error is None:
                    item.error = err
        finally:
            self._next()
            for item in batch[1:]:
                item.wake.release()

    def _run_batch(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            self._run_each(batch)
            return
        names: list[str] = []
        for item in batch:
            names.extend(n for n in item.output_names if n not in names)
        feeds = {n: np.concatenate([item.feeds[n] for item in batch]) for n in self._input_names}
        try:
            outputs = self._run(feeds, names)
        except Exception as err:
            # One request's values can fail the run (an index out of range, say); find which.
            log.info(
                "batched run of %s failed (%s); running its requests one by one", self._name, err
            )
            self._run_each(batch)
            return
        total = sum(item.rows for item in batch)
        if any(out.ndim == 0 or out.shape[0] != total for out in outputs):
            log.warning(
                "model %s answered a batch of %d with output shapes %s, so dimension 0 is not "
                "its batch axis; no longer batching it",
                self._name,
                total,
                [list(out.shape) for out in outputs],
            )
            self._batchable = False
            self._run_each(batch)
            return
        index = {n: i for i, n in enumerate(names)}
        start = 0
        for item in batch:
            end = start + item.rows
            item.result = [outputs[index[n]][start:end] for n in item.output_names]
            start = end

    def _run_each(self, batch: list[_Pending]) -> None:
        for item in batch:
            try:
                item.result = self._run(item.feeds, item.output_names)
            except Exception as err:
                item.error = err
