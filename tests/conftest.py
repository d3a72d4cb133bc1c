"""Fixtures shared by every test: deterministic threads, and small real ONNX models."""

from __future__ import annotations

import os

# One thread each for torch and ONNX Runtime: on 2 cores, more threads made everything
# 7-50x slower whenever anything else ran (shared/STACK.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("EDGEFLEET_AGENT_INTRA_OP_THREADS", "1")
