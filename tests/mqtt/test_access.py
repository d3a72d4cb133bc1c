"""Who may do what on the real broker, with the password and ACL files the cloud writes: a
device reads only its own notices and writes only its own status and telemetry; wrong
passwords, strangers and revoked devices are turned away; a forged notice moves nothing."""

from __future__ import annotations

import re
import ssl
import time
from pathlib import Path

import pytest

from edgefleet.core.certs import init_ca
from edgefleet.core.mqtt import (
    BrokerUrl,
    check_password,
    desired_topic,
    every_device,
    status_payload,
    status_topic,
    telemetry_topic,
)
from edgefleet.core.mqtt_client import make_client
from edgefleet.core.wire import to_proto
from protos.fleet.v1 import fleet_pb2
from tests.mqtt.conftest import ENROLL_SECRET, Rig, connect, probe, wait_for

NOT_AUTHORIZED = {134, 135}  # bad user name or password / not authorized


def test_the_broker_listens_only_where_its_configuration_says(rig: Rig) -> None:
    # A listener option set before `listener` made Mosquitto open plain MQTT on 1883 too.
    opened = re.findall(r"Opening ipv[46] listen socket on port (\d+)", rig.broker.log_tail(200))
    assert opened and set(opened) == {str(rig.broker.port)}


def test_devices_reach_only_their_own_topics(rig: Rig) -> None:
    fleet = rig.cloud.fleet
    a, b = fleet.enroll(ENROLL_SECRET, "dev-a"), fleet.enroll(ENROLL_SECRET, "dev-b")
    assert a.mqtt is not None and b.mqtt is not None
    assert a.mqtt.url == rig.broker.url and a.mqtt.username == "dev-a"

    pa, pb = connect(rig, a.mqtt), connect(rig, b.mqtt)  # once the broker has their accounts
    try:
        # The cloud keeps and writes only hashes, which the broker accepts.
        passwd = rig.broker.password_file.read_text()
        assert a.mqtt.password not in passwd and b.mqtt.password not in passwd
        line = next(x for x in passwd.splitlines() if x.startswith("dev-a:"))
        assert line.startswith("dev-a:$7$") and check_password(a.mqtt.password, line[6:])

        # Reading: dev-a asks for dev-b's notices, its own, and everyone's by wildcard.
        pa.client.subscribe(
            [(desired_topic("dev-b"), 1), (desired_topic("dev-a"), 1), (every_device("desired"), 1)]
        )
        pb.client.subscribe(desired_topic("dev-b"), qos=1)
        wait_for(lambda: bool(pa.got(desired_topic("dev-a"))), 10, "dev-a's own notice")
        wait_for(lambda: bool(pb.got(desired_topic("dev-b"))), 10, "dev-b's own notice")
        rig.cloud.fleet.wake()
        time.sleep(1.0)  # time enough for anything the broker would deliver
        assert pa.got(desired_topic("dev-b")) == []  # never dev-b's, however asked

        # Writing: its own status and telemetry yes; another's status, or any notice, no.
        assert not pa.publish(status_topic("dev-a"), status_payload("online")).is_failure
        assert not pa.publish(telemetry_topic("dev-a"), b'{"requests": 1}').is_failure
        assert not pb.publish(status_topic("dev-b"), status_payload("online")).is_failure
        wait_for(lambda: rig.notifier.device_status("dev-b") == "online", 5, "dev-b online")
        forged = pa.publish(status_topic("dev-b"), status_payload("offline"), retain=True)
        assert forged.value in NOT_AUTHORIZED, forged
        assert pa.publish(telemetry_topic("dev-b"), b"{}").value in NOT_AUTHORIZED
        signed = rig.cloud.fleet.signed_desired_state("dev-b")
        fake = to_proto(signed, fleet_pb2.SignedDesiredState).SerializeToString()
        assert pa.publish(desired_topic("dev-b"), fake, retain=True).value in NOT_AUTHORIZED
        assert pa.publish(desired_topic("dev-a"), fake, retain=True).value in NOT_AUTHORIZED
        time.sleep(0.5)
        # What the cloud sees of dev-b is what dev-b said, not what dev-a forged.
        assert rig.notifier.device_status("dev-b") == "online"
        assert len(pb.got(desired_topic("dev-b"))) == 1  # no replayed notice reached dev-b
    finally:
        pa.close()
        pb.close()


def test_wrong_passwords_strangers_and_revoked_devices_are_refused(rig: Rig) -> None:
    fleet = rig.cloud.fleet
    a = fleet.enroll(ENROLL_SECRET, "dev-a")
    assert a.mqtt is not None
    connect(rig, a.mqtt).close()  # the right password works
    for username, password in (
        ("dev-a", a.mqtt.password + "x"),  # a wrong password
        ("dev-a", ""),
        ("dev-z", a.mqtt.password),  # nobody enrolled by that name
        ("_edgefleet-cloud", a.mqtt.password),  # the cloud's account, with a device's password
    ):
        p = probe(rig, username, password)
        try:
            assert p.connack is not None and p.connack.value in NOT_AUTHORIZED, (
                username,
                p.connack,
            )
        finally:
            p.close()

    # Re-enrolling rotates the password: the old one stops working.
    holder = connect(rig, a.mqtt)
    again = fleet.enroll("", "dev-a", current_credential=a.device_token)
    assert again.mqtt is not None and again.mqtt.password != a.mqtt.password
    wait_for(holder.disconnected.is_set, 10, "the old session dropped after the rotation")
    holder.close()
    old = probe(rig, "dev-a", a.mqtt.password)
    assert old.connack is not None and old.connack.value in NOT_AUTHORIZED
    old.close()

    # Revoked: the broker drops its connection and refuses it from then on.
    live = connect(rig, again.mqtt)
    rig.admin.revoke_device("dev-a")
    wait_for(live.disconnected.is_set, 10, "the revoked device's connection dropped")
    live.close()
    p = probe(rig, "dev-a", again.mqtt.password)
    assert p.connack is not None and p.connack.value in NOT_AUTHORIZED
    p.close()
    assert "dev-a" not in rig.broker.acl_file.read_text()


def test_an_agent_refuses_forged_notices(rig: Rig) -> None:
    agent = rig.start_agent("edge-1", grpc_watch=False)
    mqtt_notices = agent.mqtt
    assert mqtt_notices is not None and mqtt_notices.wait_connected(15)
    # Its own retained notice (generation 0, published at its enrollment) comes first.
    wait_for(lambda: mqtt_notices.notices >= 1, 10, "the retained notice")
    rig.cloud.fleet.enroll(ENROLL_SECRET, "edge-2")
    before = mqtt_notices.notices
    # What a broker (or a device past a mistaken ACL) could hand it: garbage, and a state
    # signed for another device. Neither wakes the reconciler.
    mqtt_notices._notice(b"not a signed state")
    signed = rig.cloud.fleet.signed_desired_state("edge-2")
    mqtt_notices._notice(to_proto(signed, fleet_pb2.SignedDesiredState).SerializeToString())
    assert mqtt_notices.refused == 2 and mqtt_notices.notices == before
    # And the genuine one is taken.
    mine = rig.cloud.fleet.signed_desired_state("edge-1")
    mqtt_notices._notice(to_proto(mine, fleet_pb2.SignedDesiredState).SerializeToString())
    assert mqtt_notices.notices == before + 1


def test_a_broker_the_devices_ca_did_not_sign_is_refused(rig: Rig, tmp_path: Path) -> None:
    other = init_ca(tmp_path / "other-ca")  # an impostor broker's CA, say
    client = make_client(
        BrokerUrl.parse(rig.broker.url), "dev-a", "dev-a", "pw", ca_file=other.ca_cert
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect("127.0.0.1", rig.broker.port)
