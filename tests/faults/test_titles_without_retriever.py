"""The ranker's catalog titles: kept as long as they are valid, not for a fixed time. Real processes:
``ranker-svc`` against a ``retriever-svc`` that is given a new title, then killed.

Titles carry the retriever's catalog version (UpsertItems changes it): a retitled item is read again
by the next request that reaches the retriever, and while the retriever is down every item the
ranker has seen keeps its last title, however long ago it was read, so Rank goes on without
neighbours for all of them; only an item it never saw is refused, UNAVAILABLE.
"""

from __future__ import annotations

import grpc
import pytest

from exitrank.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc, retriever_pb2_grpc
from tests.conftest import await_ready, launch_service, stop_service
from tests.faults.conftest import BIN


def test_titles_follow_upserts_and_outlive_the_retriever(tmp_path, stack_artifacts, retriever_process):
    items = sorted(stack_artifacts.titles)  # 24 items; "dull-*" are in no history: GetItems reads them
    retitled = "dull-garden"
    log = tmp_path / "ranker.log"
    ranker = launch_service([str(BIN / "ranker-svc"), "serve", "--port", "0", "--retriever",
                             retriever_process.address, "--artifacts", str(stack_artifacts.artifacts),
                             "--dtype", "float32", "--num-threads", "1"], log)
    try:
        address = await_ready(ranker, "ranker listening on ", log)
        with grpc.insecure_channel(address) as channel:
            stub = ranker_pb2_grpc.RankerStub(channel)

            def rank(candidates: list[str]) -> ranker_pb2.RankResponse:
                return stub.Rank(ranker_pb2.RankRequest(user_id="g0u0", candidate_item_ids=candidates), timeout=30)

            def ctr_of_retitled() -> float:
                return {s.item_id: s.ctr for s in rank(items).scores}[retitled]

            before = ctr_of_retitled()
            assert ctr_of_retitled() == before  # same context, same title: the same score
            with grpc.insecure_channel(retriever_process.address) as retriever:
                summary = retriever_pb2_grpc.RetrieverStub(retriever).UpsertItems(iter([common_pb2.Item(
                    item_id=retitled, title="A rusty clockwork orchestra beneath the frozen lake")]), timeout=10)
            assert summary.accepted == 1
            rank(items[:2])  # learns the new catalog version (its titles were already current)
            after = ctr_of_retitled()
            assert after != before  # the new title reached the prompt

            retriever_process.kill()  # the retriever and its Redis, as a crash would
            down = rank(items)
            assert not down.retrieval_used and [s.item_id for s in down.scores] == items  # every item seen
            with pytest.raises(grpc.RpcError) as never_seen:
                rank(["never-seen-item"])
            assert never_seen.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert stop_service(ranker) == 0
