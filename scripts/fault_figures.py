"""The README's reliability table from one run of the fault suite.

    EDGEFLEET_FAULT_FIGURES=faults.json python -m pytest -q tests/faults
    python scripts/fault_figures.py faults.json

Each section is what the suite injected or sent (kill points by phase, link faults, attacks
refused, tamper cases by TUF attack, malformed requests per method); the suite fails if any
of them was served, lost or answered wrongly, so "lost or wrongly served" is 0 in a run that
passed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    figures: dict[str, dict[str, int]] = json.loads(Path(sys.argv[1]).read_text())
    print("| what | count |")
    print("| --- | ---: |")
    for section in sorted(figures):
        counts = figures[section]
        print(f"| **{section}** | **{sum(counts.values()):,}** |")
        if section == "malformed requests":
            services: dict[str, list[int]] = {}
            for method, n in counts.items():
                services.setdefault(method.strip("/").split("/")[0], []).append(n)
            for service, ns in sorted(services.items()):
                print(
                    f"| &nbsp;&nbsp;{service} ({len(ns)} methods) | {min(ns)}–{max(ns)} per "
                    f"method, {sum(ns):,} in all |"
                )
            continue
        for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"| &nbsp;&nbsp;{key} | {n:,} |")


if __name__ == "__main__":
    main()
