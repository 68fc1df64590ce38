"""``python -m exitrank.client``: health probes and one-off calls from a shell (containers, runbooks).

    python -m exitrank.client health 127.0.0.1:50052                 # exit 0 when SERVING (a probe)
    python -m exitrank.client health 127.0.0.1:50051 --service exitrank.v1.Retriever
    python -m exitrank.client rank 127.0.0.1:50052 --user u42 --items i1,i2,i3   # JSON, best CTR first
    python -m exitrank.client load 127.0.0.1:50051 --data data/synth   # catalog + interactions, resumable
    python -m exitrank.client ingest 127.0.0.1:50051 --user u42 --items i1,i2 # a user's clicks, now

Every command speaks TLS with ``--tls-ca FILE`` (the CA that signed the server's certificate), and
mutual TLS with ``--tls-cert``/``--tls-key`` (this client's certificate, e.g. the compose file's
``infra/certs/ingest.crt`` for ``load``/``ingest``, ``feed-server.crt`` for ``rank``);
``--tls-server-name`` when the server's certificate does not name the host dialled.

Exit status: 0 on success, 1 when not serving or the call failed (the error on stderr), 2 on bad usage
(a bad flag, a data set that cannot be read). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

from exitrank.client import ExitrankError, Interaction, RankerClient, RetrieverClient
from exitrank.client.load import DEFAULT_BATCH, STATE_FILE, LoadOptions, load
from exitrank.client.sync import ServiceClient


def _channel(args: argparse.Namespace) -> dict:
    """The client's ``credentials``/``options`` from the --tls-* flags (plaintext without them)."""
    if args.tls_ca is None and args.tls_cert is None:
        return {}
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together (this client's certificate and its key)")
    read = lambda path: None if path is None else Path(path).read_bytes()  # noqa: E731
    credentials = grpc.ssl_channel_credentials(root_certificates=read(args.tls_ca), private_key=read(args.tls_key),
                                               certificate_chain=read(args.tls_cert))
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return {"credentials": credentials, "options": options}


def _health(args: argparse.Namespace) -> int:
    with ServiceClient(args.target, timeout=args.timeout, retries=0, **_channel(args)) as client:
        status = client.health(service=args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _rank(args: argparse.Namespace) -> int:
    with RankerClient(args.target, timeout=args.timeout, **_channel(args)) as ranker:
        result = ranker.rank(args.user, [i for i in args.items.split(",") if i], num_neighbors=args.num_neighbors)
    ranked = sorted(result.scores, key=lambda s: s.ctr, reverse=True)
    print(json.dumps({"model_version": result.model_version, "retrieval_used": result.retrieval_used,
                      "scores": [{"item_id": s.item_id, "ctr": s.ctr, "exit_layer": s.exit_layer} for s in ranked]}))
    return 0


def _load(args: argparse.Namespace) -> int:
    options = LoadOptions(data=args.data, batch=args.batch, timeout_s=args.timeout, state=args.state,
                          restart=args.restart, progress=not args.no_progress, max_wait_s=args.max_wait)
    with RetrieverClient(args.target, timeout=args.timeout, **_channel(args)) as retriever:
        summary = load(args.target, options, client=retriever)
    print(json.dumps(summary))  # stdout's last line
    return 0


def _ingest(args: argparse.Namespace) -> int:
    events = [Interaction(args.user, item, args.rating) for item in args.items.split(",") if item]
    with RetrieverClient(args.target, timeout=args.timeout, **_channel(args)) as retriever:
        summary = retriever.ingest(events)
    print(json.dumps({"accepted": summary.accepted, "rejected": summary.rejected, "errors": list(summary.errors)}))
    return 0 if not summary.rejected else 1


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
    load_cmd = sub.add_parser("load", help="UpsertItems from DIR/items.jsonl, then Ingest DIR/interactions.jsonl; "
                              "resumable; prints a JSON summary")
    load_cmd.add_argument("target", help="retriever HOST:PORT")
    load_cmd.add_argument("--data", type=Path, required=True, help="a data set directory (trainer data synth/import)")
    load_cmd.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"rows per call (default {DEFAULT_BATCH})")
    load_cmd.add_argument("--timeout", type=float, default=60.0, help="deadline of one call in seconds (default 60)")
    load_cmd.add_argument("--state", type=Path, help=f"where progress is recorded (default DATA/{STATE_FILE})")
    load_cmd.add_argument("--restart", action="store_true", help="ignore recorded progress: send every row again")
    load_cmd.add_argument("--max-wait", type=float, default=300.0,
                          help="while the retriever sheds load (RESOURCE_EXHAUSTED), resend with growing pauses "
                               "for at most this many seconds in a row (default 300; 0: fail at once)")
    load_cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    load_cmd.set_defaults(run=_load)
    ingest = sub.add_parser("ingest", help="one user's interactions (stamped now) through Ingest; prints a JSON summary")
    ingest.add_argument("target", help="retriever HOST:PORT")
    ingest.add_argument("--user", required=True)
    ingest.add_argument("--items", required=True, help="comma-separated item ids")
    ingest.add_argument("--rating", type=float, default=1.0, help="the rating of each (default 1: a click)")
    ingest.add_argument("--timeout", type=float, default=10.0)
    ingest.set_defaults(run=_ingest)
    for command in (health, rank, load_cmd, ingest):
        tls = command.add_argument_group("TLS")
        tls.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate: speak TLS")
        tls.add_argument("--tls-cert", type=Path, help="PEM client certificate, for a server requiring mutual TLS")
        tls.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
        tls.add_argument("--tls-server-name", help="the name the server's certificate holds, if not the target's host")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:  # bad usage: a data set (LoadError), a state file, a flag value
        print(f"exitrank.client: {exc}", file=sys.stderr)
        return 2
    except ExitrankError as exc:
        print(f"exitrank.client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("exitrank.client: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
