"""Desired-state notices over a real Mosquitto: delivered, healed after a broker restart or a
dropped link, and never needed: without the broker, agents converge over the gRPC watch."""

from __future__ import annotations

from edgefleet.core.mqtt import desired_topic
from protos.fleet.v1.fleet_pb2 import DesiredState, SignedDesiredState
from tests.faults.netproxy import TcpProxy
from tests.mqtt.conftest import ENROLL_SECRET, Rig, connect, serving, wait_for


def test_a_deploy_reaches_an_agent_over_mqtt_alone(rig: Rig) -> None:
    v1 = rig.push()
    # Its gRPC watch stays silent and it re-checks only every 300 s: MQTT or nothing.
    agent = rig.start_agent("edge-1", grpc_watch=False)
    assert agent.mqtt is not None and agent.mqtt.wait_connected(15)
    rig.wait_settled("edge-1")
    rig.deploy(v1)
    wait_for(lambda: serving(agent, v1), 20, "edge-1 serving v1")
    assert rig.notices("edge-1", "MQTT"), rig.events["edge-1"]
    assert not rig.notices("edge-1", "gRPC watch")
    assert agent.mqtt.notices >= 1 and agent.mqtt.refused == 0
    wait_for(lambda: rig.notifier.device_status("edge-1") == "online", 5, "status online")


def test_notices_resume_after_a_broker_restart(rig: Rig) -> None:
    v1 = rig.push()
    agent = rig.start_agent("edge-1", grpc_watch=False)
    mqtt = agent.mqtt
    assert mqtt is not None and mqtt.wait_connected(15)
    rig.wait_settled("edge-1")
    rig.broker.stop()  # SIGTERM: Mosquitto saves retained messages and sessions
    wait_for(lambda: not mqtt.connected and not rig.notifier.connected, 10, "both cut off")
    # Deployed while no broker runs: nothing can be published now.
    rig.deploy(v1)
    rig.broker.start()  # same port, same files
    # The cloud reconnects and publishes every notice again; the agent reconnects,
    # re-subscribes, and the retained notice tells it what it missed.
    wait_for(lambda: serving(agent, v1), 30, "edge-1 serving v1 after the broker came back")
    assert rig.notices("edge-1", "MQTT") and not rig.notices("edge-1", "gRPC watch")
    assert mqtt.connections >= 2


def test_a_notice_published_while_a_device_was_cut_off_reaches_it_on_reconnect(
    rig: Rig,
) -> None:
    v1, v2 = rig.push(), rig.push()
    link = TcpProxy(f"127.0.0.1:{rig.broker.port}")  # the site's link to the broker
    try:
        agent = rig.start_agent(
            "edge-1",
            grpc_watch=False,
            mqtt={"url": f"mqtts://127.0.0.1:{link.port}", "reconnect_max_s": 1, "keepalive_s": 5},
        )
        mqtt = agent.mqtt
        assert mqtt is not None and mqtt.wait_connected(15)
        rig.wait_settled("edge-1")
        rig.deploy(v1)
        wait_for(lambda: serving(agent, v1), 20, "edge-1 serving v1")
        # The link drops (no goodbye): the broker sends the device's last will.
        link.faults.refuse = True
        link.cut_all()
        wait_for(lambda: not mqtt.connected, 10, "the agent to notice the cut")
        wait_for(lambda: rig.notifier.device_status("edge-1") == "offline", 10, "last will")
        rig.deploy(v2)  # published (retained) while the device cannot hear it
        link.faults.refuse = False
        wait_for(lambda: serving(agent, v2), 30, "edge-1 serving v2 after reconnecting")
        assert len(rig.notices("edge-1", "MQTT")) >= 2 and not rig.notices("edge-1", "gRPC watch")
        assert mqtt.sessions_resumed >= 1  # the persistent session survived the cut
        wait_for(lambda: rig.notifier.device_status("edge-1") == "online", 10, "back online")
    finally:
        link.close()


def test_without_the_broker_agents_converge_over_the_grpc_watch(rig: Rig) -> None:
    v1, v2 = rig.push(), rig.push()
    rig.broker.stop()
    agent = rig.start_agent("edge-1")  # enrolls and starts with no broker to be found
    assert agent.mqtt is not None
    rig.wait_settled("edge-1")
    rig.deploy(v1)
    wait_for(lambda: serving(agent, v1), 20, "edge-1 serving v1 over gRPC")
    assert rig.notices("edge-1", "gRPC watch") and not rig.notices("edge-1", "MQTT")
    assert not agent.mqtt.connected
    # The broker returns: both sides find it again, with nobody doing anything.
    rig.broker.start()
    assert agent.mqtt.wait_connected(20) and rig.notifier.wait_connected(20)
    rig.deploy(v2)
    wait_for(lambda: serving(agent, v2), 20, "edge-1 serving v2")


def test_every_change_of_a_desired_state_is_published(rig: Rig) -> None:
    """Labels and rollbacks move generations without a deploy to the device: the notifier
    compares generations, so it publishes them as it does deploys and enrollments."""
    fleet = rig.cloud.fleet
    v1, v2 = rig.push(), rig.push()
    other = fleet.enroll(ENROLL_SECRET, "dev-b")
    fleet.label("dev-b", {"site": "b"})
    rig.admin.deploy("m", v2, selector={"site": "b"})
    a = fleet.enroll(ENROLL_SECRET, "dev-a")
    assert a.mqtt is not None and other.mqtt is not None
    probe = connect(rig, a.mqtt)
    try:
        probe.client.subscribe(desired_topic("dev-a"), qos=1)

        def generations() -> list[int]:
            return [
                DesiredState.FromString(SignedDesiredState.FromString(p).state).generation
                for p in probe.got(desired_topic("dev-a"))
            ]

        wait_for(lambda: 0 in generations(), 10, "the notice of enrollment")
        fleet.label("dev-a", {"site": "b"})  # the standing deployment now applies to it
        wait_for(lambda: 1 in generations(), 10, "the notice of the relabelling")
        fleet.deploy("m", v1, {"site": "b"}, rollback=True)
        wait_for(lambda: 2 in generations(), 10, "the notice of the rollback")
    finally:
        probe.close()
