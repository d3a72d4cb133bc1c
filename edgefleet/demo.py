"""`edgefleet demo`: the whole loop on one machine, on embedded defaults.

A cloud service and three agents start on loopback in a temporary folder; a small CNN is
trained for a few seconds on images generated here, exported to ONNX (parity-checked
against torch), pushed and deployed; inference goes through each agent's Open Inference
Protocol endpoint; a better version 2 follows and every device moves over to it.
"""

from __future__ import annotations

import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

from edgefleet.admin_cli import human_bytes, render_devices
from edgefleet.client import AdminClient, Device
from edgefleet.processes import ManagedProcess, agent_process, cloud_process

console = Console()
MODEL = "shape-classifier"
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
        console.print(
            f"[green]✓[/] [{self.n}/{self.total}] {title} [dim]({time.monotonic() - started:.1f}s)[/]"
        )

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _train_and_export(
    workdir: Path,
    version: int,
    images: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    val: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
    epochs: int,
    model: Any | None,
) -> tuple[Any, Path, float, float]:
    import torch

    from compilers.export import check_parity, export_onnx
    from transfer.models import SmallCNN
    from transfer.synthetic import CLASSES
    from transfer.train import accuracy, seed_everything, train_classifier

    torch.set_num_threads(1)
    seed_everything(version)  # the same demo gives the same figures on every run
    net = model if model is not None else SmallCNN(len(CLASSES))
    train_classifier(net, images, labels, epochs=epochs, seed=version)
    acc = accuracy(net, *val)
    path = export_onnx(
        net,
        torch.from_numpy(val[0][:1]),
        workdir / f"{MODEL}-v{version}.onnx",
        input_name=INPUT,
        output_name=OUTPUT,
    )
    report = check_parity(net, path, [val[0][:1], val[0][:16]])
    return net, path, acc, max(report.max_abs_diff.values())


def _score(
    address: str,
    device: str,
    version: int,
    images: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
) -> ServedScore:
    from edgefleet.oip_client import InferenceClient

    latencies, correct, served = [], 0, 0
    with InferenceClient(address) as client:
        for start in range(0, len(images), 32):  # batches of 32 for the accuracy
            batch = images[start : start + 32]
            result = client.infer(MODEL, {INPUT: batch}, version=version)
            served = int(result.model_version)
            correct += int((result.outputs[OUTPUT].argmax(1) == labels[start : start + 32]).sum())
        for i in range(50):  # single images for the latency
            t = time.perf_counter()
            client.infer(MODEL, {INPUT: images[i : i + 1]})
            latencies.append((time.perf_counter() - t) * 1000)
    return ServedScore(
        device, served, correct / len(images), statistics.median(latencies), len(images) // 32 + 50
    )


def _wait(cloud: AdminClient, version: int, devices: list[str], title: str) -> list[Device]:
    with console.status(title) as status:

        def show(devs: list[Device]) -> None:
            moving = ", ".join(
                f"{d.device_id}: v{d.running(MODEL)}"
                + "".join(
                    f" ({m.phase})" for m in d.models if m.model == MODEL and m.phase != "ready"
                )
                for d in devs
            )
            status.update(f"{title}: {moving}")
            console.print(f"  [dim]{moving}[/]")

        return cloud.wait_converged(MODEL, version, devices, timeout=90, on_change=show)


@click.command()
@click.option("--agents", default=3, show_default=True, help="How many agents to start.")
@click.option("--keep", is_flag=True, help="Keep the working folder (logs, data) afterwards.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use this folder instead of a temporary one.",
)
def demo(agents: int, keep: bool, workdir: Path | None) -> None:
    """Show the whole loop on this machine: cloud + agents on loopback, v1 then v2.

    Nothing is downloaded: the model is trained here, in seconds, on images generated here.
    Logs of every process are in the working folder (printed at the end with --keep).
    """
    from transfer.synthetic import make_images

    workdir = workdir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    admin_token, enroll_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    step = Step(9)
    procs: list[ManagedProcess] = []
    console.print(f"[bold]edgefleet demo[/] in {workdir}")
    try:
        with step("starting the cloud service"):
            cloud_proc = cloud_process(workdir, admin_token, enroll_token).start()
            procs.append(cloud_proc)
            cloud_proc.wait_ready()
        names = [f"edge-{i + 1}" for i in range(agents)]
        with step(f"starting {agents} agents (site=plant-1)"):
            for name in names:
                procs.append(
                    agent_process(
                        workdir,
                        name,
                        cloud_proc.address,
                        enroll_token,
                        {"site": "plant-1", "line": name[-1]},
                    ).start()
                )
            for p in procs[1:]:
                p.wait_ready()
        agent_addr = {p.name: p.address for p in procs[1:]}
        cloud = AdminClient(cloud_proc.address, admin_token)

        images, labels = make_images(1500, seed=1)
        val = make_images(320, seed=2)
        with step("training v1 (300 images, 2 epochs) and exporting it to ONNX"):
            net, v1_path, v1_acc, v1_diff = _train_and_export(
                workdir, 1, images[:300], labels[:300], val, 2, None
            )
        console.print(f"    torch accuracy {v1_acc:.1%}; ONNX matches torch within {v1_diff:.1e}")
        with step("pushing v1 to the registry"):
            v1 = cloud.push_model(MODEL, v1_path, description="300 images, 2 epochs")
        console.print(
            f"    v1: {human_bytes(v1.artifacts[0].size_bytes)}, {v1.golden_sample_count} golden samples made by the cloud, inputs {', '.join(map(str, v1.inputs))}"
        )
        with step("deploying v1 to site=plant-1"):
            cloud.deploy(MODEL, 1, selector={"site": "plant-1"})
            _wait(cloud, 1, names, "agents converging on v1")
        with step("inference on every agent through the Open Inference Protocol"):
            scores_v1 = [_score(agent_addr[n], n, 1, *val) for n in names]
        with step("training v2 (1500 images, 3 more epochs) and exporting it"):
            net, v2_path, v2_acc, v2_diff = _train_and_export(
                workdir, 2, images, labels, val, 3, net
            )
        console.print(f"    torch accuracy {v2_acc:.1%}; ONNX matches torch within {v2_diff:.1e}")
        with step("pushing and deploying v2"):
            cloud.push_model(MODEL, v2_path, description="1500 images, 5 epochs", parent_version=1)
            cloud.deploy(MODEL, 2, selector={"site": "plant-1"})
            final = _wait(cloud, 2, names, "agents moving to v2")
        with step("inference on v2, and v1 still addressable for rollback"):
            scores_v2 = [_score(agent_addr[n], n, 2, *val) for n in names]
            # The previous version stays loaded: clients can still address it explicitly.
            rollback_ready = [
                _score(agent_addr[n], n, 1, val[0][:32], val[1][:32]).version == 1 for n in names
            ]

        console.print(render_devices(final))
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
        requests = sum(s.requests for s in scores_v1 + scores_v2)
        console.print(
            f"[bold green]demo complete[/] in {step.elapsed:.1f}s: {agents} agents moved v1 → v2 "
            f"({scores_v1[0].accuracy:.0%} → {scores_v2[0].accuracy:.0%} accuracy), "
            f"{requests} inference requests served over the Open Inference Protocol."
        )
        cloud.close()
    except Exception as err:
        console.print(f"[red]demo failed:[/] {err}")
        for p in procs:
            console.print(f"[dim]--- {p.name} log ({p.log_path}) ---\n{p.log_tail(15)}[/]")
        keep = True
        raise SystemExit(1) from None
    finally:
        for p in reversed(procs):
            p.stop()
        if keep:
            console.print(f"working folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
