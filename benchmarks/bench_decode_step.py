"""Where a beam step's time goes on CPU: the one-token decode step, JAX vs PyTorch, and its matmuls alone.

Beam search at 8 prompts x 8 beams is a decode step over 64 rows plus a top-k (its beams share their
prompt's cache buffer, `models.cache.branch_rows`, where this script's rows have their own). This
script times, in one process on the same random GPT-2-small weights (float32, the same threads):

1. the decode step: one token per row after 48 cached tokens; JAX `decode_step` inside one jitted loop of
   16 steps, as the searches run it, with the weights and cache held per layer (`models.model.per_layer`,
   the searches' layout for params held per layer) and stacked under the layer scan (stacked params'),
   against Hugging Face's forward with a
   `DynamicCache` cut back to 48 tokens after every call;
2. the step's matrix multiplications alone (per layer: QKV, attention output, MLP up and down; then the
   vocabulary projection), each as a plain `a @ b` in both frameworks, 16 dependent products per timed
   call (JAX: one jitted loop; a jitted call per product would time JAX's dispatch);
3. JAX's attention of one query over every layer's cache in four layouts: the stacked (L, B, S, H, K) the
   cache had until 2026-12-06, the heads-first (L, B, H, S, K) it had until 2026-12-07, today's heads-first
   values with the keys' slots last, (L, B, H, K, S), all three under the layer scan (which copies each
   layer's slice out), and one heads-first buffer per layer, read where it lies (`per_layer`'s);
4. the score product q @ k alone over a beam search's shared buffer (8 prompts x 8 beams, one query per
   beam, 32 + 8 x 63 = 536 slots at the last of 64 steps), with the keys' slots before the head dimension
   (q @ k^T) and after it (q @ k, today's).

The difference between 1 and 2 is everything else (attention over the cache, layer norms, the cache
write, dispatch). If JAX's matmuls are no faster than PyTorch's, a beam search can beat `generate` only
by the share of PyTorch's step that is not matmuls, plus the host work that `generate` adds around it.

    python benchmarks/bench_decode_step.py                    # ~2 min; both cores, both frameworks
    taskset -c 0 python benchmarks/bench_decode_step.py --torch-threads 1 --tag cpu_1core

Writes benchmarks/results/decode_step_<tag>.json / .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_forward import SHAPES
from common import command_line, machine, machine_line, matmul_times, median_ms, report_row, write_results

from makemost_jax.decoding.sampling import decode_step, prefill
from makemost_jax.models import from_hf_config, params_from_hf
from makemost_jax.models.model import per_layer

CACHED = 48  # tokens in the cache when the step runs (prompt of 32 + 16 generated)
SLOTS = 96  # the beam search's cache at 32 prompt + 64 new tokens
LOOP = 16  # decode steps per timed call of JAX's loop


def step_times(model, params, rows: int, repeats: int) -> dict:
    """ms per one-token decode step over `rows` rows after CACHED tokens: JAX per layer ("jax") and
    scanned ("jax_scan"), each a 16-step jitted loop from the same cache (copied once per call), and PyTorch."""
    prompt = np.random.RandomState(0).randint(0, 50000, (rows, CACHED)).astype(np.int32)
    cache, _ = prefill(params, jnp.asarray(prompt), jnp.ones((rows, CACHED), jnp.int32), SLOTS)

    @jax.jit
    def loop(params, cache):
        def step(_, state):
            cache, logits = decode_step(params, *state)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, LOOP, step, (cache, jnp.ones((rows,), jnp.int32)))[1]

    layouts = {"jax": per_layer(params, cache), "jax_scan": (params, cache)}
    jax_ms = {name: median_ms(lambda p=p, c=c: loop(p, c).block_until_ready(), repeats) / LOOP
              for name, (p, c) in layouts.items()}

    with torch.inference_mode():
        past = model(torch.as_tensor(prompt, dtype=torch.long), use_cache=True).past_key_values
    token_t = torch.ones((rows, 1), dtype=torch.long)

    def run_torch():
        with torch.inference_mode():
            model(token_t, cache=past, use_cache=True)
        past.crop(-1)  # back to CACHED tokens

    return {**jax_ms, "torch": median_ms(run_torch, repeats)}


def step_matmuls(hf_config) -> list[tuple]:
    """The dense matmuls of one decode step (per layer: QKV, attention output, MLP up and down; the head)."""
    d, f, v, layers = hf_config.n_embd, 4 * hf_config.n_embd, hf_config.vocab_size, hf_config.n_layer
    return [("QKV", d, 3 * d, layers, "NN"), ("attention output", d, d, layers, "NN"), ("MLP up", d, f, layers, "NN"),
            ("MLP down", f, d, layers, "NN"), ("vocabulary", d, v, 1, "NN")]


def attention_layouts(hf_config, rows: int, repeats: int) -> dict:
    """ms of one query's attention over every layer's cached keys/values (SLOTS slots), by cache layout.

    `stacked (L, B, S, H, K), scan` is the cache's first layout: each layer's slice was cut out of the stacked
    cache and turned heads-first for the batched matmuls. `stacked (L, B, H, S, K), scan` was its second (the
    slice is still copied out, but not transposed); today's keeps the keys' slots last, so q @ k is a plain
    matmul. One heads-first buffer per layer copies nothing.
    """
    layers, heads = hf_config.n_layer, hf_config.n_head
    width = hf_config.n_embd // heads
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((rows, heads, 1, width), np.float32))
    v_lbshk = jnp.asarray(rng.standard_normal((layers, rows, SLOTS, heads, width), np.float32))
    v_lbhsk = v_lbshk.transpose(0, 1, 3, 2, 4)
    keys = {"slots first": 0.5 * v_lbshk, "heads first": 0.5 * v_lbhsk,
            "slots last": (0.5 * v_lbhsk).swapaxes(3, 4)}  # keys (L, B, H, K, S)

    def attend(q, k_bhsk, v_bhsk, spec="bhqk,bhsk->bhqs"):
        w = jax.nn.softmax(jnp.einsum(spec, q, k_bhsk), axis=-1)
        return jnp.einsum("bhqs,bhsk->bhqk", w, v_bhsk)

    def scanned(layout: str):
        def run(q, k, v):
            def layer(x, kv):
                k_, v_ = kv if layout != "slots first" else (a.transpose(0, 2, 1, 3) for a in kv)
                return attend(x, k_, v_, "bhqk,bhks->bhqs" if layout == "slots last" else "bhqk,bhsk->bhqs"), None
            return jax.lax.scan(layer, q, (k, v))[0]
        return jax.jit(run)

    @jax.jit
    def per_layer(q, ks, vs):
        for k_, v_ in zip(ks, vs):
            q = attend(q, k_, v_)
        return q

    runs = {"stacked (L, B, S, H, K), scan": (scanned("slots first"), keys["slots first"], v_lbshk),
            "stacked (L, B, H, S, K), scan": (scanned("heads first"), keys["heads first"], v_lbhsk),
            "keys (L, B, H, K, S), values (L, B, H, S, K), scan": (scanned("slots last"), keys["slots last"], v_lbhsk),
            "one (B, H, S, K) buffer per layer": (per_layer, tuple(keys["heads first"]), tuple(v_lbhsk))}
    return {name: median_ms(lambda fn=fn, k=k, v=v: fn(q, k, v).block_until_ready(), repeats)
            for name, (fn, k, v) in runs.items()}


def shared_scores(hf_config, repeats: int, prompts: int = 8, beams: int = 8, slots: int = 32 + 8 * 63) -> dict:
    """ms of q @ k over every layer of a beam search's shared buffer (`branch_rows`), by the keys' layout.

    The beams of a prompt are folded into the query axis (`layers.attention`): one (beams, K) @ (K, S) matmul
    per prompt and head. Keys (S, K) make it q @ k^T; keys (K, S), today's layout, a plain q @ k.
    """
    layers, heads = hf_config.n_layer, hf_config.n_head
    width = hf_config.n_embd // heads
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((layers, prompts, heads, beams, width), np.float32))
    k_sk = jnp.asarray(rng.standard_normal((layers, prompts, heads, slots, width), np.float32))

    def scanned(spec):
        return jax.jit(lambda q, k: jax.lax.scan(lambda c, x: (c, jnp.einsum(spec, *x)), 0, (q, k))[1])

    runs = {"keys (S, K): q @ k^T": (scanned("ughk,ugsk->ughs"), k_sk),
            "keys (K, S): q @ k": (scanned("ughk,ugks->ughs"), k_sk.swapaxes(3, 4) + 0)}
    return {name: median_ms(lambda fn=fn, k=k: fn(q, k).block_until_ready(), repeats)
            for name, (fn, k) in runs.items()}


def bench(rows: int, model, params, hf_config, repeats: int) -> dict:
    steps = step_times(model, params, rows, repeats)
    mats = matmul_times(step_matmuls(hf_config), rows, 3 * repeats, chain=LOOP)
    matmul_ms = {fw: sum(m["ms"][fw] * m["count"] for m in mats) for fw in ("jax", "torch")}
    return {"rows": rows, "step_ms": steps, "matmul_ms": matmul_ms,
            "other_ms": {fw: steps[fw] - matmul_ms[fw] for fw in matmul_ms},
            "attention_ms": attention_layouts(hf_config, rows, repeats),
            "step_speedup_vs_torch": steps["torch"] / steps["jax"],
            "matmul_speedup_vs_torch": matmul_ms["torch"] / matmul_ms["jax"], "matmuls": mats}


def markdown(rows: list[dict], shared: dict, info: dict) -> str:
    lines = ["# Where a beam step's time goes: the one-token decode step, JAX vs PyTorch (decode_step)", "",
             machine_line(info), "", f"Command: `{command_line()}`", "",
             (f"GPT-2 small, random weights shared by both frameworks, float32; one token per row after {CACHED} "
              f"cached tokens (JAX: a {SLOTS}-slot cache, as in the 8 x 8 x 64 beam search, {LOOP} steps per jitted "
              "loop, weights and cache per layer (`per_layer`, the searches' layout for params held per layer) "
              "and stacked under the layer scan (for stacked params); "
              "PyTorch: a `DynamicCache` cut back after every call). Medians after a warm-up."), "",
             ("| rows | step, JAX ms | step, JAX scanned ms | step, PyTorch ms | PyTorch / JAX | matmuls, JAX ms | "
              "matmuls, PyTorch ms | rest, JAX ms | rest, PyTorch ms |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, m, o = r["step_ms"], r["matmul_ms"], r["other_ms"]
        lines.append(f"| {r['rows']} | {s['jax']:.1f} | {s['jax_scan']:.1f} | {s['torch']:.1f} | "
                     f"{r['step_speedup_vs_torch']:.2f}x | "
                     f"{m['jax']:.1f} | {m['torch']:.1f} | {o['jax']:.1f} | {o['torch']:.1f} |")
    lines += ["", (f"Matmuls (ms each, from {LOOP} dependent products per timed call, JAX's in one jitted loop; "
                   "GFLOP/s):"), "", "| rows | matmul | (M, K, N) | x per step | JAX | PyTorch |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        for m in r["matmuls"]:
            lines.append(f"| {r['rows']} | {m['matmul']} | {tuple(m['shape'])} | {m['count']} | "
                         f"{m['ms']['jax']:.3f} ({m['gflop_per_s']['jax']:.0f}) | "
                         f"{m['ms']['torch']:.3f} ({m['gflop_per_s']['torch']:.0f}) |")
    names = list(rows[0]["attention_ms"])
    lines += ["", (f"Attention of one query over every layer's {SLOTS} cached slots, JAX only, by the layout of the cache "
                   "(ms for all layers; the last is what the searches run per layer, the third what `forward` runs "
                   "with stacked weights, the first what it ran before 2026-12-06, the second before 2026-12-07):"), "",
              "| rows | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {r['rows']} | " + " | ".join(f"{r['attention_ms'][n]:.1f}" for n in names) + " |" for r in rows]
    lines += ["", ("The score product q @ k over every layer of a beam search's shared buffer (8 prompts x 8 beams, "
                   "536 slots), JAX only, by the keys' layout (ms for all layers): "
                   + ", ".join(f"{name} {ms:.1f}" for name, ms in shared.items()) + ".")]
    big = max(rows, key=lambda r: r["rows"])
    lines += ["", (f"At {big['rows']} rows the matmuls are {100 * big['matmul_ms']['jax'] / big['step_ms']['jax']:.0f}% "
                   f"of JAX's step and {100 * big['matmul_ms']['torch'] / big['step_ms']['torch']:.0f}% of "
                   f"PyTorch's; JAX's matmuls run at {big['matmul_speedup_vs_torch']:.2f}x PyTorch's.")]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="4,64", help="comma-separated rows per step (beams x prompts)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--torch-threads", type=int, default=0, help="PyTorch threads (0: its default)")
    parser.add_argument("--tag", default=None, help="results name: decode_step_<tag> (default: the backend)")
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 repeats; written to --out-dir")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if not all(r.strip().isdigit() and int(r) > 0 for r in args.rows.split(",")):
        parser.error(f"--rows {args.rows!r} must be positive integers separated by commas, e.g. 4,64")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    hf_config = SHAPES["gpt2-small"]()
    if args.quick:
        hf_config.n_layer, args.repeats = 2, 2
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    tensors = {k: t.float().numpy() for k, t in model.state_dict().items()}
    params = params_from_hf(from_hf_config(hf_config.to_dict(), tensors), tensors)
    rows = [bench(int(r), model, params, hf_config, args.repeats) for r in args.rows.split(",")]
    shared = shared_scores(hf_config, args.repeats)
    for r in rows:
        print(f"rows {r['rows']}: step JAX {r['step_ms']['jax']:.1f} ms, PyTorch {r['step_ms']['torch']:.1f} ms; "
              f"matmuls JAX {r['matmul_ms']['jax']:.1f}, PyTorch {r['matmul_ms']['torch']:.1f}", flush=True)
    info = {**machine(), "torch_threads": torch.get_num_threads()}
    tag = args.tag or (f"{jax.default_backend()}_quick" if args.quick else jax.default_backend())
    report = [report_row("beam", f"one-token decode step, GPT-2 small, {r['rows']} rows after {CACHED} cached, "
                                 "PyTorch / JAX (per layer) time",
                         f"step {r['step_speedup_vs_torch']:.2f}x, its matmuls alone {r['matmul_speedup_vs_torch']:.2f}x")
              for r in rows]
    kwargs = {} if args.out_dir is None else {"out_dir": args.out_dir}
    path = write_results(f"decode_step_{tag}", {"model": "gpt2-small (random weights)", "cached": CACHED,
                                                "slots": SLOTS, "torch_threads": torch.get_num_threads(), "rows": rows,
                                                "shared_scores_ms": shared},
                         markdown(rows, shared, info), report=report, **kwargs)
    print(markdown(rows, shared, info))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
