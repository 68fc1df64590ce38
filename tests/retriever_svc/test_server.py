"""The ``retriever-svc`` CLI as a real subprocess with its embedded redis-server."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exitrank.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from tests.retriever_svc.conftest import start_retriever, stderr_of



def _redis_child(pid: int) -> int:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    (child,) = [int(c) for c in children if "redis-server" in Path(f"/proc/{c}/cmdline").read_text()]
    return child


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    proc.send_signal(sig)
    try:
        assert proc.wait(timeout=30) == 0, stderr_of(proc)
    finally:
        if proc.poll() is None:
            proc.kill()


def _nearest(address: str, user: str, wait_s: float = 30) -> retriever_pb2.NearestUsersResponse:
    with grpc.insecure_channel(address) as channel:
        stub = retriever_pb2_grpc.RetrieverStub(channel)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return stub.NearestUsers(retriever_pb2.NearestUsersRequest(user_id=user, k=3))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_serves_stops_cleanly_and_keeps_data(tmp_path, clustered, brute_force):
    emb, _ = clustered()
    emb.save(tmp_path / "artifacts")
    args = ("--artifacts", str(tmp_path / "artifacts"), "--data-dir", str(tmp_path / "data"))
    proc, address = start_retriever(*args)
    redis_pid = _redis_child(proc.pid)
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="exitrank.v1.Retriever"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = retriever_pb2_grpc.RetrieverStub(channel)
        summary = stub.Ingest(iter([common_pb2.Interaction(user_id="late", item_id="c2i0"),
                                    common_pb2.Interaction(user_id="late", item_id="c2i2")]))
        assert summary.accepted == 2
    rows = [emb.item_ids.index("c2i0"), emb.item_ids.index("c2i2")]
    want = [s for _, s in brute_force(emb.user_ids, emb.user, emb.item_foldin[rows].sum(0), 3)]
    deadline = time.monotonic() + 30
    while True:  # both events applied (they may come in two consumer batches)
        answer = _nearest(address, "late")
        if [n.score for n in answer.neighbors] == pytest.approx(want, abs=1e-5):
            break
        assert time.monotonic() < deadline, "the second event was never applied"
        time.sleep(0.05)
    assert answer.embedding_version == emb.version
    assert all(n.user_id.startswith("c2") for n in answer.neighbors)
    _stop(proc)
    assert not Path(f"/proc/{redis_pid}").exists()  # the embedded redis-server is gone

    proc, address = start_retriever(*args)  # same data dir: the AOF kept the ingested user
    try:
        again = _nearest(address, "late")
        assert again.embedding_version == emb.version
        assert [n.score for n in again.neighbors] == pytest.approx(want, abs=1e-5)
    finally:
        _stop(proc, signal.SIGINT)


def test_temporary_data_dir_is_removed(tmp_path):
    proc, address = start_retriever("--artifacts", str(tmp_path / "none"))
    redis_pid = _redis_child(proc.pid)
    data_dir = Path(os.readlink(f"/proc/{redis_pid}/cwd"))
    assert data_dir.is_dir()
    with pytest.raises(grpc.RpcError) as info:
        _nearest(address, "nobody", wait_s=0)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no embedding version is loaded" in info.value.details()
    _stop(proc)
    assert not Path(f"/proc/{redis_pid}").exists() and not data_dir.exists()
