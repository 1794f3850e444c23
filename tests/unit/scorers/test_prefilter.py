"""The vectorised segment pre-filter decides nothing: with or without it, every customer
of a batch gets the same outcome (segments, migrations with their reasons, counters)."""

from __future__ import annotations

from typing import Any

import pytest

import scorers.scoring as scoring
from bench.profile_scoring import build, canonical, scenarios


@pytest.fixture(scope="module")
def workload() -> Any:
    return build(customers=700, days=120, seed=11, examples=600)


@pytest.mark.parametrize("scenario", ["steady", "new", "sweep", "later"])
@pytest.mark.parametrize("batch", [5, 130, 700])
def test_outcomes_are_the_same_with_and_without_the_prefilter(
        workload: Any, scenario: str, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    make = scenarios(workload)[scenario]
    got = {}
    for name, threshold in (("prefilter", 0), ("scalar", 10**9)):
        monkeypatch.setattr(scoring, "MOVING_PREFILTER_MIN", threshold)
        inputs = make()
        out = []
        for k in range(0, len(inputs), batch):
            out.extend(scoring.evaluate(inputs[k:k + batch], workload.ctx))
        got[name] = canonical(out)
    moved = sum(len(o[6]) for o in got["scalar"])
    if scenario in ("new", "later"):
        assert moved > 0  # the comparison covers migrations, not only customers who stay
    assert got["prefilter"] == got["scalar"]
