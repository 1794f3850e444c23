"""Scores derived from features: RFM, CLV, online models, segment rules."""

import stream  # noqa: F401  (adds the finder of compiled modules; see stream.native)
