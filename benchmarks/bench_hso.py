"""HSO cost: makemost_jax (`makemost_jax.hso`) vs the plain PyTorch reference, same weights.

Two questions, one process, JAX and PyTorch interleaved, warm-up excluded, medians of
repeats, ratios printed last:

1. probe: one HSO step, i.e. the value and gradient of a segment's NLL with respect to
   the cached keys/values, at the GPT-2-small shape (random weights, 12 layers, width 768,
   vocabulary 50257), segment 128 after a full cache of 384, batch 1. JAX jits
   `jax.value_and_grad` of `makemost_jax.hso.segment_nll` (what the loop runs);
   PyTorch runs `hso_torch_reference.probe_step` (autograd through a `DynamicCache` of
   leaf tensors, SDPA attention). Also XLA's `memory_analysis()` of the compiled step.
2. protocol: the whole HSO loop (`hso_nll`) on a real text (the bundled Austen sample)
   with the real default model (SmolLM2-135M from its GGUF file; the PyTorch twin loads
   the same file through `transformers`): tokens/s with the update on, with it off
   (lr=0 loop without gradients), the PyTorch reference's, the number of compilations
   the whole text cost, and the compiled loop's memory.
3. the probe's dense matmuls alone (each layer's four linear maps and the tied vocabulary
   projection, forward and the backward products the cache's gradient needs), each a plain
   product in both frameworks on the same inputs: what is left of the probe's time when they
   are taken out is everything else (attention, norms, softmax, the cache's gradient bookkeeping).

`--layers per_layer` (the default) runs both with the weights and the cache held per layer
(`mm.per_layer`, converted once before timing): the layers unrolled, no per-layer weight
slices copied out of the stacked arrays at every segment; `--layers scan` keeps them stacked
under the layer scan (faster to compile).

Results: `benchmarks/results/hso_<tag>.json` and `.md` with the machine described.

Example:
    python benchmarks/bench_hso.py            # ~8 min on 2 idle CPU cores (PyTorch slows badly on a busy machine:
                                              # then compare with --torch-threads 1)
    python benchmarks/bench_hso.py --quick    # ~2 min smoke run (tag <backend>_quick)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_forward import SHAPES
from common import load_average, machine, matmul_times, memory_mib, report_row, timed
from hso_torch_reference import hso_segment_nlls, probe_step, random_state

import makemost_jax as mm
from makemost_jax.assets import read_sample
from makemost_jax.hso import HSOConfig, HSOState, Segments, hso_nll, lm_segments, run_segments, segment_nll
from makemost_jax.hso.lm import hso_segment_step, init_state
from makemost_jax.models import from_hf_config, params_from_hf
from makemost_jax.models.cache import KVCache
from makemost_jax.recurrence.evaluate import compiled_stats

RESULTS = ROOT / "benchmarks" / "results"
MiB = 2 ** 20


# ---------------------------------------------------------------- 1. probe


def bench_probe(segment: int, cache: int, batch: int, repeats: int, layers: str) -> dict:
    """One value-and-gradient of a segment's NLL w.r.t. the cache, GPT-2-small shape."""
    torch.manual_seed(0)
    hf_config = SHAPES["gpt2-small"]()
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval().requires_grad_(False)  # frozen, as in HSO
    params = params_from_hf(from_hf_config(hf_config.to_dict()), {k: v.numpy() for k, v in model.state_dict().items()})

    state_t = random_state(model, batch, cache)  # the cache a forward over `cache` random tokens leaves
    rng = np.random.default_rng(1)
    inputs, targets = (rng.integers(0, hf_config.vocab_size, (batch, segment)) for _ in range(2))
    positions = np.broadcast_to(cache + np.arange(segment), (batch, segment))  # GPT-2: after the cached tokens
    args_t = (torch.as_tensor(inputs), torch.as_tensor(targets), torch.as_tensor(positions.copy()))

    def to_jax(per_layer, name):  # L x (B, H, C, K) -> laid out as the cache keeps it (keys: slots last)
        return jnp.moveaxis(jnp.asarray(np.stack([t.numpy() for t in per_layer])), 3, KVCache.SLOT_AXES[name])

    kv = (to_jax(state_t.keys, "k"), to_jax(state_t.values, "v"))
    if layers == "per_layer":
        params = jax.block_until_ready(mm.per_layer(params)[0])
        kv = tuple(tuple(x[i:i + 1] for i in range(x.shape[0])) for x in kv)
    state = HSOState(past=kv, base=None, positions=jnp.broadcast_to(jnp.arange(cache, dtype=jnp.int32), (batch, cache)),
                     fill=jnp.int32(cache),
                     next_position=jnp.full((batch,), cache, jnp.int32), adam=None)
    seg = Segments(inputs=jnp.asarray(inputs, jnp.int32), targets=jnp.asarray(targets, jnp.int32),
                   weights=jnp.ones((batch, segment), jnp.float32), mask=jnp.ones((batch, segment), bool))
    step = jax.jit(jax.value_and_grad(lambda kv, p, st, sg: segment_nll(p, kv, st, sg)[0]))
    compiled = step.lower(kv, params, state, seg).compile()

    def run_jax():
        return jax.block_until_ready(compiled(kv, params, state, seg))

    def run_torch():
        return probe_step(model, state_t, *args_t)

    (loss_j, grads_j), (loss_t, grads_t) = run_jax(), run_torch()  # warm-up, and a parity check
    grad_t = np.stack([g.numpy() for g in grads_t[:len(grads_t) // 2]])
    grad_scale = float(np.abs(grad_t).max())
    grad_k = grads_j[0] if layers == "scan" else jnp.concatenate(grads_j[0])
    grad_j = np.moveaxis(np.asarray(grad_k), KVCache.SLOT_AXES["k"], 3)  # as PyTorch's (L, B, H, C, K)
    grad_diff = float(np.abs(grad_j - grad_t).max()) / grad_scale
    jax_times, torch_times = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        jax_times.append(timed(run_jax)[0])
        torch_times.append(timed(run_torch)[0])
    ratios = [t / j for j, t in zip(jax_times, torch_times)]
    return {"shape": "gpt2-small", "layers": layers, "segment": segment, "cache": cache, "batch": batch,
            "repeats": repeats,
            "jax_ms": 1e3 * statistics.median(jax_times), "torch_ms": 1e3 * statistics.median(torch_times),
            "speedup_median_pairwise": statistics.median(ratios),
            "loss_rel_diff": abs(float(loss_j) - float(loss_t)) / abs(float(loss_t)),
            "key_grad_max_diff_rel": grad_diff, "jax_memory_mib": memory_mib(compiled),
            "torch_attention": hf_config._attn_implementation}


def probe_matmuls() -> list[tuple]:
    """The dense matmuls of one probe step at the GPT-2-small shape (`matmul_times`' tuples).

    Forward: `x @ w` with w stored (in, out) as the params keep it, the tied head `x @ E^T`. Backward,
    only what the gradient w.r.t. the cache needs (no weight gradients): `dy @ w^T` per linear map, the
    first layer's QKV excepted (nothing below it takes a gradient), and `dlogits @ E` for the head.
    QKV is timed fused, as Hugging Face's GPT-2 runs it; JAX's model runs three (768 x 768) products,
    which took as long as the fused one here (one core: 3 x 1.17 against 3.68 ms).
    """
    hf_config = SHAPES["gpt2-small"]()
    d, v, layers = hf_config.n_embd, hf_config.vocab_size, hf_config.n_layer
    maps = [("QKV", d, 3 * d), ("attention output", d, d), ("MLP up", d, 4 * d), ("MLP down", 4 * d, d)]
    forward = [(f"{name}, forward", k, n, layers, "NN") for name, k, n in maps]
    backward = [(f"{name}, backward", n, k, layers - (name == "QKV"), "NT") for name, k, n in maps]
    return [*forward, ("vocabulary, forward", d, v, 1, "NT"), *backward, ("vocabulary, backward", v, d, 1, "NN")]


def bench_matmuls(probe: dict, repeats: int) -> dict:
    """The probe's dense matmuls alone, JAX vs PyTorch; the rest is the probe's time minus theirs."""
    mats = matmul_times(probe_matmuls(), probe["batch"] * probe["segment"], repeats)
    total = {fw: sum(m["ms"][fw] * m["count"] for m in mats) for fw in ("jax", "torch")}
    step = {"jax": probe["jax_ms"], "torch": probe["torch_ms"]}
    return {"matmuls": mats, "total_ms": total, "rest_ms": {fw: step[fw] - total[fw] for fw in total},
            "speedup_vs_torch": total["torch"] / total["jax"]}


# ---------------------------------------------------------------- 2. whole protocol


def default_models():
    """The real default model in JAX (`mm.load()`) and its PyTorch twin from the same GGUF file."""
    from makemost_jax.checkpoints.gguf import default_gguf_path

    path = Path(default_gguf_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return mm.load(), mm.load_tokenizer(), model.requires_grad_(False), path.name  # parameters stay frozen in HSO


def segment_flops(params, cfg: HSOConfig, segments: Segments) -> dict:
    """XLA's FLOP count of one segment step (layers unrolled): HSO's cost per token before any inefficiency.

    HSO on = forward with the gradient to the cache, the update, and (`recompute`) a second pass for the
    segment's own keys/values; lr=0 = the forward alone. Their ratio bounds how cheap the loop can get.
    """
    seg = jax.tree.map(lambda x: x[0], segments)

    def flops(update: bool, recompute: bool) -> float:
        state = init_state(params, seg.inputs.shape[0], cfg.cache_size, cfg.offsets, update)
        step = functools.partial(hso_segment_step, hyper=cfg.hyper(), hso_steps=cfg.hso_steps, recompute=recompute,
                                 sink=cfg.sink)
        return compiled_stats(step, params, state, seg, memory=False)["flops"]

    out = {"lr0": flops(False, cfg.recompute), "hso": flops(True, cfg.recompute)}
    if cfg.recompute:
        out["hso_without_recompute"] = flops(True, False)
    return {**out, **{f"{k}_vs_lr0": v / out["lr0"] for k, v in out.items() if k != "lr0"}}


def bench_protocol(n_tokens: int, segment: int, cache: int, lr: float, hso_steps: int, repeats: int,
                   layers: str) -> dict:
    """tokens/s of the whole loop: JAX with HSO on and off, the PyTorch reference; compiles; memory."""
    params, tokenizer, model, gguf_name = default_models()
    if layers == "per_layer":
        params = jax.block_until_ready(mm.per_layer(params)[0])
    ids = np.asarray(tokenizer.encode_for_model(read_sample("austen")))
    if len(ids) < n_tokens:
        raise SystemExit(f"the Austen sample has {len(ids)} tokens; ask for at most that many")
    tokens = ids[None, :n_tokens]
    other = ids[None, -n_tokens:]  # a different text of the same length: must not compile again
    # No attention sinks: the PyTorch reference has none, and the NLLs are compared segment by segment.
    cfg = HSOConfig(segment=segment, cache_size=cache, lr=lr, hso_steps=hso_steps, sink=0)
    off = dataclasses.replace(cfg, lr=0.0)

    first = hso_nll(params, tokens, cfg)  # compiles
    first_off = hso_nll(params, tokens, off, update=False)
    again = [hso_nll(params, other, cfg).compiles, hso_nll(params, tokens, dataclasses.replace(cfg, lr=lr / 3)).compiles]
    segments = lm_segments(tokens, np.array([n_tokens]), segment)
    static = {"cache_size": cache, "hso_steps": hso_steps, "recompute": cfg.recompute, "offsets": cfg.offsets}
    memory = {"update": memory_mib(run_segments.lower(params, segments, cfg.hyper(), update=True, **static).compile()),
              "no_update": memory_mib(run_segments.lower(params, segments, cfg.hyper(), update=False,
                                                         **static).compile())}

    def torch_run(lr_):
        return hso_segment_nlls(model, tokens, segment=segment, cache_size=cache, lr=lr_, hso_steps=hso_steps)

    torch_nll, counts = torch_run(lr)  # warm-up, and the numbers to compare
    torch_nll_off, _ = torch_run(0.0)
    times = {"jax_hso": [], "jax_off": [], "torch_hso": [], "torch_off": []}
    for _ in range(repeats):
        times["jax_hso"].append(hso_nll(params, tokens, cfg).seconds)
        times["jax_off"].append(hso_nll(params, tokens, off, update=False).seconds)
        times["torch_hso"].append(timed(lambda: torch_run(lr))[0])
        times["torch_off"].append(timed(lambda: torch_run(0.0))[0])
    n_scored = int(counts.sum())
    tps = {name: n_scored / statistics.median(t) for name, t in times.items()}
    return {
        "model": f"SmolLM2-135M ({gguf_name}, float32)", "layers": layers, "text": "austen (bundled sample)",
        "n_tokens": n_tokens,
        "n_scored": n_scored, "n_segments": int(counts.shape[1]), "segment": segment, "cache": cache, "lr": lr,
        "hso_steps": hso_steps, "recompute": cfg.recompute, "repeats": repeats,
        "tokens_per_s": tps,
        "hso_cost_per_token_vs_lr0": tps["jax_off"] / tps["jax_hso"],
        "torch_hso_cost_per_token_vs_lr0": tps["torch_off"] / tps["torch_hso"],
        "speedup_hso_vs_torch": tps["jax_hso"] / tps["torch_hso"],
        "speedup_lr0_vs_torch": tps["jax_off"] / tps["torch_off"],
        "ppl": {"jax_hso": first.ppl, "jax_lr0": first_off.ppl,
                "torch_hso": math.exp(torch_nll.sum() / n_scored), "torch_lr0": math.exp(torch_nll_off.sum() / n_scored)},
        "max_segment_nll_diff_vs_torch": {"hso": float(np.abs(first.nll - torch_nll).max()),
                                          "lr0": float(np.abs(first_off.nll - torch_nll_off).max())},
        "first_call_seconds": {"hso": first.seconds, "lr0": first_off.seconds},
        "compiles_whole_text": {"hso": first.compiles, "lr0": first_off.compiles,
                                "other_text_same_length": again[0], "other_lr": again[1]},
        "jax_memory_mib": memory,
        "segment_flops": segment_flops(params, cfg, segments),
    }


# ---------------------------------------------------------------- report


def report_rows(payload: dict) -> list[dict]:
    """Headline rows for docs/RESULTS.md: speed against the PyTorch reference and the cost of HSO."""
    p, w, m = payload["probe"], payload["protocol"], payload.get("matmuls")
    alone = (f"; its dense matmuls alone {m['speedup_vs_torch']:.2f}x, the rest {m['rest_ms']['jax']:.0f} vs "
             f"{m['rest_ms']['torch']:.0f} ms") if m else ""
    return [report_row("HSO", f"cache-gradient probe speed-up vs PyTorch, {p['shape']}, segment {p['segment']}, "
                              f"cache {p['cache']}, layers {p.get('layers', 'scan')}",
                       f"{p['speedup_median_pairwise']:.2f}x{alone}"),
            report_row("HSO", f"whole-text loop vs PyTorch, {w['model'].split(' ')[0]}, {w['n_tokens']} tokens",
                       f"HSO {w['speedup_hso_vs_torch']:.2f}x, lr=0 {w['speedup_lr0_vs_torch']:.2f}x; ppl JAX "
                       f"{w['ppl']['jax_hso']:.2f} / PyTorch {w['ppl']['torch_hso']:.2f}"),
            report_row("HSO", "cost per token of HSO vs the lr=0 loop",
                       f"{w['hso_cost_per_token_vs_lr0']:.2f}x (PyTorch {w['torch_hso_cost_per_token_vs_lr0']:.2f}x"
                       + (f"; XLA's FLOP count {w['segment_flops']['hso_vs_lr0']:.2f}x" if "segment_flops" in w else "")
                       + f"); peak {w['jax_memory_mib']['update']['peak']} vs "
                       f"{w['jax_memory_mib']['no_update']['peak']} MiB")]


def matmul_lines(m: dict, probe: dict) -> list[str]:
    """The markdown section of the probe's matmuls alone."""
    lines = ["## The probe's dense matmuls alone", "",
             ("Each a plain product on the probe's rows, timed as 16 dependent products per call (JAX's in one jitted "
              "loop), medians; ms each (GFLOP/s). NN: `x @ w`; NT: `x @ w.T` (w stored transposed)."), "",
             "| matmul | (M, K, N) | layout | x per step | JAX | PyTorch |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['matmul']} | {tuple(r['shape'])} | {r['layout']} | {r['count']} | {r['ms']['jax']:.2f} "
              f"({r['gflop_per_s']['jax']:.0f}) | {r['ms']['torch']:.2f} ({r['gflop_per_s']['torch']:.0f}) |"
              for r in m["matmuls"]]
    t, rest = m["total_ms"], m["rest_ms"]
    lines += ["", (f"Per probe step: the dense matmuls take {t['jax']:.0f} ms in JAX against {t['torch']:.0f} ms in "
                   f"PyTorch ({m['speedup_vs_torch']:.2f}x); everything else (probe time minus them) "
                   f"{rest['jax']:.0f} against {rest['torch']:.0f} ms. The probe itself: "
                   f"{probe['speedup_median_pairwise']:.2f}x.")]
    return lines


def write_results(probe: dict, protocol: dict, matmuls: dict, info: dict, tag: str, command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": command, "probe": probe, "protocol": protocol, "matmuls": matmuls}
    (RESULTS / f"hso_{tag}.json").write_text(json.dumps({**payload, "report": report_rows(payload)}, indent=2))
    p, w = probe, protocol
    tps, ppl = w["tokens_per_s"], w["ppl"]
    lines = [
        f"# HSO cost, makemost_jax vs the PyTorch reference ({tag})", "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), "",
        f"Command: `{command}`", "",
        "## Probe: one HSO step (value and gradient of a segment's NLL w.r.t. the KV cache)", "",
        (f"GPT-2-small shape, random weights, segment {p['segment']} after {p['cache']} cached tokens, batch "
        f"{p['batch']}, JAX layers {p.get('layers', 'scan')}; median of {p['repeats']} interleaved repeats; PyTorch "
        f"attention: {p['torch_attention']}."), "",
        ("| JAX ms | PyTorch ms | speed-up (median of pairwise) | loss rel. diff | key-grad max diff (rel.) "
        "| JAX peak MiB (args + temps + outputs) |"),
        "|---|---|---|---|---|---|",
        (f"| {p['jax_ms']:.0f} | {p['torch_ms']:.0f} | {p['speedup_median_pairwise']:.2f}x | {p['loss_rel_diff']:.1e} "
        f"| {p['key_grad_max_diff_rel']:.1e} | {p['jax_memory_mib']['peak']} ({p['jax_memory_mib']['arguments']} + "
        f"{p['jax_memory_mib']['temporaries']} + {p['jax_memory_mib']['outputs']}) |"), "",
        "## Protocol: the whole HSO loop on a real text", "",
        (f"{w['model']}, JAX layers {w.get('layers', 'scan')}, {w['text']}: {w['n_tokens']} tokens, "
        f"{w['n_segments']} segments of {w['segment']}, cache "
        f"{w['cache']}, lr {w['lr']}, hso_steps {w['hso_steps']}, recompute {w['recompute']}; median of "
        f"{w['repeats']} repeats (compilation excluded)."), "",
        "| loop | tokens/s | perplexity |", "|---|---|---|",
        f"| JAX, HSO on | {tps['jax_hso']:.1f} | {ppl['jax_hso']:.3f} |",
        f"| JAX, update off (lr=0) | {tps['jax_off']:.1f} | {ppl['jax_lr0']:.3f} |",
        f"| PyTorch reference, HSO on | {tps['torch_hso']:.1f} | {ppl['torch_hso']:.3f} |",
        f"| PyTorch reference, lr=0 | {tps['torch_off']:.1f} | {ppl['torch_lr0']:.3f} |", "",
        (f"- HSO cost per token vs lr=0: JAX {w['hso_cost_per_token_vs_lr0']:.2f}x "
        f"(PyTorch {w['torch_hso_cost_per_token_vs_lr0']:.2f}x); issue 19's goal: <= 3x"),
        *([(f"- XLA's FLOPs of one segment step (layers unrolled), HSO / lr=0: "
            f"{w['segment_flops']['hso_vs_lr0']:.2f}x"
            + (f" (without the recompute: {w['segment_flops']['hso_without_recompute_vs_lr0']:.2f}x)"
               if "hso_without_recompute" in w["segment_flops"] else "")
            + f"; lr=0: {w['segment_flops']['lr0'] / 1e9:.1f} GFLOP per segment")] if "segment_flops" in w else []),
        f"- JAX / PyTorch speed-up: HSO on {w['speedup_hso_vs_torch']:.2f}x, lr=0 {w['speedup_lr0_vs_torch']:.2f}x",
        (f"- max per-segment NLL difference JAX vs PyTorch (nats): HSO {w['max_segment_nll_diff_vs_torch']['hso']:.1e}, "
        f"lr=0 {w['max_segment_nll_diff_vs_torch']['lr0']:.1e}"),
        (f"- compilations for the whole text: HSO {w['compiles_whole_text']['hso']}, lr=0 "
        f"{w['compiles_whole_text']['lr0']}; then another text of the same length "
        f"{w['compiles_whole_text']['other_text_same_length']}, another lr {w['compiles_whole_text']['other_lr']}"),
        (f"- first call (compile + run): HSO {w['first_call_seconds']['hso']:.1f} s, lr=0 "
        f"{w['first_call_seconds']['lr0']:.1f} s"),
        (f"- compiled loop memory (MiB): HSO peak {w['jax_memory_mib']['update']['peak']} (temporaries "
        f"{w['jax_memory_mib']['update']['temporaries']}), lr=0 peak {w['jax_memory_mib']['no_update']['peak']} "
        f"(temporaries {w['jax_memory_mib']['no_update']['temporaries']})"), "",
        *matmul_lines(matmuls, probe),
    ]
    path = RESULTS / f"hso_{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (small shapes, few repeats)")
    parser.add_argument("--probe-repeats", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the whole protocol")
    parser.add_argument("--tokens", type=int, default=1025, help="text length for the protocol (1 + k * segment)")
    parser.add_argument("--segment", type=int, default=128)
    parser.add_argument("--cache", type=int, default=384)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--hso-steps", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch intra-op threads (default: PyTorch's own choice, all cores)")
    parser.add_argument("--layers", choices=["per_layer", "scan"], default="per_layer",
                        help="JAX's weights and cache held per layer (default; mm.per_layer) or stacked and scanned")
    parser.add_argument("--tag", default=None, help="results file suffix (default: backend, + _quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.probe_repeats, args.repeats, args.tokens, args.segment, args.cache = 3, 1, 193, 64, 128
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    info = machine()
    probe = bench_probe(128 if not args.quick else args.segment, 384 if not args.quick else args.cache, 1,
                        args.probe_repeats, args.layers)
    print(json.dumps(probe))
    protocol = bench_protocol(args.tokens, args.segment, args.cache, args.lr, args.hso_steps, args.repeats,
                              args.layers)
    print(json.dumps(protocol))
    matmuls = bench_matmuls(probe, 3 * args.probe_repeats)
    info["load_average_at_end"] = load_average()
    tag = args.tag or jax.default_backend() + ("_quick" if args.quick else "")
    command = "python benchmarks/bench_hso.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_results(probe, protocol, matmuls, info, tag, command.strip())
    print(f"wrote {path}")
    print(f"HSO cost per token vs lr=0 (JAX): {protocol['hso_cost_per_token_vs_lr0']:.2f}x (issue 19: <= 3x; "
          f"XLA FLOPs {protocol['segment_flops']['hso_vs_lr0']:.2f}x)")
    print(f"whole HSO loop: JAX / PyTorch speed-up {protocol['speedup_hso_vs_torch']:.2f}x")
    print(f"HSO probe (one value-and-gradient w.r.t. the cache): JAX {probe['jax_ms']:.0f} ms, PyTorch "
          f"{probe['torch_ms']:.0f} ms, JAX / PyTorch speed-up {probe['speedup_median_pairwise']:.2f}x; its dense "
          f"matmuls alone {matmuls['speedup_vs_torch']:.2f}x, the rest JAX {matmuls['rest_ms']['jax']:.0f} ms, "
          f"PyTorch {matmuls['rest_ms']['torch']:.0f} ms")


if __name__ == "__main__":
    main()
