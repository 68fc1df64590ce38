"""``ranker-svc serve`` as a real process: the ready line, a Rank call, SIGTERM drain; config parsing."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc
import pytest

from exitrank.config_sources import ConfigError
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_svc.config import RankerConfig
from ranker_svc.server import parse_args

pytestmark = pytest.mark.anyio


async def test_serve_process_prints_the_port_answers_and_drains_on_sigterm(tiny_ranker_dir, retriever, catalog):
    _, target = retriever
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ranker_svc.server", "serve", "--port", "0", "--retriever", target,
        "--artifacts", str(tiny_ranker_dir.parent), "--dtype", "float32",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=120)).decode().strip()
        assert line.startswith("ranker listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert port > 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await ranker_pb2_grpc.RankerStub(channel).Rank(
                ranker_pb2.RankRequest(user_id="u0", candidate_item_ids=sorted(catalog)[:3]), timeout=60)
        assert len(reply.scores) == 3 and reply.retrieval_used
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_builds_one_config():
    config = parse_args(["serve", "--port", "0", "--retriever", "10.0.0.1:50051", "--artifacts", "/a",
                         "--dtype", "bfloat16", "--host", "0.0.0.0"])
    assert config.model.ranker_dir == Path("/a/ranker") and config.model.dtype == "bfloat16"
    assert config.server.port == 0 and config.server.host == "0.0.0.0"
    assert config.retriever.target == "10.0.0.1:50051" and config.model.engine == "torch"


def test_cli_refuses_other_engines(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["serve", "--port", "1", "--retriever", "h:1", "--artifacts", "a", "--engine", "tensorrt"])
    assert info.value.code == 2 and "--engine" in capsys.readouterr().err


def test_yaml_sections_and_unknown_keys(tmp_path):
    path = tmp_path / "ranker.yaml"
    path.write_text("batching: {batch_size: 8}\nexits: {threshold: 0.2}\nserver: {grace_s: 1}\n")
    config = parse_args(["serve", "--port", "5", "--retriever", "h:1", "--artifacts", "a", "--config", str(path)])
    assert config.batching.batch_size == 8 and config.exits.overrides() == {"threshold": 0.2}
    assert config.server.grace_s == 1 and config.server.port == 5
    with pytest.raises(ConfigError, match="batching.batch_sise"):
        RankerConfig.from_dict({"batching": {"batch_sise": 8}})
    with pytest.raises(ConfigError, match="modle"):
        RankerConfig.from_dict({"modle": {}})
    with pytest.raises(ConfigError, match="batching.max_candidates"):
        RankerConfig.from_dict({"batching": {"max_candidates": 600}})
