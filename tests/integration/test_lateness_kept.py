"""A deployment's state is pruned under its allowed lateness (event ids kept for twice it,
day buckets for the larger of 90 days and it): a worker refuses at start a lateness larger
than any the state was kept with, naming the setting, and accepts a smaller one."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
import redis

from stream.errors import SettingsError
from stream.redisconn import check_lateness, lateness_key
from stream.settings import load_settings

pytestmark = pytest.mark.integration


def _worker(services: dict[str, str], prefix: str, **env: str) -> Any:
    """`segstream worker` of the deployment ``prefix`` with ``env``, as run from a shell."""
    full = {**os.environ, "SEGSTREAM_KAFKA_BOOTSTRAP": services["kafka"],
            "SEGSTREAM_REDIS_URL": services["redis"], "SEGSTREAM_REDIS_PREFIX": prefix, **env}
    return subprocess.run([sys.executable, "-m", "stream.cli", "worker"], env=full,
                          capture_output=True, text=True, timeout=120)


def test_the_smallest_lateness_kept_is_remembered_and_a_larger_one_refused(services) -> None:
    prefix = f"lk-{uuid.uuid4().hex[:8]}:"

    def settings(days: float) -> Any:
        return load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                             redis_prefix=prefix, allowed_lateness_days=days)

    r = redis.from_url(services["redis"])
    try:
        check_lateness(settings(7))  # a fresh deployment takes any
        assert int(r.get(lateness_key(settings(7)))) == 7 * 86_400_000
        check_lateness(settings(7))  # the same again
        with pytest.raises(SettingsError, match="SEGSTREAM_ALLOWED_LATENESS_DAYS") as info:
            check_lateness(settings(30))
        assert "at most 7" in str(info.value)
        check_lateness(settings(2.5))  # smaller is safe, and from now on the one kept
        assert int(r.get(lateness_key(settings(7)))) == int(2.5 * 86_400_000)
        with pytest.raises(SettingsError, match=r"at most 2\.5"):
            check_lateness(settings(7))

        r.set(lateness_key(settings(7)), b"junk")  # unreadable: taken for none
        check_lateness(settings(7))
        assert int(r.get(lateness_key(settings(7)))) == 7 * 86_400_000
        check_lateness(settings(2.5))

        # the worker command refuses it before it starts (exit 2, one line naming it)
        res = _worker(services, prefix, SEGSTREAM_ALLOWED_LATENESS_DAYS="7")
        assert res.returncode == 2, res.stderr[-2000:]
        assert "SEGSTREAM_ALLOWED_LATENESS_DAYS" in res.stderr
        assert "Traceback" not in res.stderr
    finally:
        for k in r.scan_iter(f"{prefix}*"):
            r.delete(k)
        r.close()


def test_the_currency_the_state_was_built_with_is_kept_and_another_refused(services) -> None:
    """Restarted with another SEGSTREAM_CURRENCY, a worker used to add the new currency's
    amounts to the totals built in the old one, silently."""
    from stream.redisconn import check_currency, currency_key

    prefix = f"kc-{uuid.uuid4().hex[:8]}:"

    def settings(currency: str | None) -> Any:
        return load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                             redis_prefix=prefix, currency=currency)

    r = redis.from_url(services["redis"])
    try:
        check_currency(settings("usd"))  # a fresh deployment takes any, upper-cased
        assert r.get(currency_key(settings(None))) == b"USD"
        check_currency(settings("USD"))
        with pytest.raises(SettingsError, match="SEGSTREAM_CURRENCY is EUR") as info:
            check_currency(settings("eur"))
        assert "built with it USD" in str(info.value) and "reset --yes" in str(info.value)
        with pytest.raises(SettingsError, match="SEGSTREAM_CURRENCY is not set"):
            check_currency(settings(None))

        r.delete(currency_key(settings(None)))
        check_currency(settings(None))  # none kept: "" from now on
        assert r.get(currency_key(settings(None))) == b""
        with pytest.raises(SettingsError, match="built with it not set"):
            check_currency(settings("USD"))

        res = _worker(services, prefix, SEGSTREAM_CURRENCY="EUR")
        assert res.returncode == 2, res.stderr[-2000:]
        assert "SEGSTREAM_CURRENCY" in res.stderr and "Traceback" not in res.stderr
    finally:
        for k in r.scan_iter(f"{prefix}*"):
            r.delete(k)
        r.close()


def test_the_partition_count_the_state_was_built_with_is_kept_and_another_refused(
        services) -> None:
    """Following "add partitions" on a deployment with state used to split customers: their
    next events went to another partition and started a second state there."""
    from features.store import Keys
    from stream.redisconn import check_currency, check_partition_count, partitions_key

    prefix = f"kp-{uuid.uuid4().hex[:8]}:"

    def settings(n: int, currency: str | None = None) -> Any:
        return load_settings(kafka_bootstrap=services["kafka"], redis_url=services["redis"],
                             redis_prefix=prefix, partitions=n, currency=currency)

    r = redis.from_url(services["redis"])
    keys = Keys(prefix)
    try:
        check_partition_count(settings(3))  # a fresh deployment takes its count
        assert r.get(partitions_key(settings(3))) == b"3"
        check_partition_count(settings(3))
        with pytest.raises(SettingsError, match="SEGSTREAM_PARTITIONS is 6") as info:
            check_partition_count(settings(6))
        assert "built with 3 partitions" in str(info.value)

        # A state from before the count was kept: inferred from the partitions holding it.
        r.delete(partitions_key(settings(3)))
        r.set(keys.now(), 1)
        for p in range(3):
            r.hset(keys.meta(p), "ver", 1)
        with pytest.raises(SettingsError, match="built with 3 partitions"):
            check_partition_count(settings(6))
        check_partition_count(settings(3))
        assert r.get(partitions_key(settings(3))) == b"3"

        # ... and its currency, which cannot be told, is taken from the setting (a warning)
        check_currency(settings(3, "usd"))
        with pytest.raises(SettingsError, match="SEGSTREAM_CURRENCY is EUR"):
            check_currency(settings(3, "eur"))

        res = _worker(services, prefix, SEGSTREAM_CURRENCY="usd", SEGSTREAM_PARTITIONS="6")
        assert res.returncode == 2, res.stderr[-2000:]
        assert "SEGSTREAM_PARTITIONS" in res.stderr and "Traceback" not in res.stderr
    finally:
        for k in r.scan_iter(f"{prefix}*"):
            r.delete(k)
        r.close()
