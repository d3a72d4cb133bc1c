from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import SettingsError
from agent.settings import load, parse_labels


def test_precedence_flags_over_env_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'cloud = "file:1"\ninference_port = 9000\nresync_interval_s = 5\n[labels]\nsite = "a"\n'
    )
    monkeypatch.setenv("EDGEFLEET_AGENT_INFERENCE_PORT", "9100")
    monkeypatch.setenv("EDGEFLEET_AGENT_ENROLL_TOKEN", "s3cret")
    s = load(config, cloud="flag:2")
    assert s.cloud == "flag:2"
    assert s.inference_port == 9100
    assert s.resync_interval_s == 5
    assert s.labels == {"site": "a"}
    described = s.describe()
    assert "enroll_token = ********" in described
    assert "s3cret" not in described


def test_labels_from_env_as_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_AGENT_LABELS", "site=plant-1,hw=pi")
    assert load().labels == {"site": "plant-1", "hw": "pi"}


def test_bad_values_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="host:port"):
        load(cloud="nohost")
    with pytest.raises(SettingsError, match="does not exist"):
        load(tmp_path / "missing.toml")
    with pytest.raises(SettingsError, match="key=value"):
        parse_labels(["oops"])


def test_unknown_keys_and_other_processes_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("inference_prot = 9000\n")
    with pytest.raises(SettingsError, match="unknown setting 'inference_prot'"):
        load(config)
    monkeypatch.setenv("EDGEFLEET_CLOUD_DATA_DIR", str(tmp_path / "cloud"))
    assert load().data_dir == Path("./edgefleet-agent")  # the cloud's variable is not ours
    monkeypatch.setenv("EDGEFLEET_AGENT_RESYNC_INTERVAL", "5")
    with pytest.raises(SettingsError, match="did you mean EDGEFLEET_AGENT_RESYNC_INTERVAL_S"):
        load()
