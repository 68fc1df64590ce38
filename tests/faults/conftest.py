"""Fixtures of the fault tests: a real ``retriever-svc`` process on a fixed port that a test can kill,
pause and restart, a ranker over the live stack's artifacts, and an async load generator.

Everything is real: processes, redis-server, gRPC on loopback, the tiny Llama of ``stack_artifacts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_svc.config import BatchingConfig, ModelConfig, RankerConfig, RetrieverConfig, ServerConfig
from tests.conftest import await_ready, launch_service, stop_service

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core box: one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RetrieverProcess:
    """``retriever-svc`` on a fixed port with its embedded redis-server under ``root`` (data kept
    across restarts), so a ranker's channel finds it again at the same address."""

    def __init__(self, artifacts: Path, root: Path) -> None:
        self.artifacts, self.root = artifacts, root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> str:
        log = self.root / f"retriever-{self.starts}.log"
        self.starts += 1
        self.proc = launch_service([str(BIN / "retriever-svc"), "serve", "--port", str(self.port), "--artifacts",
                                    str(self.artifacts), "--data-dir", str(self.root / "data")], log)
        await_ready(self.proc, "retriever listening on ", log)
        return self.address

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the service and its embedded redis-server, as a crash of the whole pod would (a
        killed service cannot stop its child; the AOF under ``root`` keeps the data)."""
        children = [int(c) for task in Path(f"/proc/{self.proc.pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            stop_service(self.proc)


@pytest.fixture
def retriever_process(stack_artifacts, tmp_path):
    """A started, seeded :class:`RetrieverProcess`; stopped after the test."""
    process = RetrieverProcess(stack_artifacts.artifacts, tmp_path)
    try:
        stack_artifacts.seed(process.start())
        yield process
    finally:
        process.stop()


def ranker_config(artifacts: Path, target: str, *, timeout_s: float = 0.5, **batching) -> RankerConfig:
    return RankerConfig(
        model=ModelConfig(artifacts_dir=artifacts, dtype="float32"), server=ServerConfig(port=0),
        retriever=RetrieverConfig(target=target, timeout_s=timeout_s, breaker_failures=3, breaker_cooldown_s=1.0),
        batching=BatchingConfig(**batching),
    )


@dataclass
class Result:
    started: float  # time.monotonic() at the call
    seconds: float
    code: grpc.StatusCode
    retrieval_used: bool = False
    details: str = ""


@dataclass
class Load:
    """``workers`` coroutines calling Rank back to back on ``address`` until :meth:`stop`.

    ``request(n)`` builds the n-th request; every call's outcome lands in ``results``.
    """

    address: str
    request: object
    workers: int = 4
    timeout_s: float = 2.0
    results: list[Result] = field(default_factory=list)

    async def __aenter__(self) -> "Load":
        self._stop = asyncio.Event()
        self._channel = grpc.aio.insecure_channel(self.address)
        stub = ranker_pb2_grpc.RankerStub(self._channel)
        self._tasks = [asyncio.ensure_future(self._work(stub, w)) for w in range(self.workers)]
        return self

    async def _work(self, stub: ranker_pb2_grpc.RankerStub, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                reply = await stub.Rank(self.request(n), timeout=self.timeout_s)
                self.results.append(Result(started, time.monotonic() - started, grpc.StatusCode.OK,
                                           reply.retrieval_used))
            except grpc.aio.AioRpcError as exc:
                self.results.append(Result(started, time.monotonic() - started, exc.code(), False, exc.details()))
            n += self.workers

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def __aexit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            await self.stop()
        await self._channel.close()

    def since(self, start: float, end: float | None = None) -> list[Result]:
        return [r for r in self.results if r.started >= start and (end is None or r.started < end)]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def rank_request(stack, n: int, *, candidates: int = 4) -> ranker_pb2.RankRequest:
    """The n-th request of a load: a stack user (who has neighbours) and ``candidates`` catalog items."""
    users, items = sorted(stack.histories), sorted(stack.titles)
    return ranker_pb2.RankRequest(user_id=users[n % len(users)], candidate_item_ids=items[:candidates])
