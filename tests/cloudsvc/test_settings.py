from __future__ import annotations

from pathlib import Path

import pytest

from cloudsvc.errors import InvalidRequest
from cloudsvc.server import resolve_admin_token
from cloudsvc.settings import CloudSettings


def test_file_then_environment_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text(
        'port = 7000\nhost = "0.0.0.0"\noffline_after_s = 10\nenroll_tokens = ["enr_a"]\n'
    )
    monkeypatch.setenv("EDGEFLEET_CLOUD_PORT", "7001")
    settings = CloudSettings.load(config, offline_after_s=5.0, data_dir=None)
    assert (settings.host, settings.port, settings.offline_after_s) == ("0.0.0.0", 7001, 5.0)
    assert [t.get_secret_value() for t in settings.enroll_tokens] == ["enr_a"]
    assert settings.data_dir == Path("./edgefleet-cloud")
    # Without the file, its values do not leak into later loads.
    assert CloudSettings.load(None).host == "127.0.0.1"


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="does not exist"):
        CloudSettings.load(tmp_path / "nope.toml")


def test_describe_masks_secrets() -> None:
    settings = CloudSettings.load(None, admin_token="adm_top-secret", enroll_tokens=["enr_x"])
    text = settings.describe()
    assert "adm_top-secret" not in text and "enr_x" not in text
    assert "admin_token = ********" in text and "port = 50051" in text


def test_admin_token_is_made_once_and_kept(tmp_path: Path) -> None:
    settings = CloudSettings.load(None, data_dir=tmp_path)
    first = resolve_admin_token(settings)
    assert first.path == tmp_path / "admin-token"
    assert first.path.stat().st_mode & 0o777 == 0o600
    assert resolve_admin_token(settings).value == first.value
    given = CloudSettings.load(None, data_dir=tmp_path, admin_token="adm_given")
    assert resolve_admin_token(given).value == "adm_given"


def test_unknown_keys_are_refused_naming_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text('data_dirr = "/srv/cloud"\n')
    with pytest.raises(InvalidRequest, match=r"unknown setting 'data_dirr'.*data_dir"):
        CloudSettings.load(config)
    monkeypatch.setenv("EDGEFLEET_CLOUD_OFFLINE_AFTER", "5")
    with pytest.raises(InvalidRequest, match="EDGEFLEET_CLOUD_OFFLINE_AFTER_S"):
        CloudSettings.load(None)


def test_jobs_are_a_nested_section_and_each_process_has_its_own_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text("[jobs]\ncpu_slots = 3\nthreads = 2\n")
    monkeypatch.setenv("EDGEFLEET_CLOUD_JOBS__THREADS", "4")
    # The agent's variables (and the admin client's) do not move the cloud.
    monkeypatch.setenv("EDGEFLEET_AGENT_DATA_DIR", str(tmp_path / "agent"))
    monkeypatch.setenv("EDGEFLEET_CLOUD", "elsewhere:1")
    settings = CloudSettings.load(config)
    assert (settings.jobs.cpu_slots, settings.jobs.threads) == (3, 4)
    assert settings.data_dir == Path("./edgefleet-cloud")
    assert "jobs.cpu_slots = 3" in settings.describe()
    with pytest.raises(InvalidRequest, match=r"jobs\.slots"):
        config.write_text("[jobs]\nslots = 3\n")
        CloudSettings.load(config)
