"""The migrations API's cursor on a real Redis stream: pages by ``next`` return every entry
once, and a bare millisecond means after every entry of that millisecond."""
from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from stream.queries import migration_log_key, migrations_doc
from stream.redisconn import redis_client
from stream.settings import load_settings

pytestmark = pytest.mark.integration


def test_a_bare_millisecond_is_after_all_of_it_and_pages_cover_the_log_once(services) -> None:
    s = load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                      redis_prefix=f"mc-{uuid.uuid4().hex[:8]}:", partitions=2)
    # entries at three milliseconds, several in the middle one (ids chosen, as a busy log has)
    ids = ["1000-0", "2000-0", "2000-1", "2000-2", "3000-0", "3000-5"]

    async def run() -> tuple[list[str], list[str], list[str], list[str]]:
        r = redis_client(s)
        key = migration_log_key(s)
        try:
            for i in ids:
                await r.xadd(key, {"m": orjson.dumps({"migration_id": i})}, id=i)

            async def page(since: str | None, limit: int = 100) -> tuple[list[str], str]:
                doc = await migrations_doc(s, r, since, limit)
                return [m["migration_id"] for m in doc["migrations"]], doc["next"]

            after_2000, _ = await page("2000")
            after_2000_0, _ = await page("2000-0")
            after_0, _ = await page("0")
            seen, cursor = [], None
            while True:
                got, cursor = await page(cursor, 2)
                if not got:
                    break
                seen.extend(got)
            return after_2000, after_2000_0, after_0, seen
        finally:
            async for k in r.scan_iter(f"{s.redis_prefix}*"):
                await r.delete(k)
            await r.aclose()

    after_2000, after_2000_0, after_0, seen = asyncio.run(run())
    assert after_2000 == ["3000-0", "3000-5"]
    assert after_2000_0 == ["2000-1", "2000-2", "3000-0", "3000-5"]
    assert after_0 == ids
    assert seen == ids
