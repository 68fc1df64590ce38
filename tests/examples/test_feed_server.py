"""``examples/feed_server.py`` as a real process over HTTP, in front of the real ``live_stack`` services."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from exitrank.client import NotFound, RankerClient, RetrieverClient

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "feed_server.py"


@pytest.fixture(scope="module")
def feed_url(live_stack, tmp_path_factory):
    log = tmp_path_factory.mktemp("feed") / "feed.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--port", "0", "--ranker", live_stack.ranker,
                                 "--retriever", live_stack.retriever, "--timeout", "30"],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline().strip()
    assert line.startswith("feed server listening on http://"), (line, log.read_text()[-2000:])
    yield line.split()[-1], proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_feed_ranks_candidates_by_ctr(feed_url, live_stack):
    url, _ = feed_url
    items = sorted(live_stack.titles)[:6]
    status, feed = _get(f"{url}/feed?user=g0u1&items={','.join(items)}&n=4")
    assert status == 200 and feed["user_id"] == "g0u1" and feed["retrieval_used"] is True
    ctrs = [i["ctr"] for i in feed["items"]]
    assert len(ctrs) == 4 and ctrs == sorted(ctrs, reverse=True)
    with RankerClient(live_stack.ranker, timeout=30) as ranker:
        direct = ranker.rank("g0u1", items)
    best = sorted(direct.scores, key=lambda s: s.ctr, reverse=True)[:4]
    assert [i["item_id"] for i in feed["items"]] == [s.item_id for s in best]
    assert ctrs == pytest.approx([s.ctr for s in best], abs=1e-4)
    assert _get(f"{url}/healthz")[0] == 200


def test_client_errors_become_http_statuses(feed_url):
    url, _ = feed_url
    status, body = _get(f"{url}/feed?user=g0u1&items=")
    assert status == 400 and body["error"] == "INVALID_ARGUMENT" and "candidate_item_ids" in body["message"]
    status, body = _get(f"{url}/feed?user=g0u1&items=sunny-river,not-in-catalog")
    assert status == 404 and "not-in-catalog" in body["message"]
    assert _get(f"{url}/nowhere")[0] == 400


def test_click_goes_into_the_retriever_stream_and_sigterm_stops(feed_url, live_stack):
    url, proc = feed_url
    click = json.dumps({"user": "clicker", "item": "dull-castle"}).encode()
    request = urllib.request.Request(f"{url}/click", data=click,
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200 and json.loads(reply.read())["accepted"] == 1
    with RetrieverClient(live_stack.retriever, timeout=10) as retriever:
        deadline = time.monotonic() + 30
        while _history(retriever, "clicker") != ["dull-castle"]:
            assert time.monotonic() < deadline, "the click never reached the user's history"
            time.sleep(0.05)
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def _history(retriever: RetrieverClient, user_id: str) -> list[str]:
    try:
        return [h.item_id for h in retriever.get_context(user_id, k=1).history]
    except NotFound:
        return []
