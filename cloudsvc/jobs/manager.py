"""Queue, run, watch and cancel jobs: one worker process per slot (each GPU, and the CPU).

A job is queued durably (metadata store) before submit returns. A scheduler thread starts
the oldest queued job that has a free slot of its kind, as a child process in its own
process group (so a cancel stops the worker and whatever it spawned). A reader thread
turns the worker's stdout lines into job events and progress; when the worker exits, its
result is registered here, in the cloud process, and the job ends succeeded, failed (with
the worker's reason) or cancelled. A job found running when the manager starts was cut
off by a stop or crash: it is marked failed, saying so and how to run it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cloudsvc.errors import InvalidRequest, NotReady, UnknownResource
from cloudsvc.jobs.env import (
    CLASS_NAMES_FILE,
    PARENT_GOLDEN,
    PARENT_SOURCE,
    SPEC_FILE,
    WorkerEnv,
)
from cloudsvc.jobs.evaluate import ARTIFACT_DIR, ARTIFACT_MANIFEST
from cloudsvc.jobs.events import parse_line
from cloudsvc.jobs.results import ERROR_FILE, RESULT_FILE, JobResult, WorkerError
from cloudsvc.jobs.spec import (
    CompileSpec,
    EvaluateSpec,
    FineTuneSpec,
    JobSpec,
    check_base,
    check_data,
    check_targets,
    default_targets,
    spec_from_json,
)
from cloudsvc.registry import DEFAULT_TARGET, Registry, check_name
from cloudsvc.settings import CloudSettings
from cloudsvc.store.metadata import MetadataStore
from compilers.targets import TARGETS, resolve_target
from edgefleet.core.jobs import Job, JobEvent, JobProgress, JobState
from edgefleet.core.wire import from_json

log = logging.getLogger(__name__)

_PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
WORKER_LOG = "worker.log"


@dataclass
class _Running:
    job_id: str
    slot: str
    process: subprocess.Popen[str]
    # Set when the manager itself ends the job (cancel, shutdown): why, and how.
    ended_by: tuple[JobState, str] | None = None


class JobManager:
    def __init__(self, metadata: MetadataStore, registry: Registry, cloud: CloudSettings) -> None:
        self.metadata = metadata
        self.registry = registry
        self.settings = cloud.jobs
        self.jobs_dir = cloud.jobs_dir
        self.uploads_dir = cloud.uploads_dir
        self.data_path = cloud.data_path if cloud.metadata_backend == "sqlite" else None
        self.cache_dir = cloud.feature_cache_dir
        self.gpu_slots = detect_gpus() if self.settings.gpus is None else self.settings.gpus
        self._slots = [f"cuda:{i}" for i in range(self.gpu_slots)] + [
            "cpu" if i == 0 else f"cpu:{i}" for i in range(self.settings.cpu_slots)
        ]
        self._running: dict[str, _Running] = {}  # slot -> job
        self._changed = threading.Condition()
        self._ticks = 0  # bumped on every event, so watchers never miss one
        self._closed = False
        self._scheduler: threading.Thread | None = None

    @property
    def slots(self) -> list[str]:
        """Where jobs run: "cuda:N" per GPU, "cpu" (and "cpu:N" for more CPU slots)."""
        return list(self._slots)

    # lifecycle ------------------------------------------------------------------------
    def start(self) -> JobManager:
        for job in self.metadata.list_jobs(states=[JobState.RUNNING], limit=10_000):
            phase = job.progress.phase or "start-up"
            self._drop_bulky(self.jobs_dir / job.job_id)
            self._finish(
                job,
                JobState.FAILED,
                f"interrupted: the cloud service stopped while this job was running "
                f"({phase}); start it again with `edgefleet jobs retry {job.job_id}`",
            )
        self._scheduler = threading.Thread(target=self._schedule, name="job-scheduler", daemon=True)
        self._scheduler.start()
        return self

    def stop(self) -> None:
        """Stop scheduling; end running workers, marking their jobs failed (retryable)."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            running = list(self._running.values())
            for job in running:
                job.ended_by = (
                    JobState.FAILED,
                    "interrupted: the cloud service stopped while this job was running; "
                    f"start it again with `edgefleet jobs retry {job.job_id}`",
                )
            self._changed.notify_all()
        for job in running:
            self._terminate(job)
        deadline = time.monotonic() + self.settings.cancel_grace_s + 5
        with self._changed:
            while self._running and time.monotonic() < deadline:
                self._changed.wait(0.1)
        if self._scheduler is not None:
            self._scheduler.join(timeout=5)

    # submissions ------------------------------------------------------------------------
    def submit(self, spec: JobSpec, retry_of: str = "") -> Job:
        """Check `spec` (cheap checks only), complete its defaults, and queue it."""
        if isinstance(spec, FineTuneSpec):
            spec = self._checked_finetune(spec)
        elif isinstance(spec, EvaluateSpec):
            spec = self._checked_evaluate(spec)
        else:
            spec = self._checked_compile(spec)
        slot_kind = spec.slot_kind(self.gpu_slots)
        if slot_kind == "gpu" and not self.gpu_slots:
            raise NotReady(
                "the job asks for CUDA (device=cuda or a GPU target), and this cloud has no GPU "
                "worker; use device=auto or cpu, or run the cloud on a machine with a GPU"
            )
        record = self.metadata.create_job(
            Job(
                job_id="",
                kind=spec.kind,
                model=spec.model,
                request_json=spec.model_dump_json(),
                created_at=time.time(),
                retry_of=retry_of,
            )
        )
        summary = _summary(spec)
        self._state_event(record.job_id, JobState.QUEUED, f"queued: {summary}")
        log.info("%s queued: %s", record.job_id, summary)
        return record

    def _checked_finetune(self, spec: FineTuneSpec) -> FineTuneSpec:
        check_name("model", spec.model)
        check_base(spec.base, self.uploads_dir)
        for reference in spec.data_references:
            check_data(
                reference,
                self.uploads_dir,
                self.settings.fashion_mnist_dir,
                self.settings.data_roots,
            )
        if len(set(spec.data_references)) != len(spec.data_references):
            raise InvalidRequest(
                f"data sets {list(spec.data_references)} name one twice; give each once"
            )
        targets = check_targets(spec.targets or default_targets(self.gpu_slots), self.gpu_slots)
        spec.trials()  # every combination must be valid settings
        parent = spec.parent_version
        if parent:
            self.registry.get_version(spec.model, parent)
        else:
            model = self.metadata.get_model(spec.model)
            parent = model.latest_version if model else 0
        if spec.test_data:
            check_data(
                spec.test_data,
                self.uploads_dir,
                self.settings.fashion_mnist_dir,
                self.settings.data_roots,
            )
            if spec.test_data in spec.data_references:
                raise InvalidRequest(
                    f"the test set {spec.test_data} is also training data: a test set must be "
                    "data the model never trains on"
                )
        warm_start = self._warm_start(spec, parent)
        if warm_start:
            # Its kept source (the FP32 export) is where the weights are read from.
            self.registry.source_digest(spec.model, parent)
        return spec.model_copy(
            update={"targets": targets, "parent_version": parent, "warm_start": warm_start}
        )

    def _warm_start(self, spec: FineTuneSpec, parent: int) -> bool:
        """Whether training starts from the parent's weights: asked for (`parent`, or a
        spec that says so already, as the closed loop's do), or by default (`auto`) where
        the parent was fine-tuned here from the same base."""
        if spec.from_parent == "base" and not spec.warm_start:
            return False
        lineage = self.registry.get_version(spec.model, parent).lineage if parent else None
        fits = (
            lineage is not None and lineage.base_model == spec.base
        )  # a backbone's name or an upload
        if spec.warm_start or spec.from_parent == "parent":
            if not parent:
                raise InvalidRequest(
                    f"starting from the parent's weights needs a parent version, and "
                    f"{spec.model} has none yet; fine-tune from the base first"
                )
            if lineage is None:
                raise InvalidRequest(
                    f"{spec.model} v{parent} was pushed, not fine-tuned here: its weights "
                    "cannot be started from; use --from-base"
                )
            if not fits:
                raise InvalidRequest(
                    f"{spec.model} v{parent} was fine-tuned from {lineage.base_model}, not "
                    f"{spec.base}: start from the base (--from-base) or use --base "
                    f"{lineage.base_model}"
                )
            return True
        return fits

    def _checked_compile(self, spec: CompileSpec) -> CompileSpec:
        profile = resolve_target(spec.target)
        check_targets((profile.name,), self.gpu_slots)
        version = self.registry.get_version(spec.model, spec.version)
        if version.artifact(profile.name) is not None:
            raise InvalidRequest(
                f"{spec.model} v{spec.version} already has a {profile.name} artifact; deploy "
                "it, or fine-tune a new version"
            )
        if spec.data:
            check_data(
                spec.data,
                self.uploads_dir,
                self.settings.fashion_mnist_dir,
                self.settings.data_roots,
            )
        source = self.registry.source_digest(spec.model, spec.version)
        return spec.model_copy(update={"target": profile.name, "source_digest": source})

    def _checked_evaluate(self, spec: EvaluateSpec) -> EvaluateSpec:
        """The version exists; the artifact scored is the one named, else onnx-cpu-fp32
        where the version has it, else its first; the data reference exists."""
        version = self.registry.get_version(spec.model, spec.version)
        have = ", ".join(a.target for a in version.artifacts) or "none"
        if spec.target:
            known = spec.target.strip().lower()
            name = known if known in TARGETS else spec.target
            artifact = version.artifact(name)
            if artifact is None:
                compile_hint = (
                    f"build it with `edgefleet compile {spec.model} --version {spec.version} "
                    f"--target {name}`, or "
                    if name in TARGETS
                    else ""
                )
                raise UnknownResource(
                    f"{spec.model} v{spec.version} has no {name} artifact (it has: {have}); "
                    f"{compile_hint}pick one of those with --target"
                )
        else:
            artifact = version.artifact(DEFAULT_TARGET) or next(iter(version.artifacts), None)
            if artifact is None:
                raise NotReady(f"{spec.model} v{spec.version} has no artifact to evaluate")
        if artifact.format != "onnx":
            raise InvalidRequest(
                f"the {artifact.target} artifact of {spec.model} v{spec.version} is a "
                f"{artifact.format} file, and evaluate runs ONNX artifacts; evaluate one of: "
                + ", ".join(a.target for a in version.artifacts if a.format == "onnx")
            )
        profile = TARGETS.get(artifact.target)
        if profile is not None and profile.needs_gpu and not self.gpu_slots:
            raise NotReady(
                f"{artifact.target} runs on a GPU, and this cloud has no GPU worker; evaluate "
                "a CPU artifact (onnx-cpu-fp32, onnx-cpu-int8) or run the cloud on a machine "
                "with a GPU"
            )
        if not spec.data:
            raise InvalidRequest(
                "evaluate needs labelled data: --data fashion-mnist:test, synthetic:N, "
                "captures:MODEL, or a local folder, .csv/.parquet or .npz (uploaded for you)"
            )
        check_data(
            spec.data, self.uploads_dir, self.settings.fashion_mnist_dir, self.settings.data_roots
        )
        return spec.model_copy(
            update={"target": artifact.target, "artifact_digest": artifact.manifest_digest}
        )

    def retry(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.state.finished:
            raise InvalidRequest(
                f"{job_id} is {job.state.value}; only a finished job can be retried"
            )
        return self.submit(spec_from_json(job.request_json), retry_of=job_id)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state.finished:
            raise InvalidRequest(f"{job_id} already ended ({job.state.value}); nothing to cancel")
        with self._changed:
            running = next((r for r in self._running.values() if r.job_id == job_id), None)
            if running is None:
                job = self.get(job_id)
                if job.state is JobState.QUEUED:
                    return self._finish(job, JobState.CANCELLED, "cancelled before it started")
                return job
            running.ended_by = (JobState.CANCELLED, "cancelled by the operator")
        self._log(job_id, "cancelling: stopping the worker")
        threading.Thread(target=self._terminate, args=(running,), daemon=True).start()
        return self.get(job_id)

    # reads ----------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        job = self.metadata.get_job(job_id)
        if job is None:
            raise UnknownResource(f"no job is called {job_id!r}; see `edgefleet jobs list`")
        return job

    def list(self, model: str = "", active_only: bool = False, limit: int = 100) -> list[Job]:
        states = [JobState.QUEUED, JobState.RUNNING] if active_only else []
        return self.metadata.list_jobs(model, states, limit or 100)

    def watch(
        self,
        job_id: str,
        after_seq: int = 0,
        follow: bool = True,
        alive: Callable[[], bool] = lambda: True,
        poll_s: float = 1.0,
    ) -> Iterator[JobEvent]:
        """The job's events after `after_seq`; with `follow`, new ones until the job ends
        (or the manager stops, or `alive()` turns false)."""
        self.get(job_id)
        seq = after_seq
        while True:
            with self._changed:
                tick = self._ticks
            for event in self.metadata.list_job_events(job_id, seq):
                seq = event.seq
                yield event
            if not follow or self.get(job_id).state.finished or self._closed or not alive():
                if follow and self.get(job_id).state.finished:
                    yield from self.metadata.list_job_events(job_id, seq)
                return
            with self._changed:
                if self._ticks == tick:
                    self._changed.wait(poll_s)

    # scheduling -----------------------------------------------------------------------
    def _schedule(self) -> None:
        while True:
            with self._changed:
                if self._closed:
                    return
                free = [s for s in self._slots if s not in self._running]
            if free:
                for job in reversed(self.metadata.list_jobs(states=[JobState.QUEUED], limit=1000)):
                    kind = spec_from_json(job.request_json).slot_kind(self.gpu_slots)
                    slot = next((s for s in free if s.startswith(kind[:3])), None)
                    if slot is None:
                        continue
                    free.remove(slot)
                    try:
                        self._launch(job, slot)
                    except Exception as err:  # a broken job must not stop the scheduler
                        log.exception("could not start %s", job.job_id)
                        self._finish(job, JobState.FAILED, f"could not start the worker: {err}")
                    if not free:
                        break
            with self._changed:
                if not self._closed:
                    self._changed.wait(1.0)

    def _launch(self, job: Job, slot: str) -> None:
        with self._changed:
            # A cancel may have ended it since the scheduler read the queue.
            current = self.get(job.job_id)
            if current.state is not JobState.QUEUED or self._closed:
                return
            job = dataclasses.replace(
                current, state=JobState.RUNNING, started_at=time.time(), slot=slot
            )
            self.metadata.update_job(job)
            process = self._spawn(job, slot)
            running = _Running(job.job_id, slot, process)
            self._running[slot] = running
        self._state_event(job.job_id, JobState.RUNNING, f"running on {slot} (pid {process.pid})")
        threading.Thread(
            target=self._follow, args=(running,), name=f"job-{job.job_id}", daemon=True
        ).start()

    def _spawn(self, job: Job, slot: str) -> subprocess.Popen[str]:
        spec = spec_from_json(job.request_json)
        job_dir = self.jobs_dir / job.job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / SPEC_FILE).write_text(job.request_json)
        WorkerEnv(
            job_id=job.job_id,
            job_dir=job_dir,
            uploads_dir=self.uploads_dir,
            cache_dir=self.cache_dir,
            fashion_mnist_dir=self.settings.fashion_mnist_dir,
            threads=self.settings.threads,
            data_path=self.data_path,
        ).write()
        if isinstance(spec, CompileSpec):
            manifest = self.registry.materialize(spec.source_digest, job_dir / "source")
            (job_dir / "source.manifest").write_bytes(manifest.SerializeToString())
        elif isinstance(spec, EvaluateSpec):
            manifest = self.registry.materialize(spec.artifact_digest, job_dir / ARTIFACT_DIR)
            (job_dir / ARTIFACT_MANIFEST).write_bytes(manifest.SerializeToString())
            # The classes in output order, where the manifest may not name them.
            lineage = self.registry.get_version(spec.model, spec.version).lineage
            if lineage is not None and lineage.class_names:
                (job_dir / CLASS_NAMES_FILE).write_text(json.dumps(list(lineage.class_names)))
        elif spec.parent_version:
            if spec.warm_start:
                # The parent's FP32 export: the worker reads its trained weights from it.
                source = self.registry.source_digest(spec.model, spec.parent_version)
                manifest = self.registry.materialize(source, job_dir / PARENT_SOURCE)
                names = manifest.preprocessing.params.get("class_names", "[]")
                (job_dir / PARENT_SOURCE / CLASS_NAMES_FILE).write_text(names)
            # Golden samples of the new version re-use its parent's inputs where they fit,
            # so a device moving from the parent fetches only the new expected outputs.
            inputs = self.registry.golden_inputs(spec.model, spec.parent_version)
            for index, data in enumerate(inputs):
                (job_dir / PARENT_GOLDEN).mkdir(exist_ok=True)
                (job_dir / PARENT_GOLDEN / f"{index:03d}.pb").write_bytes(data)
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = _visible_device(slot, os.environ.get("CUDA_VISIBLE_DEVICES"))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        with (job_dir / WORKER_LOG).open("ab") as stderr:
            return subprocess.Popen(
                [sys.executable, "-m", "cloudsvc.jobs.worker", str(job_dir)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env,
                start_new_session=True,  # its own process group: cancel reaches its children
            )

    def _follow(self, running: _Running) -> None:
        job_id = running.job_id
        assert running.process.stdout is not None
        try:
            for line in running.process.stdout:
                try:
                    parsed = parse_line(line)
                    if parsed.kind == "progress" and parsed.progress is not None:
                        self._progress(job_id, parsed.progress)
                    elif parsed.message:
                        self._log(job_id, parsed.message)
                except Exception:  # one bad line must not stop reading (the pipe would fill)
                    log.exception("%s: could not record a worker line", job_id)
            code = running.process.wait()
            self._conclude(running, code)
        except Exception as err:
            log.exception("finishing %s failed", job_id)
            self._finish(self.get(job_id), JobState.FAILED, f"internal error: {err}")
        finally:
            with self._changed:
                self._running.pop(running.slot, None)
                self._changed.notify_all()

    def _conclude(self, running: _Running, code: int) -> None:
        job = self.get(running.job_id)
        job_dir = self.jobs_dir / job.job_id
        if running.ended_by is not None:
            state, reason = running.ended_by
            self._finish(job, state, reason)
        elif code == 0 and (job_dir / RESULT_FILE).is_file():
            self._register(job, job_dir)
        else:
            self._finish(job, JobState.FAILED, self._failure(job_dir, code))
        self._drop_bulky(job_dir)

    def _drop_bulky(self, job_dir: Path) -> None:
        """Builds and sources are registered (or worthless) once a job ends; logs stay."""
        if not self.settings.keep_files:
            for bulky in ("builds", "source", ARTIFACT_DIR, PARENT_GOLDEN, PARENT_SOURCE):
                shutil.rmtree(job_dir / bulky, ignore_errors=True)

    def _failure(self, job_dir: Path, code: int) -> str:
        error_file = job_dir / ERROR_FILE
        if error_file.is_file():
            error = from_json(WorkerError, error_file.read_text())
            return f"{error.phase}: {error.message}" if error.phase else error.message
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the machine may have run out of memory)" if name == "SIGKILL" else ""
            return f"the worker was killed by {name}{hint}; see {job_dir / WORKER_LOG}"
        tail = _tail(job_dir / WORKER_LOG, 3)
        return f"the worker exited with code {code}: {tail}; see {job_dir / WORKER_LOG}"

    def _register(self, job: Job, job_dir: Path) -> None:
        spec = spec_from_json(job.request_json)
        result = from_json(JobResult, (job_dir / RESULT_FILE).read_text())
        self._progress(job.job_id, JobProgress(phase="registering"))
        builds = list(result.builds)
        if isinstance(spec, FineTuneSpec):
            assert result.source is not None and result.lineage and result.evaluation
            description = spec.description or (
                f"{result.lineage.strategy} fine-tune of {result.lineage.base_model} on "
                f"{spec.data}: validation accuracy {result.evaluation.accuracy:.1%}"
            )
            version = self.registry.add_build(
                spec.model,
                builds,
                source=result.source,
                description=description,
                parent_version=spec.parent_version,
                lineage=result.lineage,
                evaluation=result.evaluation,
                test=result.test,
                baseline=result.baseline,
                metadata={"job": job.job_id},
                created_by=f"job {job.job_id}",
            )
            number = version.version
            message = (
                f"registered {spec.model} v{number} ({', '.join(b.target for b in builds)}); "
                f"validation accuracy {result.evaluation.accuracy:.2%}"
            )
        elif isinstance(spec, EvaluateSpec):
            scored = result.scored
            assert scored is not None
            self.metadata.add_evaluation(spec.model, spec.version, scored)
            number = spec.version
            low, high = scored.interval()
            message = (
                f"recorded with {spec.model} v{number}: {spec.target} accuracy "
                f"{scored.accuracy:.2%} (95% CI {low:.2%} to {high:.2%}, n={scored.count}) "
                f"on {spec.data}"
            )
        else:
            self.registry.add_target(spec.model, spec.version, builds[0])
            number = spec.version
            message = f"added {builds[0].target} to {spec.model} v{number}"
        done = dataclasses.replace(
            self.get(job.job_id),
            result_version=number,
            trials=result.trials,
            targets=result.outcomes,
        )
        self.metadata.update_job(done)
        self._log(job.job_id, message)
        self._finish(done, JobState.SUCCEEDED, "")

    # state and events --------------------------------------------------------------------
    def _finish(self, job: Job, state: JobState, error: str) -> Job:
        current = self.metadata.get_job(job.job_id) or job
        done = dataclasses.replace(current, state=state, finished_at=time.time(), error=error)
        self.metadata.update_job(done)
        text = state.value + (f": {error}" if error else "")
        self._state_event(job.job_id, state, text)
        log.info("%s %s", job.job_id, text)
        return done

    def _progress(self, job_id: str, progress: JobProgress) -> None:
        job = self.get(job_id)
        self.metadata.update_job(dataclasses.replace(job, progress=progress))
        self._event(JobEvent(job_id, 0, time.time(), "progress", progress.describe(), progress))

    def _state_event(self, job_id: str, state: JobState, message: str) -> None:
        self._event(JobEvent(job_id, 0, time.time(), "state", message, state=state))

    def _log(self, job_id: str, message: str) -> None:
        self._event(JobEvent(job_id, 0, time.time(), "log", message))

    def _event(self, event: JobEvent) -> None:
        self.metadata.add_job_event(event)
        with self._changed:
            self._ticks += 1
            self._changed.notify_all()

    def _terminate(self, running: _Running) -> None:
        process = running.process
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(self.settings.cancel_grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(text[-lines:]) or "no output"


def _summary(spec: JobSpec) -> str:
    if isinstance(spec, CompileSpec):
        return f"compile {spec.model} v{spec.version} for {spec.target}"
    if isinstance(spec, EvaluateSpec):
        return (
            f"evaluate {spec.model} v{spec.version} ({spec.target}) on {spec.data}, "
            f"{spec.sample} examples at most"
        )
    trials = spec.trials()
    search = f", search of {len(trials)} trial(s)" if spec.search else ""
    warm = f", warm start from v{spec.parent_version}" if spec.warm_start else ""
    seeds = f", {spec.seeds} seeds each" if spec.seeds > 1 else ""
    test = (
        f"; test set {spec.test_data}"
        if spec.test_data
        else f"; {spec.test_fraction:.0%} kept as the test set"
        if spec.test_fraction
        else ""
    )
    final = "; a final run on training + validation data" if spec.final else ""
    return (
        f"fine-tune {spec.model} from {spec.base}{warm} on {' + '.join(spec.data_references)} "
        f"({spec.params.strategy}, {spec.params.epochs} epochs{search}{seeds}){test}{final}; "
        f"targets {', '.join(spec.targets)}"
    )


def _visible_device(slot: str, visible: str | None) -> str:
    """What CUDA_VISIBLE_DEVICES a worker on `slot` sees: the slot's GPU among those the
    cloud itself was given (the operator's CUDA_VISIBLE_DEVICES), or none for the CPU."""
    if not slot.startswith("cuda"):
        return ""
    index = int(slot.split(":")[1])
    given = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return given[index] if index < len(given) else str(index)


def detect_gpus() -> int:
    """How many GPUs NVIDIA's driver lists here (0 without the driver or `nvidia-smi`), or
    how many CUDA_VISIBLE_DEVICES names when the operator narrowed them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip()])
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))
