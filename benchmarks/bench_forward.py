"""Scoring throughput: makemost_jax `forward` vs Hugging Face PyTorch eager, same weights.

One process, one set of random weights per shape (built with PyTorch, loaded into
JAX through the real HF mapping), warm-up excluded, JAX and PyTorch calls
interleaved; the speed-up is the median of the pairwise ratios (PyTorch time / JAX
time), printed last. Results (JSON + a Markdown table, with the machine described)
go to `benchmarks/results/`.

On a GPU the same script also measures the card's bf16 matmul rate and reports
model FLOPs utilisation (MFU) of both frameworks against it.

Example:
    python benchmarks/bench_forward.py                        # CPU, float32, batch 2 x 256
    python benchmarks/bench_forward.py --dtype bfloat16 --batch 16 --length 1024   # GPU
    python benchmarks/bench_forward.py --shapes families --tag cpu_families       # one row per family
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import command_line, machine, median_ms, report_row

from makemost_jax.models import forward, from_hf_config, params_from_hf

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    "gpt2-small": lambda: transformers.GPT2Config(attn_implementation="sdpa"),
    # The embedded default model's architecture (SmolLM2-135M), random weights.
    "smollm2-135m": lambda: transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        attn_implementation="sdpa"),
}
# One ~100M-parameter-class shape per family (random weights, each family's own features
# switched on: windows shorter than the sequence, soft-capping, partial rotary, projections),
# so that no family is a slow path: `--shapes families`.
_FAMILY = {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
               "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048,
               "attn_implementation": "sdpa"}
FAMILY_SHAPES = {
    "mistral": lambda: transformers.MistralConfig(**_FAMILY, sliding_window=128),
    "qwen2": lambda: transformers.Qwen2Config(**_FAMILY, use_sliding_window=True, sliding_window=128,
                                              max_window_layers=4),
    "qwen3": lambda: transformers.Qwen3Config(**_FAMILY, head_dim=64),
    "gemma": lambda: transformers.GemmaConfig(**_FAMILY, head_dim=64),
    "gemma2": lambda: transformers.Gemma2Config(**{**_FAMILY, "attn_implementation": "eager"}, head_dim=64,
                                                sliding_window=128, query_pre_attn_scalar=64),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_FAMILY, head_dim=64, sliding_window=128,
                                                         query_pre_attn_scalar=64),
    "phi3": lambda: transformers.Phi3Config(**_FAMILY, partial_rotary_factor=0.75, pad_token_id=0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**{k: v for k, v in _FAMILY.items() if k != "num_key_value_heads"},
                                                   rotary_pct=0.25),
    "opt": lambda: transformers.OPTConfig(vocab_size=32000, hidden_size=512, ffn_dim=1536, num_hidden_layers=8,
                                          num_attention_heads=8, max_position_embeddings=2048,
                                          word_embed_proj_dim=256, attn_implementation="sdpa"),
}
SHAPES.update(FAMILY_SHAPES)


def forward_flops(cfg, batch: int, length: int) -> float:
    """Matmul FLOPs of one scoring forward (projections, attention, LM head)."""
    d, f, n_layers = cfg.d_model, cfg.d_ff, cfg.n_layers
    qkvo = 2 * d * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + 2 * cfg.n_heads * cfg.head_dim * d
    mlp = 2 * d * f * (3 if cfg.mlp.gated else 2)
    attention = 2 * 2 * length * cfg.n_heads * cfg.head_dim  # scores + weighted sum, full T x T
    head = 2 * d * cfg.vocab_size
    return batch * length * (n_layers * (qkvo + mlp + attention) + head)


def matmul_rate(dtype, n: int = 8192, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matmul in JAX on the default device."""
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / (median_ms(lambda: mm(a).block_until_ready(), repeats, warmup=1) / 1e3)


def bench_shape(name: str, dtype: str, batch: int, length: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    hf_config = SHAPES[name]()
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    tensors = {k: v.float().numpy() for k, v in model.state_dict().items()}
    cfg = from_hf_config(hf_config.to_dict())
    jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    params = params_from_hf(cfg, tensors, dtype=jax_dtype)
    model = model.to(device=device, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])

    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    tokens_jax = jnp.asarray(tokens)
    tokens_torch = torch.tensor(tokens, dtype=torch.long, device=device)
    score = jax.jit(lambda p, t: forward(p, t).logits)

    def run_jax():
        return score(params, tokens_jax).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            out = model(tokens_torch).logits
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    ours, ref = np.asarray(run_jax(), np.float32), run_torch().float().cpu().numpy()  # warm-up
    max_diff = float(np.abs(ours - ref).max())
    run_jax(), run_torch()
    jax_times, torch_times = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        t0 = time.perf_counter()
        run_jax()
        jax_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_torch()
        torch_times.append(time.perf_counter() - t0)
    ratios = [t / j for j, t in zip(jax_times, torch_times)]
    n_tokens = batch * length
    flops = forward_flops(cfg, batch, length)
    return {
        "shape": name, "dtype": dtype, "batch": batch, "length": length, "repeats": repeats,
        "jax_median_s": statistics.median(jax_times), "torch_median_s": statistics.median(torch_times),
        "jax_tokens_per_s": n_tokens / statistics.median(jax_times),
        "torch_tokens_per_s": n_tokens / statistics.median(torch_times),
        "speedup_median_pairwise": statistics.median(ratios),
        "model_tflop_per_forward": flops / 1e12,
        "jax_tflops": flops / statistics.median(jax_times) / 1e12,
        "torch_tflops": flops / statistics.median(torch_times) / 1e12,
        "max_abs_logit_diff": max_diff,
        "torch_attention": hf_config._attn_implementation,
    }


def _percent(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def report_rows(payload: dict) -> list[dict]:
    """Headline rows for docs/RESULTS.md: the speed-up and logit agreement of each shape."""
    return [report_row("Models", f"scoring speed-up vs HF PyTorch, {r['shape']}, {r['dtype']}, {r['batch']} x {r['length']}",
                       f"{r['speedup_median_pairwise']:.2f}x ({r['jax_tokens_per_s']:,.0f} vs {r['torch_tokens_per_s']:,.0f} "
                       f"tok/s); max logit diff {r['max_abs_logit_diff']:.1e}") for r in payload["results"]]


def write_results(rows: list[dict], info: dict, tag: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": command_line(), "results": rows}
    (RESULTS / f"forward_{tag}.json").write_text(json.dumps({**payload, "report": report_rows(payload)}, indent=2))
    lines = [f"# Scoring throughput, makemost_jax vs HF PyTorch eager ({tag})", "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), "",
             ("| shape | dtype | batch x length | JAX tok/s | PyTorch tok/s | speed-up (median of pairwise) "
             "| JAX TFLOP/s | max logit diff | MFU JAX | MFU PyTorch |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['batch']} x {r['length']} | {r['jax_tokens_per_s']:.0f} "
            f"| {r['torch_tokens_per_s']:.0f} | {r['speedup_median_pairwise']:.2f}x | {r['jax_tflops']:.3f} "
            f"| {r['max_abs_logit_diff']:.1e} | {_percent(r.get('mfu_jax'))} | {_percent(r.get('mfu_torch'))} |")
    path = RESULTS / f"forward_{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gpt2-small,smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tag", default=None, help="results file suffix (default: backend_dtype)")
    args = parser.parse_args(argv)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    info = machine()
    peak = matmul_rate(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32) if device == "cuda" else None
    if peak:
        info["measured_matmul_tflops"] = round(peak / 1e12, 1)
    rows = []
    names = list(FAMILY_SHAPES) if args.shapes == "families" else args.shapes.split(",")
    for name in names:
        row = bench_shape(name, args.dtype, args.batch, args.length, args.repeats, device)
        if peak:
            row["mfu_jax"] = row["jax_tflops"] * 1e12 / peak
            row["mfu_torch"] = row["torch_tflops"] * 1e12 / peak
        rows.append(row)
        print(json.dumps(row))
    path = write_results(rows, info, args.tag or f"{jax.default_backend()}_{args.dtype}")
    print(f"wrote {path}")
    for r in rows:
        print(f"{r['shape']}: JAX / PyTorch speed-up {r['speedup_median_pairwise']:.2f}x")


if __name__ == "__main__":
    main()
