"""The stage itself: what passes through the attacker unchanged converges, so a refusal in
an attack test is the attack's doing."""

from __future__ import annotations

from agent.reconciler import PassResult
from tests.faults.rig import Stage


def test_an_untouched_path_converges_and_serves(world: Stage) -> None:
    device = world.device()
    world.push(1.0)
    world.admin.deploy("m", 1, selector={"site": "a"})
    result = device.converge()
    assert isinstance(result, PassResult) and result.converged, result
    assert device.serving() == 1 and device.infer() == 1.0
    assert world.mitm.count("GetDesiredState") >= 1 and world.mitm.count("FetchChunk") >= 1
