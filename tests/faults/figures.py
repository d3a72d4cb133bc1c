"""What the fault suite did, for the README's reliability table: each test adds its counts
here, and with EDGEFLEET_FAULT_FIGURES=path.json set, the totals are written there at the
end of the run (scripts/fault_figures.py prints the table)."""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from pathlib import Path

_LOCK = threading.Lock()
_COUNTS: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))


def add(section: str, key: str, n: int = 1) -> None:
    """Count `n` more of `key` in `section` ("kill points", "attacks refused", ...)."""
    with _LOCK:
        _COUNTS[section][key] += n


def snapshot() -> dict[str, dict[str, int]]:
    with _LOCK:
        return {s: dict(v) for s, v in _COUNTS.items()}


def write_if_asked() -> Path | None:
    target = os.environ.get("EDGEFLEET_FAULT_FIGURES")
    if not target:
        return None
    path = Path(target)
    merged: dict[str, dict[str, int]] = {}
    if path.exists():
        merged = json.loads(path.read_text())
    for section, counts in snapshot().items():
        into = merged.setdefault(section, {})
        for key, n in counts.items():
            into[key] = into.get(key, 0) + n
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return path
