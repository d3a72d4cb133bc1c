"""A fleet simulator: hundreds to a thousand lightweight agents in one process against one
real cloud, running the real reconciler, cloud link, state, chunk and telemetry code, with
ONNX Runtime replaced by :class:`SimulatedRuntime` (see tests/fleetsim/sim.py)."""

from tests.fleetsim.sim import (
    Behaviour,
    CloudAccess,
    Convergence,
    SimCloud,
    SimDevice,
    SimFleet,
    SimulatedRuntime,
    SimulatedSession,
    start_cloud,
)

__all__ = [
    "Behaviour",
    "CloudAccess",
    "Convergence",
    "SimCloud",
    "SimDevice",
    "SimFleet",
    "SimulatedRuntime",
    "SimulatedSession",
    "start_cloud",
]
