"""Pure per-customer feature state, its transitions, and the Redis store adapter."""

import stream  # noqa: F401  (adds the finder of compiled modules; see stream.native)
