"""The ranker artifact ``ARTIFACTS/ranker/``: save, stamp and load (safetensors only, nothing unpickled).

::

    ranker/config.json, model.safetensors, generation_config.json   transformers save_pretrained
    ranker/tokenizer.json, tokenizer_config.json, ...                tokenizer save_pretrained
    ranker/exit_heads.safetensors    "<layer>.norm.weight" (H,), "<layer>.proj.weight" (2, H) per exit head:
                                     the "Yes" and "No" rows only (all serving needs; older artifacts
                                     with (V, H) heads still load). Absent until stage 2: heads then
                                     start as copies of the final head's answer rows.
    ranker/collab.safetensors        the collaborative soft-token projector (``ranker_svc.collab``),
                                     when the prompt's ``collab`` mode is not "none"
    ranker/exitrank.json             {format, version, arch, num_layers, exit_layers, yes_token_id,
                                      no_token_id, heads_trained, head_rows, policy, policy_dtype,
                                      prompt, metrics, collab: {mode, dim, token_id, embedding_version, layout}}

A ranker with soft tokens is tied to the LightGCN version its projector was trained on
(``collab.embedding_version``): vectors of another version live in another space, so serving
asks the retriever for exactly that version and refuses to score with any other.

``policy_dtype`` is the dtype the policy was calibrated in (``trainer calibrate --dtype``): exit
decisions depend on small probability differences, so serving should run in that dtype, and
``load_ranker(dtype=None)`` does.

``version`` is ``<arch>-<sha256 of the weights and policy, 12 hex>``: it changes whenever scores can.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from exitrank.types import HistoryItem, NeighborContext, UserContext
from ranker_svc.collab import COLLAB_TOKEN, CollabProjector
from ranker_svc.errors import ArtifactError
from ranker_svc.exits import ExitPolicy
from ranker_svc.model import EarlyExitLM, ExitHead
from ranker_svc.prompt import PromptBuilder, PromptConfig

FORMAT = 1
META_FILE = "exitrank.json"
HEADS_FILE = "exit_heads.safetensors"
COLLAB_FILE = "collab.safetensors"
# soft-token layout 2: the target's slot ends the prompt and reads user * item (ranker_svc.collab)
COLLAB_LAYOUT = 2


@dataclass
class LoadedRanker:
    """Everything serving needs, read from one artifact directory."""

    model: EarlyExitLM
    tokenizer: PreTrainedTokenizerBase
    prompt: PromptBuilder
    policy: ExitPolicy
    version: str
    meta: dict
    context_split_ok: bool = True  # context + suffix tokenise as the full prompt (shared-context scoring)

    @property
    def collab(self) -> dict | None:
        """``{mode, dim, token_id, embedding_version}`` of the soft tokens, or None (text only)."""
        return self.meta.get("collab")


def save_ranker(
    ranker_dir: Path,
    *,
    causal_lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: PromptConfig,
    exit_layers: list[int],
    policy: ExitPolicy,
    metrics: dict | None = None,
    collab: CollabProjector | None = None,
    embedding_version: str = "",
) -> dict:
    """Writes a backbone artifact (no trained heads yet); returns its ``exitrank.json``.

    ``collab``: the soft-token projector, trained on ``embedding_version``'s vectors (needed when
    ``prompt.collab`` is not "none").
    """
    ranker_dir = Path(ranker_dir)
    ranker_dir.mkdir(parents=True, exist_ok=True)
    causal_lm.save_pretrained(ranker_dir, safe_serialization=True)
    tokenizer.save_pretrained(ranker_dir)
    (ranker_dir / HEADS_FILE).unlink(missing_ok=True)
    (ranker_dir / COLLAB_FILE).unlink(missing_ok=True)
    yes_id, no_id = check_answer_tokens(tokenizer, PromptBuilder(config=prompt))
    meta = {
        "format": FORMAT,
        "arch": causal_lm.config.model_type,
        "num_layers": causal_lm.config.num_hidden_layers,
        "exit_layers": list(exit_layers),
        "yes_token_id": yes_id,
        "no_token_id": no_id,
        "heads_trained": False,
        "policy": policy.to_json(),
        "prompt": prompt.to_json(),
        "metrics": metrics or {},
    }
    if prompt.collab != "none":
        if collab is None or not embedding_version:
            raise ArtifactError(f"prompt.collab={prompt.collab!r} needs the projector and its embedding version")
        save_file({k: v.detach().cpu().contiguous() for k, v in collab.state_dict().items()},
                  str(ranker_dir / COLLAB_FILE))
        if collab.token_id != collab_token_id(tokenizer):
            raise ArtifactError(f"the projector's token id {collab.token_id} is not {COLLAB_TOKEN!r} in the tokenizer")
        meta["collab"] = {"mode": prompt.collab, "dim": collab.dim, "embedding_version": embedding_version,
                          "token_id": collab.token_id, "layout": COLLAB_LAYOUT}
    write_meta(ranker_dir, meta)
    return stamp_version(ranker_dir)


def collab_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of :data:`~ranker_svc.collab.COLLAB_TOKEN`, which must be a single token.

    Raises:
        ArtifactError: the tokenizer splits it (add it as a special token first).
    """
    ids = tokenizer(COLLAB_TOKEN, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ArtifactError(f"{COLLAB_TOKEN!r} is {len(ids)} tokens in this tokenizer; add it as a special token")
    return ids[0]


def save_heads(ranker_dir: Path, model: EarlyExitLM, *, metrics: dict | None = None) -> dict:
    """Writes the heads' "Yes"/"No" rows to ``exit_heads.safetensors``; records their layers in ``exitrank.json``."""
    answer = model.answer_ids.tolist()
    tensors = {}
    for layer, head in model.heads.items():
        for key, value in head.answer_rows(answer).state_dict().items():
            tensors[f"{layer}.{key}"] = value.detach().to("cpu").contiguous()
    save_file(tensors, str(Path(ranker_dir) / HEADS_FILE))
    meta = read_meta(ranker_dir)
    meta["exit_layers"] = list(model.exit_layers)
    meta["heads_trained"] = True
    meta["head_rows"] = "answer"
    if metrics is not None:
        meta.setdefault("metrics", {})["heads"] = metrics
    write_meta(ranker_dir, meta)
    return stamp_version(ranker_dir)


def read_meta(ranker_dir: Path) -> dict:
    path = Path(ranker_dir) / META_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: train the ranker first "
                            f"(`trainer fit --data DATA --out {Path(ranker_dir).parent}`)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:  # truncated or corrupted: name the file, not just the parse error
        raise ArtifactError(f"{path} is not valid JSON ({exc}): the artifact is corrupted; re-run the trainer") from exc


def write_meta(ranker_dir: Path, meta: dict) -> None:
    """Atomic replace, so a reader never sees half a file."""
    path = Path(ranker_dir) / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path)


def stamp_version(ranker_dir: Path) -> dict:
    """Sets ``version`` from the weight files and the policy; returns the updated meta."""
    ranker_dir = Path(ranker_dir)
    meta = read_meta(ranker_dir)
    digest = hashlib.sha256()
    for path in sorted(ranker_dir.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(json.dumps(meta["policy"], sort_keys=True).encode())
    if meta.get("policy_dtype"):
        digest.update(meta["policy_dtype"].encode())
    meta["version"] = f"{meta['arch']}-{digest.hexdigest()[:12]}"
    write_meta(ranker_dir, meta)
    return meta


def check_answer_tokens(tokenizer: PreTrainedTokenizerBase, prompt: PromptBuilder) -> tuple[int, int]:
    """The ids of "Yes" and "No" as the token right after a prompt; refuses anything else.

    Raises:
        ArtifactError: an answer is several tokens, merges with the prompt's end, is followed by a
            token the tokenizer appends (EOS), or both answers are the same token.
    """
    probe = UserContext(
        user_id="probe",
        history=(HistoryItem("i1", "A probe title", 5.0),),
        neighbors=(NeighborContext("u2", 0.9, (HistoryItem("i2", "Another title", 1.0),)),),
    )
    text = prompt.full_text(probe, "The target title")
    base = tokenizer(text)["input_ids"]
    ids = []
    for answer in (prompt.config.answer_yes, prompt.config.answer_no):
        full = tokenizer(text + answer)["input_ids"]
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            raise ArtifactError(
                f"answer {answer!r} is not a single token after the prompt (prompt ends "
                f"{tokenizer.convert_ids_to_tokens(base[-2:])}, with answer "
                f"{tokenizer.convert_ids_to_tokens(full[len(base) - 2:])}); add it as a token "
                "(trainer.lm.ensure_answer_tokens) or change prompt.answer_yes/answer_no"
            )
        ids.append(full[-1])
    if ids[0] == ids[1]:
        raise ArtifactError(f"'Yes' and 'No' map to the same token id {ids[0]}")
    return ids[0], ids[1]


def check_context_split(tokenizer: PreTrainedTokenizerBase, prompt: PromptBuilder) -> bool:
    """Whether ``tokens(context) + tokens(suffix) == tokens(context + suffix)`` on probe prompts.

    Shared-context scoring encodes the two parts separately; a tokenizer that merges across the
    boundary (or appends EOS) would make it score a different token sequence, so the ranker then
    scores full prompts instead.
    """
    contexts = [
        UserContext(user_id="probe"),
        UserContext(user_id="probe", history=(HistoryItem("i1", "A probe title...", 5.0),),
                    neighbors=(NeighborContext("u2", 0.9, (HistoryItem("i2", "Another 'title' 42", 1.0),)),)),
    ]
    titles = ["The target title", "x", "Ünïcødé & ‘quotes’ – 1999", "   spaced   out   "]
    for ctx in contexts:
        context = tokenizer(prompt.context_text(ctx))["input_ids"]
        for title in titles:
            suffix = tokenizer(prompt.target_text(title), add_special_tokens=False)["input_ids"]
            if context + suffix != tokenizer(prompt.full_text(ctx, title))["input_ids"]:
                return False
    return True


def load_ranker(ranker_dir: Path, *, dtype: torch.dtype | None = None) -> LoadedRanker:
    """Loads ``ranker_dir`` in eval mode, checking tokens and heads.

    ``dtype`` None: the dtype the policy was calibrated in (``policy_dtype``), else float32.

    Raises:
        ArtifactError: files missing, answer tokens not single/distinct or not those recorded,
            heads not matching the recorded exit layers.
    """
    ranker_dir = Path(ranker_dir)
    meta = read_meta(ranker_dir)
    prompt = PromptBuilder(config=PromptConfig.from_json(meta.get("prompt", {})))
    dtype = dtype or getattr(torch, meta.get("policy_dtype") or "float32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(ranker_dir, local_files_only=True)
        # use_safetensors: a directory holding only pytorch_model.bin (a pickle) is refused, not unpickled
        causal_lm = AutoModelForCausalLM.from_pretrained(
            ranker_dir, local_files_only=True, dtype=dtype, use_safetensors=True
        )
    except SafetensorError as exc:  # a truncated or corrupted weights file
        files = ", ".join(f.name for f in sorted(ranker_dir.glob("model*.safetensors"))) or "model.safetensors"
        raise ArtifactError(f"cannot load the model weights {files} in {ranker_dir}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load the model/tokenizer in {ranker_dir}: {exc}") from exc
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    yes_id, no_id = check_answer_tokens(tokenizer, prompt)
    if (yes_id, no_id) != (meta["yes_token_id"], meta["no_token_id"]):
        raise ArtifactError(
            f"{META_FILE} records yes/no ids {meta['yes_token_id']}/{meta['no_token_id']} but the "
            f"tokenizer gives {yes_id}/{no_id}: the tokenizer files do not belong to this model"
        )
    causal_lm.eval()
    heads = _load_heads(ranker_dir, causal_lm, meta["exit_layers"], (yes_id, no_id))
    model = EarlyExitLM(
        causal_lm=causal_lm, yes_token_id=yes_id, no_token_id=no_id, exit_layers=meta["exit_layers"], heads=heads,
        collab=_load_collab(ranker_dir, meta, tokenizer, prompt.config.collab, causal_lm),
    ).eval()
    return LoadedRanker(
        model=model,
        tokenizer=tokenizer,
        prompt=prompt,
        policy=ExitPolicy.from_json(meta.get("policy", {})),
        version=meta["version"],
        meta=meta,
        context_split_ok=check_context_split(tokenizer, prompt),
    )


def _load_collab(ranker_dir: Path, meta: dict, tokenizer, mode: str, causal_lm: PreTrainedModel
                 ) -> CollabProjector | None:
    """The soft-token projector the prompt's ``collab`` mode needs (None for text-only prompts)."""
    recorded = meta.get("collab")
    if mode == "none":
        return None
    if not recorded or recorded.get("mode") != mode or not (ranker_dir / COLLAB_FILE).is_file():
        raise ArtifactError(f"the prompt uses collab={mode!r} but {ranker_dir} holds no matching {COLLAB_FILE}")
    if recorded.get("layout", 1) != COLLAB_LAYOUT:
        raise ArtifactError(f"{ranker_dir} was trained with soft-token layout {recorded.get('layout', 1)} (the "
                            f"target's slot after its title, no user*item term); this ranker reads layout "
                            f"{COLLAB_LAYOUT}: retrain it with `trainer tune`")
    if collab_token_id(tokenizer) != recorded["token_id"]:
        raise ArtifactError(f"{COLLAB_TOKEN!r} is not token {recorded['token_id']} in the tokenizer of {ranker_dir}")
    projector = CollabProjector(int(recorded["dim"]), causal_lm.config.hidden_size, token_id=recorded["token_id"])
    try:
        projector.load_state_dict(load_file(str(ranker_dir / COLLAB_FILE)))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ArtifactError(f"cannot load {ranker_dir / COLLAB_FILE}: {exc}") from exc
    return projector.to(causal_lm.get_input_embeddings().weight.dtype).eval()


def _load_heads(ranker_dir: Path, causal_lm: PreTrainedModel, exit_layers: list[int],
                answer_ids: tuple[int, int]) -> nn.ModuleDict:
    """Answer-row heads; from ``exit_heads.safetensors`` when present (full-vocabulary files are cut to the rows)."""
    heads = nn.ModuleDict({str(layer): ExitHead.from_final(causal_lm, rows=answer_ids) for layer in exit_layers})
    path = ranker_dir / HEADS_FILE
    if not path.is_file():  # stage 1 artifact: heads are copies of the final head
        return heads
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc}): the artifact is corrupted") from exc
    dtype = causal_lm.get_output_embeddings().weight.dtype
    rows = torch.tensor(answer_ids)
    vocab = causal_lm.get_output_embeddings().out_features
    for key, value in state.items():
        if key.endswith(("proj.weight", "proj.bias")) and value.shape[0] == vocab and vocab != len(answer_ids):
            state[key] = value[rows]  # a full-vocabulary head from an older artifact
    try:
        heads.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path} does not match exit_layers {exit_layers}: {exc}") from exc
    return heads
