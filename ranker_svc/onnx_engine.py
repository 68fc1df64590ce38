"""The ``onnx`` engine: the early-exit model as one ONNX graph per segment between answering layers.

With answering layers :math:`\\ell_1 < \\dots < \\ell_k < N`, segment i runs decoder layers
:math:`[\\ell_{i-1}, \\ell_i)` (segment 1 starts with the token embedding) and ends with the head of
layer :math:`\\ell_i` (the final norm and ``lm_head`` rows for the last segment), so every graph
returns ``(hidden (B, T, H), yes_no_logits (B, 2))``. ONNX Runtime runs the segments one after
another; between two segments :func:`ranker_svc.exits.run_exits` decides which rows exit, and the
rest continue as a smaller, trimmed batch (per-row compaction in NumPy). A batch whose rows all exit
never runs the later graphs.

Graphs are exported with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``:
the dynamo exporter needs ``onnxscript``, which is not installed), in float32, with dynamic batch
and sequence axes. Causal (and sliding-window) masks are built inside each graph from the sequence
length, so a graph needs only ``(input_ids | hidden, lengths)``. A segment steps the layers through
the model's public API (``EarlyExitLM.rotary``, ``run_layer``, ``head_logits``), as the torch
runners do. Providers: CUDA when ONNX Runtime offers it and a GPU is present, else CPU. No context
sharing: each candidate is a full prompt.

Collaborative soft tokens: for a model with a projector, the first graph takes ``inputs_embeds``
(B, T, H) instead of ids; the engine embeds the tokens and projects the soft-token vectors in
PyTorch (one embedding lookup and a two-layer MLP) and hands ONNX Runtime the embeddings.

    engine = OnnxEngine.from_loaded(load_ranker(path), export_dir=Path("/tmp/onnx"))
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from exitrank.artifacts import file_sha256
from ranker_svc.artifact import LoadedRanker
from ranker_svc.engine import full_prompts, predict_in_batches
from ranker_svc.exits import ExitPolicy, run_exits
from ranker_svc.model import EarlyExitLM, right_padded_lengths

log = logging.getLogger(__name__)
OPSET = 17
STAMP = "segments.json"


class Segment(nn.Module):
    """Decoder layers ``[start, stop)`` (0-based start, 1-based stop) and the head answering at ``stop``."""

    def __init__(self, model: EarlyExitLM, start: int, stop: int, *, from_embeds: bool = False) -> None:
        super().__init__()
        self.model, self.start, self.stop = model, start, stop
        self.from_ids = start == 0 and not from_embeds
        config = model.causal_lm.config
        self.window = getattr(config, "sliding_window", None) or 0

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        hidden = model.causal_lm.get_input_embeddings()(x) if self.from_ids else x  # (B, T, H)
        t = hidden.shape[1]
        positions = torch.arange(t, device=hidden.device)[None]  # (1, T)
        rotary = model.rotary(hidden, positions)
        index = torch.arange(t, device=hidden.device)
        causal = index[None, :] <= index[:, None]  # (T, T) True = attend
        masks = {"full_attention": causal[None, None]}
        if self.window:
            masks["sliding_attention"] = (causal & (index[None, :] > index[:, None] - self.window))[None, None]
        for i in range(self.start, self.stop):
            hidden = model.run_layer(i, hidden, mask=masks[model.layer_kinds[i]], positions=positions, rotary=rotary)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]  # (B, H)
        logits = model.head_logits(self.stop, last)  # (B, 2)
        return (logits,) if self.stop == model.num_layers else (hidden, logits)


def segment_bounds(answer_layers: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, stop)] covering 0..N: one segment per answering layer."""
    starts = [0, *answer_layers[:-1]]
    return list(zip(starts, answer_layers))


def export_segments(model: EarlyExitLM, export_dir: Path, *, stamp: dict) -> list[Path]:
    """Exports every segment of ``model`` (a float32 copy) to ``export_dir``; reuses a matching export."""
    export_dir.mkdir(parents=True, exist_ok=True)
    bounds = segment_bounds(model.answer_layers)
    paths = [export_dir / f"segment_{i}_{start}_{stop}.onnx" for i, (start, stop) in enumerate(bounds)]
    from_embeds = model.collab is not None
    stamp_path = export_dir / STAMP
    if cached_export(stamp_path, paths, stamp):
        return paths
    fp32 = model if _dtype(model) == torch.float32 else copy.deepcopy(model).float()
    fp32 = fp32.to("cpu").eval()
    ids = torch.randint(0, 10, (2, 8))
    lengths = torch.tensor([8, 5])
    hidden = fp32.causal_lm.get_input_embeddings()(ids).detach()
    for path, (start, stop) in zip(paths, bounds):
        segment = Segment(fp32, start, stop, from_embeds=from_embeds).eval()
        last = stop == fp32.num_layers
        name = "input_ids" if segment.from_ids else "inputs_embeds" if start == 0 else "hidden"
        outputs = ["logits"] if last else ["hidden_out", "logits"]
        axes = {name: {0: "batch", 1: "tokens"}, "lengths": {0: "batch"}, "logits": {0: "batch"}}
        if not last:
            axes["hidden_out"] = {0: "batch", 1: "tokens"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(segment, (ids if segment.from_ids else hidden, lengths), str(path), input_names=[name, "lengths"],
                              output_names=outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    stamp_path.write_text(json.dumps({**stamp, "sha256": {p.name: file_sha256(p) for p in paths}}))
    return paths


def cached_export(stamp_path: Path, paths: list[Path], stamp: dict) -> bool:
    """True when ``paths`` are the export ``stamp`` describes, byte for byte: the stamp matches and
    every graph's sha256 is the one recorded when it was exported (a cache directory is verified like
    an artifact; anything else, a graph edited or swapped included, is exported again)."""
    try:
        stored = json.loads(stamp_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    hashes = stored.pop("sha256", None) if isinstance(stored, dict) else None
    if stored != stamp or not isinstance(hashes, dict):
        return False
    return all(p.is_file() and hashes.get(p.name) == file_sha256(p) for p in paths)


def onnx_providers() -> list[str]:
    """CUDA first when ONNX Runtime has it and a GPU is present, else CPU."""
    gpu = torch.cuda.is_available() or Path("/dev/nvidiactl").exists()
    if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxEngine:
    """ONNX Runtime sessions, one per segment, driven segment by segment with early exits.

    Args:
        paths: the segment graphs, in depth order.
        answer_layers: the 1-based layer each segment ends at (the last is the model's depth).
        pad_id: token id for padding full prompts.
        num_threads: ONNX Runtime intra-op threads (0: torch's current setting).
        embedder: for graphs that start from embeddings, ``(ids, soft) -> (B, T, H)`` (the model's
            :meth:`~ranker_svc.model.EarlyExitLM.embed`); None: the first graph takes ids.
    """

    name = "onnx"
    shares_context = False

    def __init__(self, *, paths: Sequence[Path], answer_layers: Sequence[int], pad_id: int = 0,
                 num_threads: int = 0, embedder=None) -> None:
        if len(paths) != len(answer_layers):
            raise ValueError("one segment graph per answering layer")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.providers = onnx_providers()
        self.sessions = [ort.InferenceSession(str(p), options, providers=self.providers) for p in paths]
        self.answer_layers = tuple(answer_layers)
        self.num_layers = self.answer_layers[-1]
        self.pad_id = pad_id
        self.embedder = embedder

    @classmethod
    def from_loaded(cls, loaded: LoadedRanker, *, export_dir: Path | None = None, num_threads: int = 0) -> "OnnxEngine":
        """Exports ``loaded.model`` (cached under ``export_dir`` by artifact version) and opens the sessions."""
        model = loaded.model
        export_dir = Path(export_dir) if export_dir else Path(tempfile.mkdtemp(prefix="exitrank-onnx-"))
        stamp = {"version": loaded.version, "answer_layers": list(model.answer_layers), "opset": OPSET,
                 "from_embeds": model.collab is not None}
        paths = export_segments(model, export_dir / loaded.version, stamp=stamp)
        log.info("onnx engine: %d segments in %s, providers %s", len(paths), export_dir, onnx_providers())
        embedder = None
        if model.collab is not None:
            def embedder(ids: Tensor, soft: Tensor | None) -> np.ndarray:
                with torch.inference_mode():
                    return model.embed(ids.to(model.device), soft).float().cpu().numpy()
        return cls(paths=paths, answer_layers=model.answer_layers, pad_id=loaded.tokenizer.pad_token_id or 0,
                   num_threads=num_threads, embedder=embedder)

    def predict(self, input_ids: Tensor, attention_mask: Tensor, policy: ExitPolicy, *,
                compaction: bool = True, soft: Tensor | None = None) -> tuple[Tensor, Tensor]:
        runner = _OnnxRunner(self, input_ids, attention_mask, soft)
        return run_exits(runner, batch_size=input_ids.shape[0], answer_layers=self.answer_layers, policy=policy,
                         compaction=compaction)

    def predict_shared(self, contexts: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]],
                       groups: Sequence[int], policy: ExitPolicy, *, max_rows: int,
                       soft: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Full prompts (context + suffix per row): the graphs take no KV cache."""
        return predict_in_batches(self, full_prompts(contexts, suffixes, groups), policy, batch_size=max_rows,
                                  pad_id=self.pad_id, soft=soft)


class _OnnxRunner:
    """:class:`~ranker_svc.exits.ExitRunner` over the segment sessions (NumPy between segments)."""

    def __init__(self, engine: OnnxEngine, input_ids: Tensor, attention_mask: Tensor, soft: Tensor | None = None
                 ) -> None:
        self.engine = engine
        lengths = right_padded_lengths(attention_mask)
        ids = input_ids[:, : int(lengths.max())]
        # ids (or embeddings, for graphs that start from them), later (b, T, H) hidden states
        self.x = engine.embedder(ids, soft) if engine.embedder else ids.cpu().numpy().astype(np.int64)
        self.lengths = lengths.cpu().numpy().astype(np.int64)
        self.segment = 0

    def answer(self, layer: int) -> Tensor:
        while True:
            session = self.engine.sessions[self.segment]
            feeds = {session.get_inputs()[0].name: np.ascontiguousarray(self.x), "lengths": self.lengths}
            outputs = session.run(None, feeds)
            stop = self.engine.answer_layers[self.segment]
            self.segment += 1
            if stop < self.engine.num_layers:
                self.x = outputs[0]
            if stop == layer:
                return torch.from_numpy(outputs[-1]).float().softmax(-1)[:, 0]

    def keep(self, rows: Tensor) -> None:
        keep = rows.cpu().numpy()
        self.lengths = self.lengths[keep]
        self.x = self.x[keep][:, : int(self.lengths.max())]


def _dtype(model: EarlyExitLM) -> torch.dtype:
    return model.causal_lm.get_output_embeddings().weight.dtype
