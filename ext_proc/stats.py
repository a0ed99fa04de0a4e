"""Counters ext_proc keeps about what it metered and decided (in-process)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Stats:
    streams: int = 0  # HTTP requests seen (one ext_proc stream each)
    messages: int = 0  # ext_proc messages answered
    rejected_requests: int = 0
    unmetered_requests: int = 0  # requests of no metered API shape
    unparsed_requests: int = 0  # request bodies that were not JSON objects
    metered_responses: int = 0
    estimated_responses: int = 0
    unmetered_responses: int = 0  # metered shape, but no usage could be read
    unpriced_responses: int = 0
    provider_errors: int = 0  # error answers (no usage, no cost)
    internal_errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
