"""``GCNEmbeddings``: the LightGCN fit's output, as the trainer writes it and the retriever loads it.

On disk (``ARTIFACTS/gcn/``, see docs/architecture.md)::

    embeddings.safetensors   tensors "user" (U, d), "item" (I, d) float32, and "item_foldin" (I, d)
                             when the fit wrote it; "user@<combination>" (U, d): the same fit's users
                             under another layer combination (Table 3), when asked for; safetensors
                             metadata {"version": ...}
    meta.json                {"user_ids", "item_ids", "layers", "dim", "layer_combination",
                              "version", "metrics", ...}

``item_foldin`` is the fold-in basis f_i = sum_{k>=1} alpha_k e_i^(k-1) / sqrt(|N_i|) (see
``trainer.gcn_model.LightGCNRetriever.export``): a user's embedding from its interactions is
sum_{i in N_u} f_i / sqrt(|N_u|) (``fold_in``, the one implementation that serving and training both
call). Without it the retriever falls back to f_i = e_i (one propagation step of the final item
embeddings), an approximation.

Loading uses safetensors only (nothing is unpickled) and checks that ids and shapes agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from retriever_svc.errors import EmbeddingsError

GCN_DIR = "gcn"
TENSORS_FILE = "embeddings.safetensors"
META_FILE = "meta.json"
_RESERVED_META = ("user_ids", "item_ids", "dim", "version")


@dataclass(kw_only=True)
class GCNEmbeddings:
    """User and item embeddings of one LightGCN fit, identified by ``version``.

    Args:
        user_ids: U distinct user ids, row order of ``user``.
        item_ids: I distinct item ids, row order of ``item``.
        user: (U, d) float32 final user embeddings.
        item: (I, d) float32 final item embeddings.
        version: a name for this fit (``make_version`` gives a content hash).
        meta: ``layers``, ``layer_combination``, ``metrics`` and any other fit settings.
        item_foldin: (I, d) float32 fold-in basis, or None (see the module docstring).
        user_variants: {layer combination: (U, d)} the same fit's users combined otherwise.

    Raises:
        EmbeddingsError: shapes, dtypes or ids disagree, or values are not finite.
    """

    user_ids: list[str]
    item_ids: list[str]
    user: np.ndarray
    item: np.ndarray
    version: str
    meta: dict[str, Any] = field(default_factory=dict)
    item_foldin: np.ndarray | None = None
    user_variants: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.user_ids = [str(u) for u in self.user_ids]
        self.item_ids = [str(i) for i in self.item_ids]
        self.user = _matrix("user", self.user, len(self.user_ids))
        self.item = _matrix("item", self.item, len(self.item_ids))
        if self.user.shape[1] != self.item.shape[1]:
            raise EmbeddingsError(f"user dim {self.user.shape[1]} != item dim {self.item.shape[1]}")
        if self.item_foldin is not None:
            self.item_foldin = _matrix("item_foldin", self.item_foldin, len(self.item_ids))
            if self.item_foldin.shape[1] != self.dim:
                raise EmbeddingsError(f"item_foldin dim {self.item_foldin.shape[1]} != {self.dim}")
        self.user_variants = {name: _matrix(f"user@{name}", m, len(self.user_ids))
                              for name, m in self.user_variants.items()}
        for name, ids in (("user_ids", self.user_ids), ("item_ids", self.item_ids)):
            if len(set(ids)) != len(ids):
                raise EmbeddingsError(f"{name} has duplicates")
        if not self.version or not isinstance(self.version, str):
            raise EmbeddingsError("version must be a non-empty string")

    @property
    def dim(self) -> int:
        return int(self.user.shape[1])

    @property
    def layers(self) -> int | None:
        return self.meta.get("layers")

    @property
    def layer_combination(self) -> str | None:
        return self.meta.get("layer_combination")

    def with_users(self, combination: str) -> GCNEmbeddings:
        """These embeddings with the users of another layer combination of the same fit.

        Raises:
            EmbeddingsError: the fit did not export that combination.
        """
        if combination == self.layer_combination:
            return self
        if combination not in self.user_variants:
            raise EmbeddingsError(f"no users under {combination!r} in version {self.version}; "
                                  f"exported: {sorted(self.user_variants) or 'none'}")
        return GCNEmbeddings(user_ids=self.user_ids, item_ids=self.item_ids,
                             user=self.user_variants[combination], item=self.item,
                             version=f"{self.version}@{combination}",
                             meta={**self.meta, "layer_combination": combination})

    def fold_in_basis(self) -> np.ndarray:
        """f (I, d): ``item_foldin`` when the fit wrote it, else the final item embeddings."""
        return self.item_foldin if self.item_foldin is not None else self.item

    @staticmethod
    def make_version(user: np.ndarray, item: np.ndarray) -> str:
        """``gcn-`` + 12 hex digits of the sha256 of both matrices: same fit, same version."""
        digest = hashlib.sha256()
        for matrix in (user, item):
            digest.update(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
        return "gcn-" + digest.hexdigest()[:12]

    def save(self, artifacts_dir: Path) -> None:
        """Write ``artifacts_dir/gcn/embeddings.safetensors`` and ``meta.json`` (each atomically)."""
        out = Path(artifacts_dir) / GCN_DIR
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"user": self.user, "item": self.item}
        if self.item_foldin is not None:
            tensors["item_foldin"] = self.item_foldin
        tensors.update({f"user@{name}": m for name, m in self.user_variants.items()})
        tmp = out / (TENSORS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"version": self.version})
        os.chmod(tmp, 0o644)  # safetensors creates 0600; services may run as another user
        os.replace(tmp, out / TENSORS_FILE)
        meta = {k: v for k, v in self.meta.items() if k not in _RESERVED_META}
        meta.update(
            user_ids=self.user_ids, item_ids=self.item_ids, dim=self.dim, version=self.version
        )
        meta.setdefault("metrics", {})
        tmp = out / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, out / META_FILE)

    @classmethod
    def load(cls, artifacts_dir: Path) -> GCNEmbeddings:
        """Read ``artifacts_dir/gcn``; raises ``EmbeddingsError`` when absent or inconsistent."""
        src = Path(artifacts_dir) / GCN_DIR
        tensors_path, meta_path = src / TENSORS_FILE, src / META_FILE
        if not tensors_path.is_file() or not meta_path.is_file():
            raise EmbeddingsError(
                f"no LightGCN embeddings in {src} (need {TENSORS_FILE} and {META_FILE}; "
                f"fit them with `trainer fit-gcn --data DATA --out {Path(artifacts_dir)}`, or `trainer fit`)"
            )
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(tensors_path))
            from safetensors import safe_open  # noqa: PLC0415 - metadata only

            with safe_open(str(tensors_path), framework="numpy") as handle:
                stored_version = (handle.metadata() or {}).get("version")
        except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated file
            raise EmbeddingsError(f"cannot read embeddings in {src}: {exc}") from exc
        for key in ("user_ids", "item_ids", "version"):
            if key not in meta:
                raise EmbeddingsError(f"{meta_path} lacks {key!r}")
        for key in ("user", "item"):
            if key not in tensors:
                raise EmbeddingsError(f"{tensors_path} lacks tensor {key!r}")
        if stored_version is not None and stored_version != meta["version"]:
            raise EmbeddingsError(
                f"{TENSORS_FILE} is version {stored_version} but {META_FILE} says {meta['version']}"
            )
        if "dim" in meta and int(meta["dim"]) != tensors["user"].shape[-1]:
            raise EmbeddingsError(f"meta dim {meta['dim']} != tensor dim {tensors['user'].shape}")
        extra = {k: v for k, v in meta.items() if k not in _RESERVED_META}
        return cls(
            user_ids=meta["user_ids"],
            item_ids=meta["item_ids"],
            user=tensors["user"],
            item=tensors["item"],
            version=str(meta["version"]),
            meta=extra,
            item_foldin=tensors.get("item_foldin"),
            user_variants={k.split("@", 1)[1]: v for k, v in tensors.items() if k.startswith("user@")},
        )


def fold_in(basis: np.ndarray, item_row: Mapping[str, int], item_ids: Iterable[str]) -> np.ndarray | None:
    """A user's LightGCN embedding from its interactions, with the fit's items held fixed (fold-in).

    LightGCN's propagation gives user u at layer k >= 1, with the item layers e_i^(k-1) of the fit fixed,
    e_u^(k) = sum_{i in N_u} e_i^(k-1) / sqrt(|N_u| |N_i|), so the combined embedding is::

        e_u = sum_{i in N_u} f_i / sqrt(|N_u|),   f_i = sum_{k>=1} alpha_k e_i^(k-1) / sqrt(|N_i|)

    Args:
        basis: (I, d) the fit's fold-in basis f (``GCNEmbeddings.fold_in_basis``).
        item_row: item id -> row of ``basis``.
        item_ids: the user's interactions; N_u is their distinct ids that ``item_row`` knows (items new
            since the fit have no embedding and are skipped).

    Returns:
        (d,) with ``basis``'s dtype, or None when none of the items is known.

    The retriever folds users in with it at serving time and the trainer builds its examples' user
    vectors with it, so training and serving see the same vector.
    """
    rows = sorted({item_row[i] for i in item_ids if i in item_row})
    if not rows:
        return None
    return basis[rows].sum(axis=0) / math.sqrt(len(rows))


def _matrix(name: str, value: np.ndarray, rows: int) -> np.ndarray:
    """A C-contiguous float32 (rows, d) copy-if-needed of ``value``, or EmbeddingsError."""
    array = np.asarray(value)
    if array.ndim != 2 or array.shape[0] != rows:
        raise EmbeddingsError(f"{name} must have shape ({rows}, d), got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise EmbeddingsError(f"{name} must be floating point, got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise EmbeddingsError(f"{name} has non-finite values")
    return array
