"""The spool's disk budget, measured on its file: full, it holds rows up to its budget (the
WAL, which a checkpoint gives back, is not a reason to evict), evicts only the oldest
captures, and never telemetry."""

from __future__ import annotations

import os
from pathlib import Path

from agent.spool import CAPTURES, TELEMETRY, Spool
from protos.fleet.v1 import data_pb2

BUDGET = 400_000


def _capture(size: int) -> data_pb2.Capture:
    return data_pb2.Capture(model="m", version=1, inputs=os.urandom(size))


def test_a_full_spool_keeps_rows_up_to_its_budget(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", BUDGET)
    try:
        for _ in range(400):  # one 8 KiB capture per transaction, as a slow trickle
            spool.append(CAPTURES, [_capture(8192)])
        stats = spool.stats()
        pending = spool.pending(CAPTURES, 1000, 1 << 30)
        assert pending is not None
        kept = sum(len(b) for b in pending.bodies)
        assert stats.captures_dropped + stats.captures_pending == 400
        # Rows fill most of the budget: evicting for the WAL kept only a fifth of it.
        assert kept >= 0.6 * BUDGET, f"{kept} bytes of rows kept on a {BUDGET}-byte budget"
        assert spool.used_bytes() <= BUDGET
        # The oldest went: what is left is the newest, contiguous.
        assert (pending.first_seq, pending.last_seq) == (stats.captures_dropped + 1, 400)
        assert pending.dropped_through == stats.captures_dropped
    finally:
        spool.close()


def test_telemetry_is_never_evicted_even_over_the_budget(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", BUDGET)
    try:
        spool.append(CAPTURES, [_capture(4096) for _ in range(20)])
        rows = []
        for n in range(200):
            record = data_pb2.TelemetryRecord()
            record.device.start, record.device.end = float(n), float(n + 1)
            record.device.cpus = 4
            record.model.model = "m" * 3000  # a large row (the oneof keeps the last set)
            rows.append(record)
        spool.append(TELEMETRY, rows)
        pending = spool.pending(TELEMETRY, 1000, 1 << 30)
        assert pending is not None and (pending.first_seq, pending.last_seq) == (1, 200)
        assert pending.dropped_through == 0
        assert spool.stats().captures_pending == 0  # every capture went for it
    finally:
        spool.close()
