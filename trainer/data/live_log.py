"""The retrievers' live interaction log (Redis) as a canonical data set, for ``trainer refit``.

``export_dataset`` reads through ``retriever_svc.store.RedisStore`` (the key layout is documented
there): every user with a history, each user's newest ``HISTORY_CAP`` interactions with ratings
and timestamps, and the catalog titles of the items in them (ids, JSON and floats only; nothing is
unpickled). It writes them with ``trainer.data.dataset.write_dataset``: samples by the rule of
``trainer.data.samples`` (chronological targets; explicit ratings >= ``rating_threshold``
positive, or sampled negatives when every rating is 1), but each user's split is a keyed hash of its
id (8:1:1, :func:`stable_split`), so a user keeps its split across refits and the test users of one
refit never trained an earlier model. The key is a secret (:func:`split_key`, ``ROOT/.split-key``,
mode 0600, made at the first refit): with a public hash, whoever can Ingest could pick user ids
that land in the held-out split and steer the refit gate's evaluation.

    export_dataset("redis://:pw@redis:6379/0", Path("refit-data"), prefix="xr", key=split_key(root))
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import os
import secrets
from pathlib import Path

SPLIT_KEY = ".split-key"  # under the release root: hidden, so never part of a release
HISTORY_CAP = 5000  # newest interactions read per user (the Lua reply is one table of this size)
_CHUNK = 500


class RefitError(ValueError):
    """A refit cannot run as configured (no release to refit, Redis unreachable, ...); the message says why."""


def export_dataset(redis_url: str, out: Path, *, key: bytes, prefix: str = "xr", rating_threshold: float = 4.0,
                   seed: int = 0) -> dict[str, int]:
    """The retriever's histories and catalog (Redis at ``redis_url``) as a canonical data set in ``out``.

    Returns the row counts per file. Raises RefitError when Redis cannot be read or holds no history.
    """
    from retriever_svc.errors import StoreUnavailable
    from trainer.data.dataset import write_dataset
    from trainer.data.rows import DatasetMeta
    from trainer.data.samples import SampleRule, build_samples

    try:
        items, interactions = asyncio.run(_pull_log(redis_url, prefix))
    except StoreUnavailable as exc:
        raise RefitError(f"cannot read the interaction log from Redis: {exc}") from exc
    if not interactions:
        raise RefitError(f"Redis (prefix {prefix!r}) holds no interaction histories: nothing to refit on")
    implicit = all(x.rating == 1.0 for x in interactions)
    rule = SampleRule(threshold=rating_threshold, implicit=implicit, seed=seed)
    samples = [dataclasses.replace(s, split=stable_split(s.user_id, key)) for s in build_samples(interactions, rule)]
    meta = DatasetMeta(name="refit", format="redis", implicit=implicit,
                       rating_threshold=1.0 if implicit else rating_threshold,
                       sample_rule={**dataclasses.replace(rule, kind="given").to_json(), "split": "hmac(key, user_id) 8:1:1"})
    return write_dataset(out, items=items, interactions=interactions, meta=meta, samples=samples)


async def _pull_log(redis_url: str, prefix: str) -> tuple[list, list]:
    """(catalog items, interactions) of every user with a history, in a few round trips per 500 users."""
    from retriever_svc.store import RedisStore
    from trainer.data.rows import InteractionRow, Item

    store = RedisStore.from_url(redis_url, prefix=prefix)
    try:
        users = sorted(await store.all_users())
        interactions = []
        for start in range(0, len(users), _CHUNK):
            chunk = users[start : start + _CHUNK]
            for user, rows in zip(chunk, await store.histories(chunk, HISTORY_CAP)):
                interactions += [InteractionRow(user, item, rating, ts) for item, ts, rating in rows]
        item_ids = sorted({x.item_id for x in interactions})
        items = []
        for start in range(0, len(item_ids), _CHUNK):
            chunk = item_ids[start : start + _CHUNK]
            for item_id, found in zip(chunk, await store.get_items(chunk)):
                items.append(Item(item_id, found.title if found else "", dict(found.attributes) if found else {}))
    finally:
        await store.close()
    return items, interactions


def split_key(root: Path) -> bytes:
    """The secret that keys :func:`stable_split` for the releases under ``root``: read from
    ``root/.split-key``, or made (32 random bytes, mode 0600) when there is none yet. Keep it: a new key
    moves users between splits, and test users would have trained the serving model."""
    path = Path(root) / SPLIT_KEY
    if not path.is_file():
        Path(root).mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another refit made it meanwhile: read that one
            return bytes.fromhex(path.read_text().strip())
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    return bytes.fromhex(path.read_text().strip())


def stable_split(user_id: str, key: bytes) -> str:
    """train / valid / test by a keyed hash (HMAC-SHA256) of the user id (8:1:1): the same user, the
    same split, every refit with the same key; unpredictable without it."""
    digest = hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
    bucket = int(digest[:8], 16) % 10
    return "test" if bucket == 9 else "valid" if bucket == 8 else "train"
