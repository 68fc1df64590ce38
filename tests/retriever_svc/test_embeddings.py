"""GCNEmbeddings: safetensors + meta.json round trip, and refusal of inconsistent artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from retriever_svc.embeddings import GCNEmbeddings
from retriever_svc.errors import EmbeddingsError


def test_save_load_round_trip(tmp_path, clustered):
    emb, _ = clustered()
    emb.meta["metrics"] = {"recall@20": 0.5}
    emb.save(tmp_path)
    assert sorted(p.name for p in (tmp_path / "gcn").iterdir()) == ["embeddings.safetensors",
                                                                    "meta.json"]
    meta = json.loads((tmp_path / "gcn" / "meta.json").read_text())
    assert meta["dim"] == 8 and meta["layers"] == 3 and meta["version"] == emb.version
    assert meta["layer_combination"] == "mean_1_to_K" and meta["metrics"] == {"recall@20": 0.5}
    back = GCNEmbeddings.load(tmp_path)
    assert back.user_ids == emb.user_ids and back.item_ids == emb.item_ids
    np.testing.assert_array_equal(back.user, emb.user)
    np.testing.assert_array_equal(back.item_foldin, emb.item_foldin)
    assert back.version == emb.version and back.layers == 3 and back.dim == 8


def test_make_version_is_a_content_hash(clustered):
    a, _ = clustered(seed=0)
    b, _ = clustered(seed=1)
    assert GCNEmbeddings.make_version(a.user, a.item) == GCNEmbeddings.make_version(a.user, a.item)
    assert GCNEmbeddings.make_version(a.user, a.item) != GCNEmbeddings.make_version(b.user, b.item)


def test_fold_in_basis_falls_back_to_items(clustered):
    emb, _ = clustered()
    plain = GCNEmbeddings(user_ids=emb.user_ids, item_ids=emb.item_ids, user=emb.user,
                          item=emb.item, version="v")
    assert plain.fold_in_basis() is plain.item


def test_inconsistent_artifacts_are_refused(tmp_path, clustered):
    emb, _ = clustered()
    with pytest.raises(EmbeddingsError, match="no LightGCN embeddings"):
        GCNEmbeddings.load(tmp_path)
    emb.save(tmp_path)
    meta_path = tmp_path / "gcn" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "user_ids": meta["user_ids"][:-1]}))
    with pytest.raises(EmbeddingsError, match="user must have shape"):
        GCNEmbeddings.load(tmp_path)
    meta_path.write_text(json.dumps({**meta, "version": "other"}))
    with pytest.raises(EmbeddingsError, match="version"):
        GCNEmbeddings.load(tmp_path)
    meta_path.write_text(json.dumps(meta))
    save_file({"user": emb.user}, str(tmp_path / "gcn" / "embeddings.safetensors"))
    with pytest.raises(EmbeddingsError, match="lacks tensor 'item'"):
        GCNEmbeddings.load(tmp_path)
    with pytest.raises(EmbeddingsError, match="non-finite"):
        GCNEmbeddings(user_ids=["a"], item_ids=["i"], user=np.array([[np.nan]]),
                      item=np.ones((1, 1)), version="v")
    with pytest.raises(EmbeddingsError, match="duplicates"):
        GCNEmbeddings(user_ids=["a", "a"], item_ids=["i"], user=np.ones((2, 1)),
                      item=np.ones((1, 1)), version="v")
