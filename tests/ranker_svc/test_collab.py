"""Collaborative soft tokens: binding, embedding, the model's paths, the artifact, the engines."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from exitrank.types import RankExample
from ranker_svc.artifact import load_ranker, save_ranker
from ranker_svc.collab import COLLAB_TOKEN, CollabProjector, SoftTable, embed_tokens
from ranker_svc.errors import ArtifactError
from ranker_svc.exits import ExitPolicy
from ranker_svc.prompt import PromptBuilder, PromptConfig
from ranker_svc.ranker import Ranker
from ranker_svc.scoring import ScoreJob, Scorer
from ranker_svc.server import build_engine
from trainer.lm import build_model, build_tokenizer, ensure_collab_token

DIM = 8


def with_vectors(examples: list[RankExample], seed: int = 0) -> list[RankExample]:
    """The examples with random vectors for every user, history item and target (some missing)."""
    rng = np.random.default_rng(seed)
    vec = lambda: rng.normal(size=DIM).astype(np.float32)  # noqa: E731

    def items(history):
        return tuple(dataclasses.replace(h, embedding=vec() if j % 3 else None) for j, h in enumerate(history))

    out = []
    for ex in examples:
        ctx = ex.context
        neighbors = tuple(dataclasses.replace(n, history=items(n.history)) for n in ctx.neighbors)
        ctx = dataclasses.replace(ctx, history=items(ctx.history), neighbors=neighbors, user_embedding=vec())
        out.append(dataclasses.replace(ex, context=ctx, item_embedding=vec()))
    return out


@pytest.fixture(scope="module")
def collab_dir(tmp_path_factory, examples):
    prompt = PromptConfig(rating_style="stars", collab="full")
    builder = PromptBuilder(config=prompt)
    tokenizer = build_tokenizer([builder.full_text(ex.context, ex.title) for ex in examples], vocab_size=500)
    causal_lm = build_model(tokenizer, preset="tiny", arch="llama", seed=0)
    token_id = ensure_collab_token(tokenizer, causal_lm)
    torch.manual_seed(0)
    projector = CollabProjector(DIM, causal_lm.config.hidden_size, token_id=token_id)
    with torch.no_grad():
        causal_lm.lm_head.weight.mul_(40.0)  # rows exit at different layers
        projector.net[-1].weight.mul_(20.0)  # vectors move the answer a lot
    ranker_dir = tmp_path_factory.mktemp("collab") / "ranker"
    save_ranker(ranker_dir, causal_lm=causal_lm, tokenizer=tokenizer, prompt=prompt, exit_layers=[1, 2, 3, 4, 5],
                policy=ExitPolicy(criterion="probability_delta", threshold=0.05, window=2), collab=projector,
                embedding_version="gcn-test")
    return ranker_dir


@pytest.fixture(scope="module")
def collab_examples(examples):
    return with_vectors(examples[:12])


def test_bind_replaces_slots_from_the_end_and_checks_counts():
    table = SoftTable(vocab_size=100, placeholder_id=7, dim=2)
    a, b, c = (np.full(2, x, np.float32) for x in (1, 2, 3))
    assert table.bind([1, 7, 5, 7], [a, b]) == [1, 100, 5, 101]
    assert table.bind([7, 9], [a, b, c]) == [102, 9]  # a cut prompt lost its first slots: the last vector
    assert [r[0] for r in table.rows] == [1, 2, 3]
    assert table.bind([4], [None]) == [4] and table.tensor().shape == (3, 4)  # rows [e, m]
    assert not table.tensor()[:, 2:].any()  # no partner: m = 0
    with pytest.raises(ValueError, match="2 <|cf|> slots but 1 vectors".replace("|", "\\|")):
        table.bind([7, 7], [a])
    with pytest.raises(ValueError, match="3 dimensions"):
        table.bind([7], [np.zeros(3)])


def test_a_partnered_slot_carries_the_product_and_a_missing_vector_is_zero():
    table = SoftTable(vocab_size=100, placeholder_id=7, dim=2)
    user, item = np.array([2.0, -1.0], np.float32), np.array([3.0, 4.0], np.float32)
    assert table.bind([7, 1, 7], [user, item], [None, user]) == [100, 1, 101]
    assert table.bind([7], [None], [user]) == [102]
    rows = table.tensor()
    assert rows[0].tolist() == [2.0, -1.0, 0.0, 0.0]  # the user's own slot: m = 0
    assert rows[1].tolist() == [3.0, 4.0, 6.0, -4.0]  # the target's: m = user * item, sum = the GCN score
    assert rows[2].tolist() == [0.0] * 4


def test_embed_tokens_projects_only_virtual_ids():
    embedding = torch.nn.Embedding(10, 4)
    projector = CollabProjector(2, 4, token_id=9)
    ids = torch.tensor([[1, 10, 2, 11]])
    soft = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.5, -0.5]])
    out = embed_tokens(embedding, projector, ids, soft)
    assert torch.equal(out[0, 0], embedding.weight[1]) and torch.equal(out[0, 2], embedding.weight[2])
    assert torch.allclose(out[0, 1], projector(soft[:1])[0]) and torch.allclose(out[0, 3], projector(soft[1:])[0])
    with pytest.raises(ValueError, match="no vectors"):
        embed_tokens(embedding, projector, ids, None)


def test_the_prompt_has_one_slot_per_vector(collab_examples):
    ex = collab_examples[0]
    for mode, expected in (("none", 0), ("user", 1), ("full", 1 + 4 + 2 + 1)):
        builder = PromptBuilder(config=PromptConfig(collab=mode))
        vectors = builder.context_vectors(ex.context) + builder.target_vectors(ex.item_embedding)
        assert builder.full_text(ex.context, ex.title).count(COLLAB_TOKEN) == len(vectors) == expected
    # the target's slot ends the prompt: the answer is read at it
    assert PromptBuilder(config=PromptConfig(collab="full")).full_text(ex.context, ex.title).endswith(
        f"Answer: {COLLAB_TOKEN}")
    # a title cannot add a slot of its own
    assert PromptBuilder(config=PromptConfig(collab="full")).target_text(f"x {COLLAB_TOKEN} y").count(COLLAB_TOKEN) == 1


def test_artifact_round_trip_and_refusals(collab_dir, tmp_path):
    loaded = load_ranker(collab_dir)
    assert loaded.collab == {"mode": "full", "dim": DIM, "embedding_version": "gcn-test",
                             "token_id": loaded.model.collab.token_id, "layout": 2}
    (tmp_path / "ranker").mkdir()
    for f in collab_dir.iterdir():
        if f.name != "collab.safetensors":
            (tmp_path / "ranker" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ArtifactError, match="no matching collab.safetensors"):
        load_ranker(tmp_path / "ranker")
    # an artifact of the earlier layout (target slot after the title, no user*item term) is refused
    import json
    old = tmp_path / "old"
    old.mkdir()
    for f in collab_dir.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    meta = json.loads((old / "exitrank.json").read_text())
    del meta["collab"]["layout"]
    (old / "exitrank.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="layout 1 .* retrain"):
        load_ranker(old)


def test_vectors_change_the_scores(collab_dir, collab_examples):
    ranker = Scorer(loaded=load_ranker(collab_dir))
    full = ExitPolicy(disabled=True)
    base = [d.ctr for d in ranker.score_examples(collab_examples, full)]
    other = with_vectors(collab_examples, seed=1)
    moved = [d.ctr for d in ranker.score_examples(other, full)]
    assert max(abs(a - b) for a, b in zip(base, moved)) > 1e-4  # same vectors give identical scores


def test_one_context_pass_equals_full_prompts_with_soft_tokens(collab_dir, collab_examples):
    """Three requests batched together (one soft-token table for all): each candidate's score and
    exit layer equal its full prompt scored alone."""
    ranker = Scorer(loaded=load_ranker(collab_dir, dtype=torch.float32))
    policy = ExitPolicy(criterion="confidence", threshold=0.99)  # mixed depths on these weights
    jobs = [ScoreJob(collab_examples[c].context, tuple(ex.title for ex in collab_examples[4 * j: 4 * j + 4]), policy,
                     tuple(ex.item_embedding for ex in collab_examples[4 * j: 4 * j + 4]))
            for j, c in enumerate((0, 3, 4))]  # users whose rows settle at different depths
    shared = [d for result in ranker.score_jobs(jobs) for d in result]
    singles = ranker.score_examples([RankExample(job.context, "", t, 0, v) for job in jobs
                                     for t, v in zip(job.titles, job.embeddings)], policy)
    assert [d.exit_layer for d in shared] == [d.exit_layer for d in singles]
    assert [d.ctr for d in shared] == pytest.approx([d.ctr for d in singles], abs=1e-4)
    assert len({d.exit_layer for d in shared}) > 1  # rows of one batch left at different layers


@pytest.mark.parametrize("engine", ["onnx", "deepspeed"])
def test_every_engine_reads_the_soft_tokens_alike(collab_dir, collab_examples, tmp_path, engine):
    loaded = load_ranker(collab_dir, dtype=torch.float32)
    torch_scores = Scorer(loaded=loaded).score_examples(collab_examples, ExitPolicy(disabled=True))
    other = Scorer(loaded=loaded, engine=build_engine(engine, loaded, onnx_dir=tmp_path, device="cpu"))
    got = other.score_examples(collab_examples, ExitPolicy(disabled=True))
    assert [d.ctr for d in got] == pytest.approx([d.ctr for d in torch_scores], abs=1e-4)


@pytest.mark.anyio
async def test_rank_scores_with_the_pinned_versions_vectors_from_a_real_retriever(collab_dir, redis_url, catalog):
    """A real retriever core + gRPC server holding version "gcn-test": Rank asks for that version's
    vectors and scores exactly what scoring the fetched context offline gives; a ranker pinned to a
    version the retriever does not keep is refused, never fed other vectors."""
    from ranker_svc.config import RetrieverConfig
    from ranker_svc.errors import EmbeddingVersionUnavailable
    from ranker_svc.retriever_client import RetrieverClient
    from retriever_svc.config import IndexConfig, ServerConfig
    from retriever_svc.embeddings import GCNEmbeddings
    from retriever_svc.index import Retriever
    from retriever_svc.records import CatalogItem, Interaction
    from retriever_svc.server import start_grpc
    from retriever_svc.store import RedisStore

    rng = np.random.default_rng(3)
    items = sorted(catalog)
    users = [f"u{j}" for j in range(6)]
    emb = GCNEmbeddings(user_ids=users, item_ids=items, user=rng.normal(size=(6, DIM)),
                        item=rng.normal(size=(len(items), DIM)), item_foldin=rng.normal(size=(len(items), DIM)),
                        version="gcn-test")
    store = RedisStore.from_url(redis_url, prefix="collab")
    core = Retriever(store=store, config=IndexConfig(kind="exact"))
    await core.load_embeddings(emb)
    await core.upsert_items([CatalogItem(i, catalog[i]) for i in items])
    await store.apply_events([Interaction(u, items[(3 * j + t) % len(items)], 4.0, t + 1)
                              for j, u in enumerate(users) for t in range(3)])
    running = await start_grpc(core, ServerConfig(port=0))
    server, port = running.server, running.port
    client = RetrieverClient(config=RetrieverConfig(target=f"127.0.0.1:{port}", timeout_s=5.0))
    try:
        ranker = Ranker(loaded=load_ranker(collab_dir, dtype=torch.float32), context_source=client)
        assert ranker.pinned_version == "gcn-test"
        candidates = items[:5]
        result = await ranker.rank(user_id="u0", candidate_item_ids=candidates)
        assert result.retrieval_used and result.embedding_version == "gcn-test"
        ctx = await client.get_context("u0", 4, 15, embedding_version="gcn-test")
        assert ctx.vectors_version == "gcn-test" and ctx.user_embedding is not None
        assert all(h.embedding is not None for h in ctx.history)
        vectors = await client.get_item_vectors(candidates, embedding_version="gcn-test")
        np.testing.assert_allclose(vectors[candidates[0]], emb.item[0], rtol=1e-6)
        offline = ranker.scorer.score_jobs([ScoreJob(ctx, tuple(catalog[i] for i in candidates), ranker.policy,
                                              tuple(vectors[i] for i in candidates))])[0]
        assert [s.ctr for s in result.scores] == pytest.approx([d.ctr for d in offline], abs=1e-5)
        ranker.scorer.pinned_version = "gcn-retired"  # a ranker trained on a version no longer kept
        with pytest.raises(EmbeddingVersionUnavailable, match="gcn-retired"):
            await ranker.rank(user_id="u0", candidate_item_ids=candidates)
    finally:
        await client.close()
        await server.stop(0)
        await store.close()
