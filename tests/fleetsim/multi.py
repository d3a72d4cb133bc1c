"""The fleet simulator in several worker processes: each runs its own :class:`SimFleet` of
a share of the devices against the same cloud, and this process aggregates.

One process of a thousand simulated devices spends most of its CPU on its 3,000 threads
taking turns at one GIL; split into a few processes, the simulator costs what its devices
do. Processes start with `spawn` (a gRPC channel does not survive a fork) and take commands
over a pipe; every device-side figure (when each device's report was taken, bytes fetched,
CPU) comes back from them. `time.monotonic()` is the system's monotonic clock, the same in
every process, so a `since` taken here measures there.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tests.fleetsim.sim import Behaviour, CloudAccess, SimFleet, SimulatedRuntime


def _worker(conn: Connection, cloud: CloudAccess, workdir: str, options: dict[str, Any]) -> None:
    runtime = SimulatedRuntime(Behaviour(**options.pop("behaviour", {})))
    fleet = SimFleet(cloud, Path(workdir), runtime=runtime, **options)

    def enroll(count: int, labels: dict[str, str], prefix: str, telemetry: int) -> list[str]:
        made = fleet.enroll(count, labels, prefix=prefix, telemetry=telemetry, start=False)
        return [d.device_id for d in made]

    def wait(model: str, version: int, since: float, timeout: float) -> dict[str, float]:
        found = fleet.wait_until_converged(
            model, version, since=since, timeout=timeout, confirm=False
        )
        return found.per_device

    def behave(model: str, version: int, behaviour: dict[str, Any]) -> None:
        runtime.set(model, version, Behaviour(**behaviour))

    def cpu() -> float:
        times = os.times()
        return times.user + times.system

    commands: dict[str, Any] = {
        "enroll": enroll,
        "start": lambda: fleet.start(),
        "wait": wait,
        "behave": behave,
        "bytes": fleet.bytes_fetched,
        "loads": lambda: runtime.loads,
        "cpu": cpu,
    }
    try:
        while True:
            name, kwargs = conn.recv()
            if name == "close":
                break
            try:
                conn.send(("ok", commands[name](**kwargs)))
            except Exception as err:  # said to the parent, which raises it
                conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        fleet.close()
        conn.send(("ok", None))


class ProcessFleet:
    """`processes` worker processes, each a SimFleet of its share of the devices.

    with ProcessFleet(cloud, workdir, processes=4) as fleet:
        fleet.enroll(1000, {"site": "sim"})
        t0 = time.monotonic()
        fleet.admin.deploy("m", 1, selector={"site": "sim"})
        print(fleet.wait_until_converged("m", 1, since=t0))  # (last, median) seconds
    """

    def __init__(
        self,
        cloud: CloudAccess,
        workdir: Path,
        *,
        processes: int = 4,
        behaviour: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.cloud = cloud
        self.admin = cloud.admin()
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._procs: list[Any] = []
        for n in range(processes):
            parent, child = context.Pipe()
            opts = {**options, "behaviour": dict(behaviour or {})}
            proc = context.Process(
                target=_worker,
                args=(child, cloud, str(workdir / f"p{n}"), opts),
                name=f"sim-fleet-{n}",
                daemon=True,
            )
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)
        self.device_ids: list[str] = []

    def _all(self, name: str, per_worker: list[dict[str, Any]] | None = None) -> list[Any]:
        """The command on every worker at once; their answers in order."""
        for n, pipe in enumerate(self._pipes):
            pipe.send((name, per_worker[n] if per_worker else {}))
        answers = []
        errors = []
        for pipe in self._pipes:
            status, value = pipe.recv()
            if status == "error":
                errors.append(value)
            answers.append(value)
        if errors:
            raise RuntimeError(f"{name} failed in {len(errors)} simulator process(es): {errors[0]}")
        return answers

    def enroll(self, count: int, labels: Mapping[str, str], *, telemetry: int = 0) -> None:
        """`count` devices split over the workers (the first `telemetry` of each worker's
        share, in proportion, record telemetry); every one enrolls before any comes
        online (an enrollment wakes every open watch)."""
        k = len(self._pipes)
        shares = [count // k + (1 if n < count % k else 0) for n in range(k)]
        tele = [round(telemetry * s / count) if count else 0 for s in shares]
        made = self._all(
            "enroll",
            [
                {"count": s, "labels": dict(labels), "prefix": f"sim{n}", "telemetry": t}
                for n, (s, t) in enumerate(zip(shares, tele, strict=True))
            ],
        )
        self._all("start")
        self.device_ids = [d for ids in made for d in ids]

    def behave(self, model: str, version: int, **behaviour: Any) -> None:
        self._all("behave", [{"model": model, "version": version, "behaviour": behaviour}] * len(self._pipes))  # fmt: skip

    def wait_until_converged(
        self, model: str, version: int, *, since: float, timeout: float = 300.0
    ) -> tuple[float, float]:
        """Seconds after `since` until the last device's (and the median device's) report
        that it serves `version` was taken by the cloud."""
        kwargs = {"model": model, "version": version, "since": since, "timeout": timeout}
        found = self._all("wait", [kwargs] * len(self._pipes))
        times = sorted(t for per_device in found for t in per_device.values())
        return times[-1], statistics.median(times)

    def confirm(self, model: str, version: int, *, since: float, timeout: float = 120.0) -> float:
        """Seconds after `since` until `AdminClient.devices()` shows every device converged."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.admin.devices()
            if len(seen) >= len(self.device_ids) and all(
                d.running(model) == version and d.converged for d in seen
            ):
                return time.monotonic() - since
            if time.monotonic() > deadline:
                raise TimeoutError(f"the admin API does not show {model} v{version} everywhere")
            time.sleep(0.2)

    def bytes_fetched(self) -> dict[str, int]:
        return {k: v for found in self._all("bytes") for k, v in found.items()}

    def sim_cpu_seconds(self) -> float:
        return float(sum(self._all("cpu")))

    def cloud_cpu_seconds(self) -> float:
        if self.cloud.pid is None:
            return 0.0
        import psutil

        times = psutil.Process(self.cloud.pid).cpu_times()
        return float(times.user + times.system)

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(("close", {}))
            except OSError:
                continue
        for pipe, proc in zip(self._pipes, self._procs, strict=True):
            try:
                if pipe.poll(60):
                    pipe.recv()
            except (EOFError, OSError):
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self.admin.close()

    def __enter__(self) -> ProcessFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
