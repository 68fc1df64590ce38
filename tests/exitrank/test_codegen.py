"""The committed gRPC stubs must be what scripts/codegen.py generates from protos/ now."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_protos(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "codegen.py"), "--out", str(tmp_path)],
        check=True, capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "exitrank").rglob("*.py*"))
    assert generated, "codegen produced nothing"
    stale = [str(rel) for rel in generated if not (ROOT / rel).is_file()
             or not filecmp.cmp(tmp_path / rel, ROOT / rel, shallow=False)]
    assert not stale, f"stale stubs {stale}: run `make codegen` and commit the result"


def test_stubs_expose_the_public_contract():
    from exitrank.v1 import ranker_pb2, ranker_pb2_grpc, retriever_pb2, retriever_pb2_grpc

    retriever = retriever_pb2.DESCRIPTOR.services_by_name["Retriever"]
    assert {"Ingest", "UpsertItems", "NearestUsers", "GetContext", "GetItems"} <= set(
        retriever.methods_by_name)
    ranker = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"]
    assert set(ranker.methods_by_name) == {"Rank", "RankStream"}
    assert ranker.full_name == "exitrank.v1.Ranker"
    assert hasattr(ranker_pb2_grpc, "RankerStub") and hasattr(retriever_pb2_grpc, "RetrieverStub")
    request = ranker_pb2.RankRequest(user_id="u")
    assert not request.HasField("exit_policy")  # absent means the calibrated policy


def _locked(name: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        pinned, _, version = line.partition("==")
        if pinned.strip().lower() == name:
            return version.strip()
    raise AssertionError(f"requirements.lock pins no {name}: run `make lock`")


def test_stubs_are_generated_by_the_locked_grpcio_tools():
    """The staleness test above compares against what the *installed* generator writes: it means
    something only when that generator is the locked one, and the stubs say which one wrote them."""
    import importlib.metadata as md

    tools = _locked("grpcio-tools")
    installed = md.version("grpcio-tools")
    assert installed == tools, (f"grpcio-tools {installed} is installed but requirements.lock pins {tools}: "
                                "run `make install` (or `make lock` to move the pin, then commit the stubs)")
    for stub in sorted((ROOT / "exitrank" / "v1").glob("*_pb2_grpc.py")):
        assert f"GRPC_GENERATED_VERSION = '{tools}'" in stub.read_text(), f"{stub.name}: run `make codegen`"
    runtime = tuple(int(p) for p in _locked("grpcio").split(".")[:3])
    assert runtime >= tuple(int(p) for p in tools.split(".")[:3]), "the locked grpcio is older than its stubs"
