"""What this device is and can run, sent at enrollment and in every report."""

from __future__ import annotations

import platform
import socket
from pathlib import Path

import onnxruntime as ort
import psutil

from agent.runtime import available_providers
from edgefleet import __version__
from edgefleet.core.fleet import INT8_CPU_FEATURES, Capabilities, CpuFeatures

CPUINFO = Path("/proc/cpuinfo")
# Linux names the feature list `flags` on x86 and `Features` on ARM.
_FEATURE_KEYS = ("flags", "features")


def capabilities() -> Capabilities:
    return Capabilities(
        arch=platform.machine(),
        os=f"{platform.system()} {platform.release()}".strip(),
        execution_providers=tuple(available_providers()),
        memory_bytes=int(psutil.virtual_memory().total),
        agent_version=__version__,
        hostname=socket.gethostname(),
        onnxruntime_version=ort.__version__,
        cpu_features=cpu_features(),
    )


def cpu_features(path: Path = CPUINFO) -> CpuFeatures | None:
    """The CPU's integer-acceleration features from /proc/cpuinfo; None when unknown (no
    such file, as on macOS and in some containers, or no feature list in it)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return parse_cpuinfo(text)


def parse_cpuinfo(text: str) -> CpuFeatures | None:
    """The INT8 features every core lists (a big.LITTLE core without them would run INT8
    slowly); None when the text lists no features at all."""
    common: set[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or key.strip().lower() not in _FEATURE_KEYS:
            continue
        flags = set(value.split())
        common = flags if common is None else common & flags
    if common is None:
        return None
    return CpuFeatures(tuple(f for f in INT8_CPU_FEATURES if f in common))
