"""What a worker process tells the manager while it runs: one JSON object per stdout line.

Plain lines keep the worker independent of the cloud's store and transport: the manager
reads them, stores them as job events and streams them to watchers. Anything else the
worker's libraries print goes to stderr, which the manager keeps in the job's log file.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, TextIO

from pydantic import ValidationError

from edgefleet.core.jobs import JobProgress
from edgefleet.core.wire import from_json, to_jsonable


@dataclass(frozen=True)
class WorkerLine:
    kind: str  # log | progress
    message: str = ""
    progress: JobProgress | None = None


def parse_line(line: str) -> WorkerLine:
    """A line the worker printed; text that is not one of ours becomes a log line."""
    text = line.rstrip("\n")
    try:
        data: Any = json.loads(text)
    except ValueError:
        return WorkerLine("log", text)
    if not isinstance(data, dict):
        return WorkerLine("log", text)
    if data.get("event") == "progress":
        try:
            return WorkerLine(
                "progress", progress=from_json(JobProgress, json.dumps(data["progress"]))
            )
        except (KeyError, ValidationError):
            return WorkerLine("log", text)
    return WorkerLine("log", str(data.get("message", text)))


class Reporter:
    """The worker's side: log lines and progress, written whole and flushed at once.

    Progress within an epoch loop can come faster than anyone reads it (head-only epochs
    on cached features take milliseconds): updates closer than `min_interval_s` to the
    last one are held back, except phase changes and the last epoch of a run.
    """

    def __init__(self, out: TextIO, min_interval_s: float = 0.25) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._min_interval = min_interval_s
        self._last_sent = 0.0
        self.current = JobProgress()

    def log(self, message: str) -> None:
        self._write({"event": "log", "message": message})

    def phase(self, phase: str, message: str = "") -> None:
        self.current = JobProgress(phase=phase, message=message, trials=self.current.trials)
        self._send(force=True)
        if message:
            self.log(f"{phase}: {message}")

    def update(self, **changes: Any) -> None:
        self.current = replace(self.current, **changes)
        final = self.current.epochs and self.current.epoch >= self.current.epochs
        self._send(force=bool(final))

    def _send(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_sent < self._min_interval:
            return
        self._last_sent = now
        self._write({"event": "progress", "progress": to_jsonable(self.current)})

    def _write(self, data: dict[str, Any]) -> None:
        with self._lock:
            # NaN (a diverging loss) is written as JSON's NaN constant, which the reader takes.
            self._out.write(json.dumps(data, allow_nan=True) + "\n")
            self._out.flush()
