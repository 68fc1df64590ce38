"""The growth soak (``python -m bench.soak --growth``, ``make soak-growth``): ever-new users and items
at a fixed rate beside the Rank load, with the retriever's bounds set small so that the run crosses
them in its first minute; the memory of both services and of Redis must then stop growing.

* The retriever runs with ``GROWTH_BOUNDS`` (``EXITRANK_RETRIEVER_INDEX_*`` variables): at most 500
  users, 1,000 catalog ids, 10 interactions a user, 5,000 unapplied stream events, 400 cached titles;
  the ranker with a title cache of 300 (``EXITRANK_RANKER_RETRIEVER_TITLE_CACHE_SIZE``).
* :class:`GrowthLoader` (a thread of the soak's process, its own channel) sends, every ``tick_s``,
  ``rate x tick_s`` events: a quarter of them of a user never seen before, the rest of a random admitted
  user; half of them of an item never seen before (upserted first, UpsertItems), the rest of an item of
  the fit. Ingest's ``rejected`` (new users beyond ``max_users``) and UpsertItems' (new ids beyond
  ``max_items``) are refusals by design, counted apart from errors; so is RESOURCE_EXHAUSTED (the
  stream's backlog bound).
* :func:`growth_rank_caller`: Rank for seed users and new ones (a new user the retriever refused or has
  not applied yet ranks without context, which is not an error), over seed items and new catalog items
  the loader has had acknowledged (a file, :class:`Progress`, tells the load process how far it got).
* Every ``--sample-s``: RSS of the ranker, the retriever and redis-server; Redis's ``used_memory``,
  ``DBSIZE``, the updates stream's ``MEMORY USAGE`` (kept by age, 6 hours: the one key whose size
  follows the ingest rate, so it is reported apart) and the events stream's length.
* Verdicts (:func:`verdicts`): each service's RSS flat (median of the last quarter of the samples within
  ``max(16 MiB, 5%)`` of the second quarter's); Redis's ``used_memory`` less the updates stream flat
  (``max(1 MiB, 5%)``) and never above :func:`redis_bound` (``store.py``'s formula for the configured
  bounds, plus what Redis held before the growth load); the key count flat and under its bound; p99 flat
  (the last quarter's within ``max(1.5x, +5 ms)`` of the second's); no Rank error and no Ingest error.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

from bench.common import run_load, say
from bench.proc_memory import child_pid, rss_mb

GROWTH_BOUNDS = {"history_per_user": 10, "max_users": 500, "max_items": 1000, "max_stream_backlog": 5000,
                 "title_cache_size": 400, "keep_versions": 2}
RANKER_TITLE_CACHE = 300
STREAM_ENTRY_B = 200  # bytes an unapplied event takes in the events stream (~199 B measured at ~150 entries;
#                       each run reports its own: ``events_b_per_entry``)
NEW_USER_SHARE, NEW_ITEM_SHARE = 0.25, 0.5


def retriever_env(bounds: dict) -> dict[str, str]:
    """The retriever's ``index`` bounds as its ``EXITRANK_RETRIEVER_INDEX_<KEY>`` variables."""
    return {f"EXITRANK_RETRIEVER_INDEX_{key.upper()}": str(value) for key, value in bounds.items()}


def ranker_env() -> dict[str, str]:
    return {"EXITRANK_RANKER_RETRIEVER_TITLE_CACHE_SIZE": str(RANKER_TITLE_CACHE)}


def new_user(n: int) -> str:
    return f"nu{n:07d}"


def new_item(n: int) -> str:
    return f"ni{n:07d}"


class Progress:
    """How many new users and items the loader has had acknowledged, in a file the Rank load reads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._read_at = 0.0
        self._value = (0, 0)

    def write(self, users: int, items: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([users, items]))
        os.replace(tmp, self.path)

    def read(self) -> tuple[int, int]:
        """(users, items), re-read at most once a second."""
        now = time.monotonic()
        if now - self._read_at >= 1.0:
            self._read_at = now
            try:
                users, items = json.loads(self.path.read_text())
                self._value = (int(users), int(items))
            except (OSError, ValueError):
                pass
        return self._value


def growth_rank_caller(channel, *, users: list[str], items: list[str], candidates: int, timeout_s: float,
                       progress: str, item_cap: int):
    """``run_load``'s request maker: Rank for a seed user or a new one, over seed and new catalog items
    (new ones only among the first ``item_cap``, the ids the catalog's bound admits)."""
    from exitrank.v1 import ranker_pb2, ranker_pb2_grpc

    stub = ranker_pb2_grpc.RankerStub(channel)
    made = Progress(progress)

    def call(rng: random.Random):
        new_users, new_items = made.read()
        user = new_user(rng.randrange(new_users)) if new_users and rng.random() < 0.5 else rng.choice(users)
        admitted = min(new_items, item_cap)
        fresh = rng.sample(range(admitted), min(candidates // 2, admitted))
        chosen = [new_item(n) for n in fresh] + rng.sample(items, candidates - len(fresh))
        return stub.Rank(ranker_pb2.RankRequest(user_id=user, candidate_item_ids=chosen), timeout=timeout_s)

    return call


class GrowthLoader:
    """Ingest (and UpsertItems of the new items) at ``rate`` events/s from a thread, until ``stop``."""

    def __init__(self, address: str, *, rate: float, users: list[str], items: list[str], bounds: dict,
                 progress: Progress, tick_s: float = 0.25) -> None:
        self.address, self.rate, self.tick_s = address, rate, tick_s
        self.users, self.items, self.progress = users, items, progress
        self.user_cap = max(0, bounds["max_users"] - len(users))
        self.rng = random.Random(2)
        self.made = {"users": 0, "items": 0}
        self.counts = {"events_sent": 0, "ingest_accepted": 0, "ingest_refused_beyond_bound": 0,
                       "ingest_resource_exhausted": 0, "items_sent": 0, "items_accepted": 0,
                       "items_refused_beyond_bound": 0, "rpc_errors": 0}
        self.error_codes: dict[str, int] = {}
        self.first_refusal_s: dict[str, float] = {}
        self.max_lag_s = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.started = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self.thread.start()

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join(60)
        return {"rate_per_s": self.rate, "tick_s": self.tick_s, "new_users": self.made["users"],
                "new_items": self.made["items"], **self.counts, "rpc_error_codes": self.error_codes,
                "first_refusal_s": self.first_refusal_s, "max_lag_s": round(self.max_lag_s, 2)}

    def run(self) -> None:
        import grpc

        from exitrank.v1 import retriever_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = retriever_pb2_grpc.RetrieverStub(channel)
            owed, tick = 0.0, 0
            while not self.stop.is_set():
                owed += self.rate * self.tick_s
                count, owed = int(owed), owed - int(owed)
                self.send(stub, count)
                tick += 1
                due = self.started + tick * self.tick_s
                self.max_lag_s = max(self.max_lag_s, time.monotonic() - due)
                self.stop.wait(max(0.0, due - time.monotonic()))

    def batch(self, count: int) -> tuple[list, list]:
        """``count`` events and the new items among them."""
        from exitrank.v1 import common_pb2

        events, fresh = [], []
        now_ms = int(time.time() * 1000)
        for j in range(count):
            if self.rng.random() < NEW_USER_SHARE:
                user = new_user(self.made["users"])
                self.made["users"] += 1
            else:
                pick = self.rng.randrange(len(self.users) + min(self.made["users"], self.user_cap))
                user = self.users[pick] if pick < len(self.users) else new_user(pick - len(self.users))
            if self.rng.random() < NEW_ITEM_SHARE:
                item = new_item(self.made["items"])
                self.made["items"] += 1
                fresh.append(common_pb2.Item(item_id=item, title=f"The new thing {item[2:]}"))
            else:
                item = self.rng.choice(self.items)
            events.append(common_pb2.Interaction(user_id=user, item_id=item, rating=float(1 + j % 5),
                                                 timestamp_ms=now_ms + j))
        return events, fresh

    def send(self, stub, count: int) -> None:
        """One tick: UpsertItems of the new items, then Ingest of the events; counts each outcome."""
        events, fresh = self.batch(count)
        if fresh:
            summary = self.call(stub.UpsertItems, fresh, "item")
            if summary is not None:
                self.tally(summary, "items_accepted", "items_refused_beyond_bound", "max_items")
        summary = self.call(stub.Ingest, events, "event")
        if summary is not None:
            self.tally(summary, "ingest_accepted", "ingest_refused_beyond_bound", "max_users")
        self.counts["items_sent"] += len(fresh)
        self.counts["events_sent"] += len(events)
        self.progress.write(self.made["users"], self.made["items"])

    def call(self, method, messages: list, kind: str):
        """The call's summary, or None after counting its failure."""
        import grpc

        try:
            return method(iter(messages), timeout=30)
        except grpc.RpcError as exc:
            if kind == "event" and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.counts["ingest_resource_exhausted"] += len(messages)
                self.first_refusal_s.setdefault("max_stream_backlog", self.elapsed())
            else:
                self.counts["rpc_errors"] += 1
                name = exc.code().name if exc.code() else "UNKNOWN"
                self.error_codes[name] = self.error_codes.get(name, 0) + 1
            return None

    def tally(self, summary, accepted: str, refused: str, bound: str) -> None:
        self.counts[accepted] += summary.accepted
        self.counts[refused] += summary.rejected
        if summary.rejected:
            self.first_refusal_s.setdefault(bound, self.elapsed())

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)


# ------------------------------------------------------------------------- Redis and memory


def redis_client(data_dir: Path):
    """A client of the retriever's embedded redis-server under ``data_dir`` (its password from the file)."""
    import redis

    from exitrank.redis_server import with_credentials

    return redis.Redis.from_url(with_credentials(f"unix://{data_dir / 'redis' / 'redis.sock'}"))


def redis_sample(client, keys) -> dict[str, float]:
    """Redis's used_memory and DBSIZE, the updates stream's bytes, the events stream's length and bytes."""
    used = int(client.info("memory")["used_memory"])
    updates = int(client.memory_usage(keys.updates, samples=0) or 0)
    return {"used_mb": used / 2**20, "less_updates_mb": (used - updates) / 2**20, "updates_kb": updates / 1024,
            "keys": client.dbsize(), "events_len": client.xlen(keys.stream),
            "events_kb": int(client.memory_usage(keys.stream, samples=0) or 0) / 1024}


def quarter_medians(samples: list[float]) -> list[float]:
    """The median of each quarter of the samples (in time order)."""
    size = max(1, len(samples) // 4)
    parts = [samples[q * size:(q + 1) * size] for q in range(3)] + [samples[3 * size:]]
    return [round(statistics.median(p), 3) if p else float("nan") for p in parts]


def redis_bound(bounds: dict, *, dim: int, version_items: int, entry_b: int, base_mb: float) -> dict:
    """``store.py``'s sizing for the configured bounds: max_users x (history_per_user x 125 B +
    (keep + 1) x (4 d + 200 B)) + max_items x (entry + 150 B) + keep x 8 I d B + the backlog
    (``STREAM_ENTRY_B`` an event), plus what Redis held before the growth load (``base_mb``)."""
    keep = bounds["keep_versions"]
    parts = {"users_b": bounds["max_users"] * (bounds["history_per_user"] * 125 + (keep + 1) * (4 * dim + 200)),
             "items_b": bounds["max_items"] * (entry_b + 150), "item_tables_b": keep * 8 * version_items * dim,
             "backlog_b": bounds["max_stream_backlog"] * STREAM_ENTRY_B}
    total = base_mb + sum(parts.values()) / 2**20
    return {**parts, "base_mb": round(base_mb, 3), "bound_mb": round(total, 3),
            "keys_bound": 3 * bounds["max_users"] + bounds["max_items"] + 4 * keep + 10}


def flat(quarters: list[float], *, floor: float, share: float = 0.05) -> bool:
    """The last quarter's median within ``max(floor, share x)`` of the second's."""
    return quarters[3] - quarters[1] <= max(floor, share * quarters[1])


def verdicts(rss: dict[str, list[float]], redis: dict[str, list[float]], bound: dict, latency: list[dict],
             loader: dict, rank_errors: int) -> dict:
    """Each quantity against its bound: RSS flat, Redis flat and under the formula, keys, p99, errors."""
    q = {name: quarter_medians(values) for name, values in {**rss, **redis}.items()}
    p99 = [part.get("p99_ms", float("nan")) for part in latency]
    return {
        "ranker_rss_flat": flat(q["ranker"], floor=16.0),
        "retriever_rss_flat": flat(q["retriever"], floor=16.0),
        "redis_rss_flat": flat(q["redis"], floor=16.0),
        "redis_less_updates_flat": flat(q["less_updates_mb"], floor=1.0),
        "redis_under_bound": max(redis["less_updates_mb"]) <= bound["bound_mb"],
        "keys_flat": flat(q["keys"], floor=0, share=0.01),
        "keys_under_bound": max(redis["keys"]) <= bound["keys_bound"],
        "p99_flat": p99[3] <= max(1.5 * p99[1], p99[1] + 5.0),
        "bounds_crossed": {"max_users", "max_items"} <= set(loader["first_refusal_s"]),
        "no_errors": rank_errors == 0 and loader["rpc_errors"] == 0,
    }


# ------------------------------------------------------------------------- the run


def growth_soak(args, ranker, retriever, load_args: dict, address: str, retriever_at: str, work: Path,
                artifacts: Path) -> dict:
    """Calibrate on the seed, then ``args.duration`` seconds of Rank load in four quarters beside the
    growth loader, sampling memory every ``args.sample_s``; the result's ``soak_growth`` section."""
    from retriever_svc.keys import Keys

    capacity = run_load([address], "bench.soak:rank_caller", load_args, concurrency=args.concurrency,
                        duration=args.calibrate)
    say(f"capacity: {capacity['requests_per_s']} Rank/s at {args.concurrency} clients, {capacity['errors']} errors")
    client, keys = redis_client(work / "data"), Keys("xr")
    base_mb = redis_sample(client, keys)["less_updates_mb"]
    redis_pid = child_pid(retriever.pid, "redis-server")
    progress = Progress(work / "growth_progress.json")
    progress.write(0, 0)
    loader = GrowthLoader(retriever_at, rate=args.growth_rate, users=load_args["users"], items=load_args["items"],
                          bounds=GROWTH_BOUNDS, progress=progress)
    rank_args = {**load_args, "progress": str(progress.path),
                 "item_cap": max(0, GROWTH_BOUNDS["max_items"] - len(load_args["items"]))}
    latency: list[dict] = []
    runner = threading.Thread(target=lambda: latency.extend(run_load(
        [address], "bench.soak_growth:growth_rank_caller", rank_args, concurrency=args.concurrency,
        duration=args.duration / 4, servers=[ranker.pid, retriever.pid], seed=1 + q) for q in range(4)), daemon=True)
    rss: dict[str, list[float]] = {"ranker": [], "retriever": [], "redis": []}
    redis: dict[str, list[float]] = {}
    load: list[float] = []
    loader.start()
    runner.start()
    while runner.is_alive():
        for name, pid in (("ranker", ranker.pid), ("retriever", retriever.pid), ("redis", redis_pid)):
            rss[name].append(rss_mb(pid) if pid else float("nan"))
        for key, value in redis_sample(client, keys).items():
            redis.setdefault(key, []).append(round(value, 3))
        load.append(round(os.getloadavg()[0], 2))  # the machine is shared: context for p99
        runner.join(args.sample_s)
    loaded = loader.finish()
    client.close()
    meta = json.loads((artifacts / "gcn" / "meta.json").read_text())
    bound = redis_bound(GROWTH_BOUNDS, dim=int(meta["dim"]), version_items=len(meta["item_ids"]),
                        entry_b=len(json.dumps({"title": "The new thing 0000000", "attributes": {}})), base_mb=base_mb)
    return summarise(args, capacity, latency, loaded, rss, {**redis, "load_avg_1m": load}, bound)


def summarise(args, capacity: dict, latency: list[dict], loaded: dict, rss: dict, redis: dict, bound: dict) -> dict:
    """Per-quarter medians, growth from the second quarter to the last, the Redis bound and the verdicts."""
    series = {**{f"{n}_rss_mb": v for n, v in rss.items()},
              **{k if k.startswith("load") else f"redis_{k}": v for k, v in redis.items()}}
    quarters = {name: quarter_medians(values) for name, values in series.items()}
    rank_errors = sum(part["errors"] for part in latency)
    verdict = verdicts(rss, redis, bound, latency, loaded, rank_errors)
    updates = redis["updates_kb"]
    span_s = max(args.sample_s * (len(updates) - 1), 1.0)
    say(f"growth soak: {sum(p['requests'] for p in latency)} Ranks, {rank_errors} errors; loader {loaded}")
    say(f"quarters: {quarters}; verdicts {verdict}")
    return {
        "duration_s": args.duration, "sample_s": args.sample_s, "concurrency": args.concurrency,
        "candidates": args.candidates, "capacity_rps": capacity["requests_per_s"], "bounds": GROWTH_BOUNDS,
        "ranker_title_cache_size": RANKER_TITLE_CACHE, "loader": loaded,
        "rank": {"requests": sum(p["requests"] for p in latency), "errors": rank_errors,
                 "p50_ms": [p.get("p50_ms") for p in latency], "p99_ms": [p.get("p99_ms") for p in latency],
                 "requests_per_s": [p.get("requests_per_s") for p in latency]},
        "quarter_medians": quarters,
        "growth_q2_to_q4": {name: round(q[3] - q[1], 3) for name, q in quarters.items()},
        "redis_bound": bound,
        "updates_stream": {"kb_per_min": round((updates[-1] - updates[0]) / span_s * 60, 2),
                           "projected_6h_mb": round((updates[-1] - updates[0]) / span_s * 21600 / 1024, 1)},
        "events_b_per_entry": events_entry_bytes(redis),
        "verdicts": verdict, "passed": all(verdict.values()), "samples": series,
    }


def events_entry_bytes(redis: dict) -> float | None:
    """The events stream's bytes per entry at its longest sample (None: it was always empty)."""
    longest = max(range(len(redis["events_len"])), key=lambda j: redis["events_len"][j])
    count = redis["events_len"][longest]
    return round(redis["events_kb"][longest] * 1024 / count, 1) if count else None
