"""The built-in backbone names and what they take, importable without torch (the cloud
service checks a job's backbone with it before any worker starts)."""

from __future__ import annotations

from typing import Literal

BackboneKind = Literal["image", "text"]

KNOWN_BACKBONES: dict[str, BackboneKind] = {
    "small-cnn": "image",
    "efficientnet-lite0": "image",
    "minilm-l6": "text",
}


def known_backbones(kind: str | None = None) -> list[str]:
    return [n for n, k in KNOWN_BACKBONES.items() if kind is None or k == kind]
