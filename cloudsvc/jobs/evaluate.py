"""An evaluate job: score one artifact of a version on labelled data, on a stratified sample
whose size and class counts are stated, and hand the scores back to be kept with the
version. Torch-free: ONNX Runtime runs the artifact; a text model's tokenizer is the one
shipped in its artifact, run by the Hugging Face `tokenizers` library."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloudsvc.errors import JobFailed
from cloudsvc.jobs.data import OUTPUT_NAME, TEXT_INPUTS, load_job_data
from cloudsvc.jobs.env import CLASS_NAMES_FILE, WorkerEnv
from cloudsvc.jobs.events import Reporter
from cloudsvc.jobs.feeds import Feeds
from cloudsvc.jobs.results import JobResult
from cloudsvc.jobs.spec import EvaluateSpec
from cloudsvc.sessions import open_session, providers_for
from compilers.sampling import stratified_sample
from compilers.targets import TARGETS
from edgefleet.core.tensors import CLASS_NAMES_KEY, ORT_TO_DATATYPE, numpy_dtype, parse_class_names
from protos.artifact.v1 import artifact_pb2
from transfer.datasets import Dataset
from transfer.metrics import evaluate

# In the job folder, written by the manager before the worker starts: the artifact's files,
# its manifest, and (where the version's lineage names them) its classes in output order.
ARTIFACT_DIR = "artifact"
ARTIFACT_MANIFEST = "artifact.manifest"
BATCH_SIZE = 64
TOKENIZER_DIR = "tokenizer"
# Token type ids a BERT-like graph may also take; all zeros for single texts.
TOKEN_TYPE_IDS = "token_type_ids"
# The tokenizer's "no limit" model_max_length (transformers' VERY_LARGE_INTEGER).
_NO_LIMIT = 1_000_000

Encoder = Callable[[npt.NDArray[Any]], Feeds]


def run_evaluate(spec: EvaluateSpec, env: WorkerEnv, report: Reporter) -> JobResult:
    """Score `job_dir/artifact` (the manager writes it there, with `artifact.manifest`)
    on `spec.data`; the result's `scored` is recorded with the version."""
    report.phase("validating", f"{spec.model} v{spec.version} {spec.target} on {spec.data}")
    folder = env.job_dir / ARTIFACT_DIR
    manifest = artifact_pb2.Manifest()
    manifest.ParseFromString((env.job_dir / ARTIFACT_MANIFEST).read_bytes())
    params = dict(manifest.preprocessing.params)
    entry = folder / manifest.entrypoint
    run = open_session(
        entry, providers_for(TARGETS[spec.target].providers if spec.target in TARGETS else ())
    )
    dataset = load_job_data(spec.data, spec.data_options, env, seed=0)
    what = f"{spec.model} v{spec.version} ({spec.target})"
    encode = _encoder(run, dataset, folder, params, what)

    sample = stratified_sample(dataset.labels, spec.sample, seed=0)
    described = sample.describe(dataset.class_names)
    report.log(
        f"scoring {what} on {described}: drawn per class (stratified, seed 0) from the "
        f"{len(dataset)} examples of {spec.data}"
    )
    inputs = dataset.inputs[sample.indices]
    output = _output_name(run)
    try:
        first = np.asarray(run.run([output], encode(inputs[:1]))[0])
    except Exception as err:
        shape = f" (shape {list(dataset.input_shape)})" if dataset.input_shape else ""
        raise JobFailed(
            f"{what} cannot run on the {dataset.kind} examples of {spec.data}{shape}: "
            f"{_first_line(err)}"
        ) from None
    if first.ndim != 2:
        raise JobFailed(
            f"{what} outputs {output} of shape {list(first.shape)}; evaluate scores "
            "classifiers, whose first output holds one score per class"
        )
    names = model_classes(params, env.job_dir, entry) or tuple(
        str(i) for i in range(first.shape[1])
    )
    if len(names) != first.shape[1]:
        raise JobFailed(
            f"{what} outputs {first.shape[1]} scores per example but names {len(names)} "
            f"classes ({', '.join(names[:8])})"
        )
    mapping = class_mapping(dataset, names, what)
    labels = mapping[dataset.labels[sample.indices]]
    shared = sum(1 for c in dataset.class_names if c in names)
    if shared < len(names):
        report.log(
            f"{spec.data} holds {shared} of the model's {len(names)} classes; the others are "
            "scored with no examples (support 0)"
        )

    as_probabilities = probabilities(np.asarray(first, dtype=np.float64))
    if as_probabilities:
        report.log(f"{output} holds probabilities (rows sum to 1): the loss is taken of them")
    report.phase("scoring", f"{len(labels)} examples in batches of {BATCH_SIZE}")
    predictions: list[npt.NDArray[np.int64]] = []
    losses: list[npt.NDArray[np.float64]] = []
    for start in range(0, len(labels), BATCH_SIZE):
        stop = min(start + BATCH_SIZE, len(labels))
        scores = np.asarray(run.run([output], encode(inputs[start:stop]))[0], dtype=np.float64)
        predictions.append(scores.argmax(axis=1))
        losses.append(cross_entropy(scores, labels[start:stop], as_probabilities))
        report.update(message=f"{stop}/{len(labels)} examples")
    predicted = np.concatenate(predictions)
    scored = replace(
        evaluate(labels, predicted, names),
        loss=float(np.concatenate(losses).mean()),
        target=spec.target,
        data=spec.data,
        created_at=int(time.time()),
        sample=described,
        split=f"evaluate: {spec.data}",
    )
    low, high = scored.interval()
    report.log(
        f"{what}: accuracy {scored.accuracy:.2%} (95% CI {low:.2%} to {high:.2%}, "
        f"n={scored.count}), loss {scored.loss:.4f}"
    )
    return JobResult(scored=scored)


# ----------------------------------------------------------------------------- classes


def model_classes(params: Mapping[str, str], job_dir: Path, entry: Path) -> tuple[str, ...]:
    """The model's classes in output order: its manifest's preprocessing, else its lineage
    (the manager writes them into the job folder), else the graph's metadata; () if none."""
    names = parse_class_names(params.get("class_names", ""))
    if names:
        return names
    lineage = job_dir / CLASS_NAMES_FILE
    if lineage.is_file():
        names = parse_class_names(lineage.read_text())
        if names:
            return names
    try:
        import onnx

        graph = onnx.load(str(entry), load_external_data=False)
    except Exception:  # a graph onnx cannot parse here still ran in ONNX Runtime
        return ()
    for prop in graph.metadata_props:
        if prop.key == CLASS_NAMES_KEY:
            return parse_class_names(prop.value)
    return ()


def class_mapping(dataset: Dataset, names: Sequence[str], what: str) -> npt.NDArray[np.int64]:
    """Data set label -> the model's output index, by class name; JobFailed naming each
    data class (with examples) the model does not know. Fewer classes are fine."""
    index = {name: i for i, name in enumerate(names)}
    present = {int(c) for c in np.unique(dataset.labels)}
    unknown = [c for i, c in enumerate(dataset.class_names) if i in present and c not in index]
    if unknown:
        listed = ", ".join(repr(c) for c in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise JobFailed(
            f"{dataset.source} has class(es) {listed}{more} that {what} does not know; its "
            f"classes are {', '.join(names)}. Score it on data of those classes (drop or "
            "rename the others), or fine-tune a version that learns them"
        )
    return np.asarray([index.get(c, -1) for c in dataset.class_names], dtype=np.int64)


# ---------------------------------------------------------------------------------- feeds


def _encoder(
    run: Any, dataset: Dataset, folder: Path, params: Mapping[str, str], what: str
) -> Encoder:
    """Raw examples (pixels, features or strings) -> the graph's named inputs."""
    inputs = run.get_inputs()
    names = [i.name for i in inputs]
    if dataset.kind == "text":
        unknown = [n for n in names if n not in (*TEXT_INPUTS, TOKEN_TYPE_IDS)]
        if unknown or TEXT_INPUTS[0] not in names:
            raise JobFailed(
                f"{dataset.source} holds text, and {what} takes {names}, not token ids "
                f"({', '.join(TEXT_INPUTS)}); score it on {_kind(params)} data"
            )
        tokenize = load_tokenizer(folder, params)

        def text_feeds(texts: npt.NDArray[Any]) -> Feeds:
            encoded = tokenize([str(t) for t in texts])
            return {n: encoded[n] for n in names}

        return text_feeds
    if len(inputs) != 1 or inputs[0].type not in ORT_TO_DATATYPE:
        raise JobFailed(
            f"{dataset.source} holds {dataset.kind} examples, and {what} takes {names}: "
            f"it needs {_kind(params)} data"
        )
    name, dtype = names[0], numpy_dtype(ORT_TO_DATATYPE[inputs[0].type])
    if dtype.kind not in "f":
        raise JobFailed(
            f"{what} takes {name} of {inputs[0].type}, not numbers; score it on "
            f"{_kind(params)} data"
        )

    def numeric_feeds(batch: npt.NDArray[Any]) -> Feeds:
        return {name: np.ascontiguousarray(batch, dtype=dtype)}

    return numeric_feeds


def _kind(params: Mapping[str, str]) -> str:
    return params.get("kind") or "matching"


def load_tokenizer(
    folder: Path, params: Mapping[str, str]
) -> Callable[[list[str]], dict[str, npt.NDArray[np.int64]]]:
    """The tokenizer shipped in the artifact, set up as the fine-tune's text backbone calls
    its Hugging Face tokenizer: `padding=True` (to the batch's longest), `truncation=True`,
    `max_length` from the manifest (else the tokenizer's model_max_length), special tokens
    added. Returns texts -> input_ids, attention_mask, token_type_ids (int64)."""
    from tokenizers import Tokenizer

    files = folder / TOKENIZER_DIR
    path = files / "tokenizer.json"
    if not path.is_file():
        raise JobFailed(
            "the artifact ships no tokenizer/tokenizer.json, so its text inputs cannot be "
            "made; evaluate a version fine-tuned here from a text backbone"
        )
    tokenizer = Tokenizer.from_file(str(path))
    config = _json(files / "tokenizer_config.json")
    special = _json(files / "special_tokens_map.json")
    pad_token = _token(config.get("pad_token")) or _token(special.get("pad_token"))
    padding = tokenizer.padding or {}
    if not pad_token:
        pad_token = str(padding.get("pad_token", "[PAD]"))
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        pad_id = int(padding.get("pad_id", 0))
    max_length = int(params.get("max_length") or 0)
    if not max_length:
        limit = int(config.get("model_max_length") or 0)
        max_length = limit if 0 < limit < _NO_LIMIT else 0
    tokenizer.no_truncation()
    if max_length:
        tokenizer.enable_truncation(
            max_length,
            stride=0,
            strategy="longest_first",
            direction=str(config.get("truncation_side", "right")),
        )
    tokenizer.enable_padding(
        direction=str(config.get("padding_side", "right")),
        pad_id=pad_id,
        pad_type_id=0,
        pad_token=pad_token,
        length=None,
        pad_to_multiple_of=None,
    )

    def tokenize(texts: list[str]) -> dict[str, npt.NDArray[np.int64]]:
        encoded = tokenizer.encode_batch(texts, add_special_tokens=True)
        return {
            TEXT_INPUTS[0]: np.asarray([e.ids for e in encoded], dtype=np.int64),
            TEXT_INPUTS[1]: np.asarray([e.attention_mask for e in encoded], dtype=np.int64),
            TOKEN_TYPE_IDS: np.asarray([e.type_ids for e in encoded], dtype=np.int64),
        }

    return tokenize


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _token(value: object) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


# ------------------------------------------------------------------------------- scoring


def _output_name(run: Any) -> str:
    """The scores: the output called logits where there is one, else the first."""
    names = [o.name for o in run.get_outputs()]
    return OUTPUT_NAME if OUTPUT_NAME in names else names[0]


def probabilities(scores: npt.NDArray[np.float64]) -> bool:
    """Whether a graph's scores already are probabilities (it ends in Softmax): rows in
    0..1 summing to 1. Logits are passed through a softmax first."""
    return bool(
        scores.size
        and scores.min() >= 0.0
        and scores.max() <= 1.0
        and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    )


def cross_entropy(
    scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], as_probabilities: bool
) -> npt.NDArray[np.float64]:
    """Each example's cross-entropy: -log of the softmax of its logits (or of its scores,
    where they are probabilities) at its true class."""
    rows = np.arange(len(labels))
    if as_probabilities:
        picked: npt.NDArray[np.float64] = -np.log(np.clip(scores[rows, labels], 1e-12, None))
        return picked
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    out: npt.NDArray[np.float64] = -log_softmax[rows, labels]
    return out


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
