"""Commands packed by hiredis are byte-for-byte what redis-py's own packer sends."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import DataError

from stream.redisconn import _with_hiredis_packing

_arg = st.one_of(
    st.binary(max_size=64), st.text(max_size=32),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)


def _pair() -> tuple[object, object]:
    plain = aioredis.Redis().connection_pool.make_connection()
    fast_pool = _with_hiredis_packing(aioredis.Redis()).connection_pool
    return plain, fast_pool.make_connection()


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["SET", b"EVALSHA", "HSET", "CONFIG GET", b"CLIENT SETNAME"]),
       args=st.lists(_arg, max_size=40))
def test_same_bytes_as_redis_py(name: object, args: list[object]) -> None:
    plain, fast = _pair()
    assert type(fast) is not type(plain)
    want = b"".join(bytes(x) for x in plain.pack_command(name, *args))
    got = b"".join(bytes(x) for x in fast.pack_command(name, *args))
    assert got == want


def test_rejects_what_redis_py_rejects() -> None:
    _, fast = _pair()
    with pytest.raises(DataError):
        fast.pack_command("SET", "k", True)
    with pytest.raises(DataError):
        fast.pack_command("SET", "k", None)
