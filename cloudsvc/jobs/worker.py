"""The worker process of one job: `python -m cloudsvc.jobs.worker JOB_DIR`.

Reads `spec.json` and `env.json` from JOB_DIR, runs the pipeline, and leaves
`result.json` (exit 0) or `error.json` (exit 2; 3 for an unexpected crash). Its stdout
carries only the JSON lines of cloudsvc.jobs.events; whatever libraries print goes to
stderr, which the manager keeps as the job's worker.log. A worker whose manager died
(the cloud crashed) stops within a second rather than training for nobody.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TextIO

from cloudsvc.jobs.env import SPEC_FILE, WorkerEnv
from cloudsvc.jobs.events import Reporter
from cloudsvc.jobs.results import ERROR_FILE, RESULT_FILE, JobResult, WorkerError
from cloudsvc.jobs.spec import CompileSpec, EvaluateSpec, JobSpec, spec_from_json
from edgefleet.core.errors import EdgefleetError
from edgefleet.core.wire import to_json

EXIT_FAILED = 2
EXIT_CRASHED = 3


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


def _run(spec: JobSpec, env: WorkerEnv, report: Reporter) -> JobResult:
    # Imported here: the pipelines pull in torch (evaluate does not), which the manager
    # never needs.
    if isinstance(spec, EvaluateSpec):
        from cloudsvc.jobs.evaluate import run_evaluate

        return run_evaluate(spec, env, report)
    if isinstance(spec, CompileSpec):
        from cloudsvc.jobs.compile import run_compile

        return run_compile(spec, env, report)
    from cloudsvc.jobs.finetune import run_finetune

    return run_finetune(spec, env, report)


def run(job_dir: Path) -> int:
    report = Reporter(_events_stream())
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        env = WorkerEnv.read(job_dir)
        spec = spec_from_json((job_dir / SPEC_FILE).read_text())
        result = _run(spec, env, report)
    except EdgefleetError as err:
        error = WorkerError(message=err.message, code=err.code.value, phase=report.current.phase)
        _write_atomically(job_dir / ERROR_FILE, to_json(error))
        return EXIT_FAILED
    except Exception as err:
        traceback.print_exc()
        error = WorkerError(
            message=f"internal error: {type(err).__name__}: {err} (traceback in worker.log)",
            code="internal",
            phase=report.current.phase,
        )
        _write_atomically(job_dir / ERROR_FILE, to_json(error))
        return EXIT_CRASHED
    _write_atomically(job_dir / RESULT_FILE, to_json(result))
    return 0


def main(argv: list[str] | None = None) -> None:
    # The manager stops a cancelled worker with SIGTERM; a mask inherited from a thread or
    # parent that blocked it would leave the worker running until SIGKILL.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m cloudsvc.jobs.worker JOB_DIR")
    sys.exit(run(Path(args[0])))


if __name__ == "__main__":
    main()
