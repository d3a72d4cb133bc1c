"""Sync, agent to cloud, over gRPC on loopback: the real cloud (`edgefleet cloud serve`, its
own process, TLS, the SQLite data store) and the agent's real Syncer reading a real spool.

    python benchmarks/bench_sync.py [--telemetry 100000] [--captures 100000] [--json out.json]

Rows are spooled first, with no sync running (a device offline), then one sync pass sends
them all (the reconnect), timed from its start until the cloud acknowledged the last row:

- telemetry-sized rows: the recorder's own telemetry rows (a model window of an 8-feature
  model, with its latency histogram and per-feature statistics, and a device window)
  repeated; target >= 50,000 rows/s;
- small captures (a 1x8 float input and a 1x3 output as tensor sets): rows/s, and the time
  for 100,000 of them captured offline to be in the cloud after the reconnect.

Bytes per row are the batches' bytes (as the Syncer writes them from the stored rows) over
the rows. Baseline, in the same run: the cloud's data store alone (`SqliteDataStore.ingest`
in this process, synchronous FULL as the cloud runs it) taking the same rows in the same
batches: what storing costs before any network, validation or process boundary.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import write_json


def _model(path: Path) -> Path:
    """y = x @ W + b: 8 features in, 3 out, a dynamic batch."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "W"),
            numpy_helper.from_array(np.zeros(3, np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def telemetry_rows(workdir: Path) -> list[Any]:
    """A model window and a device window as the recorder writes them, after 100 requests."""
    import numpy as np

    from agent.recorder import Recorder
    from agent.spool import TELEMETRY, Spool
    from protos.fleet.v1 import data_pb2

    spool = Spool(workdir / "scratch" / "spool.db")
    recorder = Recorder(spool, stats_per_second=1000)
    x = np.random.default_rng(0).normal(size=(1, 8)).astype(np.float32)
    for _ in range(100):
        recorder.observe("m", 1, {"x": x}, ["y"], [x[:, :3]], time.perf_counter() - 0.0004)
    recorder.flush_telemetry()
    pending = spool.pending(TELEMETRY, 10, 1 << 20)
    assert pending is not None
    spool.close()
    return [data_pb2.TelemetryRecord.FromString(b) for b in pending.bodies]


def small_capture(n: int) -> Any:
    import numpy as np

    from edgefleet.core.golden import tensor_set_bytes
    from protos.fleet.v1 import data_pb2

    x = np.full((1, 8), n % 7, np.float32)
    return data_pb2.Capture(
        model="m",
        version=1,
        request_id=f"req-{n}",
        at=time.time(),
        latency_ms=0.4,
        inputs=tensor_set_bytes({"x": x}),
        outputs=tensor_set_bytes({"y": x[:, :3]}),
        confidence=-1.0,
        reason="sampled",
    )


def fill(spool: Any, stream: str, make: Any, count: int) -> float:
    """Spool `count` rows (as the recorder does, in batches); their mean stored size."""
    batch = 1000
    for start in range(0, count, batch):
        spool.append(stream, [make(n) for n in range(start, min(count, start + batch))])
    pending = spool.pending(stream, 1000, 1 << 30)
    return sum(len(b) for b in pending.bodies) / len(pending.bodies)


def store_alone(workdir: Path, stream: str, make: Any, count: int, batch: int) -> float:
    """Rows per second into the cloud's SqliteDataStore, in process, same batches."""
    from cloudsvc.store.data import Batch
    from cloudsvc.store.data_sqlite import SqliteDataStore

    rows = [make(n) for n in range(count)]
    for n, row in enumerate(rows):
        row.seq = n + 1
    store = SqliteDataStore(workdir / f"baseline-{stream}" / "data.db")
    try:
        start = time.perf_counter()
        for i in range(0, count, batch):
            part = rows[i : i + batch]
            if stream == "telemetry":
                store.ingest(Batch("dev", "spool", telemetry=part))
            else:
                store.ingest(Batch("dev", "spool", captures=part))
        elapsed = time.perf_counter() - start
        assert store.cursors("dev", "spool") == (
            (count, 0) if stream == "telemetry" else (0, count)
        )
    finally:
        store.close()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--telemetry", type=int, default=100_000, help="telemetry rows")
    parser.add_argument("--captures", type=int, default=100_000, help="small captures")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    from agent.cloud_link import GrpcCloudLink
    from agent.spool import CAPTURES, TELEMETRY, Spool
    from agent.state import Identity
    from agent.sync import Syncer
    from edgefleet.cli.processes import cloud_process
    from edgefleet.client.admin import AdminClient
    from edgefleet.core.tls import ClientSecurity
    from protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cloud, trust = cloud_process(workdir)
        cloud.start().wait_ready(60)
        admin = AdminClient(cloud.address, token_file=trust.admin_token_file, ca_file=trust.ca_file)
        link: GrpcCloudLink | None = None
        try:
            # A device given the model, so that its rows are its to send.
            secret, _ = admin.create_enroll_token(labels={"bench": "sync"}, max_uses=1)
            security = ClientSecurity(ca_file=trust.ca_file)
            with security.channel(cloud.address) as channel:
                enrolled = fleet_pb2_grpc.AgentServiceStub(channel).Enroll(
                    fleet_pb2.EnrollRequest(enroll_token=secret, device_id="bench-1")
                )
            admin.push_model("m", _model(workdir / "m.onnx"))
            admin.deploy("m", 1, selector={"bench": "sync"})
            link = GrpcCloudLink(cloud.address, security)
            link.authenticate(Identity(enrolled.device_id, enrolled.device_token))
            samples = telemetry_rows(workdir)

            def telemetry(n: int) -> Any:
                row = type(samples[0])()
                row.CopyFrom(samples[n % len(samples)])
                return row

            for stream, make, count in (
                (TELEMETRY, telemetry, args.telemetry),
                (CAPTURES, small_capture, args.captures),
            ):
                spool = Spool(workdir / stream / "spool.db")
                stored_size = fill(spool, stream, make, count)
                syncer = Syncer(spool, link)
                start = time.perf_counter()
                sent = syncer.sync_once()  # the reconnect: everything pending, in batches
                took = time.perf_counter() - start
                assert sent == count and spool.pending(stream, 1, 1 << 20) is None
                spool.close()
                baseline = store_alone(workdir, stream, make, count, syncer.max_batch_rows)
                rate = count / took
                results[stream] = {
                    "rows": count,
                    "seconds": took,
                    "rows_per_s": rate,
                    "bytes_per_row": syncer.stats.bytes / syncer.stats.rows,
                    "stored_bytes_per_row": stored_size,
                    "batches": syncer.stats.batches,
                    "store_alone_rows_per_s": baseline,
                    "ratio_to_store_alone": rate / baseline,
                }
        finally:
            if link is not None:
                link.close()
            admin.close()
            cloud.stop()

    print(
        f"\n{'rows':<34} {'count':>8} {'seconds':>8} {'rows/s':>9} {'B/row':>7} {'store alone':>12} {'ratio':>6}"
    )
    names = {TELEMETRY: "telemetry windows", CAPTURES: "small captures"}
    for stream, r in results.items():
        print(
            f"{names[stream]:<34} {r['rows']:>8} {r['seconds']:>8.2f} {r['rows_per_s']:>9.0f} "
            f"{r['bytes_per_row']:>7.1f} {r['store_alone_rows_per_s']:>12.0f} "
            f"{r['ratio_to_store_alone']:>6.2f}"
        )
    t, c = results[TELEMETRY], results[CAPTURES]
    print(
        f"\ntelemetry: {t['rows_per_s']:.0f} rows/s (target >= 50,000: "
        f"{'met' if t['rows_per_s'] >= 50_000 else 'missed'}), {t['bytes_per_row']:.1f} bytes "
        f"per row on the wire ({t['stored_bytes_per_row']:.1f} stored)"
    )
    print(
        f"{c['rows']} small captures spooled offline: in the cloud {c['seconds']:.2f}s after the "
        f"reconnect ({c['rows_per_s']:.0f} rows/s, {c['bytes_per_row']:.1f} bytes per row)"
    )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
