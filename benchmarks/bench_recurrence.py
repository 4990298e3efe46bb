"""Training cost of recurrence against full-context training at the same total length.

One process, one LM (random weights: speed and memory do not depend on them), sequences of
T = N x W tokens. Three training steps (`makemost_jax.training.make_train_step`, AdamW):

- full context: the LM finetuned on whole T-token sequences (`lm_loss`);
- full context, remat: the same with every layer rematerialised (`TrainConfig.remat="full"`);
- recurrence: the memory module trained over N windows of W (LM frozen, `jax.checkpoint`
  per window, gradients through the memory across all N windows).

For each: training tokens/s (median of `--repeats` steps after warm-up) and XLA's compiled
peak bytes (arguments + temporaries + outputs - donated aliases). The ratios are printed last.

Example:
    python benchmarks/bench_recurrence.py                     # CPU, ~3 min
    python benchmarks/bench_recurrence.py --width 768 --layers 12 --heads 12 --vocab 50257 --tag gpu
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import MiB, command_line, machine, report_row

import makemost_jax as mm
from makemost_jax.recurrence import RecurrenceConfig, init_memory_module, recurrence_loss
from makemost_jax.training import TrainConfig, TrainState, lm_loss, make_optimizer, make_train_step

RESULTS = ROOT / "benchmarks" / "results"


def measure(name, config, params, batch, loss_fn, frozen, repeats) -> dict:
    """Compiled peak bytes and median step time of one training step."""
    state = TrainState.create(params, make_optimizer(config)[0], config.seed)
    step = make_train_step(config, state, loss_fn, frozen=frozen)
    mem = step.lower(state, batch, frozen).compile().memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
    for _ in range(2):  # compile and warm up
        state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, frozen)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    tokens = batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
    row = {"method": name, "step_s": seconds, "tokens_per_s": tokens / seconds, "peak_bytes": peak,
           "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
           "trained_parameters": sum(int(x.size) for x in jax.tree.leaves(params))}
    print(f"{name:28s} {seconds * 1e3:9.1f} ms/step  {row['tokens_per_s']:9.0f} tokens/s  "
          f"peak {peak / MiB:8.1f} MiB (temporaries {mem.temp_size_in_bytes / MiB:8.1f})", flush=True)
    return row


def report_rows(payload: dict) -> list[dict]:
    """Headline rows for docs/RESULTS.md: tokens/s and peak memory against full-context training."""
    s, a = payload["summary"], payload["args"]
    return [report_row("Recurrence", f"training vs full context, {a['batch']} x {a['window'] * a['windows']} tokens "
                                     f"({a['windows']} windows of {a['window']})",
                       f"{s['tokens_per_s_vs_full']:.2f}x tokens/s, {s['peak_vs_full']:.2f}x peak memory "
                       f"({s['peak_vs_full_remat']:.2f}x of full context with remat)")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--window", type=int, default=128, help="W")
    parser.add_argument("--windows", type=int, default=8, help="N: the sequence is N x W tokens")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    length = args.window * args.windows
    if args.family == "gpt2":
        hf = {"model_type": "gpt2", "n_embd": args.width, "n_layer": args.layers, "n_head": args.heads,
              "vocab_size": args.vocab, "n_positions": length}
    else:
        hf = {"model_type": "llama", "hidden_size": args.width, "intermediate_size": 4 * args.width,
              "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
              "num_key_value_heads": args.heads, "max_position_embeddings": length, "vocab_size": args.vocab,
              "rope_theta": 10000.0}
    lm = mm.init_params(mm.from_hf_config(hf), jax.random.key(0))
    module = init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(1))
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, length + 1)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens)}
    rec_batch = {**batch, "loss_mask": jnp.ones((args.batch, length), jnp.float32)}
    print(f"{args.family}, width {args.width}, {args.layers} layers, vocab {args.vocab}; {args.batch} sequences of "
          f"{length} tokens = {args.windows} windows of {args.window}", flush=True)
    def copy(tree):  # each step donates its state
        return jax.tree.map(jnp.copy, tree)

    rows = [
        measure("full context", TrainConfig(), copy(lm), batch, lm_loss, None, args.repeats),
        measure("full context, remat", TrainConfig(remat="full"), copy(lm), batch, lm_loss, None, args.repeats),
        measure("recurrence (LM frozen)", TrainConfig(), {"memory": module}, rec_batch,
                recurrence_loss(args.window), lm, args.repeats),
    ]
    full, remat, rec = rows
    summary = {"tokens_per_s_vs_full": rec["tokens_per_s"] / full["tokens_per_s"],
               "peak_vs_full": rec["peak_bytes"] / full["peak_bytes"],
               "peak_vs_full_remat": rec["peak_bytes"] / remat["peak_bytes"]}
    info = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"recurrence_bench_{args.tag}"
    payload = {"machine": info, "command": command_line(), "args": vars(args), "rows": rows, "summary": summary}
    stem.with_suffix(".json").write_text(json.dumps({**payload, "report": report_rows(payload)}, indent=2))
    lines = [f"# Recurrence vs full-context training, same total length ({args.tag})", "",
             f"Machine: {', '.join(f'{k}={v}' for k, v in info.items())}", "",
             (f"{args.family} LM, width {args.width}, {args.layers} layers, vocab {args.vocab} (random weights); "
              f"{args.batch} sequences of {length} tokens per step ({args.windows} windows of {args.window} for "
              f"recurrence); AdamW; median of {args.repeats} steps after warm-up. Peak: XLA compiled memory "
              "analysis (arguments + temporaries + outputs - donated). "
              f"Command: `{' '.join(['python benchmarks/bench_recurrence.py', *sys.argv[1:]])}`."), "",
             "| training | trained parameters | ms/step | tokens/s | peak (MiB) | temporaries (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trained_parameters']:,} | {r['step_s'] * 1e3:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_bytes'] / MiB:.1f} | {r['temp_bytes'] / MiB:.1f} |")
    lines += ["", (f"Recurrence: {summary['tokens_per_s_vs_full']:.2f}x the tokens/s of full-context training, "
                   f"{summary['peak_vs_full']:.2f}x its peak memory ({summary['peak_vs_full_remat']:.2f}x that of "
                   "full context with per-layer remat).")]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(lines[-1])


if __name__ == "__main__":
    main()
