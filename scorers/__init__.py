"""Scores derived from features: RFM, CLV, online models, segment rules."""
