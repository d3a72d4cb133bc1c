"""What a job was asked to do, validated before it is queued (torch-free).

The specs are what the store keeps as a job's request (JSON) and what a worker process is
handed; `retry` submits the same spec again. Every check here is cheap: names, ranges,
the search grid, targets against this cloud's slots, data references that must exist.
The worker's first phase checks what needs the data and the backbone loaded.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cloudsvc.errors import Forbidden, InvalidRequest, NotReady, UnknownResource
from compilers.targets import TARGETS, Precision, resolve_target
from transfer.catalog import known_backbones

Strategy = Literal["head", "last-n", "full"]
UPLOAD_PREFIX = "upload:"
BUILT_IN_DATA = ("fashion-mnist", "fashion-mnist:train", "fashion-mnist:test", "synthetic")
MAX_TRIALS_LIMIT = 64
MAX_EXTRA_DATA = 8
MAX_SEEDS = 8
# Every trial of a search is scored on one split, on one device, at one input size, so
# that their validation accuracies compare; these settings cannot vary between trials.
SEARCHABLE = (
    "strategy",
    "epochs",
    "lr",
    "batch_size",
    "weight_decay",
    "unfreeze_blocks",
    "backbone_lr_scale",
    "patience",
)


class FineTuneParams(BaseModel):
    """The settings of one fine-tune run (one trial of a search)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = Field(default="head", description="head, last-n or full")
    epochs: int = Field(default=20, ge=1, le=10_000)
    lr: float = Field(default=3e-3, gt=0, le=10)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    weight_decay: float = Field(default=0.0, ge=0)
    unfreeze_blocks: int = Field(default=1, ge=1, description="last-n: backbone blocks that train")
    backbone_lr_scale: float = Field(default=0.1, gt=0, description="backbone rate = lr * this")
    patience: int = Field(default=5, ge=0, description="epochs without improvement; 0 never stops")
    seed: int = Field(default=0, ge=0)
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int | None = Field(default=None, ge=8, le=1024, description="resize images to this")

    @classmethod
    def parse(cls, values: dict[str, Any], where: str = "params") -> FineTuneParams:
        """The params from string or typed values; InvalidRequest naming the bad one."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
                for e in err.errors()
            )
            known = ", ".join(cls.model_fields)
            raise InvalidRequest(f"{where}: {problems} (settings: {known})") from None

    def as_strings(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.model_dump().items() if v is not None}


class DataOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label_column: str = "label"
    text_column: str | None = None
    limit: int = Field(default=0, ge=0)


class FineTuneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["finetune"] = "finetune"
    model: str
    base: str
    data: str
    data_options: DataOptions = DataOptions()
    params: FineTuneParams = FineTuneParams()
    search: tuple[tuple[str, tuple[str, ...]], ...] = ()
    max_trials: int = Field(default=8, ge=1, le=MAX_TRIALS_LIMIT)
    targets: tuple[str, ...] = ()
    description: str = ""
    parent_version: int = 0
    max_accuracy_drop: float = Field(default=0.01, ge=0, le=1)
    # More data sets trained on together with `data` (same kind and input shape; the
    # classes are the union), e.g. captured rows plus the parent's original data.
    extra_data: tuple[str, ...] = Field(default=(), max_length=MAX_EXTRA_DATA)
    # Start from the parent version's trained weights (its head, and the backbone tensors
    # it trained) instead of a fresh head: lineage records warm_start_from. Resolved at
    # submission from `from_parent` (what the user asked for).
    warm_start: bool = False
    # auto: from the parent where one exists and was fine-tuned from the same base; parent:
    # always (refused without a fitting parent); base: never.
    from_parent: Literal["auto", "parent", "base"] = "auto"
    # The test set: a data set of its own, or a stratified share of `data` kept apart
    # before the train/validation split. No training, early stopping, search or gate
    # reads it; the chosen version is scored on it once.
    test_data: str = ""
    test_fraction: float = Field(default=0.0, ge=0, lt=1)
    # Train the chosen settings again on training + validation data for the epoch count
    # the validation run chose, keeping the last epoch.
    final: bool = False
    # Seeds each trial runs with (seed, seed+1, ...): their spread is reported, their mean
    # ranks the trials.
    seeds: int = Field(default=1, ge=1, le=MAX_SEEDS)

    @property
    def data_references(self) -> tuple[str, ...]:
        """Every data set the job trains on, `data` first."""
        return (self.data, *self.extra_data)

    @model_validator(mode="after")
    def _check_search(self) -> FineTuneSpec:
        if self.test_data and self.test_fraction:
            raise ValueError(
                "give the test set one way: --test DATA or --test-split FRACTION, not both"
            )
        if self.test_fraction and self.test_fraction + self.params.validation_fraction >= 0.9:
            raise ValueError(
                f"test share {self.test_fraction} and validation share "
                f"{self.params.validation_fraction} leave under 10% of the data to train on"
            )
        seen: set[str] = set()
        for name, values in self.search:
            if name not in SEARCHABLE:
                fixed = " (every trial uses one split, device and input size)"
                raise ValueError(
                    f"cannot search over {name!r}{fixed if name in FineTuneParams.model_fields else ''}; "
                    f"searchable: {', '.join(SEARCHABLE)}"
                )
            if name in seen:
                raise ValueError(f"search names {name!r} twice; give its values in one --search")
            if not values:
                raise ValueError(f"search over {name!r} lists no values; write {name}=A,B")
            seen.add(name)
        return self

    def trials(self) -> list[FineTuneParams]:
        """Every combination of the search axes over `params` (just `params` without a
        search), in grid order, cut to max_trials."""
        if not self.search:
            return [self.params]
        names = [name for name, _ in self.search]
        grid = itertools.product(*(values for _, values in self.search))
        base = self.params.model_dump()
        out = []
        for combo in itertools.islice(grid, self.max_trials):
            overrides = dict(zip(names, combo, strict=True))
            where = "search " + ", ".join(f"{k}={v}" for k, v in overrides.items())
            out.append(FineTuneParams.parse({**base, **overrides}, where))
        return out

    def slot_kind(self, gpu_slots: int) -> Literal["gpu", "cpu"]:
        """Where it runs: on a GPU when it asks for CUDA or a GPU target, or says auto
        and the cloud has a GPU worker; else on the CPU slot."""
        devices = {p.device for p in self.trials()}
        if "cuda" in devices or any(TARGETS[t].needs_gpu for t in self.targets):
            return "gpu"
        return "gpu" if gpu_slots and "auto" in devices else "cpu"


class CompileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["compile"] = "compile"
    model: str
    version: int = Field(ge=1)
    target: str
    data: str = ""
    data_options: DataOptions = DataOptions()
    max_accuracy_drop: float = Field(default=0.01, ge=0, le=1)
    # Resolved at submission: the manifest of what the target is compiled from.
    source_digest: str = ""

    def slot_kind(self, gpu_slots: int) -> Literal["gpu", "cpu"]:
        return "gpu" if TARGETS[self.target].needs_gpu else "cpu"


DEFAULT_EVALUATION_SAMPLE = 2000


class EvaluateSpec(BaseModel):
    """Score one artifact of a version on labelled data; the result is kept with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["evaluate"] = "evaluate"
    model: str
    version: int = Field(ge=1)
    target: str = ""  # resolved at submission: onnx-cpu-fp32 where it exists, else the first
    data: str
    data_options: DataOptions = DataOptions()
    sample: int = Field(default=DEFAULT_EVALUATION_SAMPLE, ge=1, le=1_000_000)
    # Resolved at submission: the manifest of the artifact scored.
    artifact_digest: str = ""

    def slot_kind(self, gpu_slots: int) -> Literal["gpu", "cpu"]:
        return "gpu" if self.target in TARGETS and TARGETS[self.target].needs_gpu else "cpu"


JobSpec = FineTuneSpec | CompileSpec | EvaluateSpec


def parse_spec(
    cls: type[FineTuneSpec] | type[CompileSpec] | type[EvaluateSpec], data: dict[str, Any]
) -> JobSpec:
    """A spec from request fields; InvalidRequest naming every problem."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            (f"{'.'.join(str(p) for p in e['loc'])}: " if e["loc"] else "")
            + str(e["msg"]).removeprefix("Value error, ")
            for e in err.errors()
        )
        raise InvalidRequest(problems) from None


def spec_from_json(text: str) -> JobSpec:
    data = json.loads(text)
    if data.get("kind") == "compile":
        return CompileSpec.model_validate(data)
    if data.get("kind") == "evaluate":
        return EvaluateSpec.model_validate(data)
    return FineTuneSpec.model_validate(data)


# ---------------------------------------------------------------- checks at submission


def check_base(base: str, uploads_dir: Path) -> None:
    """A known backbone name or an uploaded model file; UnknownResource otherwise."""
    if base in known_backbones():
        return
    if base.startswith(UPLOAD_PREFIX):
        resolve_upload(base, uploads_dir)
        return
    raise UnknownResource(
        f"unknown backbone {base!r}: use one of {', '.join(known_backbones())}, or upload a "
        "TorchScript / torch.export file (the CLI does it when --base is a local file)"
    )


def check_data(
    data: str, uploads_dir: Path, fashion_mnist_dir: Path, data_roots: tuple[Path, ...] = ()
) -> None:
    """A built-in data set, an upload, captures, or a path on this machine under one of
    `data_roots` (the operator's `jobs.data_roots`; none by default). A job reads what it
    names and may echo its class names in errors that viewers read, so no request may
    name an arbitrary file of the cloud machine, nor learn whether one exists."""
    if not data:
        raise InvalidRequest(
            "a fine-tune needs a data set: --data fashion-mnist, synthetic, captures:MODEL, or a "
            "local folder, .csv/.parquet or .npz (uploaded for you)"
        )
    if data.startswith("fashion-mnist"):
        if data not in BUILT_IN_DATA:
            raise InvalidRequest(f"{data!r}: write fashion-mnist or fashion-mnist:test")
        if not (fashion_mnist_dir / "train-images-idx3-ubyte.gz").exists():
            raise NotReady(
                f"fashion-mnist is not installed on the cloud machine (looked in "
                f"{fashion_mnist_dir}); install it there with `apt-get install "
                "dataset-fashion-mnist`, or upload your own data"
            )
        return
    if data == "synthetic" or data.startswith("synthetic:"):
        return  # its COUNT/SEED are checked when the worker generates it
    if data.startswith("captures:"):
        from cloudsvc.jobs.captures import parse

        parse(data)  # the rows themselves are read when the job starts
        return
    if data.startswith(UPLOAD_PREFIX):
        resolve_upload(data, uploads_dir)
        return
    if not within(Path(data), data_roots):
        unknown = (
            f"data set {data!r} is neither built in ({', '.join(BUILT_IN_DATA)}), an upload, "
            "nor captures"
        )
        if "/" not in data and not data.startswith("."):
            raise UnknownResource(f"{unknown}; give a local path to the CLI to upload it")
        raise Forbidden(
            f"{unknown}; paths on the cloud machine are read only under the folders its "
            "operator lists in jobs.data_roots. Give a local path to the CLI to upload it"
        )
    if not _exists(Path(data)):
        raise UnknownResource(f"data set {data!r} does not exist under jobs.data_roots")


def within(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether `path`, with links and `..` resolved, lies in one of `roots` (resolved too)."""
    try:
        resolved = path.resolve()
        return any(resolved.is_relative_to(root.resolve()) for root in roots)
    except (OSError, RuntimeError, ValueError):  # a refused name, a link loop, a NUL byte
        return False


def _exists(path: Path) -> bool:
    """Path.exists, but False for a name the file system refuses (too long): such a name
    comes from a request and names nothing here."""
    try:
        return path.exists()
    except OSError:
        return False


def resolve_upload(reference: str, uploads_dir: Path) -> Path:
    """The file or folder an `upload:<digest>/<name>` reference names."""
    rest = reference.removeprefix(UPLOAD_PREFIX)
    digest, _, name = rest.partition("/")
    if not digest or not name or "/" in name or name in (".", "..") or not digest.isalnum():
        raise InvalidRequest(f"{reference!r} is not an upload reference (upload:<digest>/<name>)")
    path = uploads_dir / digest / name
    if not _exists(path):
        raise UnknownResource(
            f"upload {reference!r} is not on this cloud (uploads are per cloud); upload it again"
        )
    return path


def check_targets(targets: tuple[str, ...], gpu_slots: int) -> tuple[str, ...]:
    """The targets resolved by name; errors for unknown ones and for GPU targets on a cloud
    without a GPU worker."""
    resolved = []
    for name in targets:
        profile = resolve_target(name)
        if profile.needs_gpu and gpu_slots == 0:
            raise NotReady(
                f"target {profile.name} is built on a GPU, and this cloud has no GPU worker; "
                "use onnx-cpu-fp32 or onnx-cpu-int8, or run the cloud on a machine with a GPU"
            )
        resolved.append(profile.name)
    if len(set(resolved)) != len(resolved):
        raise InvalidRequest(f"targets {list(targets)} name one target twice")
    return tuple(resolved)


def default_targets(gpu_slots: int) -> tuple[str, ...]:
    """Every CPU target, plus ONNX FP16 on GPU where the cloud has a GPU worker."""
    out = [n for n, p in TARGETS.items() if not p.needs_gpu]
    if gpu_slots:
        out += [n for n, p in TARGETS.items() if p.needs_gpu and p.precision is Precision.FP16]
        out = [n for n in out if TARGETS[n].requires_module is None]
    return tuple(out)
