"""Property-based requests for every RPC of both services against the live stack (real ``retriever-svc``
and ``ranker-svc`` processes): no call is ever answered INTERNAL or UNKNOWN, every error names
something, and both services are still SERVING afterwards. Raw byte strings go to every method too.

Fuzzed writes cannot disturb the other tests of the live stack: fuzzed Ingest users and UpsertItems
items never carry the stack's ids, so no stack user gains a neighbour and no title changes.
"""

from __future__ import annotations

import collections

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.support.reliability import recording
from exitrank.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc, retriever_pb2, retriever_pb2_grpc

EXAMPLES = 120  # per RPC: enough to reach every validation branch, a few seconds each
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # lone surrogates cannot be encoded
ids = st.one_of(text, st.just(""), st.text(min_size=129, max_size=140), st.sampled_from(["c0i0", "g0u0", "x"]))
int32 = st.integers(-(2**31), 2**31 - 1)
small = st.integers(-3, 1100)
float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


class Outcomes:
    """Status codes seen per RPC; a forbidden one fails the test at once."""

    def __init__(self) -> None:
        self.codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.messages = collections.Counter()  # Ingest/UpsertItems messages accepted and rejected

    def call(self, rpc: str, fn, *args) -> None:
        try:
            reply = fn(*args, timeout=30)
            code = grpc.StatusCode.OK
            if isinstance(reply, retriever_pb2.IngestSummary):
                self.messages.update(accepted=reply.accepted, rejected=reply.rejected)
        except grpc.RpcError as exc:
            code = exc.code()
            assert code not in FORBIDDEN, (rpc, code, exc.details(), args)
            assert exc.details(), (rpc, code)  # every refusal says why
        self.codes[rpc][code.name] += 1


@pytest.fixture(scope="module")
def stubs(live_stack):
    retriever = grpc.insecure_channel(live_stack.retriever)
    ranker = grpc.insecure_channel(live_stack.ranker)
    yield retriever_pb2_grpc.RetrieverStub(retriever), ranker_pb2_grpc.RankerStub(ranker), retriever, ranker
    retriever.close()
    ranker.close()


def _fuzz_retriever(stack, stub, out: Outcomes) -> None:
    foreign = set(stack.titles) | set(stack.histories)

    @SETTINGS
    @given(st.lists(st.tuples(ids, ids, float32, st.integers(-(2**63), 2**63 - 1)), max_size=8))
    def ingest(events):
        assume(not any(u in foreign or i in foreign for u, i, _, _ in events))
        out.call("Ingest", stub.Ingest, iter([common_pb2.Interaction(user_id=u, item_id=i, rating=r, timestamp_ms=t)
                                              for u, i, r, t in events]))

    @SETTINGS
    @given(st.lists(st.tuples(ids, st.text(max_size=600), st.dictionaries(ids, st.text(max_size=1100), max_size=34)),
                    max_size=4))
    def upsert(items):
        assume(not any(i in foreign for i, _, _ in items))
        out.call("UpsertItems", stub.UpsertItems,
                 iter([common_pb2.Item(item_id=i, title=t, attributes=a) for i, t, a in items]))

    @SETTINGS
    @given(st.one_of(st.sampled_from(sorted(stack.histories)), ids), st.one_of(st.integers(1, 1000), small, int32))
    def nearest(user, k):
        out.call("NearestUsers", stub.NearestUsers, retriever_pb2.NearestUsersRequest(user_id=user, k=k))

    @SETTINGS
    @given(st.one_of(st.sampled_from(sorted(stack.histories)), ids), st.one_of(st.integers(0, 100), small, int32),
           st.one_of(st.integers(1, 200), small, int32))
    def context(user, k, max_history):
        out.call("GetContext", stub.GetContext,
                 retriever_pb2.ContextRequest(user_id=user, k=k, max_history=max_history))

    @SETTINGS
    @given(st.one_of(st.lists(st.one_of(ids, st.sampled_from(sorted(stack.titles))), max_size=30),
                     st.integers(9_990, 10_010).map(lambda n: [f"i{j}" for j in range(n)])))
    def items(item_ids):
        out.call("GetItems", stub.GetItems, retriever_pb2.GetItemsRequest(item_ids=item_ids))

    for fuzz in (ingest, upsert, nearest, context, items):
        fuzz()


def _rank_requests(stack):
    """RankRequests: about half valid (stack users and items, policies in range), half anything."""
    titles = sorted(stack.titles)
    candidates = st.one_of(st.lists(st.sampled_from(titles), min_size=1, max_size=8, unique=True),
                           st.lists(st.one_of(ids, st.sampled_from(titles)), max_size=12))
    in_range = st.builds(ranker_pb2.ExitPolicy, threshold=st.floats(0.01, 1.0), window=st.integers(1, 16),
                         min_layer=st.integers(0, 6), disabled=st.booleans(), criterion=st.integers(0, 2),
                         confidence=st.one_of(st.none(), st.just(0.0), st.floats(0.51, 1.0)))
    anything = st.builds(ranker_pb2.ExitPolicy, threshold=float32, window=st.one_of(small, int32),
                         min_layer=st.one_of(small, int32), disabled=st.booleans(),
                         criterion=st.one_of(st.integers(0, 3), int32), confidence=st.one_of(st.none(), float32))
    return st.builds(lambda u, c, n, p: ranker_pb2.RankRequest(user_id=u, candidate_item_ids=c, num_neighbors=n,
                                                               exit_policy=p),
                     st.one_of(st.sampled_from(sorted(stack.histories)), ids), candidates,
                     st.one_of(st.integers(0, 16), st.integers(-2, 20), int32), st.one_of(st.none(), in_range, anything))


def _fuzz_ranker(stack, stub, out: Outcomes) -> None:
    requests = _rank_requests(stack)

    @SETTINGS
    @given(requests)
    def rank(request):
        out.call("Rank", stub.Rank, request)

    @settings(SETTINGS, max_examples=EXAMPLES // 2)
    @given(st.lists(requests, min_size=1, max_size=4))
    def rank_stream(batch):
        out.call("RankStream", lambda it, timeout: list(stub.RankStream(it, timeout=timeout)), iter(batch))

    rank()
    rank_stream()


METHODS = ["/exitrank.v1.Retriever/NearestUsers", "/exitrank.v1.Retriever/GetContext",
           "/exitrank.v1.Retriever/GetItems", "/exitrank.v1.Ranker/Rank"]
STREAMS = ["/exitrank.v1.Retriever/Ingest", "/exitrank.v1.Retriever/UpsertItems"]


def _fuzz_raw(retriever, ranker, out: Outcomes) -> None:
    @SETTINGS
    @given(st.sampled_from(METHODS + STREAMS), st.binary(max_size=64))
    def raw(method, payload):
        channel = ranker if "Ranker" in method else retriever
        if method in STREAMS:
            out.call("raw bytes", channel.stream_unary(method), iter([payload]))
        else:
            out.call("raw bytes", channel.unary_unary(method), payload)

    raw()


@pytest.mark.slow
def test_random_requests_never_get_internal_or_unknown(request, live_stack, stubs):
    retriever_stub, ranker_stub, retriever, ranker = stubs
    out = Outcomes()
    with recording(request.node.nodeid, "fuzzing", area="bad input") as row:
        _fuzz_retriever(live_stack, retriever_stub, out)
        _fuzz_ranker(live_stack, ranker_stub, out)
        _fuzz_raw(retriever, ranker, out)
        for channel in (retriever, ranker):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        total = sum(sum(c.values()) for c in out.codes.values())
        refused = sum(n for c in out.codes.values() for code, n in c.items() if code != "OK")
        # both paths reached: answers and refusals
        assert all(len(out.codes[rpc]) >= 2 for rpc in ("NearestUsers", "GetContext", "GetItems", "Rank", "RankStream")), dict(out.codes)
        assert out.messages["accepted"] and out.messages["rejected"]
        row.sent, row.refused = total, refused
        per_rpc = "; ".join(f"{rpc} {sum(c.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                            for rpc, c in out.codes.items())
        row.measured = (f"hypothesis, {EXAMPLES} examples per RPC (RankStream {EXAMPLES // 2}) against the live "
                        f"retriever-svc and ranker-svc processes, plus raw byte strings to every method: {total} calls, "
                        f"0 INTERNAL, 0 UNKNOWN, every refusal with a message; both SERVING afterwards. {per_rpc} "
                        f"(stream messages: {out.messages['accepted']} accepted, {out.messages['rejected']} rejected)")
