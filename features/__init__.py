"""Pure per-customer feature state, its transitions, and the Redis store adapter."""
