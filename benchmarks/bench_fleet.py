"""A fleet converging: one real cloud process (`edgefleet cloud serve`, TLS, SQLite) and
N simulated devices (tests/fleetsim: the real reconciler, link, state, chunk download and
signature checks; ONNX Runtime replaced by SimulatedRuntime, which loads at once), split over
several worker processes (tests/fleetsim/multi.py) so the simulator's threads do not all
fight over one GIL.

    python benchmarks/bench_fleet.py [--devices 1000] [--mode deploy|rollout] [--json out.json]

Measured, after every device runs v1 (installed, the warm-up):

1. deploy: from `AdminClient.deploy(v2)` to every device's report that it serves v2 (the
   cloud took it; confirmed through `AdminClient.devices()`); target < 10 s for 1,000.
   Bytes each device fetched (chunks + the compressed signed manifest), and the cloud
   process's CPU time per device (psutil on its pid, before/after);
2. rollback: from `AdminClient.rollback(model, 1, selector)` (the signed rollback a
   rollout's abort issues) to every device serving v1 again; target < 5 s.

With `--mode rollout`, in the same run (the two above are its baselines):

a. `start_rollout(v3)`, one wave of 100%, bake 0, no gates, to every device active;
b. v4 simulated slow with telemetry on, one wave of every device, a short bake and a p95
   gate: when the engine records the abort (the failed wave's finish time), and from then
   until every device serves v3 again; target < 5 s.

Baselines in the same run: AWS IoT Jobs' documented maximum rollout rate (1,000 devices a
minute, so 60 s for 1,000: the ratio printed is that over ours), and the same run with
100 devices (scaling: time per device at N over at 100).

Device state lives on tmpfs (/dev/shm) when there is one: a thousand devices' fsyncs on the
one disk of this machine measure that disk, where each real device has its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import write_json

MODEL = "fleet-classifier"
AWS_IOT_JOBS_DEVICES_PER_MIN = 1000  # maximum rollout rate of a job (documented quota)
DEPLOY_TARGET_S = 10.0
ROLLBACK_TARGET_S = 5.0
SLOW_MS = 60.0  # v4's simulated latency in the gate run; the gate says p95 < 30 ms
GATE_P95_MS = 30.0
ABORT_STATES = ("aborting", "aborted")
# The engine's tick at its default (1 s); a gate judges on 20 requests (its default).
CLOUD_ENV = {"EDGEFLEET_CLOUD_ROLLOUTS__TICK_S": "1.0"}


def _device_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def run(
    devices: int,
    mode: str = "deploy",
    *,
    processes: int = 4,
    hidden: int = 256,
    telemetry: int = 50,
    bake_s: float = 2.0,
) -> dict[str, Any]:
    """One measurement: a fresh cloud, `devices` simulated devices in `processes` worker
    processes, v1 installed; then the plain deploy of v2 and the signed rollback to v1 (the
    baselines); with mode "rollout" also (a) a rollout of v3 (one wave of every device, no
    bake, no gates) and (b) a rollout of v4, slow, gated on p95, to the abort and every
    device back on v3."""
    from edgefleet.core.rollouts import RolloutSpec, RolloutState, parse_gate
    from tests.fleetsim import start_cloud
    from tests.fleetsim.multi import ProcessFleet
    from tests.onnx_models import linear_model

    labels = {"bench": "fleet"}
    rollout = mode == "rollout"
    versions = 4 if rollout else 2
    telemetry = min(devices, telemetry) if rollout else 0
    result: dict[str, Any] = {
        "devices": devices,
        "mode": mode,
        "processes": processes,
        "telemetry_devices": telemetry,
    }
    with (
        tempfile.TemporaryDirectory() as cloud_tmp,
        tempfile.TemporaryDirectory(dir=_device_root()) as device_tmp,
    ):
        workdir = Path(cloud_tmp)
        with (
            start_cloud(workdir, devices=devices, env=CLOUD_ENV) as cloud,
            ProcessFleet(cloud, Path(device_tmp), processes=processes) as fleet,
        ):
            admin = fleet.admin
            for version in range(1, versions + 1):
                path = linear_model(workdir / f"v{version}.onnx", seed=version, hidden=hidden)
                admin.push_model(MODEL, path)
            started = time.monotonic()
            fleet.enroll(devices, labels, telemetry=telemetry)
            result["enroll_s"] = time.monotonic() - started
            since = time.monotonic()
            admin.deploy(MODEL, 1, selector=labels)
            result["install_v1_s"] = fleet.wait_until_converged(MODEL, 1, since=since)[0]

            def measure(
                name: str, move: Any, version: int, *, confirm: bool = True
            ) -> dict[str, Any]:
                before_bytes = fleet.bytes_fetched()
                cpu0, sim0 = fleet.cloud_cpu_seconds(), fleet.sim_cpu_seconds()
                since = time.monotonic()
                move()
                last, p50 = fleet.wait_until_converged(MODEL, version, since=since)
                confirmed = fleet.confirm(MODEL, version, since=since) if confirm else 0.0
                cpu1, sim1 = fleet.cloud_cpu_seconds(), fleet.sim_cpu_seconds()
                after = fleet.bytes_fetched()
                moved_bytes = [after[d] - before_bytes[d] for d in after]
                return {
                    f"{name}_s": last,
                    f"{name}_p50_s": p50,
                    f"{name}_confirmed_s": confirmed,
                    f"{name}_bytes_per_device": sum(moved_bytes) / len(moved_bytes),
                    f"{name}_cloud_cpu_ms_per_device": (cpu1 - cpu0) * 1000 / devices,
                    f"{name}_sim_cpu_ms_per_device": (sim1 - sim0) * 1000 / devices,
                }

            result |= measure("deploy", lambda: admin.deploy(MODEL, 2, selector=labels), 2)
            result |= measure("rollback", lambda: admin.rollback(MODEL, 1, selector=labels), 1)
            if not rollout:
                return result

            # (a) a rollout of v3: one wave of every device, no bake, no gates.
            one_wave = RolloutSpec(MODEL, 3, labels, (1.0,), bake_s=0.0, wave_deadline_s=600.0)
            ids: list[str] = []

            def start_a() -> None:
                ids.append(admin.start_rollout(one_wave).rollout_id)

            result |= measure("rollout", start_a, 3)
            since = time.monotonic()
            done = _poll(admin, ids[0], lambda r: r.state.finished)
            assert done.state == RolloutState.SUCCEEDED, done.reason
            result["rollout_engine_succeeded_after_confirm_s"] = time.monotonic() - since

            # (b) v4 is slow on every device; one wave, a short bake, a p95 gate: the time
            # from the abort the engine records to every device serving v3 again.
            fleet.behave(MODEL, 4, latency_ms=SLOW_MS, jitter=0.1)
            gated = RolloutSpec(
                MODEL,
                4,
                labels,
                (1.0,),
                bake_s=bake_s,
                gates=(parse_gate(f"p95_latency_ms<{GATE_P95_MS:g}"),),
                wave_deadline_s=600.0,
            )
            offset = time.time() - time.monotonic()  # the engine's wall clock to monotonic
            cpu0, sim0 = fleet.cloud_cpu_seconds(), fleet.sim_cpu_seconds()
            started = time.monotonic()
            rollout_id = admin.start_rollout(gated).rollout_id
            seen = _poll(admin, rollout_id, lambda r: r.state.value in ABORT_STATES, poll=0.2)
            noticed = time.monotonic()
            wave = seen.waves[0]
            recorded = wave.finished_at - offset  # when the engine judged and aborted
            back, back_p50 = fleet.wait_until_converged(MODEL, 3, since=recorded)
            confirmed = fleet.confirm(MODEL, 3, since=recorded)
            aborted = _poll(admin, rollout_id, lambda r: r.state.finished)
            cpu1, sim1 = fleet.cloud_cpu_seconds(), fleet.sim_cpu_seconds()
            result |= {
                "gate_moved_s": wave.reported_at - offset - started,
                "gate_abort_recorded_s": recorded - started,
                "gate_abort_seen_by_client_s": noticed - recorded,
                "gate_all_back_s": back,
                "gate_all_back_p50_s": back_p50,
                "gate_all_back_confirmed_s": confirmed,
                "gate_state": aborted.state.value,
                "gate_reason": aborted.reason,
                "gate_cloud_cpu_ms_per_device": (cpu1 - cpu0) * 1000 / devices,
                "gate_sim_cpu_ms_per_device": (sim1 - sim0) * 1000 / devices,
            }
    return result


def _poll(admin: Any, rollout_id: str, done: Any, *, poll: float = 0.5, timeout: float = 300.0) -> Any:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        found = admin.rollout(rollout_id)
        if done(found):
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout {rollout_id}: {found.state.value}, {found.reason}")
        time.sleep(poll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices")
    parser.add_argument("--baseline-devices", type=int, default=100, help="the scaling run")
    parser.add_argument("--mode", default="deploy", choices=["deploy", "rollout"])
    parser.add_argument(
        "--processes", type=int, default=4, help="simulator worker processes (1: one process)"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    sizes = [args.baseline_devices]
    if args.devices != args.baseline_devices:
        sizes.append(args.devices)
    runs = [run(n, args.mode, processes=args.processes) for n in sizes]
    small, big = runs[0], runs[-1]

    print(
        f"\n{'devices':>7} {'procs':>5} {'enroll s':>9} {'deploy s':>9} {'p50 s':>6} "
        f"{'admin s':>8} {'KiB/dev':>8} {'cloud CPU ms/dev':>17} {'sim CPU ms/dev':>15} "
        f"{'rollback s':>11} {'p50 s':>6} {'admin s':>8}"
    )
    for r in runs:
        print(
            f"{r['devices']:>7} {r['processes']:>5} {r['enroll_s']:>9.2f} {r['deploy_s']:>9.2f} "
            f"{r['deploy_p50_s']:>6.2f} {r['deploy_confirmed_s']:>8.2f} "
            f"{r['deploy_bytes_per_device'] / 1024:>8.1f} "
            f"{r['deploy_cloud_cpu_ms_per_device']:>17.2f} "
            f"{r['deploy_sim_cpu_ms_per_device']:>15.2f} {r['rollback_s']:>11.2f} "
            f"{r['rollback_p50_s']:>6.2f} {r['rollback_confirmed_s']:>8.2f}"
        )
    n = big["devices"]
    aws_s = n / AWS_IOT_JOBS_DEVICES_PER_MIN * 60
    scaling = (big["deploy_s"] / n) / (small["deploy_s"] / small["devices"])
    figures: dict[str, Any] = {
        "runs": runs,
        "aws_iot_jobs_seconds": aws_s,
        "ratio_aws_over_deploy": aws_s / big["deploy_s"],
        "ratio_aws_over_rollback": aws_s / big["rollback_s"],
        "scaling_per_device": scaling,
    }
    print(
        f"\ndeploy to {n} devices: {big['deploy_s']:.2f} s (target < {DEPLOY_TARGET_S:.0f} s: "
        f"{_verdict(big['deploy_s'], DEPLOY_TARGET_S)}); AWS IoT Jobs at its "
        f"maximum rate notifies {n} devices in {aws_s:.0f} s: {aws_s / big['deploy_s']:.1f}x"
    )
    print(
        f"signed rollback on {n} devices: {big['rollback_s']:.2f} s (target < "
        f"{ROLLBACK_TARGET_S:.0f} s: {_verdict(big['rollback_s'], ROLLBACK_TARGET_S)})"
        f"; {aws_s / big['rollback_s']:.1f}x AWS IoT Jobs' rate"
    )
    print(
        f"scaling: time per device at {n} is {scaling:.2f}x that at {small['devices']} "
        f"(1.00 = linear); {big['deploy_bytes_per_device'] / 1024:.1f} KiB per device for "
        f"the deploy, {big['rollback_bytes_per_device'] / 1024:.1f} KiB for the rollback"
    )
    if args.mode == "rollout":
        print(
            f"\n{'devices':>7} {'rollout s':>10} {'p50 s':>6} {'admin s':>8} {'KiB/dev':>8} "
            f"{'cloud CPU ms/dev':>17} {'/deploy':>8} {'abort at s':>11} {'all back s':>11} "
            f"{'p50 s':>6} {'admin s':>8} {'/rollback':>10}"
        )
        for r in runs:
            print(
                f"{r['devices']:>7} {r['rollout_s']:>10.2f} {r['rollout_p50_s']:>6.2f} "
                f"{r['rollout_confirmed_s']:>8.2f} {r['rollout_bytes_per_device'] / 1024:>8.1f} "
                f"{r['rollout_cloud_cpu_ms_per_device']:>17.2f} "
                f"{r['rollout_s'] / r['deploy_s']:>8.2f} {r['gate_abort_recorded_s']:>11.2f} "
                f"{r['gate_all_back_s']:>11.2f} {r['gate_all_back_p50_s']:>6.2f} "
                f"{r['gate_all_back_confirmed_s']:>8.2f} "
                f"{r['gate_all_back_s'] / r['rollback_s']:>10.2f}"
            )
        print(
            f"\nrollout (one wave, no bake, no gates) to {n} devices: {big['rollout_s']:.2f} s "
            f"to every device active (target < {DEPLOY_TARGET_S:.0f} s: "
            f"{_verdict(big['rollout_s'], DEPLOY_TARGET_S)}); {big['rollout_s'] / big['deploy_s']:.2f}x "
            f"the plain deploy; {aws_s / big['rollout_s']:.1f}x AWS IoT Jobs' rate"
        )
        print(
            f"gate breach on {n} devices: the engine recorded the abort "
            f"{big['gate_abort_recorded_s']:.2f} s after the start (every device active at "
            f"{big['gate_moved_s']:.2f} s, then the bake); every moved device served the "
            f"previous version {big['gate_all_back_s']:.2f} s after the abort (target < "
            f"{ROLLBACK_TARGET_S:.0f} s: {_verdict(big['gate_all_back_s'], ROLLBACK_TARGET_S)}); "
            f"{big['gate_all_back_s'] / big['rollback_s']:.2f}x the plain rollback\n"
            f"  reason: {big['gate_reason']}"
        )
        figures["ratio_rollout_over_deploy"] = big["rollout_s"] / big["deploy_s"]
        figures["ratio_abort_back_over_rollback"] = big["gate_all_back_s"] / big["rollback_s"]
    write_json(args.json, figures)


def _verdict(seconds: float, target: float) -> str:
    return "met" if seconds < target else "missed"


if __name__ == "__main__":
    main()
