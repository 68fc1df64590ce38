"""The retriever on a real 3-node Redis Cluster on loopback (``redis+cluster://`` URLs)."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import redis

from exitrank.redis_server import EmbeddedRedis
from retriever_svc.config import IndexConfig, RedisConfig
from retriever_svc.consumer import StreamConsumer
from retriever_svc.index import Retriever
from retriever_svc.records import CatalogItem, Interaction
from retriever_svc.redis_io import is_cluster_url
from retriever_svc.store import RedisStore

pytestmark = pytest.mark.anyio
SLOTS = 16384


def _free_port_pair() -> int:
    """A port p with p and p + 10000 (the cluster bus) free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three primaries sharing the 16384 slots; yields the seed URL (redis+cluster://)."""
    password = "cluster-secret"
    nodes = []
    try:
        for n in range(3):
            node = EmbeddedRedis(
                tmp_path_factory.mktemp(f"node{n}"), port=_free_port_pair(), password=password,
                appendfsync="everysec",
                extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                            "--cluster-node-timeout", "2000"),
            )
            nodes.append(node.start())
        clients = [redis.Redis(host="127.0.0.1", port=n.port, password=password) for n in nodes]
        bounds = np.linspace(0, SLOTS, 4).astype(int)
        for n, client in enumerate(clients):
            client.execute_command("CLUSTER ADDSLOTS", *range(bounds[n], bounds[n + 1]))
        for node in nodes[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + 30
        while not all(c.execute_command("CLUSTER INFO")["cluster_state"] == "ok" for c in clients):
            assert time.monotonic() < deadline, "the cluster did not reach cluster_state:ok"
            time.sleep(0.1)
        for client in clients:
            client.close()
        yield f"redis+cluster://:{password}@127.0.0.1:{nodes[0].port}/0"
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
async def cluster_store(cluster, unique_prefix):
    store = RedisStore.from_url(cluster, prefix=unique_prefix("cl"), timeout_s=2.0)
    yield store
    await store.close()


async def test_cluster_url_gives_a_cluster_client(cluster, cluster_store):
    assert is_cluster_url(cluster) and not is_cluster_url("redis://127.0.0.1:6379/0")
    assert type(cluster_store.client).__name__ == "RedisCluster"
    assert await cluster_store.ping()  # the client discovers the nodes on first use
    nodes = cluster_store.client.get_primaries()
    assert len(nodes) == 3
    # one user's keys share a slot; different users spread over the nodes
    keys = cluster_store.keys
    slot = cluster_store.client.keyslot
    assert len({slot(keys.hist("alice")), slot(keys.rating("alice")), slot(keys.emb("alice"))}) == 1
    owners = {cluster_store.client.get_node_from_key(keys.hist(f"user{j}")).name for j in range(60)}
    assert len(owners) == 3


async def test_retriever_end_to_end_on_the_cluster(cluster_store, clustered, brute_force):
    store = cluster_store
    retriever = Retriever(store=store, config=IndexConfig(kind="exact"), replica="a")
    emb, history = clustered()
    await retriever.upsert_items([CatalogItem(i, f"T {i}") for i in emb.item_ids])
    events = [Interaction(u, i, 3.0, 10 + j) for u, items in history.items()
              for j, i in enumerate(items)]
    assert (await retriever.ingest(events)).accepted == len(events)
    await retriever.load_embeddings(emb)
    consumer = StreamConsumer(retriever=retriever, store=store,
                              config=RedisConfig(consumer="a", block_ms=20))
    await store.streams.ensure_group()
    while await consumer.step():
        pass
    assert await store.streams.pending_count() == 0
    # histories and fold-ins through Lua scripts on the nodes owning each user
    await retriever.apply_events([Interaction("newcomer", "c2i0", 1.0, 5),
                                  Interaction("newcomer", "c2i4", 1.0, 6)])
    stored = await store.user_vector("newcomer", emb.version)
    rows = [emb.item_ids.index("c2i0"), emb.item_ids.index("c2i4")]
    np.testing.assert_allclose(stored, emb.item_foldin[rows].sum(0) / np.sqrt(2), rtol=1e-6)
    answer = await retriever.nearest_users("newcomer", 4)
    want = brute_force(emb.user_ids, emb.user, stored, 4)
    np.testing.assert_allclose([s for _, s in answer.neighbors], [s for _, s in want], atol=1e-5)
    # GetContext: the five users' histories in one pipeline (fanned out to their nodes)
    before = store.round_trips
    ctx = await retriever.get_context("c1u0", k=4, max_history=2)
    assert store.round_trips - before == 1
    assert [h.item_id for h in ctx.history] == history["c1u0"][-2:]
    assert all(h.title == f"T {h.item_id}" for h in ctx.history)
    for n in ctx.neighbors:
        assert [h.item_id for h in n.history] == history[n.user_id][-2:]
    # a restarted replica restores the current version, fold-ins included
    restarted = Retriever(store=store, config=IndexConfig(kind="exact"), replica="b")
    assert await restarted.restore() == emb.version
    again = await restarted.nearest_users("newcomer", 4)
    np.testing.assert_allclose([s for _, s in again.neighbors],
                               [s for _, s in answer.neighbors], atol=1e-6)


async def test_reply_sizes_are_read_across_the_nodes_before_the_items(cluster_store):
    """GetItems's size check (one STRLEN pipeline, its keys on every node) refuses before reading."""
    from retriever_svc.errors import ReplyTooLarge

    retriever = Retriever(store=cluster_store, config=IndexConfig(kind="exact"), replica="s")
    ids = [f"sized{j}" for j in range(90)]
    await retriever.upsert_items([CatalogItem(i, "t" * 500, {"a": "v" * 1000}) for i in ids])
    owners = {cluster_store.client.get_node_from_key(cluster_store.keys.item(i)).name for i in ids}
    sizes = await cluster_store.item_sizes(ids + ["absent"])
    assert len(owners) == 3 and sizes[-1] == 0 and all(s > 1500 for s in sizes[:-1])
    found, _ = await retriever.get_items(ids, max_reply_bytes=sum(sizes) + 90 * 40)
    assert len(found) == 90
    before = cluster_store.round_trips
    with pytest.raises(ReplyTooLarge, match="over limits.max_send_bytes=100000"):
        await retriever.get_items(ids, max_reply_bytes=100_000)
    assert cluster_store.round_trips - before == 1  # the sizes only: no entry was read
