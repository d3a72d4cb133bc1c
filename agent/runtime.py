"""ONNX Runtime sessions on the best local execution provider, and the set of loaded models.

The inference server reads from ``ModelRepository``; the reconciler publishes into it. A new
version is loaded and smoke-tested before it is published, and the old one is dropped only
after the swap, so requests never see a half-loaded model (load new, switch, unload old).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException as OrtRuntimeException

from agent.errors import ArtifactRejected, InvalidRequest, ModelNotFound
from edgefleet.core.fleet import Variant
from edgefleet.core.tensors import CLASS_NAMES_KEY, ORT_TO_DATATYPE, parse_class_names
from edgefleet.core.versions import TensorSpec

log = logging.getLogger(__name__)

# Best first. Providers not in this list (Azure, ...) are never chosen automatically.
PROVIDER_PREFERENCE: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)


def available_providers() -> list[str]:
    """Execution providers this ONNX Runtime build offers, in our order of preference."""
    have = set(ort.get_available_providers())
    return [p for p in PROVIDER_PREFERENCE if p in have]


@dataclass(frozen=True)
class SessionOptions:
    # Preferred providers, best first; empty means PROVIDER_PREFERENCE.
    providers: Sequence[str] = ()
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    inter_op_threads: int = 0
    # Shrink the arena after runs on large inputs (off only to measure what it saves).
    shrink_after_large_runs: bool = True


def create_session(model_path: Path, options: SessionOptions) -> tuple[ort.InferenceSession, str]:
    """A session on the best provider that loads the model, and that provider's name.

    Each preferred provider is tried in turn; a failure is logged with its reason and the
    next one is tried, down to CPU. Only when no provider loads the model is it rejected.
    """
    wanted = list(options.providers) or list(PROVIDER_PREFERENCE)
    have = set(ort.get_available_providers())
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    errors: list[str] = []
    for provider in wanted:
        if provider not in have:
            log.info("execution provider %s is not available in this onnxruntime build", provider)
            continue
        try:
            session = ort.InferenceSession(str(model_path), sess_options=so, providers=[provider])
        except Exception as err:  # ORT raises its own types; each is a reason to fall back
            reason = f"{provider}: {type(err).__name__}: {err}"
            log.warning("falling back from %s", reason)
            errors.append(reason)
            continue
        return session, provider
    detail = "; ".join(errors) or f"none of {wanted} is available (have {sorted(have)})"
    raise ArtifactRejected(f"ONNX Runtime cannot load {model_path.name}: {detail}")


def _tensor_specs(nodes: Sequence[ort.NodeArg]) -> tuple[TensorSpec, ...]:
    specs = []
    for node in nodes:
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
        specs.append(TensorSpec(node.name, ORT_TO_DATATYPE.get(node.type, node.type), shape))
    return tuple(specs)


# After a run on inputs this large, ONNX Runtime hands the arena memory the run grew back:
# a batch of 64 images took EfficientNet-Lite0's arena to gigabytes, kept for good.
SHRINK_AFTER_BYTES = 1 << 20
_SHRINK = ort.RunOptions()
_SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


@dataclass
class LoadedModel:
    """One version of one model, loaded and ready to run."""

    name: str
    version: int
    digest: str  # manifest digest
    session: ort.InferenceSession
    execution_provider: str
    inputs: tuple[TensorSpec, ...] = field(init=False)
    outputs: tuple[TensorSpec, ...] = field(init=False)
    shrink: bool = True
    # The names of the output classes, from the model's metadata (CLASS_NAMES_KEY); () when
    # it has none.
    class_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = _tensor_specs(self.session.get_inputs())
        self.outputs = _tensor_specs(self.session.get_outputs())
        meta = self.session.get_modelmeta().custom_metadata_map
        self.class_names = parse_class_names(meta.get(CLASS_NAMES_KEY, ""))

    def run(
        self, feeds: dict[str, npt.NDArray[np.generic]], output_names: Sequence[str] | None = None
    ) -> list[npt.NDArray[np.generic]]:
        """Run the session; inputs the model cannot compute on raise InvalidRequest.

        Each input may pass its own checks and still not fit the others (two dynamic
        dimensions that must be equal, say); ONNX Runtime then fails inside a node. The
        model passed its smoke test, so such a failure is the request's, not the server's.
        """
        names = list(output_names) if output_names else [o.name for o in self.outputs]
        large = self.shrink and sum(a.nbytes for a in feeds.values()) > SHRINK_AFTER_BYTES
        try:
            result: list[npt.NDArray[np.generic]] = self.session.run(
                names, feeds, _SHRINK if large else None
            )
        except (OrtInvalidArgument, OrtFail) as err:
            raise InvalidRequest(
                f"model {self.name!r} v{self.version} cannot run on these inputs: {err}"
            ) from None
        except OrtRuntimeException as err:
            # ONNX Runtime up to 1.23 (the newest for Python 3.10) raises this for shapes
            # that do not broadcast; anything else of this class stays the server's.
            if "broadcast" not in str(err).lower():
                raise
            raise InvalidRequest(
                f"model {self.name!r} v{self.version} cannot run on these inputs: {err}"
            ) from None
        return result


def load_model(
    name: str, version: int, digest: str, model_path: Path, options: SessionOptions
) -> LoadedModel:
    session, provider = create_session(model_path, options)
    model = LoadedModel(name, version, digest, session, provider)
    model.shrink = options.shrink_after_large_runs
    return model


def bucket(key: str) -> float:
    """A routing key's stable place in [0, 1): the same key lands on the same version, on
    every device and across restarts (Python's own hash is salted per process)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Traffic:
    """How one model's requests that name no version are split: the A/B variants by the
    upper end of their slice of [0, 1) (the primary takes the rest), and the shadow."""

    slices: tuple[tuple[int, float], ...] = ()
    shadow: int = 0

    @classmethod
    def of(cls, variants: Sequence[Variant]) -> Traffic:
        slices, upper = [], 0.0
        for v in variants:
            if not v.shadow and v.weight > 0:
                # A variant's slice starts at 0, so raising its weight only adds keys to it:
                # sticky clients already on it stay there.
                upper += v.weight
                slices.append((v.version, upper))
        shadow = next((v.version for v in variants if v.shadow), 0)
        return cls(tuple(slices), shadow)


class ModelRepository:
    """The models being served, by name and version. Thread-safe; reads take no lock.

    Each model has a default version (the one requests without ``model_version`` get) and
    may have others loaded at the same time (e.g. the previous one, for rollback).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # name -> (default version, {version: model}); replaced whole, never mutated, so
        # readers see either the old or the new mapping.
        self._models: dict[str, tuple[int, dict[int, LoadedModel]]] = {}
        self._traffic: dict[str, Traffic] = {}
        self._random = random.Random()

    def publish(self, model: LoadedModel, *, keep: Sequence[int] = ()) -> list[LoadedModel]:
        """Make `model` the default version of its name; keep only `keep` other versions.

        Returns the models dropped, so the caller can release them after the switch.
        """
        with self._lock:
            _, current = self._models.get(model.name, (0, {}))
            retained = {v: m for v, m in current.items() if v in keep and v != model.version}
            dropped = [m for v, m in current.items() if v not in retained and m is not model]
            retained[model.version] = model
            new = dict(self._models)
            new[model.name] = (model.version, retained)
            self._models = new
        return dropped

    def remove(self, name: str) -> list[LoadedModel]:
        with self._lock:
            new = dict(self._models)
            _, gone = new.pop(name, (0, {}))
            self._models = new
            self._traffic = {k: t for k, t in self._traffic.items() if k != name}
        return list(gone.values())

    def add(self, model: LoadedModel) -> LoadedModel | None:
        """Serve `model` beside its name's default version (which stays the default); the
        model it replaces at that version, if any. ModelNotFound when the name has none."""
        with self._lock:
            entry = self._models.get(model.name)
            if entry is None:
                raise ModelNotFound(f"model {model.name!r} has no default version to serve beside")
            default, versions = entry
            if model.version == default:
                raise InvalidRequest(f"{model.name} v{model.version} is its default version")
            replaced = versions.get(model.version)
            self._models = {
                **self._models,
                model.name: (default, {**versions, model.version: model}),
            }
        return replaced

    def drop(self, name: str, version: int) -> LoadedModel | None:
        """Stop serving a version other than the default; the model dropped, if any."""
        with self._lock:
            entry = self._models.get(name)
            if entry is None or entry[0] == version or version not in entry[1]:
                return None
            default, versions = entry
            kept = {v: m for v, m in versions.items() if v != version}
            self._models = {**self._models, name: (default, kept)}
            return versions[version]

    def set_traffic(self, name: str, variants: Sequence[Variant]) -> None:
        """Split `name`'s requests that name no version between its default and `variants`
        (none: the default takes them all)."""
        traffic = Traffic.of(variants)
        with self._lock:
            rest = {k: t for k, t in self._traffic.items() if k != name}
            self._traffic = {**rest, name: traffic} if traffic != Traffic() else rest

    def traffic(self, name: str) -> Traffic:
        return self._traffic.get(name, Traffic())

    def route(self, name: str, key: str = "") -> tuple[LoadedModel, LoadedModel | None]:
        """The version a request naming no version runs on (by its routing `key`'s bucket,
        or at random without one) and the shadow that gets a copy of it (None: none). A
        variant not loaded (still downloading, or refused) leaves its share to the default."""
        traffic = self._traffic.get(name)
        if traffic is None:
            return self.get(name), None
        entry = self._models.get(name)
        if entry is None:
            return self.get(name), None
        default, versions = entry
        chosen = versions[default]
        if traffic.slices:
            point = bucket(key) if key else self._random.random()
            for version, upper in traffic.slices:
                if point < upper:
                    chosen = versions.get(version, chosen)
                    break
        shadow = versions.get(traffic.shadow) if traffic.shadow else None
        return chosen, shadow

    def get(self, name: str, version: str | int | None = None) -> LoadedModel:
        entry = self._models.get(name)
        if entry is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {name!r} is not served here (serving: {known})")
        default, versions = entry
        if version in (None, "", 0):
            return versions[default]
        try:
            v = int(version)
        except (TypeError, ValueError):
            raise ModelNotFound(
                f"model {name!r} has no version {version!r}; versions are whole numbers"
            ) from None
        model = versions.get(v)
        if model is None:
            have = ", ".join(str(x) for x in sorted(versions))
            raise ModelNotFound(f"model {name!r} has no version {v} loaded (loaded: {have})")
        return model

    def default_version(self, name: str) -> int:
        entry = self._models.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} is not served here")
        return entry[0]

    def versions(self, name: str) -> list[int]:
        entry = self._models.get(name)
        return sorted(entry[1]) if entry else []

    def names(self) -> list[str]:
        return sorted(self._models)

    def ready(self) -> bool:
        """True when at least one model is loaded."""
        return bool(self._models)
