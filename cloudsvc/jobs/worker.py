"""The worker process of one job: `python -m cloudsvc.jobs.worker JOB_DIR`.

Reads `spec.json` and `env.json` from JOB_DIR, runs the pipeline, and leaves
`result.json` (exit 0) or `error.json` (exit 2; 3 for an unexpected crash). Its stdout
carries only the JSON lines of cloudsvc.jobs.events; whatever libraries print goes to
stderr, which the manager keeps as the job's worker.log. A worker whose manager died
(the cloud crashed) stops within a second rather than training for nobody.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TextIO

from cloudsvc.jobs.events import Reporter
from cloudsvc.jobs.pipeline import WorkerEnv, run_compile, run_finetune
from cloudsvc.jobs.results import ERROR_FILE, RESULT_FILE, JobResult, WorkerError
from cloudsvc.jobs.spec import CompileSpec, spec_from_json
from edgefleet.core.errors import EdgefleetError

SPEC_FILE = "spec.json"
ENV_FILE = "env.json"
EXIT_FAILED = 2
EXIT_CRASHED = 3


def read_env(job_dir: Path) -> WorkerEnv:
    data = json.loads((job_dir / ENV_FILE).read_text())
    return WorkerEnv(
        job_id=data["job_id"],
        job_dir=job_dir,
        uploads_dir=Path(data["uploads_dir"]),
        cache_dir=Path(data["cache_dir"]),
        fashion_mnist_dir=Path(data["fashion_mnist_dir"]),
        threads=int(data.get("threads", 0)),
    )


def write_env(env: WorkerEnv) -> None:
    data = {
        "job_id": env.job_id,
        "uploads_dir": str(env.uploads_dir),
        "cache_dir": str(env.cache_dir),
        "fashion_mnist_dir": str(env.fashion_mnist_dir),
        "threads": env.threads,
    }
    (env.job_dir / ENV_FILE).write_text(json.dumps(data, indent=2))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(EXIT_CRASHED)


def _events_stream() -> TextIO:
    """A private handle on the real stdout for events; fd 1 and sys.stdout then point at
    stderr, so prints from torch, onnx and C extensions cannot corrupt the event stream."""
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


def run(job_dir: Path) -> int:
    report = Reporter(_events_stream())
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        env = read_env(job_dir)
        spec = spec_from_json((job_dir / SPEC_FILE).read_text())
        result: JobResult = (
            run_compile(spec, env, report)
            if isinstance(spec, CompileSpec)
            else run_finetune(spec, env, report)
        )
    except EdgefleetError as err:
        error = WorkerError(message=err.message, code=err.code.value, phase=report.current.phase)
        _write_atomically(job_dir / ERROR_FILE, error.model_dump_json())
        return EXIT_FAILED
    except Exception as err:
        traceback.print_exc()
        error = WorkerError(
            message=f"internal error: {type(err).__name__}: {err} (traceback in worker.log)",
            code="internal",
            phase=report.current.phase,
        )
        _write_atomically(job_dir / ERROR_FILE, error.model_dump_json())
        return EXIT_CRASHED
    _write_atomically(job_dir / RESULT_FILE, result.model_dump_json(indent=1))
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m cloudsvc.jobs.worker JOB_DIR")
    sys.exit(run(Path(args[0])))


if __name__ == "__main__":
    main()
