"""A running ``ranker-svc`` process under continuous Rank load from client threads while releases are
published: the new model is picked up without a restart, no request fails, every response names the
old or the new model (and only the new one once it answered), a corrupted release is refused.

The retriever is the live stack's real ``retriever-svc``; the models are real tiny Llamas.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import grpc

from exitrank.artifacts import CURRENT, RELEASES, publish_release
from tests.support.reliability import recording
from exitrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_svc.artifact import read_meta
from tests.conftest import await_ready, launch_service, stop_service
from tests.ranker_svc.test_reload import as_release, build_variant

CLIENTS = 3
PER_PHASE = 20  # responses received in each phase before the next step


class Load:
    """Client threads sending Rank back to back; each response as (sent, received, model_version)."""

    def __init__(self, address: str, users: list[str], items: list[str]) -> None:
        self.address, self.users, self.items = address, users, items
        self.done: list[tuple[float, float, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)]

    def _client(self, n: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = ranker_pb2_grpc.RankerStub(channel)
            j = n
            while not self._stop.is_set():
                user, j = self.users[j % len(self.users)], j + 1
                candidates = [self.items[(j + k) % len(self.items)] for k in range(4)]
                sent = time.monotonic()
                try:
                    reply = stub.Rank(ranker_pb2.RankRequest(user_id=user, candidate_item_ids=candidates),
                                      timeout=30)
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code()}: {exc.details()}")
                    continue
                self.done.append((sent, time.monotonic(), reply.model_version))

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def wait_for(self, more: int, *, since: float = 0.0, timeout_s: float = 60) -> None:
        """Until ``more`` responses were received after ``since`` (a ``time.monotonic()`` value)."""
        deadline = time.monotonic() + timeout_s
        while sum(1 for _, got, _ in list(self.done) if got > since) < more:
            assert time.monotonic() < deadline, f"only {len(self.done)} responses, errors {self.errors[:3]}"
            assert not self.errors, self.errors[:3]
            time.sleep(0.02)


def _wait_for_line(log: Path, text: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{text!r} never logged: {log.read_text()[-2000:]}"
        time.sleep(0.05)


def test_refit_published_during_load_swaps_without_a_failed_request(request, live_stack, tmp_path):
    builds, root = tmp_path / "builds", tmp_path / "artifacts"
    old_release = as_release(live_stack.artifacts / "ranker", builds / "old")
    build_variant(live_stack.artifacts / "ranker", builds / "new", seed=1)
    new_release = as_release(builds / "new" / "ranker", builds / "new")
    old, new = (read_meta(r / "ranker")["version"] for r in (old_release, new_release))
    publish_release(old_release, root)
    log = tmp_path / "ranker.log"
    proc = launch_service([str(Path(sys.executable).parent / "ranker-svc"), "serve", "--port", "0",
                           "--retriever", live_stack.retriever, "--artifacts", str(root / CURRENT),
                           "--dtype", "float32", "--num-threads", "1", "--reload-interval-s", "0.2"], log)
    try:
        address = await_ready(proc, "ranker listening on ", log)
        with recording(request.node.nodeid, "refit during load", area="faults") as row:
            with Load(address, sorted(live_stack.histories), sorted(live_stack.titles)) as load:
                load.wait_for(PER_PHASE)
                published_at = time.monotonic()
                publish_release(new_release, root)  # what `trainer refit` does
                _wait_until(lambda: any(v == new for _, _, v in list(load.done)))
                first_new = min(got for _, got, v in list(load.done) if v == new)
                load.wait_for(PER_PHASE, since=first_new)
                broken = root / RELEASES / "broken"  # a release corrupted on disk, linked without verification
                shutil.copytree(old_release, broken)
                (broken / "ranker" / "model.safetensors").write_bytes(b"\0" * 128)
                (root / "next").symlink_to(f"{RELEASES}/broken")
                (root / "next").replace(root / CURRENT)
                _wait_for_line(log, "refusing new release")
                refused_at = time.monotonic()
                load.wait_for(PER_PHASE, since=refused_at)
            assert proc.poll() is None  # the same process throughout
            done = list(load.done)
            assert not load.errors, load.errors[:5]
            assert {v for _, _, v in done} == {old, new}
            late = [v for sent, _, v in done if sent > first_new]  # sent after the new model had answered
            assert late and set(late) == {new}
            assert {v for sent, _, v in done if sent > refused_at} == {new}  # the broken release never served
            text = log.read_text()
            assert text.count("refusing new release") == 1 and "does not match the manifest" in text
            assert f"model {new} now serving (was {old})" in text
            before = sum(1 for _, _, v in done if v == old)
            while_loading = sum(1 for _, got, _ in done if published_at < got < first_new)
            assert while_loading > 0  # the old model answered while the new one loaded off the serving path
            row.sent, row.refused = len(done) + len(load.errors), len(load.errors)
            row.measured = (f"ranker-svc under {CLIENTS} client threads: {len(done)} Rank calls, 0 failed; "
                            f"{before} answered by the old model ({while_loading} of them while the new one "
                            f"loaded), {len(done) - before} by the new one published mid-load (swapped without "
                            f"restart; all {len(late)} calls sent after its first "
                            f"answer named it); a corrupted release (weights not matching the manifest) refused "
                            f"with one log line while the new model kept serving")
    finally:
        stop_service(proc)


def _wait_until(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
