"""edgefleet runs on Python 3.10 (JetPack 6 and Ubuntu 22.04 ship it), and no 3.10 interpreter
runs this suite: vermin checks statically that nothing shipped needs 3.11 (the same command
runs in .ci/run). A failure names the file, the line and the construct; the fix is usually
edgefleet.core.compat (StrEnum), typing_extensions under TYPE_CHECKING (Self),
datetime.timezone.utc (UTC) or tomli (tomllib)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from enum import auto
from pathlib import Path

import pydantic
import pytest

from edgefleet.core.compat import StrEnum, StrEnum310

ROOT = Path(__file__).resolve().parents[1]
# Everything the wheel ships, and the container's health check. (An agent-only install
# imports edgefleet/, agent/ and protos/; the cloud's packages run on 3.10 as well.)
PATHS = (
    "edgefleet",
    "agent",
    "protos",
    "cloudsvc",
    "compilers",
    "transfer",
    "packaging/container/healthcheck.py",
)
# --eval-annotations: pydantic and the wire conversions evaluate dataclass annotations at
# run time; typing_extensions stands in for typing where it is used; .pyi stubs never run.
FLAGS = (
    "--target=3.10-",
    "--no-tips",
    "--violations",
    "--eval-annotations",
    "--backport",
    "typing_extensions",
    "--no-make-paths-absolute",
    "--exclude-regex",
    r"\.pyi$",
)


def vermin(*paths: str, cwd: Path = ROOT) -> tuple[int, list[str]]:
    """Exit status and the violations, one `path:line: what` each."""
    pytest.importorskip("vermin", reason="vermin is in the dev extra")
    run = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", *FLAGS,
         "--format", "parsable", *paths],
        cwd=cwd, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    found = []
    for line in run.stdout.splitlines():
        # path:line:column:py2:py3:feature (vermin skips paths holding ':'); a file's and
        # the run's summary lines have no line number
        fields = line.split(":", 5)
        if len(fields) == 6 and fields[1]:
            path, lineno, _col, _py2, py3, feature = fields
            found.append(f"{path}:{lineno}: {feature} needs Python {py3}")
    return run.returncode, found


def test_nothing_shipped_needs_more_than_python_310() -> None:
    status, found = vermin(*PATHS)
    assert not found, "3.11-only constructs (see edgefleet/core/compat.py):\n" + "\n".join(found)
    assert status == 0


def test_the_check_catches_what_310_lacks(tmp_path: Path) -> None:
    (tmp_path / "new.py").write_text(
        "from __future__ import annotations\n"
        "import datetime\n"
        "from enum import StrEnum\n"
        "from typing import Self\n"
        "NOW = datetime.datetime.now(datetime.UTC)\n"
    )
    status, found = vermin("new.py", cwd=tmp_path)
    assert status != 0
    assert any(f.startswith("new.py:3:") and "StrEnum" in f for f in found), found
    assert any(f.startswith("new.py:4:") and "Self" in f for f in found), found
    assert any(f.startswith("new.py:5:") and "UTC" in f for f in found), found


def test_ci_runs_the_same_check() -> None:
    script = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")
    lines = [line for line in script.splitlines() if line.strip().startswith("vermin ")]
    assert len(lines) == 1, "one vermin line in .ci/run, before the tests"
    words = shlex.split(lines[0])
    assert set(FLAGS) <= set(words) and set(PATHS) <= set(words), words
    assert script.index(lines[0]) < script.index("python -m pytest")


class Phase(StrEnum310):
    QUEUED = auto()
    READY = "ready"


def test_the_310_strenum_behaves_as_311s() -> None:
    for member, value in ((Phase.QUEUED, "queued"), (Phase.READY, "ready")):
        assert str(member) == f"{member}" == format(member, "") == value == member
        assert Phase(value) is member and isinstance(member, str)
    assert f"{Phase.READY:>7}" == "  ready"
    adapter = pydantic.TypeAdapter(Phase)
    assert adapter.dump_json(Phase.READY) == b'"ready"'
    assert adapter.validate_python("queued") is Phase.QUEUED
    if sys.version_info >= (3, 11):
        from enum import StrEnum as Standard  # novm: compared only where it exists

        assert StrEnum is Standard


def test_times_with_a_z_read_as_on_311() -> None:
    # 3.10's datetime.fromisoformat refuses a trailing Z that 3.11's reads as UTC.
    from edgefleet.core.data import parse_since

    utc = parse_since("2026-11-30T08:00")
    assert parse_since("2026-11-30T08:00Z") == parse_since("2026-11-30T08:00+00:00") == utc
    assert parse_since("2026-11-30T09:00+01:00") == utc
