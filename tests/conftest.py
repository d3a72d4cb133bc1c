"""Fixtures shared by every test: deterministic threads, and small real ONNX models."""

from __future__ import annotations

import os
import signal

# Some CI runners start the suite with SIGTERM blocked, and every process a test starts would
# inherit it (brokers, job workers, agents), stopping only at SIGKILL: our own processes
# unblock it themselves (tests/test_cli.py checks the demo started that way); the processes
# of other programs the tests start get the mask a normal shell gives.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

# One thread each for torch and ONNX Runtime: on 2 cores, more threads made everything
# 7-50x slower whenever anything else ran (shared/STACK.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("EDGEFLEET_AGENT_INTRA_OP_THREADS", "1")
