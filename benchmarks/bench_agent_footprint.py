"""Agent footprint: resident memory when idle with one model loaded (target < 150 MB) and time
from process start to ServerReady with the model loaded (target < 2 s).

    python benchmarks/bench_agent_footprint.py [--json out.json]

Runs the real thing through the documented CLI: `edgefleet cloud serve` on a free port, a
small CNN pushed with `edgefleet models push` and deployed with `edgefleet deploy`, then
`edgefleet agent run` as its own process. Three agent starts are timed: the first (enrol,
download, verify, load), a restart from local state with the cloud up, and a restart with
the cloud stopped (offline). Baseline: a bare Python process that imports onnxruntime and
opens one session of the same model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import export_small_cnn, write_json

MODEL = "small-cnn"
RSS_TARGET_MB = 150.0
READY_TARGET_S = 2.0


def edgefleet_command() -> list[str]:
    beside = Path(sys.executable).with_name("edgefleet")
    found = str(beside) if beside.exists() else shutil.which("edgefleet")
    if found:
        return [found]
    return [sys.executable, "-c", "from edgefleet.cli import main; main()"]


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode} before writing {path}")
        time.sleep(0.01)
    raise SystemExit(f"{path} did not appear within {timeout} s")


def rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return float(total) / 2**20


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_agent(
    cli: list[str], cloud: str, trust: list[str], data_dir: Path, workdir: Path, tag: str
) -> tuple[subprocess.Popen[bytes], Path, float]:
    port_file = workdir / f"agent-{tag}.port"
    port_file.unlink(missing_ok=True)
    log = (workdir / f"agent-{tag}.log").open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            *cli,
            "agent",
            "run",
            "--cloud",
            cloud,
            *trust,
            "--data-dir",
            str(data_dir),
            "--inference-host",
            "127.0.0.1",
            "--inference-port",
            "0",
            "--port-file",
            str(port_file),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, port_file, started


def time_to_ready(
    proc: subprocess.Popen[bytes], port_file: Path, started: float, timeout: float
) -> float:
    """Seconds from `started` until the agent answers ServerReady and ModelReady true."""
    from edgefleet.client.inference import InferenceClient
    from edgefleet.core.errors import EdgefleetError

    port = wait_for_file(port_file, proc, timeout)
    deadline = started + timeout
    with InferenceClient(f"127.0.0.1:{port}", timeout=1.0) as client:
        while time.perf_counter() < deadline:
            try:
                if client.ready() and client.model_ready(MODEL):
                    return time.perf_counter() - started
            except EdgefleetError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"the agent exited with {proc.returncode} before it was ready")
            time.sleep(0.005)
    raise SystemExit(f"the agent was not ready with {MODEL!r} within {timeout} s")


def bare_onnxruntime(model_path: Path) -> tuple[float, float]:
    """(seconds to a ready session, RSS MB) of a bare Python process with one ORT session."""
    code = (
        "import sys, onnxruntime as ort\n"
        "so = ort.SessionOptions(); so.intra_op_num_threads = 1\n"
        f"s = ort.InferenceSession({str(model_path)!r}, so, providers=['CPUExecutionProvider'])\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
    )
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.readline()
    elapsed = time.perf_counter() - started
    time.sleep(1.0)
    rss = rss_mb(proc.pid)
    proc.stdin.write(b"\n")
    proc.stdin.close()
    proc.wait()
    return elapsed, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle before RSS")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for ready")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    cli = edgefleet_command()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_path = work / "small_cnn.onnx"
        export_small_cnn(model_path)

        enroll_file = work / "enroll-token"
        enroll_file.write_text(secrets.token_hex(16))
        enroll_file.chmod(0o600)
        cloud_port_file = work / "cloud.port"
        cloud_log = (work / "cloud.log").open("wb")
        cloud_proc = subprocess.Popen(
            [
                *cli,
                "cloud",
                "serve",
                "--data-dir",
                str(work / "cloud"),
                "--port",
                "0",
                "--port-file",
                str(cloud_port_file),
                "--enroll-token-file",
                str(enroll_file),
            ],
            stdout=cloud_log,
            stderr=subprocess.STDOUT,
        )
        agent_proc: subprocess.Popen[bytes] | None = None
        try:
            cloud = f"127.0.0.1:{wait_for_file(cloud_port_file, cloud_proc, 60)}"
            ca = str(work / "cloud" / "trust" / "ca.pem")
            auth = ["--cloud", cloud, "--token-file", str(work / "cloud" / "admin-token")]
            auth += ["--ca-file", ca]
            root_key = (work / "cloud" / "trust" / "root-key.txt").read_text().strip()
            trust = ["--ca-file", ca, "--root-key", root_key]
            trust += ["--enroll-token-file", str(enroll_file)]
            subprocess.run(
                [*cli, "models", "push", MODEL, str(model_path), *auth],
                check=True,
                stdout=subprocess.DEVNULL,
            )

            def deploy_once_enrolled(deadline: float) -> None:
                # The cloud refuses a deployment before any device has enrolled.
                while True:
                    done = subprocess.run(
                        [*cli, "deploy", MODEL, "--version", "1", *auth],
                        capture_output=True,
                    )
                    if done.returncode == 0:
                        return
                    if time.monotonic() > deadline:
                        raise SystemExit(f"deploy kept failing: {done.stderr.decode()}")
                    time.sleep(0.1)

            data_dir = work / "agent"

            # 1. First start: enrol, then (once the device exists) deploy, download, verify,
            # smoke-test, load. This figure includes the deploy command's own run time.
            agent_proc, port_file, started = start_agent(cli, cloud, trust, data_dir, work, "1")
            deploy_once_enrolled(time.monotonic() + args.timeout)
            figures["first_start_to_ready_s"] = time_to_ready(
                agent_proc, port_file, started, args.timeout
            )
            time.sleep(args.idle)
            figures["idle_rss_mb"] = rss_mb(agent_proc.pid)
            stop(agent_proc)

            # 2. Restart from local state, cloud up.
            agent_proc, port_file, started = start_agent(cli, cloud, trust, data_dir, work, "2")
            figures["restart_to_ready_s"] = time_to_ready(
                agent_proc, port_file, started, args.timeout
            )
            time.sleep(args.idle)
            figures["restart_idle_rss_mb"] = rss_mb(agent_proc.pid)
            stop(agent_proc)

            # 3. Restart with the cloud gone: serves from local state alone.
            stop(cloud_proc)
            agent_proc, port_file, started = start_agent(cli, cloud, trust, data_dir, work, "3")
            figures["offline_restart_to_ready_s"] = time_to_ready(
                agent_proc, port_file, started, args.timeout
            )
            stop(agent_proc)
            agent_proc = None
        except SystemExit:
            for name in ("cloud.log", "agent-1.log", "agent-2.log", "agent-3.log"):
                log_path = work / name
                if log_path.exists():
                    tail = log_path.read_text(errors="replace").splitlines()[-15:]
                    print(f"--- last lines of {name}", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            if agent_proc is not None:
                stop(agent_proc)
            stop(cloud_proc)

        bare_s, bare_rss = bare_onnxruntime(model_path)
        figures["bare_ort_process_ready_s"] = bare_s
        figures["bare_ort_process_rss_mb"] = bare_rss

    print(f"\nagent footprint with one small CNN loaded ({os.cpu_count()} CPUs)")
    print(f"{'measure':<46} {'value':>9} {'target':>8} {'ratio':>7}")
    rows = [
        ("idle RSS, MB (first start)", figures["idle_rss_mb"], RSS_TARGET_MB),
        ("idle RSS, MB (restart)", figures["restart_idle_rss_mb"], RSS_TARGET_MB),
        (
            "start to ready, s (first: enrol+deploy+download)",
            figures["first_start_to_ready_s"],
            READY_TARGET_S,
        ),
        ("start to ready, s (restart, local state)", figures["restart_to_ready_s"], READY_TARGET_S),
        (
            "start to ready, s (restart, cloud offline)",
            figures["offline_restart_to_ready_s"],
            READY_TARGET_S,
        ),
        ("bare python + onnxruntime + 1 session, RSS MB", bare_rss, None),
        ("bare python + onnxruntime + 1 session, s", bare_s, None),
    ]
    for label, value, target in rows:
        t = f"{target:>8.1f}" if target else f"{'':>8}"
        r = f"{value / target:>6.2f}x" if target else f"{'':>7}"
        print(f"{label:<46} {value:>9.2f} {t} {r}")
    print(
        f"\nagent RSS / bare onnxruntime process RSS: {figures['idle_rss_mb'] / bare_rss:.2f}x; "
        f"agent restart-to-ready / bare session-ready: "
        f"{figures['restart_to_ready_s'] / bare_s:.2f}x"
    )
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
