"""Read a Prometheus endpoint the way Prometheus does: over HTTP, parsed by the text format's
parser, so a test checks what a user's scrape would see."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Sample] = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def find(self, name: str, **labels: str) -> list[Sample]:
        """Samples named `name` whose labels include `labels`."""
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample named `name` with these labels."""
        found = self.find(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples, expected one"
        return float(found[0].value)

    def total(self, name: str, **labels: str) -> float:
        return sum(float(s.value) for s in self.find(name, **labels))


def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return Scrape(response.read().decode())
