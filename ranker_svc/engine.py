"""Engines: the runtimes that execute the early-exit model for the ``Scorer`` (torch, DeepSpeed, ONNX).

The ``Scorer`` (``ranker_svc.scoring``) only sees the :class:`Engine` protocol: right-padded prompts in, CTR and exit layer
per row out; or R shared contexts plus candidate suffixes in. Every engine walks its batch through
the same :func:`ranker_svc.exits.run_exits`, so the exit decisions do not depend on the engine.

- ``torch`` (:class:`TorchEngine`): :class:`~ranker_svc.model.EarlyExitLM` in eager PyTorch through
  the runners of ``ranker_svc.runners``, with per-row compaction and one context pass per request
  (``ranker_svc.prefix``).
- ``deepspeed`` (:func:`deepspeed_engine`): the same layer loop over the module that
  ``deepspeed.init_inference`` returns (tensor parallelism across GPUs; kernel injection off, since
  fused injected blocks cannot be stepped layer by layer). Launch with ``deepspeed --num_gpus N``
  for N > 1.
- ``onnx`` (``ranker_svc.onnx_engine.OnnxEngine``, which builds on this module's helpers): one ONNX
  graph per segment between answering layers, run by ONNX Runtime segment by segment; full prompts
  (no KV reuse across candidates).

Which engine serves is the server's choice (``ranker_svc.server.build_engine``), so this module
never imports the ONNX one.

    engine = TorchEngine(model=loaded.model)
    ctr, layer = engine.predict_shared([context_ids], suffix_ids, [0] * len(suffix_ids), policy, max_rows=256)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from ranker_svc.artifact import LoadedRanker
from ranker_svc.exits import ExitPolicy
from ranker_svc.model import EarlyExitLM, pad_right
from ranker_svc.runners import context_encoder, predict, predict_suffixes


class Engine(Protocol):
    """What the ranker core needs from a model runtime."""

    name: str
    num_layers: int
    answer_layers: tuple[int, ...]
    shares_context: bool  # True: predict_shared encodes each context once

    def predict(self, input_ids: Tensor, attention_mask: Tensor, policy: ExitPolicy, *,
                compaction: bool = True, soft: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, T) right-padded prompts -> (ctr (B,) float32, exit_layer (B,) long) on the CPU.

        ``soft``: (n, d) vectors of the prompts' virtual ids (collaborative soft tokens), or None."""

    def predict_shared(self, contexts: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]],
                       groups: Sequence[int], policy: ExitPolicy, *, max_rows: int,
                       soft: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Rows ``contexts[groups[i]] + suffixes[i]`` (groups nondecreasing), at most ``max_rows`` per pass."""


class TorchEngine:
    """:class:`EarlyExitLM` in PyTorch: per-row compaction and one context pass per request.

    Args:
        model: the early-exit model (in eval mode, on its device).
        name: reported in logs and benchmarks.
    """

    shares_context = True

    def __init__(self, *, model: EarlyExitLM, name: str = "torch") -> None:
        self.model = model
        self.name = name
        self.num_layers = model.num_layers
        self.answer_layers = model.answer_layers

    def predict(self, input_ids: Tensor, attention_mask: Tensor, policy: ExitPolicy, *,
                compaction: bool = True, soft: Tensor | None = None) -> tuple[Tensor, Tensor]:
        device = self.model.device
        return predict(self.model, input_ids.to(device), attention_mask.to(device), policy, compaction=compaction,
                       soft=soft)

    def predict_shared(self, contexts: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]],
                       groups: Sequence[int], policy: ExitPolicy, *, max_rows: int,
                       soft: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One (lazy) pass over all contexts, shared by the suffix rows' chunks of ``max_rows``."""
        context = context_encoder(self.model, contexts, soft)
        ctr, layer = [], []
        for start in range(0, len(suffixes), max_rows):
            c, l = predict_suffixes(self.model, context, suffixes[start : start + max_rows],
                                    groups[start : start + max_rows], policy, soft=soft)
            ctr.append(c)
            layer.append(l)
        return torch.cat(ctr), torch.cat(layer)


def full_prompts(contexts: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]],
                 groups: Sequence[int]) -> list[list[int]]:
    """The concatenated prompt of every suffix row (for engines without context sharing)."""
    return [list(contexts[g]) + list(s) for g, s in zip(groups, suffixes)]


def predict_in_batches(engine: Engine, prompts: Sequence[Sequence[int]], policy: ExitPolicy, *,
                       batch_size: int, pad_id: int = 0, compaction: bool = True,
                       soft: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scores token-id prompts in batches of similar length (fewer pads); results in input order."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    ctr = torch.empty(len(prompts), dtype=torch.float32)
    layer = torch.empty(len(prompts), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, mask = pad_right([prompts[i] for i in chunk], pad_id)
        c, l = engine.predict(input_ids, mask, policy, compaction=compaction, soft=soft)
        ctr[chunk], layer[chunk] = c, l
    return ctr, layer


def serving_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def deepspeed_model(model: EarlyExitLM, *, tensor_parallel: int = 1, device: str = "auto") -> EarlyExitLM:
    """``model``'s decoder under ``deepspeed.init_inference`` with the same heads (imported only when asked for).

    ``dtype`` is passed explicitly (DeepSpeed's default is fp16, which CPUs do not run well) and
    ``replace_with_kernel_inject=False`` keeps transformers' own layers, which the loop steps through.
    """
    import deepspeed  # noqa: PLC0415 - heavy, optional

    dtype = model.causal_lm.get_output_embeddings().weight.dtype
    ds = deepspeed.init_inference(model.causal_lm, dtype=dtype, replace_with_kernel_inject=False,
                                  tensor_parallel={"tp_size": tensor_parallel})
    wrapped = EarlyExitLM(causal_lm=ds.module, yes_token_id=model.yes_token_id, no_token_id=model.no_token_id,
                          exit_layers=model.exit_layers, heads=model.heads, collab=model.collab).eval()
    return wrapped.to(serving_device(device))


def deepspeed_engine(loaded: LoadedRanker, *, tensor_parallel: int = 1, device: str = "auto") -> TorchEngine:
    """The layer loop over ``deepspeed.init_inference(...)``'s module (:func:`deepspeed_model`)."""
    return TorchEngine(model=deepspeed_model(loaded.model, tensor_parallel=tensor_parallel, device=device),
                       name="deepspeed")
