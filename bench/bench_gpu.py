"""``make bench-gpu``: the early-exit ranker on a GPU, on a 7B-shaped decoder with random weights.

Speed does not depend on what the weights say, only on the shapes and on where rows exit, so a
LLaMA-7B-shaped decoder (32 layers, hidden 4096, MLP 11008, 32 heads, vocabulary 32,000: the
paper's Vicuna-7B) is built with random bf16 weights on the device, exit heads at 5, 10, ..., 30
(the paper's section 6 setting), and timed through the same ``EarlyExitLM`` the ranker serves.
Prompts are random token ids of the length of a retrieval-augmented prompt (``--context-tokens``
of instruction, similar users and history, ``--suffix-tokens`` of target item). Every ratio is
measured side by side in one process (arms alternate, medians of ``--repeats`` rounds):

- ``prompts_per_s``: single prompts (the paper's "request", one user-item pair) in batches of
  ``--batch``, at full depth and with every row exiting at each exit layer in turn (a confidence
  policy whose threshold every row meets, from that layer on): the speed-versus-depth curve.
- ``mixed``: a confidence threshold picked on a sample so the rows exit at mixed depths with a
  mean exit layer near ``--target-depth`` of the model; per-row compaction over whole-batch exit
  (the batch runs until its last row settles) and over full depth, with the exit histogram.
  Random heads give no accuracy: the accuracy side of the trade-off is ``make bench-ranker``'s.
- ``rank50``: one request = one user with ``--candidates`` candidates, scored as suffixes over one
  context pass (``ranker_svc.runners.context_encoder`` + ``predict_suffixes``), ``--requests-per-pass``
  requests per batch, against the same rows scored as full prompts.
- ``tflops_achieved`` of the full-depth prompt run (2 x parameters per token plus attention) over
  ``tflops_matmul_peak``, an 8192^3 matmul in the same dtype on the same device.
- ``deepspeed``: the full-depth and mid-depth prompt arms through ``deepspeed.init_inference``
  (tensor parallel over the visible GPUs; kernel injection off), when DeepSpeed imports.
- ``onnxruntime_providers``: what ONNX Runtime offers on the machine, when it imports.

    python bench/bench_gpu.py                                   # 7B shape on cuda, JSON last line
    python bench/bench_gpu.py --preset tiny --device cpu --dtype float32 --repeats 1   # a dry run
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, machine, mixed_depth_policy, say  # noqa: E402
from ranker_svc.exits import ExitPolicy  # noqa: E402
from ranker_svc.model import EarlyExitLM, pad_right  # noqa: E402
from ranker_svc.runners import context_encoder, predict, predict_suffixes  # noqa: E402

PRESETS = {
    # LLaMA-7B / Vicuna-7B (the paper's backbone)
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
}
YES, NO, BOS = 3, 4, 1
FULL = ExitPolicy(disabled=True)


def build_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int) -> EarlyExitLM:
    """A random-weight decoder of ``preset``'s shape with answer-row exit heads at the default layers."""
    torch.manual_seed(seed)
    config = LlamaConfig(**PRESETS[preset], attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            causal_lm = LlamaForCausalLM(config).eval()
            model = EarlyExitLM(causal_lm=causal_lm, yes_token_id=YES, no_token_id=NO)
            for layer, head in list(model.heads.items()):
                model.heads[layer] = head.answer_rows([YES, NO])  # what artifacts serve: 2 rows per head
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def random_ids(rng: random.Random, n: int, length: int, vocab: int, *, bos: bool) -> list[list[int]]:
    return [([BOS] if bos else []) + [rng.randrange(8, vocab) for _ in range(length - int(bos))] for _ in range(n)]


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def side_by_side(arms: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each arm; the arms alternate round by round after one warm-up each."""
    for fn in arms.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            seconds[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in seconds.items()}


def exit_at(layer: int) -> ExitPolicy:
    """Every row exits at the first exit layer >= ``layer`` (max(P, 1-P) >= 0.5 always holds)."""
    return ExitPolicy(criterion="confidence", threshold=0.5, min_layer=layer)


def model_flops(model: EarlyExitLM, tokens: int, keys_per_token: float, layers: int) -> float:
    """Useful FLOPs of ``tokens`` tokens through ``layers`` layers: 2 x params + 4 x d x keys per layer."""
    per_layer = sum(p.numel() for p in model.decoder.layers[0].parameters())
    d = model.causal_lm.config.hidden_size
    return tokens * layers * (2 * per_layer + 4 * d * keys_per_token)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = statistics.median(timed(lambda: a @ b, device) for _ in range(repeats + 2))
    return 2 * n**3 / seconds / 1e12


def bench_prompts(model: EarlyExitLM, args, rng: random.Random, device: torch.device) -> dict:
    """Single prompts in batches: full depth, each exit layer forced, and a mixed-depth policy."""
    length = args.context_tokens + args.suffix_tokens
    vocab = model.causal_lm.config.vocab_size
    batch = pad_right(random_ids(rng, args.batch, length, vocab, bos=True), 0, device)
    with torch.inference_mode():
        p_yes = model.forward_all_exits(*batch).float().softmax(-1)[..., 0]  # (B, E)
    mixed = mixed_depth_policy(p_yes, model.answer_layers, args.target_depth * model.num_layers)
    arms = {"full": lambda: predict(model, *batch, FULL)}
    arms.update({f"exit@{layer}": (lambda p=exit_at(layer): predict(model, *batch, p)) for layer in model.exit_layers})
    arms["mixed"] = lambda: predict(model, *batch, mixed)
    arms["mixed_whole_batch"] = lambda: predict(model, *batch, mixed, compaction=False)
    seconds = side_by_side(arms, device, args.repeats)
    _, layers = predict(model, *batch, mixed)
    rate = {name: args.batch / s for name, s in seconds.items()}
    flops = model_flops(model, args.batch * length, (length + 1) / 2, model.num_layers)
    return {
        "batch": args.batch, "tokens_per_prompt": length,
        "prompts_per_s": {name: round(r, 2) for name, r in rate.items()},
        "exit_speedup_by_layer": {name: round(rate[name] / rate["full"], 3) for name in rate if name.startswith("exit@")},
        "mixed": {"policy": mixed.to_json(), "mean_exit_layer": round(float(layers.float().mean()), 2),
                  "exit_histogram": {str(int(k)): int(v) for k, v in zip(*layers.unique(return_counts=True))},
                  "speedup_over_full": round(rate["mixed"] / rate["full"], 3),
                  "compaction_speedup": round(rate["mixed"] / rate["mixed_whole_batch"], 3)},
        "tflops_achieved_full": round(flops / seconds["full"] / 1e12, 1),
    }


def bench_rank50(model: EarlyExitLM, args, rng: random.Random, device: torch.device, r: int) -> dict:
    """``r`` requests of ``--candidates`` candidates a pass: one context pass + suffixes against full prompts."""
    vocab = model.causal_lm.config.vocab_size
    c = args.candidates
    contexts = random_ids(rng, r, args.context_tokens, vocab, bos=True)
    suffixes = random_ids(rng, r * c, args.suffix_tokens, vocab, bos=False)
    groups = [i // c for i in range(r * c)]
    full_prompts = [contexts[g] + s for g, s in zip(groups, suffixes)]
    batches = [pad_right(full_prompts[i : i + args.batch], 0, device) for i in range(0, len(full_prompts), args.batch)]

    def shared(policy: ExitPolicy):
        return predict_suffixes(model, context_encoder(model, contexts), suffixes, groups, policy)

    def naive():
        return [predict(model, *b, FULL) for b in batches]

    seconds = side_by_side({"shared": lambda: shared(FULL), "full_prompts": naive,
                            "shared_exit@mid": lambda: shared(exit_at(model.exit_layers[len(model.exit_layers) // 2]))},
                           device, args.repeats)
    return {"candidates": c, "requests_per_pass": r,
            "requests_per_s": {name: round(r / s, 3) for name, s in seconds.items()},
            "pass_ms": {name: round(s * 1e3, 1) for name, s in seconds.items()},
            "context_sharing_speedup": round(seconds["full_prompts"] / seconds["shared"], 2)}


def bench_deepspeed(model: EarlyExitLM, args, rng: random.Random, device: torch.device) -> dict:
    """The full-depth and mid-depth prompt arms through DeepSpeed inference beside the plain model."""
    try:
        from ranker_svc.engine import deepspeed_model  # noqa: PLC0415 - optional

        ds = deepspeed_model(model, tensor_parallel=max(1, torch.cuda.device_count()), device=str(device))
    except Exception as error:  # noqa: BLE001 - reported, not fatal: the other figures stand
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    length = args.context_tokens + args.suffix_tokens
    batch = pad_right(random_ids(rng, args.batch, length, model.causal_lm.config.vocab_size, bos=True), 0, device)
    mid = exit_at(model.exit_layers[len(model.exit_layers) // 2])
    ctr_t, _ = predict(model, *batch, FULL)
    ctr_d, _ = predict(ds, *batch, FULL)
    seconds = side_by_side({"torch_full": lambda: predict(model, *batch, FULL), "deepspeed_full": lambda: predict(ds, *batch, FULL),
                            "deepspeed_mid": lambda: predict(ds, *batch, mid)}, device, args.repeats)
    return {"prompts_per_s": {name: round(args.batch / s, 2) for name, s in seconds.items()},
            "max_ctr_difference_vs_torch": float((ctr_t - ctr_d).abs().max())}


def onnxruntime_providers() -> list[str] | str:
    try:
        import onnxruntime  # noqa: PLC0415 - optional

        return onnxruntime.get_available_providers()
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context-tokens", type=int, default=320)
    p.add_argument("--suffix-tokens", type=int, default=32)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--requests-per-pass", type=int, default=4)
    p.add_argument("--target-depth", type=float, default=0.5, help="mean exit layer of the mixed policy / depth")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-deepspeed", action="store_true")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench_gpu: no CUDA device here; run it where there is one, or pass --device cpu --preset tiny\n")
    started = time.perf_counter()
    rng = random.Random(args.seed)
    model = build_model(args.preset, device, dtype, args.seed)
    say(f"built {args.preset} on {device} in {time.perf_counter() - started:.1f} s")
    result = {"preset": args.preset, "dtype": args.dtype, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "layers": model.num_layers, "exit_layers": list(model.exit_layers),
              "parameters_billions": round(sum(p.numel() for p in model.causal_lm.parameters()) / 1e9, 2)}
    result["prompts"] = bench_prompts(model, args, rng, device)
    say(f"prompts: {result['prompts']['prompts_per_s']}")
    result["rank50"] = bench_rank50(model, args, rng, device, args.requests_per_pass)
    result["rank50_one_request"] = bench_rank50(model, args, rng, device, 1)  # its pass_ms: a lone request's latency
    say(f"rank50: {result['rank50']} {result['rank50_one_request']}")
    peak = matmul_tflops(device, dtype, 8192 if device.type == "cuda" else 512)
    result["tflops_matmul_peak"] = float(f"{peak:.3g}")  # 3 significant digits: a CPU dry run is ~0.01
    result["utilisation"] = round(result["prompts"]["tflops_achieved_full"] / peak, 3)
    if not args.no_deepspeed:
        result["deepspeed"] = bench_deepspeed(model, args, rng, device)
        say(f"deepspeed: {result['deepspeed']}")
    result["onnxruntime_providers"] = onnxruntime_providers()
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    result["machine"] = machine()
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    emit(result)


if __name__ == "__main__":
    main()
