"""`edgefleet demo`: the whole loop on one machine, on embedded defaults.

A cloud service and three agents start on loopback in a temporary folder; a small CNN is
trained for a few seconds on images generated here, exported to ONNX (parity-checked
against torch), pushed and deployed; inference goes through each agent's Open Inference
Protocol endpoint; a better version 2 follows and every device moves over to it.
"""

from __future__ import annotations

import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click
import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgefleet.cli.admin import human_bytes, render_devices, update_size
from edgefleet.cli.processes import (
    ManagedProcess,
    agent_process,
    cloud_process,
    write_secret_file,
)
from edgefleet.client.admin import AdminClient
from edgefleet.core.data import DataSet
from edgefleet.core.fleet import Device, ModelPhase
from edgefleet.core.jobs import Job, JobEvent, JobState
from edgefleet.core.rollouts import Rollout
from edgefleet.core.versions import ModelVersion

console = Console()
MODEL = "shape-classifier"
# Telemetry windows and syncs every few seconds (a minute and ten seconds by default), so
# the way back shows within the demo.
DEMO_AGENT = {"EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S": "1", "EDGEFLEET_AGENT_SYNC_INTERVAL_S": "1"}
INPUT, OUTPUT = "image", "logits"


@dataclass
class ServedScore:
    device: str
    version: int
    accuracy: float
    p50_ms: float
    requests: int


class Step:
    """Numbered, timed steps so the user sees where the demo is."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.monotonic()

    @contextmanager
    def __call__(self, title: str) -> Iterator[Any]:
        self.n += 1
        started = time.monotonic()
        with console.status(f"[{self.n}/{self.total}] {title}...") as status:
            yield status
        _check_signals()
        console.print(
            f"[green]✓[/] [{self.n}/{self.total}] {title} [dim]({time.monotonic() - started:.1f}s)[/]"
        )

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _fine_tune(
    cloud: AdminClient, title: str, status: Any, **request: Any
) -> tuple[Job, ModelVersion]:
    """Submit a fine-tune job and show its progress on the step's status line."""
    job = cloud.finetune(MODEL, base="small-cnn", **request)

    def show(event: JobEvent) -> None:
        if event.progress is not None:
            status.update(f"{title}: {job.job_id} {event.progress.describe()}")

    done = cloud.wait_job(job.job_id, on_event=show, timeout=600)
    if done.state is not JobState.SUCCEEDED:
        raise RuntimeError(f"{done.job_id} {done.state}: {done.error}")
    return done, cloud.version(MODEL, done.result_version)


def _score(
    address: str,
    device: str,
    version: int,
    class_names: tuple[str, ...],
    images: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
) -> ServedScore:
    """Accuracy on held-out images (batches of 32) and batch-1 latency, as a client sees
    them; the version's class order (its lineage) maps outputs to names."""
    from edgefleet.client.inference import InferenceClient
    from transfer.synthetic import CLASSES

    latencies, correct, served = [], 0, 0
    names = np.asarray(class_names)
    with InferenceClient(address) as client:
        for start in range(0, len(images), 32):
            batch = images[start : start + 32]
            result = client.infer(MODEL, {INPUT: batch}, version=version)
            served = int(result.model_version)
            predicted = names[result.outputs[OUTPUT].argmax(1)]
            truth = np.asarray(CLASSES)[labels[start : start + 32]]
            correct += int((predicted == truth).sum())
        for i in range(50):  # single images for the latency
            t = time.perf_counter()
            client.infer(MODEL, {INPUT: images[i : i + 1]})
            latencies.append((time.perf_counter() - t) * 1000)
    return ServedScore(
        device, served, correct / len(images), statistics.median(latencies), len(images) // 32 + 50
    )


def _serve_traffic(
    address: str, images: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]
) -> int:
    """What a site's client does: one image a request, sending the label it knows (an
    operator's ground truth), so a capture of the request comes back labelled."""
    from edgefleet.client.inference import InferenceClient
    from transfer.synthetic import CLASSES

    with InferenceClient(address) as client:
        for image, label in zip(images, labels, strict=True):
            client.infer(MODEL, {INPUT: image[None]}, label=CLASSES[int(label)])
    return len(images)


class _Traffic:
    """Clients at the sites going on with their work while a rollout moves: one image a
    request to every agent, unlabelled, until stopped."""

    def __init__(self, addresses: list[str], images: npt.NDArray[np.float32]) -> None:
        import threading

        self._stop = threading.Event()
        self.sent = 0
        self._threads = [
            threading.Thread(target=self._send, args=(a, images), daemon=True) for a in addresses
        ]

    def __enter__(self) -> _Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _send(self, address: str, images: npt.NDArray[np.float32]) -> None:
        from edgefleet.client.inference import InferenceClient
        from edgefleet.core.errors import EdgefleetError

        with InferenceClient(address) as client:
            n = 0
            while not self._stop.is_set():
                try:
                    client.infer(MODEL, {INPUT: images[n % len(images)][None]})
                    self.sent += 1
                except EdgefleetError:
                    pass  # a version switch under way: the next request finds the new one
                n += 1
                self._stop.wait(0.02)


def _slow_model(path: Path, classes: int) -> Path:
    """A deliberately worse v3: the same input and output as the fine-tuned versions, eight
    wide convolutions at full resolution in front: about ten times the latency."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    nodes, inits = [], []
    previous, channels = INPUT, 3
    for i in range(8):
        w = rng.normal(0, 0.1, (48, channels, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        previous, channels = f"r{i}", 48
    inits.append(
        numpy_helper.from_array(rng.normal(0, 0.1, (48, classes)).astype(np.float32), "head")
    )
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "head"], [OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _roll_out(cloud: AdminClient, version: int, gates: list[str], status: Any) -> Rollout:
    """A rollout in two waves (one device, then the rest), followed to its end."""
    from edgefleet.core.rollouts import RolloutSpec, parse_gate

    spec = RolloutSpec(
        MODEL,
        version,
        {"site": "plant-1"},
        (0.01, 1.0),
        bake_s=4.0,
        max_failure=0.0,
        gates=tuple(parse_gate(g) for g in gates),
        wave_deadline_s=90.0,
    )
    rollout = cloud.start_rollout(spec)
    deadline = time.monotonic() + 180
    while not rollout.state.finished:
        if rollout.state.value == "paused" or time.monotonic() > deadline:
            raise RuntimeError(f"rollout {rollout.rollout_id} stopped: {rollout.reason}")
        wave = rollout.waves[rollout.current_wave]
        counts = ", ".join(f"{n} {p}" for p, n in rollout.counts(rollout.moved()).items() if n)
        status.update(
            f"rollout {rollout.rollout_id} of v{version}: wave {wave.index + 1}/"
            f"{len(rollout.waves)} {wave.state.value} ({counts})"
        )
        time.sleep(0.5)
        rollout = cloud.rollout(rollout.rollout_id)
    return rollout


def _print_rollout(rollout: Rollout) -> None:
    for wave in rollout.waves:
        verdicts = "; ".join(
            f"{c.gate}: {c.value:.3g} (limit {c.limit:.3g}"
            + (f", v{rollout.devices[0].previous_version} {c.baseline:.3g})" if c.baseline else ")")
            + (" held" if c.passed else " [red]breached[/]")
            for c in wave.checks
            if c.evaluated
        )
        console.print(
            f"    wave {wave.index + 1} ({wave.size} device(s)): {wave.state.value}"
            + (f" — {verdicts}" if verdicts else "")
        )
    console.print(f"    {rollout.rollout_id} {rollout.state.value}: {rollout.reason}")


def _wait_for_captures(cloud: AdminClient, labelled: int, status: Any) -> DataSet:
    deadline = time.monotonic() + 180
    counted = 0
    while True:
        found = next((d for d in cloud.data_sets() if d.model == MODEL), None)
        have = found.labelled if found else 0
        status.update(f"captures synced: {have}/{labelled} labelled rows")
        if found is not None and have >= labelled:
            # And the telemetry windows that counted those requests (one a second here).
            counted = sum(v.captured for v in cloud.telemetry(MODEL))
            status.update(f"telemetry synced: {counted}/{found.rows} captured requests counted")
            if counted >= found.rows:
                return found
        if time.monotonic() > deadline:
            if have < labelled:
                raise RuntimeError(f"only {have} of {labelled} captured rows reached the cloud")
            raise RuntimeError(
                f"telemetry counted {counted} captured requests of the {found.rows if found else 0} "
                "captured rows in the cloud after 3 minutes"
            )
        time.sleep(0.5)


def _wait(cloud: AdminClient, version: int, devices: list[str], title: str) -> list[Device]:
    with console.status(title) as status:

        def show(devs: list[Device]) -> None:
            moving = ", ".join(
                f"{d.device_id}: v{d.running(MODEL)}"
                + "".join(
                    f" ({m.phase})"
                    for m in d.models
                    if m.model == MODEL and m.phase is not ModelPhase.READY
                )
                for d in devs
            )
            status.update(f"{title}: {moving}")
            console.print(f"  [dim]{moving}[/]")

        return cloud.wait_converged(MODEL, version, devices, timeout=90, on_change=show)


def _print_telemetry(cloud: AdminClient) -> None:
    for v in cloud.telemetry(MODEL):
        console.print(
            f"    telemetry v{v.version}: {v.requests:,} requests on {v.devices} devices, "
            f"{v.errors} errors, p50 {v.p50_ms:.2f} ms, p99 {v.p99_ms:.2f} ms, "
            f"{v.captured:,} captured"
        )


def _describe_version(version: ModelVersion, job: Job) -> None:
    evaluation = f"{version.evaluation.accuracy:.1%}" if version.evaluation else "?"
    console.print(
        f"    {job.job_id} made {MODEL} v{version.version}: validation accuracy {evaluation}"
    )
    for artifact in version.artifacts:
        m = artifact.metrics
        line = f"    {artifact.target}: {human_bytes(artifact.size_bytes)} in {artifact.file_count} files"
        if "latency_p50_ms" in m:
            line += f", p50 {m['latency_p50_ms']:.2f} ms at batch 1"
        if "accuracy_drop" in m:
            line += f", accuracy {m['accuracy']:.1%}"
        if "update_bytes" in m:
            line += f"; from v{version.parent_version}: {update_size(m, artifact.size_bytes)}"
        console.print(line)
    for outcome in job.targets:
        if outcome.status != "built":
            reason = outcome.reason.split(":")[0]  # the measurement, not the advice
            console.print(f"    {outcome.target}: {outcome.status}: {reason}")


class Terminated(BaseException):
    """SIGTERM or SIGHUP reached the demo: unwind (stopping every child), like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Also kept: the exception may surface inside code that swallows what it cannot handle
    # (a finaliser, an extension's callback); each step's end raises it again.
    _received.append(signum)
    raise Terminated(signum)


def _check_signals() -> None:
    if _received:
        raise Terminated(_received[0])


@click.command()
@click.option("--agents", default=3, show_default=True, help="How many agents to start.")
@click.option("--keep", is_flag=True, help="Keep the working folder (logs, data) afterwards.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use this folder instead of a temporary one. A folder that exists already is "
    "never deleted (the demo's files stay in it); a new one is, unless --keep.",
)
def demo(agents: int, keep: bool, workdir: Path | None) -> None:
    """Show the whole loop on this machine: cloud + agents on loopback, v1 then v2.

    Both versions are fine-tuned by the cloud as jobs (the built-in small-cnn backbone, a
    new head, on images generated here), exported to ONNX checked against torch, compiled
    to FP32 and INT8 with their accuracy and latency measured, then rolled out. v2 changes
    only the head, so each agent downloads only the head's bytes. Nothing is downloaded
    from the internet. Logs of every process are in the working folder (kept with --keep).
    """
    from transfer.synthetic import synthetic_pixels

    # Only what the demo made is deleted at the end: a folder the user had stays.
    ours = workdir is None or not workdir.exists()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    step = Step(11)
    procs: list[ManagedProcess] = []
    console.print(f"[bold]edgefleet demo[/] in {workdir}")
    stoppers = (signal.SIGTERM, signal.SIGHUP)
    _received.clear()
    previous = {sig: signal.signal(sig, _terminate) for sig in stoppers}
    # A parent that blocked them (some CI runners and init scripts do) must not keep the
    # demo from stopping: a blocked SIGTERM would wait, pending, until the demo ended.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stoppers)
    try:
        with step("starting the cloud service (TLS with a private CA it makes)"):
            cloud_proc, trust = cloud_process(workdir)
            procs.append(cloud_proc.start())
            cloud_proc.wait_ready()
            cloud = AdminClient(
                cloud_proc.address, token_file=trust.admin_token_file, ca_file=trust.ca_file
            )
        names = [f"edge-{i + 1}" for i in range(agents)]
        with step(f"starting {agents} agents (enroll tokens granting site=plant-1)"):
            for name in names:
                # One single-use token per device, granting its labels: what a user does.
                secret, _ = cloud.create_enroll_token(
                    ttl_seconds=3600,
                    max_uses=1,
                    labels={"site": "plant-1", "line": name[-1]},
                    note=f"demo {name}",
                )
                token_file = write_secret_file(workdir / "tokens" / name, secret)
                procs.append(
                    agent_process(
                        workdir, name, cloud_proc.address, trust, token_file, env=DEMO_AGENT
                    ).start()
                )
            for p in procs[1:]:
                p.wait_ready()
        agent_addr = {p.name: p.address for p in procs[1:]}
        held_out = synthetic_pixels(320, seed=2)  # never trained on, never captured labelled

        title = "fine-tuning v1 in the cloud (small-cnn + new head, 120 images, 1 epoch)"
        with step(title) as status:
            job1, v1 = _fine_tune(
                cloud,
                title,
                status,
                data="synthetic:120:1",
                params={"epochs": 1, "lr": 3e-4},
                description="120 images, 1 epoch",
            )
        _describe_version(v1, job1)
        with step("deploying v1 to site=plant-1, capturing every request"):
            cloud.set_capture_policy(MODEL, sample_rate=1.0)
            cloud.deploy(MODEL, 1, selector={"site": "plant-1"})
            _wait(cloud, 1, names, "agents converging on v1")
        classes1 = v1.lineage.class_names if v1.lineage else ()
        with step("inference on every agent through the Open Inference Protocol"):
            scores_v1 = [_score(agent_addr[n], n, 1, classes1, *held_out) for n in names]
        per_agent = 300
        title = f"the sites' traffic: {per_agent} labelled requests per agent, captured"
        with step(title):
            traffic_x, traffic_y = synthetic_pixels(per_agent * len(names), seed=4)
            served = sum(
                _serve_traffic(
                    agent_addr[n],
                    traffic_x[i * per_agent : (i + 1) * per_agent],
                    traffic_y[i * per_agent : (i + 1) * per_agent],
                )
                for i, n in enumerate(names)
            )
        with step("the way back: captures and telemetry synced to the cloud") as status:
            captured = _wait_for_captures(cloud, served, status)
        console.print(
            f"    {captured.name}: {captured.rows:,} rows from {captured.devices} devices, "
            f"{captured.labelled:,} labelled ({human_bytes(captured.bytes)})"
        )
        _print_telemetry(cloud)
        title = f"fine-tuning v2 on what the devices captured ({served} labelled images)"
        with step(title) as status:
            job2, v2 = _fine_tune(
                cloud,
                title,
                status,
                data=f"captures:{MODEL}",
                params={"epochs": 10},
                search={"lr": [1e-3, 1e-2]},
                description="fine-tuned on the devices' captured traffic",
            )
        for trial in job2.trials:
            console.print(
                f"    trial {trial.number}: lr={trial.params['lr']} -> validation accuracy "
                f"{trial.val_accuracy:.1%}{' (kept)' if trial.best else ''}"
            )
        _describe_version(v2, job2)
        gates = ["p95_latency_ms<+200%", "error_rate<1%"]
        title = "rolling out v2 in waves (1 device, then the rest), gated on " + " and ".join(gates)
        with step(title) as status, _Traffic([agent_addr[n] for n in names], held_out[0]):
            # Captures are done: the sites' traffic from here on is not kept.
            cloud.set_capture_policy(MODEL, sample_rate=0.0)
            rollout2 = _roll_out(cloud, 2, gates, status)
            if rollout2.state.value != "succeeded":
                raise RuntimeError(
                    f"the rollout of v2 ended {rollout2.state.value}: {rollout2.reason}"
                )
            final = _wait(cloud, 2, names, "agents on v2 (each fetched only the chunks it lacked)")
        _print_rollout(rollout2)
        classes2 = v2.lineage.class_names if v2.lineage else ()
        with step("inference on v2, and v1 still addressable for rollback"):
            scores_v2 = [_score(agent_addr[n], n, 2, classes2, *held_out) for n in names]
            # The previous version stays loaded: clients can still address it explicitly.
            rollback_ready = [
                _score(agent_addr[n], n, 1, classes1, held_out[0][:32], held_out[1][:32]).version
                == 1
                for n in names
            ]

        slow = cloud.push_model(
            MODEL,
            _slow_model(workdir / "v3-slow.onnx", len(classes2)),
            description="deliberately slow",
        )
        title = f"a deliberately slow v{slow.version}: its latency gate trips, the device goes back"
        with step(title) as status, _Traffic([agent_addr[n] for n in names], held_out[0]):
            rollout3 = _roll_out(cloud, slow.version, gates, status)
            if rollout3.state.value != "aborted":
                raise RuntimeError(f"the slow v{slow.version} was not stopped: {rollout3.reason}")
            final = _wait(cloud, 2, names, "every agent serving v2 again")
        _print_rollout(rollout3)

        console.print(render_devices(final, reasons=False))
        reasons = {a.target_reason for d in final for a in d.desired.assignments if a.target_reason}
        for reason in sorted(reasons):
            console.print(f"  [dim]target chosen per device: {escape(reason)}[/]")
        table = Table(
            "device", "v1 accuracy", "v2 accuracy", "p50 latency (batch 1)", "v1 still addressable"
        )
        for s1, s2, back in zip(scores_v1, scores_v2, rollback_ready, strict=True):
            table.add_row(
                s1.device,
                f"{s1.accuracy:.1%}",
                f"{s2.accuracy:.1%}",
                f"{s2.p50_ms:.2f} ms",
                "yes" if back else "no",
            )
        console.print(table)
        requests = sum(s.requests for s in scores_v1 + scores_v2) + served
        # What the fleet chose for these devices' hardware (INT8 where it pays and passed).
        assigned = final[0].desired.assignment(MODEL)
        moved = (assigned and v2.artifact(assigned.target)) or v2.artifacts[0]
        console.print(
            f"[bold green]demo complete[/] in {step.elapsed:.1f}s: {agents} agents captured "
            f"{served} labelled requests, v2 was fine-tuned on them, and every agent moved "
            f"v1 → v2 ({scores_v1[0].accuracy:.0%} → {scores_v2[0].accuracy:.0%} accuracy on "
            "held-out images), each "
            f"downloading {update_size(moved.metrics, moved.size_bytes)} of the new "
            f"{moved.target} artifact; {requests} inference requests served over the Open "
            "Inference Protocol. Every link ran TLS; each agent trusted only the cloud's CA "
            "and root key it was given and enrolled with its own single-use token."
        )
        console.print(
            "next: run `edgefleet cloud serve` and `edgefleet finetune NAME --base small-cnn "
            "--data YOUR-DATA`; see README.md"
        )
        cloud.close()
    except Terminated as signalled:
        console.print(f"[yellow]demo stopped by {signalled}[/]: stopping the cloud and agents")
        keep = True
        raise SystemExit(128 + signalled.signum) from None
    except Exception as err:
        console.print(f"[red]demo failed:[/] {err}")
        for p in procs:
            console.print(f"[dim]--- {p.name} log ({p.log_path}) ---\n{p.log_tail(15)}[/]")
        keep = True
        raise SystemExit(1) from None
    finally:
        # Every child stops whatever ended the demo: success, failure, Ctrl-C or SIGTERM.
        for p in reversed(procs):
            p.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if keep or not ours:
            console.print(f"working folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
