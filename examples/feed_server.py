"""A minimal feed server on ``exitrank.client``: HTTP in, candidates ranked by predicted CTR out.

    .venv/bin/python examples/feed_server.py --ranker 127.0.0.1:50052 --retriever 127.0.0.1:50051 --port 8080
    curl 'http://127.0.0.1:8080/feed?user=u42&items=i1,i2,i3&n=2'   # {"items": [{"item_id", "ctr", ...}], ...}
    curl -X POST http://127.0.0.1:8080/click -d '{"user": "u42", "item": "i2"}'   # into the retriever's stream
    curl http://127.0.0.1:8080/healthz                                # 200 while the ranker is SERVING

Standard library HTTP (``ThreadingHTTPServer``) sharing one client per service across threads. Client
errors map to HTTP statuses: InvalidRequest 400, NotFound 404, Overloaded/Unavailable 503,
DeadlineExceeded 504, anything else 502. Prints ``feed server listening on http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from exitrank.client import (DeadlineExceeded, ExitrankError, Interaction, InvalidRequest, NotFound, Overloaded,
                             RankerClient, RetrieverClient, Unavailable)

HTTP_STATUS = ((InvalidRequest, 400), (NotFound, 404), (Overloaded, 503), (Unavailable, 503), (DeadlineExceeded, 504))


class FeedHandler(BaseHTTPRequestHandler):
    ranker: RankerClient
    retriever: RetrieverClient | None

    def do_GET(self) -> None:
        self._reply(self._get)

    def do_POST(self) -> None:
        self._reply(self._post)

    def _get(self) -> tuple[int, dict]:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/healthz":
            return (200 if self.ranker.health(timeout=1) == "SERVING" else 503), {}
        if url.path != "/feed" or "user" not in query:
            return 400, {"error": "use GET /feed?user=ID&items=ID,ID[&n=N]"}
        items = [i for i in query.get("items", "").split(",") if i]
        result = self.ranker.rank(query["user"], items)
        ranked = sorted(result.scores, key=lambda s: s.ctr, reverse=True)[: int(query.get("n", len(items)))]
        return 200, {"user_id": query["user"], "model_version": result.model_version,
                     "retrieval_used": result.retrieval_used,
                     "items": [{"item_id": s.item_id, "ctr": s.ctr, "exit_layer": s.exit_layer} for s in ranked]}

    def _post(self) -> tuple[int, dict]:
        if self.path != "/click" or self.retriever is None:
            return 404, {"error": "POST /click needs --retriever"}
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        summary = self.retriever.ingest([Interaction(str(body.get("user", "")), str(body.get("item", "")))])
        return (200 if summary.accepted else 400), {"accepted": summary.accepted, "errors": list(summary.errors)}

    def _reply(self, handler) -> None:
        """Runs ``handler`` and answers its (status, JSON); a client error becomes its HTTP status."""
        try:
            status, payload = handler()
        except ExitrankError as exc:
            status = next((s for kind, s in HTTP_STATUS if isinstance(exc, kind)), 502)
            payload = {"error": exc.code.name, "message": exc.message}
        self._send(status, payload)

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranker", required=True, help="ranker HOST:PORT")
    parser.add_argument("--retriever", help="retriever HOST:PORT (enables POST /click)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--timeout", type=float, default=2.0, help="deadline of each call, retries included")
    args = parser.parse_args(argv)
    FeedHandler.ranker = RankerClient(args.ranker, timeout=args.timeout, retries=2)
    FeedHandler.retriever = RetrieverClient(args.retriever, timeout=args.timeout) if args.retriever else None
    server = ThreadingHTTPServer((args.host, args.port), FeedHandler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"feed server listening on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        FeedHandler.ranker.close()
        if FeedHandler.retriever is not None:
            FeedHandler.retriever.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
