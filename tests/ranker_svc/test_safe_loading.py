"""Artifacts whose weight files are pickles are refused without running them: a real pickle payload
that would create a file replaces the model, the exit heads, or the GCN embeddings."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from tests.support.reliability import recording
from ranker_svc.artifact import load_ranker
from retriever_svc.embeddings import GCNEmbeddings


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears iff something unpickled it."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload(marker) -> bytes:
    return pickle.dumps(_Payload(marker))


def test_pickled_weights_are_refused_unexecuted(tiny_ranker_dir, tmp_path, request):
    sanity = tmp_path / "sanity"
    pickle.loads(_payload(sanity)).close()
    assert sanity.exists()  # the payload is live: unpickling it does create its file

    marker = tmp_path / "pwned"
    attempts = {}
    with recording(request.node.nodeid, "safe loading") as row:
        # 1. the model as pytorch_model.bin (a pickle) instead of model.safetensors
        bin_only = tmp_path / "bin_only" / "ranker"
        shutil.copytree(tiny_ranker_dir, bin_only)
        (bin_only / "model.safetensors").unlink()
        (bin_only / "pytorch_model.bin").write_bytes(_payload(marker))
        with pytest.raises(Exception) as info:
            load_ranker(bin_only)
        attempts["model as pytorch_model.bin"] = type(info.value).__name__
        # 2. exit heads replaced by a pickle under the safetensors name
        heads = tmp_path / "heads" / "ranker"
        shutil.copytree(tiny_ranker_dir, heads)
        (heads / "exit_heads.safetensors").write_bytes(_payload(marker))
        with pytest.raises(Exception) as info:
            load_ranker(heads)
        attempts["exit_heads.safetensors holding a pickle"] = type(info.value).__name__
        # 3. GCN embeddings replaced by a pickle
        emb = GCNEmbeddings(user_ids=["u"], item_ids=["i"], user=np.ones((1, 2), np.float32),
                            item=np.ones((1, 2), np.float32), item_foldin=np.ones((1, 2), np.float32),
                            version="v", meta={"layers": 1, "layer_combination": "mean_1_to_K"})
        emb.save(tmp_path / "gcn_art")
        (tmp_path / "gcn_art" / "gcn" / "embeddings.safetensors").write_bytes(_payload(marker))
        with pytest.raises(Exception) as info:
            GCNEmbeddings.load(tmp_path / "gcn_art")
        attempts["embeddings.safetensors holding a pickle"] = type(info.value).__name__
        # 4. the one pickle-reading path the policy allows, torch.load(weights_only=True), refuses it too
        (tmp_path / "w.pt").write_bytes(_payload(marker))
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "w.pt", weights_only=True)
        attempts["torch.load(weights_only=True)"] = "UnpicklingError"
        assert not marker.exists()  # nothing ran
        assert attempts["model as pytorch_model.bin"] == "ArtifactError"
        row.sent, row.refused = len(attempts), len(attempts)
        row.measured = (f"{len(attempts)}/{len(attempts)} live pickle payloads refused without running: "
                        + "; ".join(f"{k} ({v})" for k, v in attempts.items()))
