"""Scraping a service's /metrics endpoint over real HTTP, and reading it."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# Sample-name suffixes each metric type adds to its family's name.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


@dataclass(frozen=True)
class Family:
    name: str  # without the _total of counters
    type: str
    samples: list[Sample]

    @property
    def display_name(self) -> str:
        """The name as queried (and listed in docs/operations/metrics.md): counters with _total."""
        return self.name + "_total" if self.type == "counter" else self.name

    def label_names(self) -> set[str]:
        return {k for s in self.samples for k in s.labels if k != "le"}


@dataclass(frozen=True)
class Scrape:
    families: dict[str, Family]

    def value(self, sample: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when it does not exist (yet)."""
        for family in self.families.values():
            for s in family.samples:
                if s.name == sample and s.labels == labels:
                    return float(s.value)
        return 0.0

    def labels_of(self, sample: str) -> list[dict[str, str]]:
        return [s.labels for f in self.families.values() for s in f.samples if s.name == sample]

    def family_of(self, name: str) -> Family | None:
        """The family a name used in a query belongs to: the family itself, or
        a sample-name suffix only its type adds (foo_bucket of histogram foo)."""
        if name in self.families and self.families[name].type not in SUFFIXES:
            return self.families[name]
        for family in self.families.values():
            if any(name == family.name + s for s in SUFFIXES.get(family.type, ())):
                return family
        return None


def scrape(port: int | None) -> Scrape:
    assert port, "metrics are not served (metrics_listen is empty)"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()
    families = {
        f.name: Family(f.name, f.type, list(f.samples))
        for f in text_string_to_metric_families(text)
    }
    return Scrape(families)
