"""``python -m exitrank.client``: health probes and one-off calls from a shell (containers, runbooks).

    python -m exitrank.client health 127.0.0.1:50052                 # exit 0 when SERVING (a probe)
    python -m exitrank.client health 127.0.0.1:50051 --service exitrank.v1.Retriever
    python -m exitrank.client rank 127.0.0.1:50052 --user u42 --items i1,i2,i3   # JSON, best CTR first

Exit status: 0 on success, 1 when not serving or the call failed (the error on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys

from exitrank.client import ExitrankError, RankerClient
from exitrank.client.sync import ServiceClient


def _health(args: argparse.Namespace) -> int:
    with ServiceClient(args.target, timeout=args.timeout, retries=0) as client:
        status = client.health(service=args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _rank(args: argparse.Namespace) -> int:
    with RankerClient(args.target, timeout=args.timeout) as ranker:
        result = ranker.rank(args.user, [i for i in args.items.split(",") if i], num_neighbors=args.num_neighbors)
    ranked = sorted(result.scores, key=lambda s: s.ctr, reverse=True)
    print(json.dumps({"model_version": result.model_version, "retrieval_used": result.retrieval_used,
                      "scores": [{"item_id": s.item_id, "ctr": s.ctr, "exit_layer": s.exit_layer} for s in ranked]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m exitrank.client", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    health = sub.add_parser("health", help="gRPC health check; exit 0 when SERVING")
    health.add_argument("target", help="HOST:PORT")
    health.add_argument("--service", default="", help="service name (default '': the whole server)")
    health.add_argument("--timeout", type=float, default=2.0)
    health.set_defaults(run=_health)
    rank = sub.add_parser("rank", help="rank candidates for a user, print JSON")
    rank.add_argument("target", help="ranker HOST:PORT")
    rank.add_argument("--user", required=True)
    rank.add_argument("--items", required=True, help="comma-separated item ids")
    rank.add_argument("--num-neighbors", type=int, default=0)
    rank.add_argument("--timeout", type=float, default=10.0)
    rank.set_defaults(run=_rank)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ExitrankError as exc:
        print(f"exitrank.client: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
