"""What this device is and can run, sent at enrollment and in every report."""

from __future__ import annotations

import platform
import socket

import onnxruntime as ort
import psutil

from agent.runtime import available_providers
from edgefleet import __version__
from edgefleet.core.fleet import Capabilities


def capabilities() -> Capabilities:
    return Capabilities(
        arch=platform.machine(),
        os=f"{platform.system()} {platform.release()}".strip(),
        execution_providers=tuple(available_providers()),
        memory_bytes=int(psutil.virtual_memory().total),
        agent_version=__version__,
        hostname=socket.gethostname(),
        onnxruntime_version=ort.__version__,
    )
