"""The feature store on a real three-node Redis Cluster.

Slots are judged by the servers themselves (``CLUSTER KEYSLOT``), not by the client's
own hashing, and every command the store sends is recorded on its way out.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as acluster
import redis_servers

from features.store import Keys, LogAppend, PartitionCommit, RedisFeatureStore
from stream.errors import SettingsError
from stream.redisconn import check_redis, delete_matching, redis_client, redis_sync_client
from stream.settings import load_settings

pytestmark = [pytest.mark.integration]

PARTITIONS = 6
TOPICS = ["t.clickstream", "t.transactions"]
PREFIX = "rc-test:"


@pytest.fixture(scope="module")
def cluster() -> Iterator[redis_servers.Cluster]:
    with redis_servers.redis_cluster(3) as c:
        yield c


@pytest.fixture
def settings(cluster: redis_servers.Cluster) -> Any:
    s = load_settings(redis_url=cluster.url, redis_cluster=True, redis_prefix=PREFIX,
                      partitions=PARTITIONS)
    yield s
    r = redis_sync_client(s)
    try:
        delete_matching(r, f"{PREFIX}*")
    finally:
        r.close()


def server_slot(cluster: redis_servers.Cluster, key: str) -> int:
    """The slot the server computes for a key."""
    return int(cluster.cli("cluster", "keyslot", key).strip())


def slot_owner(cluster: redis_servers.Cluster, slot: int) -> int:
    """Port of the primary serving a slot, from the server's own slot table."""
    r = redis.Redis(port=cluster.ports[0])
    try:
        for start, end, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(primary[1])
    finally:
        r.close()
    raise AssertionError(f"slot {slot} unserved")


def raw_get(cluster: redis_servers.Cluster, key: str) -> str:
    """GET through redis-cli on the node that owns the key (no engine code involved)."""
    port = slot_owner(cluster, server_slot(cluster, key))
    return cluster.cli("get", key, port=port).rstrip("\n")


class Recorder:
    """Records every command the asyncio cluster client sends, pipelined or not."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[Any, ...]] = []
        direct = acluster.RedisCluster.execute_command
        piped = acluster.ClusterPipeline.execute_command
        rec = self

        async def on_direct(self: Any, *args: Any, **kw: Any) -> Any:
            rec.sent.append(args)
            return await direct(self, *args, **kw)

        def on_piped(self: Any, *args: Any, **kw: Any) -> Any:
            rec.sent.append(args)
            return piped(self, *args, **kw)

        monkeypatch.setattr(acluster.RedisCluster, "execute_command", on_direct)
        monkeypatch.setattr(acluster.ClusterPipeline, "execute_command", on_piped)


def command_keys(args: tuple[Any, ...]) -> list[str]:
    """The keys of a data command as Redis defines them (for the commands the store uses)."""
    name = str(args[0]).upper()
    rest = [a.decode() if isinstance(a, bytes) else str(a) for a in args[1:]]
    if name in ("EVALSHA", "EVAL"):
        return rest[2:2 + int(rest[1])]
    if name in ("MGET", "UNLINK", "DEL", "EXISTS"):
        return rest
    if name in ("SCAN", "SCRIPT LOAD", "PING") or name.startswith(("CLUSTER", "SCRIPT")):
        return []
    return rest[:1]


def test_every_key_family_of_a_partition_lands_in_the_slot_of_its_tag(cluster) -> None:
    keys = Keys(PREFIX)
    slots = {}
    for p in range(PARTITIONS):
        tag_slot = server_slot(cluster, f"{{p{p}}}")
        family = [keys.meta(p), keys.outbox(p), keys.ids(p), keys.customer(p, "c-1"),
                  keys.customer(p, "{odd}id"), keys.profile(p, "c-1"), keys.table(p, "rfm"),
                  keys.table(p, "seg")]
        assert {server_slot(cluster, k) for k in family} == {tag_slot}, p
        slots[p] = tag_slot
    # The partitions really are spread over the cluster, so the tests below cross nodes.
    owners = {slot_owner(cluster, s) for s in slots.values()}
    assert len(owners) >= 2, owners


def test_every_multi_key_command_the_store_sends_is_single_slot(cluster, settings,
                                                                 monkeypatch) -> None:
    rec = Recorder(monkeypatch)

    async def run() -> tuple[Any, ...]:
        r = redis_client(settings)
        assert isinstance(r, aioredis.RedisCluster)
        store = RedisFeatureStore(r, PREFIX)
        try:
            wanted = {p: [f"c{p}-{i}" for i in range(5)] for p in range(PARTITIONS)}
            _, snaps = await store.load(wanted, TOPICS)
            commits = [
                PartitionCommit(
                    p, snaps[p].ver, {TOPICS[1]: 10 + p}, 1_000 + p,
                    states={c: f"state-{c}".encode() for c in wanted[p]},
                    outbox={f"o{p}": b"rec"}, high_ts={TOPICS[1]: 900 + p},
                    profiles={c: f"profile-{c}".encode() for c in wanted[p][:2]},
                    increments={"rfm": {"x": 2}, "seg": {"rfm|Champions": 1}})
                for p in range(PARTITIONS)]
            ok = await store.commit(commits)
            now, snaps2 = await store.load(wanted, TOPICS)
            found = await store.get_customer("c4-3", PARTITIONS)
            tables = await store.read_tables("rfm", range(PARTITIONS))
            scanned = {}
            for p in range(PARTITIONS):
                cursor, ids = 0, []
                while True:
                    cursor, page = await store.scan_customers(p, cursor, 2)
                    ids += page
                    if cursor == 0:
                        break
                scanned[p] = sorted(ids)
            streamed = sorted([(p, c) async for p, c, _ in store.iter_customers(PARTITIONS)])
            pending = await store.outbox_pending(range(PARTITIONS))
            # Forgetting outbox records of every partition and appending to the log
            # (another slot) in one round trip.
            await store.outbox_done({p: [f"o{p}"] for p in range(PARTITIONS)},
                                    LogAppend("migrations:log", [b"m0"], 100))
            await store.mark_swept(2, "digest")
            await store.set_context("digest")
            await store.append_log("migrations:log", [b"m1", b"m2"], 100)
            wms = await store.watermarks(PARTITIONS, TOPICS)
            return (wanted, ok, now, snaps2, found, tables, scanned, streamed, pending, wms,
                    await store.now(), await store.outbox_pending(range(PARTITIONS)))
        finally:
            await r.aclose()

    (wanted, ok, now, snaps2, found, tables, scanned, streamed, pending, wms, now2,
     pending2) = asyncio.run(run())

    # What the store did, judged by reading the cluster directly.
    assert ok == {p: True for p in range(PARTITIONS)}
    assert now == now2 == 1_000 + PARTITIONS - 1
    assert raw_get(cluster, f"{PREFIX}now") == str(1_000 + PARTITIONS - 1)
    for p in range(PARTITIONS):
        for c in wanted[p]:
            assert raw_get(cluster, f"{PREFIX}{{p{p}}}:c:{c}") == f"state-{c}"
            assert snaps2[p].states[c] == f"state-{c}".encode()
        assert snaps2[p].ver == 1 and snaps2[p].watermarks[TOPICS[1]] == 10 + p
        assert scanned[p] == sorted(wanted[p])
        assert tables[p] == {"x": 2}
        assert pending[p] == {f"o{p}": b"rec"}
    assert found == (4, b"state-c4-3")
    assert streamed == sorted((p, c) for p, cs in wanted.items() for c in cs)
    assert wms[(TOPICS[1], 5)] == 15 and wms[(TOPICS[0], 5)] == -1
    assert pending2 == {}
    log_key = f"{PREFIX}migrations:log"
    log_port = slot_owner(cluster, server_slot(cluster, log_key))
    # XRANGE prints: id, field "m", value, per entry
    assert cluster.cli("xrange", log_key, "-", "+", port=log_port).split()[2::3] == [
        "m0", "m1", "m2"]

    # Every command the store sent: multi-key ones stay in one slot, and any key of
    # partition p is in the slot of {pN}.
    tag_slots = {p: server_slot(cluster, f"{{p{p}}}") for p in range(PARTITIONS)}
    data = [a for a in rec.sent if command_keys(a)]
    assert any(str(a[0]).upper() == "EVALSHA" for a in data)
    assert any(str(a[0]).upper() == "MGET" for a in data)
    for args in data:
        keys = command_keys(args)
        slots = {server_slot(cluster, k) for k in keys}
        assert len(slots) == 1, (args[0], keys)
        for p, slot in tag_slots.items():
            if any(f"{{p{p}}}" in k for k in keys):
                assert slots == {slot}, (args[0], keys)


def test_a_node_that_lost_its_scripts_conflicts_alone_and_the_retry_applies(
        cluster, settings) -> None:
    async def run() -> tuple[dict[int, bool], dict[int, bool], dict[int, bool]]:
        r = redis_client(settings)
        store = RedisFeatureStore(r, PREFIX)
        try:
            def commits(ver: int, off: int) -> list[PartitionCommit]:
                return [PartitionCommit(p, ver, {TOPICS[0]: off}, 5_000 + off,
                                        states={f"k{p}": f"v{off}".encode()})
                        for p in range(PARTITIONS)]

            first = await store.commit(commits(0, 1))
            # A restarted node comes back without its script cache.
            subprocess.run(["redis-cli", "-p", str(victim), "script", "flush"], check=True,
                           capture_output=True)
            second = await store.commit(commits(1, 2))
            retry = await store.commit(
                [c for c in commits(1, 2) if not second[c.partition]])
            return first, second, retry
        finally:
            await r.aclose()

    tag_owner = {p: slot_owner(cluster, server_slot(cluster, f"{{p{p}}}"))
                 for p in range(PARTITIONS)}
    victim = tag_owner[0]
    first, second, retry = asyncio.run(run())
    assert first == {p: True for p in range(PARTITIONS)}
    assert second == {p: tag_owner[p] != victim for p in range(PARTITIONS)}
    assert retry == {p: True for p in range(PARTITIONS) if tag_owner[p] == victim}
    for p in range(PARTITIONS):
        assert raw_get(cluster, f"{PREFIX}{{p{p}}}:c:k{p}") == "v2"
    assert raw_get(cluster, f"{PREFIX}now") == "5002"


def test_reset_style_deletion_reaches_every_node(cluster, settings) -> None:
    names = [f"{PREFIX}{{p{p}}}:c:x" for p in range(PARTITIONS)] + [f"{PREFIX}now",
                                                                     "other:keep"]
    for k in names:
        cluster.cli("-c", "set", k, "1", port=slot_owner(cluster, server_slot(cluster, k)))
    r = redis_sync_client(settings)
    try:
        assert isinstance(r, redis.RedisCluster)
        assert delete_matching(r, f"{PREFIX}*", batch=3) == len(names) - 1
    finally:
        r.close()
    for port in cluster.ports:
        assert cluster.cli("--scan", "--pattern", f"{PREFIX}*", port=port).split() == []
    assert raw_get(cluster, "other:keep") == "1"
    cluster.cli("-c", "del", "other:keep")


def test_a_cluster_named_as_a_single_server_or_the_reverse_fails_naming_the_setting(
        cluster, services) -> None:
    with pytest.raises(SettingsError, match=r"SEGSTREAM_REDIS_CLUSTER.*=true"):
        check_redis(load_settings(redis_url=cluster.url, redis_prefix=PREFIX))
    with pytest.raises(SettingsError, match=r"SEGSTREAM_REDIS_CLUSTER.*=false"):
        check_redis(load_settings(redis_url=services["redis"], redis_cluster=True))
    check_redis(load_settings(redis_url=cluster.url, redis_cluster=True, redis_prefix=PREFIX))
    check_redis(load_settings(redis_url=services["redis"]))


def test_a_fresh_client_can_scan_before_any_other_command(cluster, settings) -> None:
    async def write() -> None:
        r = redis_client(settings)
        store = RedisFeatureStore(r, PREFIX)
        try:
            _, snaps = await store.load({p: [f"fresh{p}"] for p in range(PARTITIONS)}, TOPICS)
            assert all((await store.commit([PartitionCommit(
                p, snaps[p].ver, {TOPICS[0]: 1}, 10, states={f"fresh{p}": f"v{p}".encode()})
                for p in range(PARTITIONS)])).values())
        finally:
            await r.aclose()

    async def first_command(scan: bool) -> list[tuple[int, str]]:
        r = redis_client(settings)  # its slot table is loaded by its first command
        store = RedisFeatureStore(r, PREFIX)
        try:
            if scan:
                out = []
                for p in range(PARTITIONS):
                    cursor = 0
                    while True:  # a page may come back empty with more to come
                        cursor, ids = await store.scan_customers(p, cursor, 100)
                        out += [(p, c) for c in ids]
                        if cursor == 0:
                            break
                return out
            return [(p, c) async for p, c, _ in store.iter_customers(PARTITIONS)]
        finally:
            await r.aclose()

    asyncio.run(write())
    want = [(p, f"fresh{p}") for p in range(PARTITIONS)]
    assert sorted(asyncio.run(first_command(scan=True))) == want
    assert sorted(asyncio.run(first_command(scan=False))) == want
    for p in range(PARTITIONS):
        assert raw_get(cluster, f"{PREFIX}{{p{p}}}:c:fresh{p}") == f"v{p}"


def test_forget_erases_a_customer_on_the_cluster(cluster, settings) -> None:
    from stream.forget import forget

    async def run() -> dict[str, Any]:
        r = redis_client(settings)
        store = RedisFeatureStore(r, PREFIX)
        try:
            _, snaps = await store.load({4: ["gone", "kept"]}, TOPICS)
            assert (await store.commit([PartitionCommit(
                4, snaps[4].ver, {TOPICS[0]: 1}, 7_000,
                states={"gone": b"a", "kept": b"b"}, profiles={"gone": b""})]))[4]
            await store.append_log("migrations:log", [b'{"customer_id": "gone"}',
                                                      b'{"customer_id": "kept"}'], 100)
            return await forget(settings, r, store, "gone")
        finally:
            await r.aclose()

    removed = asyncio.run(run())
    assert removed["found"] is True and removed["log_entries"] == 1
    assert raw_get(cluster, f"{PREFIX}{{p4}}:c:gone") == ""
    assert raw_get(cluster, f"{PREFIX}{{p4}}:c:kept") == "b"
    log_key = f"{PREFIX}migrations:log"
    port = slot_owner(cluster, server_slot(cluster, log_key))
    assert cluster.cli("xlen", log_key, port=port).strip() == "1"


def test_the_engines_acl_user_suffices_on_a_cluster(cluster) -> None:
    """``~prefix* +@all -@dangerous`` covers what the cluster client needs too (slot table)."""
    prefix = "rc-acl:"
    for port in cluster.ports:
        cluster.cli("acl", "setuser", "engine", "on", ">pw", f"~{prefix}*", "+@all",
                    "-@dangerous", port=port)
    s = load_settings(redis_url=cluster.url.replace("redis://", "redis://engine:pw@"),
                      redis_cluster=True, redis_prefix=prefix)
    check_redis(s)

    async def run() -> tuple[dict[int, bool], list[tuple[int, str]]]:
        r = redis_client(s)
        store = RedisFeatureStore(r, prefix)
        try:
            _, snaps = await store.load({p: ["a"] for p in range(PARTITIONS)}, TOPICS)
            ok = await store.commit([PartitionCommit(p, snaps[p].ver, {TOPICS[0]: 1}, 5,
                                                     states={"a": b"1"})
                                     for p in range(PARTITIONS)])
            return ok, sorted([(p, c) async for p, c, _ in store.iter_customers(PARTITIONS)])
        finally:
            await r.aclose()

    ok, stored = asyncio.run(run())
    assert ok == {p: True for p in range(PARTITIONS)}
    assert stored == [(p, "a") for p in range(PARTITIONS)]
    on_nodes = [k for port in cluster.ports
                for k in cluster.cli("--scan", "--pattern", f"{prefix}*", port=port).split()]
    assert {f"{prefix}{{p{p}}}:c:a" for p in range(PARTITIONS)} <= set(on_nodes)
    r = redis_sync_client(s)
    try:
        assert delete_matching(r, f"{prefix}*") == len(on_nodes)
    finally:
        r.close()
    assert not any(cluster.cli("--scan", "--pattern", f"{prefix}*", port=port).split()
                   for port in cluster.ports)
    with pytest.raises(SettingsError, match="SEGSTREAM_REDIS_PREFIX"):
        check_redis(load_settings(redis_url=s.redis_url, redis_cluster=True,
                                  redis_prefix="elsewhere:"))
