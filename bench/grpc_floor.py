"""The floor under any Python gRPC service on this machine: a ``Retriever`` that answers
``NearestUsers`` with a canned response of the real one's shape (k neighbours, a version) and
does nothing else. ``bench_retriever`` drives it exactly like the real replicas, side by side,
so its latency shows how much of the real service's comes from grpcio and the machine, and
how much from the retriever itself.

    .venv/bin/python -m bench.grpc_floor      # prints "retriever listening on HOST:PORT"
"""

from __future__ import annotations

import asyncio
import gc

import grpc

from exitrank.v1 import retriever_pb2, retriever_pb2_grpc


class CannedRetriever(retriever_pb2_grpc.RetrieverServicer):
    """NearestUsers answers ``k`` made-up neighbours; every other RPC is UNIMPLEMENTED."""

    async def NearestUsers(self, request, context):
        return retriever_pb2.NearestUsersResponse(
            neighbors=[retriever_pb2.Neighbor(user_id=f"u{j}", score=0.5) for j in range(request.k)],
            embedding_version="floor")


async def serve() -> None:
    server = grpc.aio.server()
    retriever_pb2_grpc.add_RetrieverServicer_to_server(CannedRetriever(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gc.freeze()  # as the real service after loading its index
    print(f"retriever listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve())
