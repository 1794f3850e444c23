"""Redis clients for the engine: one place that turns settings into a connection.

``SEGSTREAM_REDIS_URL`` names the server (``rediss://`` for TLS, ``user:password@`` for an
ACL user); ``SEGSTREAM_REDIS_CLUSTER=true`` makes it a seed node of a Redis Cluster, and
the ``SEGSTREAM_REDIS_TLS_*`` files configure TLS beyond the URL. Every client the engine
builds (asyncio for the worker, sync for CLI paths) comes from here, so they all agree.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    ClusterDownError,
    MovedError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from stream.errors import ServiceError, SettingsError
from stream.settings import Settings, redacted_url

#: Either asyncio client; both speak the same commands for everything the engine sends.
AsyncRedis = aioredis.Redis | aioredis.RedisCluster
SyncRedis = redis.Redis | redis.RedisCluster


def redis_failed(settings: Settings, exc: Exception) -> ServiceError:
    """The error for a Redis call that failed after start-up, naming the setting (the URL
    without its password) and the first line of what went wrong."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ServiceError(f"Redis at {redacted_url(settings.redis_url)} failed "
                        f"(SEGSTREAM_REDIS_URL): {first}")


#: How Redis words a refused login or a command the ACL user may not run.
_REFUSALS = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid username-password",
             "Authentication required", "no permissions")


def refusal_hint(exc: BaseException) -> str:
    """`` (…SEGSTREAM_REDIS_URL…)`` when ``exc`` is Redis refusing the engine's user or
    password or a command of it, so a password rotated or an ACL narrowed under a running
    worker names the setting to fix; otherwise ``""``.

    >>> "SEGSTREAM_REDIS_URL" in refusal_hint(Exception("redis load failed: WRONGPASS …"))
    True
    >>> refusal_hint(Exception("Connection refused"))
    ''
    """
    text = str(exc)
    if any(word in text for word in _REFUSALS):
        return (" (Redis refused the user or password or a command of it: check "
                "SEGSTREAM_REDIS_URL and the user's ACL)")
    return ""


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments every client gets on top of what the URL says."""
    kw: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
    }
    if settings.redis_tls_ca_file is not None:
        kw["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    if settings.redis_tls_cert_file is not None:
        kw["ssl_certfile"] = str(settings.redis_tls_cert_file)
        kw["ssl_keyfile"] = str(settings.redis_tls_key_file)
    return kw


class _HiredisPacking:
    """Packs commands with hiredis (C) instead of redis-py's pure-Python packer.

    The asyncio connections of redis-py pack every argument in Python; a batch commit
    carries thousands of arguments, so this is a real share of a micro-batch. Anything
    hiredis does not take (a multi-word command name, a memoryview, a type redis-py
    rejects) goes through redis-py's own packer, with its own errors.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0] if args else None
        if (isinstance(head, str) and " " not in head) or (
                isinstance(head, bytes) and b" " not in head):
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        return super().pack_command(*args)  # type: ignore[misc,no-any-return]


_FAST: dict[type, type] = {}


def _with_hiredis_packing(client: aioredis.Redis) -> aioredis.Redis:
    pool = client.connection_pool
    base = pool.connection_class
    fast = _FAST.get(base)
    if fast is None:
        fast = _FAST[base] = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    pool.connection_class = fast
    return client


def redis_client(settings: Settings) -> AsyncRedis:
    """The engine's asyncio client: a ``RedisCluster`` when the settings say cluster.

    Callers use the commands both clients share; on a cluster every multi-key command
    and every transaction must stay within one hash slot (see ``features.store``).
    """
    kw = connection_kwargs(settings)
    if settings.redis_cluster:
        return aioredis.RedisCluster.from_url(settings.redis_url, **kw)
    return _with_hiredis_packing(
        aioredis.from_url(settings.redis_url, health_check_interval=30, **kw))


def redis_sync_client(settings: Settings, timeout_s: float | None = None,
                      **extra: Any) -> SyncRedis:
    """The blocking twin of :func:`redis_client` (CLI commands, health checks, benchmarks)."""
    kw = {**connection_kwargs(settings), **extra}
    if timeout_s is not None:
        kw["socket_timeout"] = kw["socket_connect_timeout"] = timeout_s
    if settings.redis_cluster:
        return redis.RedisCluster.from_url(settings.redis_url, **kw)
    return redis.from_url(settings.redis_url, **kw)


def is_cluster(client: Any) -> bool:
    """Whether a client (asyncio or sync) talks to a Redis Cluster."""
    return isinstance(client, aioredis.RedisCluster | redis.RedisCluster)


async def mget_any(client: Any, keys: Sequence[str]) -> list[Any]:
    """MGET of keys that may live in different hash slots (split per slot on a cluster)."""
    if not keys:
        return []
    if isinstance(client, aioredis.RedisCluster):
        return list(await client.mget_nonatomic(list(keys)))
    return list(await client.mget(list(keys)))


def delete_matching(client: Any, pattern: str, batch: int = 1000,
                    only: Callable[[Any], bool] | None = None) -> int:
    """UNLINK every key matching a pattern (and ``only``, when given) on every primary
    of a cluster; the count."""
    n = 0
    keys: list[Any] = []
    # On a cluster, scan_iter walks every primary and unlink splits its keys by slot.
    for k in client.scan_iter(match=pattern, count=batch):
        if only is not None and not only(k):
            continue
        keys.append(k)
        if len(keys) >= batch:
            n += int(client.unlink(*keys))
            keys = []
    if keys:
        n += int(client.unlink(*keys))
    return n


def check_redis(settings: Settings) -> None:
    """Fail fast, naming the setting to fix, when the engine cannot use its Redis.

    Connects with the engine's own settings, pings, and reads one of the deployment's
    keys (which an ACL user limited to another prefix may not).
    """
    where = redacted_url(settings.redis_url)
    probe = f"{settings.redis_prefix}now"
    try:
        client = redis_sync_client(settings)
        try:
            client.ping()
            client.exists(probe)
            if not settings.redis_cluster and _serves_cluster(client):
                raise SettingsError(
                    f"SEGSTREAM_REDIS_CLUSTER: {where} is a Redis Cluster node; set "
                    "SEGSTREAM_REDIS_CLUSTER=true")
        finally:
            client.close()
    except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
        raise SettingsError(
            f"SEGSTREAM_REDIS_URL: Redis at {where} refused the user name or password "
            f"({_first_line(exc)}); put the ACL user's credentials in the URL as "
            "redis[s]://user:password@host:port/0") from None
    except NoPermissionError as exc:
        raise SettingsError(
            f"SEGSTREAM_REDIS_URL: the Redis user of {where} may not use the deployment's "
            f"keys {settings.redis_prefix}* ({_first_line(exc)}); grant them to the user "
            "(ACL ~prefix*) or change SEGSTREAM_REDIS_PREFIX") from None
    except RedisClusterException as exc:
        raise SettingsError(
            f"SEGSTREAM_REDIS_CLUSTER: cannot use {where} as a Redis Cluster "
            f"({_first_line(exc)}); set SEGSTREAM_REDIS_CLUSTER=false for a single "
            "server") from None
    except (MovedError, AskError, ClusterDownError):
        raise SettingsError(
            f"SEGSTREAM_REDIS_CLUSTER: {where} is a Redis Cluster node; set "
            "SEGSTREAM_REDIS_CLUSTER=true") from None
    except ResponseError as exc:
        text = str(exc)
        if text.startswith("NOAUTH"):
            raise SettingsError(
                f"SEGSTREAM_REDIS_URL: Redis at {where} needs a user name and password "
                "(redis[s]://user:password@host:port/0)") from None
        raise ServiceError(f"Redis at {where} answered with an error: {text}") from None
    except RedisError as exc:
        cause = exc.__cause__ or exc.__context__
        said = f"{exc} {cause}"
        if settings.redis_tls_cert_file is None and settings.redis_url.startswith(
                "rediss://") and ("CERTIFICATE_REQUIRED" in said or "EOF occurred" in said):
            raise SettingsError(
                f"SEGSTREAM_REDIS_TLS_CERT_FILE / SEGSTREAM_REDIS_TLS_KEY_FILE: Redis at {where} "
                f"ended the TLS handshake ({_first_line(exc)}); a server that requires client "
                "certificates needs both set") from None
        if isinstance(cause, ssl.SSLError) or "SSL" in str(exc):
            raise SettingsError(
                f"SEGSTREAM_REDIS_URL / SEGSTREAM_REDIS_TLS_CA_FILE: TLS with {where} failed "
                f"({_first_line(exc)}); check the CA file and the host name") from None
        hint = "" if settings.redis_url.startswith("rediss://") else \
            " (if the server only speaks TLS, use a rediss:// URL)"
        if isinstance(exc, RedisTimeoutError):
            hint = (f" (no answer within SEGSTREAM_REDIS_TIMEOUT_S = "
                    f"{settings.redis_timeout_s:g} s){hint}")
        raise ServiceError(
            f"SEGSTREAM_REDIS_URL: cannot use Redis at {where}: {_first_line(exc)}{hint}"
        ) from None


#: maxmemory policies under which Redis deletes keys the engine never set to expire.
EVICTING = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def _policies(answer: Any, node: str = "") -> dict[str, set[str]]:
    """The maxmemory-policy values in a CONFIG GET answer (one server's, or per node of a
    cluster), each with the nodes that gave it (``""`` for a single server's answer)."""
    found: dict[str, set[str]] = {}
    if isinstance(answer, dict):
        for k, v in answer.items():
            key = k.decode() if isinstance(k, bytes) else str(k)
            if key == "maxmemory-policy":
                found.setdefault(v.decode() if isinstance(v, bytes) else str(v),
                                 set()).add(node)
            elif isinstance(v, dict):
                for policy, nodes in _policies(v, key).items():
                    found.setdefault(policy, set()).update(nodes)
    return found


def check_eviction(settings: Settings) -> None:
    """Refuse a Redis that evicts keys when full: the engine's state would go silently.

    The state, watermarks and outbox have no expiry, so only an ``allkeys-*`` policy can
    evict them (``noeviction`` makes a full Redis refuse writes, which a worker retries;
    ``volatile-*`` evicts only keys with an expiry, such as the trigger consumer's marks).
    A server that does not let the user read its configuration (managed services, ACL
    users without ``CONFIG``) gets a warning instead.
    """
    where = redacted_url(settings.redis_url)
    try:
        client = redis_sync_client(settings)
        try:
            if settings.redis_cluster:  # every node's: each holds a share of the keys
                answer = client.config_get("maxmemory-policy",
                                           target_nodes=client.ALL_NODES)
            else:
                answer = client.config_get("maxmemory-policy")
            policies = _policies(answer)
        finally:
            client.close()
    except RedisError as exc:
        logging.getLogger(__name__).warning(
            "could not read maxmemory-policy of Redis at %s (%s); make sure it is "
            "noeviction: a Redis that evicts keys loses the engine's state silently",
            where, _first_line(exc))
        return
    if not policies:
        logging.getLogger(__name__).warning(
            "Redis at %s did not say its maxmemory-policy; make sure it is noeviction: a "
            "Redis that evicts keys loses the engine's state silently", where)
        return
    if any(p.startswith("volatile-") for p in policies):
        logging.getLogger(__name__).warning(
            "Redis at %s evicts keys with an expiry when full (maxmemory-policy %s): the "
            "trigger consumer's marks and erase times can go, and with them its "
            "deduplication; noeviction keeps them", where, sorted(policies)[0])
    evicting = sorted(p for p in policies if p in EVICTING)
    if evicting:
        nodes = sorted(n for p in evicting for n in policies[p] if n)
        server = (f"Redis at {where}" if not nodes else
                  f"the cluster at {where} has node{'s' if len(nodes) > 1 else ''} "
                  f"{', '.join(nodes)} that")
        raise SettingsError(
            f"SEGSTREAM_REDIS_URL: {server} evicts keys when it is full "
            f"(maxmemory-policy {evicting[0]}), which would lose customer state and offsets "
            "silently; set maxmemory-policy noeviction on "
            f"{'that node' if len(nodes) == 1 else 'the server' if not nodes else 'those nodes'}"
            " (a full Redis then refuses writes, and the worker retries them)")


def _serves_cluster(client: Any) -> bool:
    """Whether a plain client is connected to a cluster node (where keys would be MOVED)."""
    try:
        client.execute_command("CLUSTER", "MYID")
    except ResponseError:  # cluster support disabled, or the ACL user may not ask
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


#: Keeps the smallest allowed lateness (ms) the deployment's state was ever kept with, and
#: returns it: a state pruned under a lateness stays pruned (see :func:`check_lateness`).
_LATENESS_KEPT = """
local v = tonumber(redis.call('GET', KEYS[1]) or '')
if not v or tonumber(ARGV[1]) < v then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return v
"""


def _cannot(settings: Settings, doing: str, exc: RedisError) -> ServiceError:
    """What a failed start-up read or write of the state's settings raises."""
    return ServiceError(f"SEGSTREAM_REDIS_URL: cannot {doing} in Redis at "
                        f"{redacted_url(settings.redis_url)}: {_first_line(exc)}")


def _keep(settings: Settings, script: str, key: str, value: Any, what: str) -> Any:
    """Run one of the scripts that keep a setting the state was built with; a Redis that
    fails names SEGSTREAM_REDIS_URL."""
    try:
        client = redis_sync_client(settings)
        try:
            return client.eval(script, 1, key, value)
        finally:
            client.close()
    except RedisError as exc:
        raise _cannot(settings, f"keep {what}", exc) from None


def lateness_key(settings: Settings) -> str:
    """The key holding the smallest allowed lateness the deployment's state was kept with."""
    return f"{settings.redis_prefix}kept_lateness_ms"


def check_lateness(settings: Settings) -> None:
    """Refuse, naming the setting, an allowed lateness larger than any the deployment's
    state was kept with before.

    Like the engine's own writes, this needs the deployment's keys and ``EVAL``. While
    workers run, lower the lateness on all of them together: a worker still running with the
    larger one would accept events into partitions pruned under the smaller (it checks only
    as it starts).

    A state keeps its event ids for twice the allowed lateness and its day buckets for the
    larger of 90 days and the lateness; what it pruned under a smaller lateness is gone. A
    larger lateness would accept events whose id or day the state no longer has: they
    would be counted twice, or into days already folded. A smaller one is always safe, and
    from then on is the one kept.
    """
    kept = int(_keep(settings, _LATENESS_KEPT, lateness_key(settings), settings.lateness_ms,
                     "the allowed lateness"))
    if settings.lateness_ms > kept:
        days = f"{kept / 86_400_000:g}"
        raise SettingsError(
            f"SEGSTREAM_ALLOWED_LATENESS_DAYS: {settings.allowed_lateness_days:g} days is more "
            f"than the {days} this deployment's state has been kept with (event ids for twice "
            "the lateness, day buckets for the larger of 90 days and it): events within the "
            "new lateness could be counted twice or land in days already folded. Keep it at "
            f"most {days}, or build the state again with it (segstream reset --yes, then "
            "replay the input)")


#: Keeps a setting the deployment's state was built with, and returns the one kept: the
#: current one (ARGV[1]) is taken when none is kept yet and the deployment has no state
#: (KEYS[2], its engine time, does not exist), or ARGV[2] is "adopt"; else "?" (unknown).
_SETTING_KEPT = """
local v = redis.call('GET', KEYS[1])
if v then return v end
if ARGV[2] == 'adopt' or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return false
"""


def currency_key(settings: Settings) -> str:
    """The key holding the currency setting the deployment's state was built with."""
    return f"{settings.redis_prefix}kept_currency"


def partitions_key(settings: Settings) -> str:
    """The key holding the partition count the deployment's state was built with."""
    return f"{settings.redis_prefix}kept_partitions"


def _kept_setting(settings: Settings, key: str, value: str, what: str,
                  adopt: bool = False) -> str | None:
    """The value of a setting the state was built with (taking ``value`` on a deployment
    without state, or with ``adopt``); None when the state predates keeping it."""
    from features.store import Keys

    now_key = Keys(settings.redis_prefix).now()
    try:
        client = redis_sync_client(settings)
        try:
            if settings.redis_cluster:
                # The two keys are in different slots on a cluster: one call each.
                kept = client.get(key)
                if kept is None and (adopt or not client.exists(now_key)):
                    client.set(key, value, nx=True)
                    kept = client.get(key)
            else:
                kept = client.eval(_SETTING_KEPT, 2, key, now_key, value,
                                   "adopt" if adopt else "")
        finally:
            client.close()
    except RedisError as exc:
        raise _cannot(settings, f"keep {what}", exc) from None
    if kept is None:
        return None
    return kept.decode() if isinstance(kept, bytes) else str(kept)


def check_currency(settings: Settings) -> None:
    """Refuse, naming the setting, a ``SEGSTREAM_CURRENCY`` other than the one the
    deployment's state was built with.

    The money features sum amounts as numbers: amounts accepted in one currency and then in
    another (or, with no currency set, in any) would be added together, and two workers of
    one group with different settings would disagree partition by partition. The first
    worker to start on a deployment without state keeps its setting. A state built by a
    version that did not keep it takes the current setting, with a warning: which currency
    its amounts were in cannot be told.
    """
    want = (settings.currency or "").upper()
    key = currency_key(settings)
    kept = _kept_setting(settings, key, want, "the currency")
    if kept is None:
        logging.getLogger(__name__).warning(
            "the currency this deployment's state was built with is not known (it predates "
            "keeping it); taking SEGSTREAM_CURRENCY=%s as its currency from now on",
            want or "(not set)")
        kept = _kept_setting(settings, key, want, "the currency", adopt=True)
    if kept != want:
        def said(c: str | None) -> str:
            return c if c else "not set (amounts of any currency, summed as given)"

        raise SettingsError(
            f"SEGSTREAM_CURRENCY is {said(want)}, but this deployment's state was built with "
            f"it {said(kept)}: its money features would add amounts of different currencies. "
            f"Set it back to {kept or 'nothing'}, or build the state again with the new one "
            "(segstream reset --yes, then replay the input)")


def check_partition_count(settings: Settings) -> None:
    """Refuse, naming ``SEGSTREAM_PARTITIONS``, another partition count than the one the
    deployment's state was built with.

    A customer's state lives in the partition of their key, which follows from the count:
    with another count, a customer's next events go to another partition, which starts a
    second state beside the first (two half-histories, segment counts twice). A state that
    predates keeping the count has it inferred from the partitions holding state.
    """
    want = str(settings.partitions)
    key = partitions_key(settings)
    kept = _kept_setting(settings, key, want, "the partition count")
    if kept is None:
        held = _partitions_with_state(settings)
        kept = _kept_setting(settings, key, str(held or settings.partitions),
                             "the partition count", adopt=True)
    if kept != want:
        raise SettingsError(
            f"SEGSTREAM_PARTITIONS is {want}, but this deployment's state was built with "
            f"{kept} partitions: each customer's state is in the partition of their key, "
            f"which changes with the count, so their next events would start a second state. "
            f"Set it back to {kept} (and the input topics' partitions with it), or build the "
            "state again with the new count (segstream reset --yes, recreate the topics, then "
            "replay the input)")


#: The most partitions a state is looked for in when its count was not kept.
_MAX_PROBED_PARTITIONS = 4096


def _partitions_with_state(settings: Settings) -> int:
    """One more than the highest partition whose metadata exists (0 when none does)."""
    from features.store import Keys

    keys = Keys(settings.redis_prefix)
    try:
        client = redis_sync_client(settings)
        try:
            pipe = client.pipeline(transaction=False)
            for p in range(_MAX_PROBED_PARTITIONS):
                pipe.exists(keys.meta(p))
            found = pipe.execute()
        finally:
            client.close()
    except RedisError as exc:
        raise _cannot(settings, "read the state's partitions", exc) from None
    held = [p for p, n in enumerate(found) if n]
    return held[-1] + 1 if held else 0
