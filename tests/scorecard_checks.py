"""The check every phase's report must pass: one scorecard, the same keys for its input and output models."""
from __future__ import annotations


def assert_one_scorecard(report: dict) -> None:
    section = report["scorecard"]
    assert set(section) == {"spec", "spec_digest", "inputs", "outputs", "baselines", "cards"}
    measured = [*section["inputs"], *section["outputs"]]
    assert section["outputs"] and set(measured) <= set(section["cards"])
    first = section["cards"][measured[0]]
    for name in measured:
        card = section["cards"][name]
        assert card["spec_digest"] == section["spec_digest"], name
        assert list(card["metrics"]) == list(first["metrics"]), name
        assert list(card["items"]) == list(first["items"]), name
        assert card["problems"] == first["problems"], name
