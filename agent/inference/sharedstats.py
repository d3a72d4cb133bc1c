"""Inference statistics in shared memory, for the worker-process mode (``workers``).

Each worker process owns one small file in a folder the control process makes under
/dev/shm (``create_files``): a header of the worker's own totals (requests, failures, large
requests, refusals, heap trims, its pid), then one row per model version with Triton's
ModelStatistics figures (``stats``). Only its owner writes a file, and every counter is one
aligned 8-byte word, so any process sums every file without a lock (``merged``,
``worker_totals``): a sum read while requests run may be a request behind, never torn
within a counter. The files are mapped, never written to disk (/dev/shm is memory), and the
control process removes the folder when it stops.

A worker that is restarted takes its predecessor's file over and counts on from where it
stopped, so what a crashed worker served stays counted, once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.inference.batching import DynamicBatcher
from agent.inference.limits import MemoryStats
from agent.inference.shm import SHM_ROOT
from agent.inference.stats import Duration, ModelStatistics, VersionFigures, VersionStats

log = logging.getLogger(__name__)

MAGIC = 0x65_64_67_65_73_74_61_01  # "edgesta" and a layout version
CAPACITY = 256  # model versions one worker counts at once (far more than a device serves)

# Header words.
_MAGIC, _CAPACITY, _PID, _REQUESTS, _FAILURES, _LARGE, _REFUSED, _TRIMS = range(8)
HEADER_WORDS = 16
# Row words: in use (written last when a row is taken, first when it is freed), the version
# and the model's name as a 16-byte digest, then the counters.
_USED, _VERSION, _KEY_A, _KEY_B = range(4)
(
    _LAST_MS,
    _INFERENCES,
    _EXECUTIONS,
    _SUCCESS_N,
    _SUCCESS_NS,
    _FAIL_N,
    _FAIL_NS,
    _QUEUE_NS,
    _INPUT_NS,
    _INFER_NS,
    _OUTPUT_NS,
) = range(4, 15)
ROW_WORDS = 16
FILE_BYTES = 8 * (HEADER_WORDS + CAPACITY * ROW_WORDS)


def _key(name: str) -> tuple[int, int]:
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return (
        int.from_bytes(digest[:8], "little", signed=True),
        int.from_bytes(digest[8:], "little", signed=True),
    )


def file_path(folder: Path, index: int) -> Path:
    return folder / f"worker-{index}.stats"


def make_folder() -> Path:
    """A private folder for the statistics files: in /dev/shm (memory) where there is one.
    Folders left by an agent that was killed (its pid gone) are removed on the way."""
    root = SHM_ROOT if SHM_ROOT.is_dir() else Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for stale in root.glob("edgefleet-workers-*"):
            pid = stale.name.split("-")[2] if stale.name.count("-") >= 3 else ""
            if pid.isdigit() and not _alive(int(pid)) and stale.stat().st_uid == os.getuid():
                shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"edgefleet-workers-{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_files(folder: Path, count: int) -> None:
    """One zeroed statistics file per worker (done by the control process, before any
    worker starts, so that every reader can map every file)."""
    for index in range(count):
        path = file_path(folder, index)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, FILE_BYTES)
        finally:
            os.close(fd)
        with StatsFile(path) as table:
            table.words[_CAPACITY] = CAPACITY
            table.words[_MAGIC] = MAGIC


class StatsFile:
    """One worker's statistics file, mapped."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, FILE_BYTES, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.words = memoryview(self._map).cast("q")

    def __enter__(self) -> StatsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.words.release()
        self._map.close()

    def find(self, name: str, version: int) -> int:
        """The first word of the row counting (name, version); -1 when there is none."""
        a, b = _key(name)
        words = self.words
        for base in range(HEADER_WORDS, len(words), ROW_WORDS):
            if (
                words[base + _USED]
                and words[base + _VERSION] == version
                and words[base + _KEY_A] == a
                and words[base + _KEY_B] == b
            ):
                return base
        return -1

    def take(self, name: str, version: int) -> int:
        """The row of (name, version), taken when there is none yet (owner only); -1 when
        every row is in use."""
        found = self.find(name, version)
        if found >= 0:
            return found
        a, b = _key(name)
        words = self.words
        for base in range(HEADER_WORDS, len(words), ROW_WORDS):
            if not words[base + _USED]:
                for i in range(1, ROW_WORDS):
                    words[base + i] = 0
                words[base + _VERSION] = version
                words[base + _KEY_A] = a
                words[base + _KEY_B] = b
                words[base + _USED] = 1
                return base
        return -1

    def free_except(self, loaded: set[tuple[str, int]]) -> None:
        """Free the rows of versions not in `loaded` (owner only)."""
        keys = {(_key(name), version) for name, version in loaded}
        words = self.words
        for base in range(HEADER_WORDS, len(words), ROW_WORDS):
            if not words[base + _USED]:
                continue
            key = ((words[base + _KEY_A], words[base + _KEY_B]), words[base + _VERSION])
            if key not in keys:
                words[base + _USED] = 0


@dataclass(frozen=True)
class WorkerTotals:
    """One worker's figures since the agent started (restarts included)."""

    index: int
    pid: int
    requests: int  # answered or failed, every model
    failures: int
    memory: MemoryStats


def worker_totals(folder: Path, count: int) -> list[WorkerTotals]:
    """Every worker's totals, read from its file."""
    totals = []
    for index in range(count):
        with StatsFile(file_path(folder, index)) as table:
            w = table.words
            totals.append(
                WorkerTotals(
                    index,
                    w[_PID],
                    w[_REQUESTS],
                    w[_FAILURES],
                    MemoryStats(w[_LARGE], w[_REFUSED], w[_TRIMS]),
                )
            )
    return totals


class SharedStatistics(ModelStatistics):
    """A worker's ModelStatistics: its own figures go to its file, and every version's
    figures read back summed over every worker's file."""

    def __init__(self, folder: Path, index: int, count: int) -> None:
        super().__init__()
        self.files = [StatsFile(file_path(folder, i)) for i in range(count)]
        self.own = self.files[index]
        self.write_lock = threading.Lock()  # this worker's threads, one writer at a time
        words = self.own.words
        words[_PID] = os.getpid()
        # Large requests and refusals are counted by the data plane (MemoryStats) from 0 in
        # each process; they are added to what the worker's predecessors counted.
        self._memory_base = MemoryStats(words[_LARGE], words[_REFUSED], words[_TRIMS])
        self._warned = False

    def of(self, name: str, version: int) -> VersionStats:
        key = (name, version)
        stats = self._by_version.get(key)
        if stats is None:
            with self._lock:
                stats = self._by_version.get(key)
                if stats is None:
                    with self.write_lock:
                        row = self.own.take(name, version)
                    if row < 0:
                        if not self._warned:
                            log.warning(
                                "more than %d model versions counted at once: %s v%d is counted "
                                "by this worker only",
                                CAPACITY,
                                name,
                                version,
                            )
                            self._warned = True
                        stats = VersionStats(name, version)
                    else:
                        stats = SharedVersionStats(name, version, self, row)
                    self._by_version = {**self._by_version, key: stats}
        return stats

    def keep(self, loaded: set[tuple[str, int]]) -> None:
        super().keep(loaded)
        with self.write_lock:
            self.own.free_except(loaded)

    def record_memory(self, memory: MemoryStats) -> None:
        """The data plane's large-request figures, on top of the predecessors'."""
        base, words = self._memory_base, self.own.words
        words[_LARGE] = base.large_requests + memory.large_requests
        words[_REFUSED] = base.refused_over_limit + memory.refused_over_limit
        words[_TRIMS] = base.trims + memory.trims

    def merged(self, name: str, version: int) -> VersionFigures:
        """The figures of (name, version) summed over every worker."""
        sums = [0] * ROW_WORDS
        last = 0
        for table in self.files:
            base = table.find(name, version)
            if base < 0:
                continue
            row = table.words[base : base + ROW_WORDS]
            last = max(last, row[_LAST_MS])
            for i in range(_INFERENCES, ROW_WORDS):
                sums[i] += row[i]
        n = sums[_SUCCESS_N]
        return VersionFigures(
            name=name,
            version=version,
            last_inference_ms=last,
            inference_count=sums[_INFERENCES],
            execution_count=sums[_EXECUTIONS],
            success=Duration(n, sums[_SUCCESS_NS]),
            fail=Duration(sums[_FAIL_N], sums[_FAIL_NS]),
            queue=Duration(n, sums[_QUEUE_NS]),
            compute_input=Duration(n, sums[_INPUT_NS]),
            compute_infer=Duration(n, sums[_INFER_NS]),
            compute_output=Duration(n, sums[_OUTPUT_NS]),
        )

    def close(self) -> None:
        for table in self.files:
            with contextlib.suppress(BufferError):
                table.close()


class SharedVersionStats(VersionStats):
    """One version's figures in its row of the worker's file; `figures` answers the sum over
    every worker. With dynamic batching, the runs count is the batcher's (followed here)."""

    __slots__ = ("_base", "_batcher", "_runs_seen", "_shared")

    def __init__(self, name: str, version: int, shared: SharedStatistics, base: int) -> None:
        super().__init__(name, version)
        self._shared = shared
        self._base = base
        self._batcher: DynamicBatcher | None = None
        self._runs_seen = 0

    def follow(self, batcher: DynamicBatcher) -> None:
        """Count `batcher`'s model runs as this version's executions from now on."""
        if batcher is not self._batcher:
            with self._shared.write_lock:
                self._batcher = batcher
                self._runs_seen = batcher.stats().runs

    def succeeded(
        self,
        *,
        rows: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        total_ns: int,
        executions: int = 1,
    ) -> None:
        now_ms = time.time_ns() // 1_000_000
        shared = self._shared
        words, base = shared.own.words, self._base
        with shared.write_lock:
            if self._batcher is not None:
                runs = self._batcher.stats().runs
                executions, self._runs_seen = runs - self._runs_seen, runs
            words[base + _LAST_MS] = now_ms
            words[base + _INFERENCES] += rows
            words[base + _EXECUTIONS] += executions
            words[base + _SUCCESS_N] += 1
            words[base + _SUCCESS_NS] += total_ns
            words[base + _QUEUE_NS] += queue_ns
            words[base + _INPUT_NS] += input_ns
            words[base + _INFER_NS] += infer_ns
            words[base + _OUTPUT_NS] += output_ns
            words[_REQUESTS] += 1

    def failed(self, total_ns: int) -> None:
        now_ms = time.time_ns() // 1_000_000
        shared = self._shared
        words, base = shared.own.words, self._base
        with shared.write_lock:
            words[base + _LAST_MS] = now_ms
            words[base + _FAIL_N] += 1
            words[base + _FAIL_NS] += total_ns
            words[_REQUESTS] += 1
            words[_FAILURES] += 1

    def figures(self, executions: int | None = None) -> VersionFigures:
        """Every worker's figures summed (`executions` is ignored: the runs are counted in
        the files)."""
        return self._shared.merged(self.name, self.version)
