"""Names of the per-customer scores (DESIGN §5); these names are contract."""

from __future__ import annotations

#: Every score the engine puts next to a customer's features, in display order.
SCORE_NAMES: tuple[str, ...] = (
    "rfm_r",
    "rfm_f",
    "rfm_m",
    "rfm",
    "p_alive",
    "expected_purchases_90d",
    "clv_90d",
    "churn_probability",
    "purchase_propensity_7d",
    "cluster",
)

#: Scores whose value is a string rather than a number.
TEXT_SCORES: frozenset[str] = frozenset({"rfm", "cluster"})
