"""A device's status on the broker: online while its agent runs, offline when the agent stops,
and offline too when it dies without a word (the last will the broker sends for it)."""

from __future__ import annotations

from pathlib import Path

from edgefleet.cli.processes import CloudTrust, agent_process, write_secret_file
from tests.mqtt.conftest import ENROLL_SECRET, Rig, wait_for


def test_the_last_will_marks_a_killed_agent_offline(rig: Rig, tmp_path: Path) -> None:
    proc = agent_process(
        tmp_path,
        "edge-k",
        rig.cloud.address,
        CloudTrust(rig.cloud.settings.data_dir),
        write_secret_file(tmp_path / "enroll-token", ENROLL_SECRET),
        env={"EDGEFLEET_AGENT_MQTT__RECONNECT_MAX_S": "1"},
    )
    try:
        proc.start().wait_ready(60)
        wait_for(lambda: rig.notifier.device_status("edge-k") == "online", 30, "online")
        proc.kill()  # SIGKILL: no goodbye, only the broker's last will can tell
        wait_for(lambda: rig.notifier.device_status("edge-k") == "offline", 15, "last will")

        proc.start().wait_ready(60)  # back, same identity and account
        wait_for(lambda: rig.notifier.device_status("edge-k") == "online", 30, "online again")
        assert proc.stop() == 0  # a clean stop says offline itself
        wait_for(lambda: rig.notifier.device_status("edge-k") == "offline", 5, "offline on stop")
        assert "(session resumed)" in proc.log_path.read_text()
    finally:
        proc.stop()
