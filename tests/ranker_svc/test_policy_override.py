"""A request's ``exit_policy`` overrides every field of the calibrated policy, also where calibration
stored ``disabled=true`` (proto3 ``optional bool disabled``: false is a value, and a policy that says
how to exit asks for exits). The translation on its own, then a real ``ranker-svc`` whose artifact was
calibrated to the full depth, answering over gRPC with the exit layers each request asked for."""

from __future__ import annotations

import dataclasses
import shutil

import grpc
import pytest

from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_svc.artifact import read_meta, stamp_version, write_meta
from ranker_svc.exits import ExitPolicy
from ranker_svc.servicer import policy_from_proto

CALIBRATED_OFF = ExitPolicy(criterion="probability_delta", threshold=0.05, window=2, min_layer=0, disabled=True,
                            confidence=0.0)
DEPTH = 6  # decoder layers of the stack's tiny Llama; exit heads at 1..5
CONFIDENCE = ranker_pb2.EXIT_CRITERION_CONFIDENCE


def _request(**policy) -> ranker_pb2.RankRequest:
    return ranker_pb2.RankRequest(user_id="g0u0", candidate_item_ids=["sunny-garden"],
                                  exit_policy=ranker_pb2.ExitPolicy(**policy))


@pytest.mark.parametrize("field, proto, want", [
    ("criterion", {"criterion": CONFIDENCE}, "confidence"),
    ("threshold", {"threshold": 0.5}, 0.5),
    ("window", {"window": 5}, 5),
    ("min_layer", {"min_layer": 3}, 3),
    ("confidence", {"confidence": 0.9}, pytest.approx(0.9)),
    ("disabled", {"disabled": False}, False),
])
def test_each_field_overrides_a_calibrated_policy_that_runs_the_full_depth(field, proto, want):
    policy = policy_from_proto(_request(**proto), CALIBRATED_OFF)
    assert getattr(policy, field) == want
    assert policy.disabled is False  # saying how to exit asks for exits
    untouched = {f.name for f in dataclasses.fields(ExitPolicy)} - {field, "disabled"}
    assert all(getattr(policy, name) == getattr(CALIBRATED_OFF, name) for name in untouched)


def test_disabled_wins_when_given_and_absence_keeps_the_calibrated_policy():
    assert policy_from_proto(_request(disabled=True, threshold=0.5), dataclasses.replace(CALIBRATED_OFF, disabled=False)
                             ).disabled is True
    assert policy_from_proto(_request(), CALIBRATED_OFF) == CALIBRATED_OFF  # an empty policy changes nothing
    assert policy_from_proto(ranker_pb2.RankRequest(user_id="u"), CALIBRATED_OFF) is None
    assert policy_from_proto(_request(confidence=0.0), CALIBRATED_OFF).confidence == 0.0  # 0 is a value: off


@pytest.fixture(scope="module")
def full_depth_ranker(tmp_path_factory, stack_artifacts, live_stack, spawn_service) -> str:
    """``ranker-svc`` over a copy of the stack's artifact whose calibrated policy is ``disabled``."""
    artifacts = tmp_path_factory.mktemp("full-depth") / "artifacts"
    shutil.copytree(stack_artifacts.artifacts, artifacts)
    meta = read_meta(artifacts / "ranker")
    meta["policy"] = {**meta["policy"], "disabled": True}
    write_meta(artifacts / "ranker", meta)
    stamp_version(artifacts / "ranker")
    return spawn_service("ranker-svc", "serve", "--port", "0", "--retriever", live_stack.retriever,
                         "--artifacts", str(artifacts), "--dtype", "float32", "--num-threads", "1",
                         ready="ranker listening on ")


def test_a_request_turns_early_exit_back_on_over_grpc(full_depth_ranker, live_stack):
    items = sorted(live_stack.titles)[:8]
    request = ranker_pb2.RankRequest(user_id="g0u0", candidate_item_ids=items)
    with grpc.insecure_channel(live_stack.ranker) as channel:  # the same model calibrated with exits on
        calibrated_on = [s.exit_layer for s in ranker_pb2_grpc.RankerStub(channel).Rank(request, timeout=60).scores]
    assert min(calibrated_on) < DEPTH
    with grpc.insecure_channel(full_depth_ranker) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)

        def layers(**policy) -> list[int]:
            asked = ranker_pb2.RankRequest()
            asked.CopyFrom(request)
            if policy:
                asked.exit_policy.CopyFrom(ranker_pb2.ExitPolicy(**policy))
            return [s.exit_layer for s in stub.Rank(asked, timeout=60).scores]

        assert layers() == [DEPTH] * len(items)  # the calibrated policy: the full depth
        assert layers(disabled=True, threshold=1.0) == [DEPTH] * len(items)  # disabled given: it wins
        assert layers(threshold=1.0) == [3] * len(items)  # delta test always true: the third exit layer
        assert layers(criterion=CONFIDENCE, threshold=0.5) == [1] * len(items)  # always sure: the first head
        assert layers(criterion=CONFIDENCE, threshold=0.5, min_layer=2) == [2] * len(items)
        assert min(layers(confidence=0.51)) < 3  # a sure head answers before the delta test can
        assert layers(disabled=False) == calibrated_on  # the calibrated delta test (tau 0.05, m 2) decides again
