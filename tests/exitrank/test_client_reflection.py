"""Calling the services the way grpcurl does: from server reflection alone, with no generated code.

The descriptors come from the running server (``ServerReflectionInfo``) into a fresh descriptor pool,
the message classes are built from them, the request is parsed from JSON and the call is made by
its method path. Nothing from ``exitrank.v1`` is imported here, so this is what a Go, Java or shell
caller without our stubs sees.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def _reflect(channel: grpc.Channel) -> tuple[ProtoReflectionDescriptorDatabase, descriptor_pool.DescriptorPool]:
    database = ProtoReflectionDescriptorDatabase(channel)
    return database, descriptor_pool.DescriptorPool(database)


def _unary(channel: grpc.Channel, pool: descriptor_pool.DescriptorPool, service: str, method: str):
    """A callable for ``service/method`` whose request and response classes come from ``pool``."""
    rpc = pool.FindServiceByName(service).FindMethodByName(method)
    request_cls = message_factory.GetMessageClass(rpc.input_type)
    response_cls = message_factory.GetMessageClass(rpc.output_type)
    call = channel.unary_unary(f"/{service}/{method}", request_serializer=request_cls.SerializeToString,
                               response_deserializer=response_cls.FromString)
    return request_cls, call


def test_rank_through_reflection_alone(live_stack):
    items = sorted(live_stack.titles)[:3]
    with grpc.insecure_channel(live_stack.ranker) as channel:
        database, pool = _reflect(channel)
        assert {"exitrank.v1.Ranker", "grpc.health.v1.Health"} <= set(database.get_services())
        assert pool.FindFileContainingSymbol("exitrank.v1.Ranker").name == "exitrank/v1/ranker.proto"
        request_cls, rank = _unary(channel, pool, "exitrank.v1.Ranker", "Rank")
        request = json_format.ParseDict(  # what `grpcurl -d '{...}'` would send
            {"userId": "g1u2", "candidateItemIds": items, "exitPolicy": {"criterion": "EXIT_CRITERION_CONFIDENCE",
                                                                         "threshold": 0.6}}, request_cls())
        reply = json_format.MessageToDict(rank(request, timeout=30))
    assert [s["itemId"] for s in reply["scores"]] == items
    assert all(0 < s["ctr"] < 1 and 1 <= s["exitLayer"] <= 6 for s in reply["scores"])
    assert reply["retrievalUsed"] is True and reply["embeddingVersion"] == "stack-1"


def test_retriever_reflection_describes_its_contract(live_stack):
    with grpc.insecure_channel(live_stack.retriever) as channel:
        database, pool = _reflect(channel)
        assert "exitrank.v1.Retriever" in database.get_services()
        service = pool.FindServiceByName("exitrank.v1.Retriever")
        assert {m.name for m in service.methods} == {"Ingest", "UpsertItems", "NearestUsers", "GetContext", "GetItems"}
        assert service.methods_by_name["Ingest"].client_streaming
        request_cls, get_items = _unary(channel, pool, "exitrank.v1.Retriever", "GetItems")
        reply = get_items(request_cls(item_ids=["sunny-river", "unknown-item"]), timeout=10)
    assert [(i.item_id, i.title) for i in reply.items] == [("sunny-river", "The sunny river")]
    assert list(reply.missing_item_ids) == ["unknown-item"]
