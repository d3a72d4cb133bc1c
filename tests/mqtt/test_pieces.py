"""The pieces of MQTT notices without a broker: password hashes Mosquitto's own tool agrees
with, broker URLs, settings that refuse what is unsafe or unknown, the files `edgefleet mqtt
acl` writes, and the device's account kept with its identity."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from agent.mqtt.notices import MqttNotices
from agent.settings import AgentSettings
from agent.state import Identity, StateStore
from cloudsvc.errors import CloudError
from cloudsvc.mqtt.broker_files import acl_text
from cloudsvc.mqtt.settings import MqttSettings
from cloudsvc.server import CloudServer
from cloudsvc.settings import CloudSettings
from edgefleet.cli import cli
from edgefleet.core.errors import InvalidArgument
from edgefleet.core.fleet import MqttAccess
from edgefleet.core.mqtt import (
    BrokerUrl,
    check_password,
    hash_password,
    parse_status,
    parse_topic,
    status_payload,
)
from tests.mqtt.conftest import ENROLL_SECRET


def test_hashes_are_mosquittos_own(tmp_path: Path) -> None:
    hashed = hash_password("s3cret")
    assert hashed.startswith("$7$101$") and check_password("s3cret", hashed)
    assert not check_password("s3cret!", hashed) and not check_password("s3cret", "$6$x$y")
    assert hash_password("s3cret") != hashed  # salted
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed: the broker tests check the hashes")
    path = tmp_path / "passwd"
    path.touch()
    subprocess.run([tool, "-b", str(path), "dev-1", "s3cret"], check=True)
    user, _, theirs = path.read_text().strip().partition(":")
    assert user == "dev-1" and check_password("s3cret", theirs)


def test_broker_urls() -> None:
    assert BrokerUrl.parse("mqtts://broker.example") == BrokerUrl(True, "broker.example", 8883)
    assert BrokerUrl.parse("mqtt://10.0.0.5:1884") == BrokerUrl(False, "10.0.0.5", 1884)
    assert str(BrokerUrl.parse("mqtts://[::1]:8884")) == "mqtts://[::1]:8884"
    for bad in ("tcp://h:1", "h:1883", "mqtts://", "mqtts://u:p@h:8883", "mqtts://h:99999"):
        with pytest.raises(InvalidArgument):
            BrokerUrl.parse(bad)


def test_topics_and_status() -> None:
    assert parse_topic("edgefleet/v1/devices/dev-1/desired") == ("dev-1", "desired")
    assert parse_topic("edgefleet/v1/devices/dev-1/other") is None
    assert parse_topic("elsewhere/dev-1/status") is None
    assert parse_status(status_payload("offline")) == "offline"
    assert parse_status(b"") is None and parse_status(b"[1]") is None


def test_cloud_settings_refuse_what_is_unsafe_or_unknown(tmp_path: Path) -> None:
    assert not CloudSettings().mqtt.enabled
    with pytest.raises(ValidationError, match="plain text"):
        MqttSettings(url="mqtt://broker:1883")
    assert MqttSettings(url="mqtt://broker", insecure=True).broker.port == 1883
    with pytest.raises(ValidationError, match="must start with '_'"):
        MqttSettings(url="mqtts://broker", username="cloud")
    with pytest.raises(InvalidArgument, match=r"unknown setting 'mqtt\.passwrd_file'"):
        CloudSettings.from_sources(None, mqtt={"url": "mqtts://b", "passwrd_file": "x"})
    settings = CloudSettings.model_validate(
        {
            "data_dir": tmp_path / "cloud",
            "port": 0,
            "desired_state_ttl_s": 600,
            "mqtt": {"url": "mqtts://127.0.0.1:1", "republish_s": 400},
        }
    )
    with pytest.raises(CloudError, match="half of desired_state_ttl_s"):
        CloudServer(settings)


def test_agent_settings_and_a_plain_text_broker(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"unknown setting 'mqtt\.enable'"):
        AgentSettings.from_sources(None, mqtt={"enable": False})
    settings = AgentSettings(ca_file=tmp_path / "ca.pem", data_dir=tmp_path / "agent")
    notices = MqttNotices(settings, None, None)  # type: ignore[arg-type]
    plain = MqttAccess("mqtt://broker:1883", "dev-1", "pw")
    assert notices._broker(plain) is None  # refused: its password would travel in clear
    allowed = MqttNotices(
        settings.model_copy(update={"mqtt": settings.mqtt.model_copy(update={"insecure": True})}),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
    )
    assert allowed._broker(plain) == BrokerUrl(False, "broker", 1883)
    assert notices._broker(MqttAccess("mqtts://broker", "dev-1", "pw")) is not None


def test_the_device_keeps_its_account_with_its_identity(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "agent.db")
    try:
        access = MqttAccess("mqtts://broker:8883", "dev-1", "mqtt_secret")
        state.save_identity(Identity("dev-1", "dev_token", mqtt=access))
        assert state.identity() == Identity("dev-1", "dev_token", mqtt=access)
        state.save_identity(Identity("dev-1", "dev_token2"))  # re-enrolled, no broker now
        assert state.identity() == Identity("dev-1", "dev_token2")
    finally:
        state.close()
    assert oct((tmp_path / "agent.db").stat().st_mode & 0o777) == "0o600"


def test_acl_gives_each_device_its_own_topics_only() -> None:
    text = acl_text("_edgefleet-cloud", ["dev-b", "dev-a"])
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in text.split("\n\n")[1:]}
    assert blocks["user _edgefleet-cloud"] == [
        "topic write edgefleet/v1/devices/+/desired",
        "topic read edgefleet/v1/devices/+/status",
        "topic read edgefleet/v1/devices/+/telemetry",
    ]
    assert blocks["user dev-a"] == [
        "topic read edgefleet/v1/devices/dev-a/desired",
        "topic write edgefleet/v1/devices/dev-a/status",
        "topic write edgefleet/v1/devices/dev-a/telemetry",
    ]
    rules = [line for line in text.splitlines() if line.startswith("topic")]
    assert len(rules) == 9 and not any("#" in rule for rule in rules)


def test_mqtt_acl_writes_the_brokers_files_from_the_cloud(tmp_path: Path) -> None:
    data = tmp_path / "cloud"
    settings = CloudSettings.model_validate(
        {
            "data_dir": data,
            "port": 0,
            "enroll_tokens": [ENROLL_SECRET],
            "mqtt": {"url": "mqtts://127.0.0.1:1"},  # no broker runs: nothing needs one
        }
    )
    cloud = CloudServer(settings)
    try:
        a = cloud.fleet.enroll(ENROLL_SECRET, "dev-a")
        cloud.fleet.enroll(ENROLL_SECRET, "dev-b")
        cloud.fleet.revoke("dev-b")
    finally:
        cloud.stop(grace=0)
    assert a.mqtt is not None
    out = tmp_path / "broker"
    result = CliRunner().invoke(
        cli,
        [
            "mqtt",
            "acl",
            "--data-dir",
            str(data),
            "--password-file",
            str(out / "passwd"),
            "--acl-file",
            str(out / "acl"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "password_file" in result.output and "acl_file" in result.output
    accounts = dict(
        line.split(":", 1)
        for line in (out / "passwd").read_text().splitlines()
        if not line.startswith("#")
    )
    assert set(accounts) == {"dev-a", "_edgefleet-cloud"}  # revoked dev-b has none
    assert check_password(a.mqtt.password, accounts["dev-a"])
    cloud_password = (data / "mqtt" / "cloud-password").read_text().strip()
    assert check_password(cloud_password, accounts["_edgefleet-cloud"])
    acl = (out / "acl").read_text()
    assert "user dev-a" in acl and "dev-b" not in acl
    assert oct((out / "passwd").stat().st_mode & 0o777) == "0o640"

    memory = CliRunner().invoke(cli, ["mqtt", "acl", "--data-dir", str(tmp_path / "nothing")])
    assert memory.exit_code != 0 and "no cloud data" in memory.output
