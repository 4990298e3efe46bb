"""HSO learning rate x steps sweep on the real default model and a fixed Austen text.

METHODS.md section 1 asks for the learning rate and `hso_steps` to be swept and shown,
not guessed. This script runs `makemost_jax.hso.hso_nll` on the real default model
(SmolLM2-135M, float32) over the bundled Austen sample (`read_sample("austen")`, the
opening of *Persuasion*) for every (lr, hso_steps) of a grid, beside two baselines on the
same tokens: the same loop with the update off (lr=0) and the standard strided
sliding-window perplexity with context segment + cache and stride segment. The learning
rate is a traced value, so each `hso_steps` compiles once for the whole lr column.

Writes `benchmarks/results/hso_sweep.json`, `.md` and `.png` (perplexity vs lr, one line
per hso_steps, the baselines as horizontal lines); `--quick` writes `hso_sweep_quick.*`.

Example:
    python benchmarks/hso_sweep.py            # ~20 min on 2 busy CPU cores (14 runs + 2 baselines)
    python benchmarks/hso_sweep.py --quick    # ~1.5 min: 257 tokens, 2 x 2 grid
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, report_row

import makemost_jax as mm
from makemost_jax.assets import read_sample
from makemost_jax.hso import HSOConfig, hso_nll
from makemost_jax.perplexity import perplexity

RESULTS = ROOT / "benchmarks" / "results"
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
STEPS = (1, 2)


def sweep(tokens: np.ndarray, segment: int, cache: int, lrs, steps, recompute: bool) -> dict:
    """Perplexity of every (lr, hso_steps) and of the two baselines, on one token sequence."""
    params = mm.load()
    base = hso_nll(params, tokens[None], HSOConfig(segment=segment, cache_size=cache, lr=0.0), update=False)
    t0 = time.perf_counter()
    sliding = perplexity(params, tokens, context=segment + cache, stride=segment, progress=False)
    sliding_seconds = time.perf_counter() - t0
    runs = []
    grid = [(s, lr) for s in steps for lr in lrs]
    for hso_steps, lr in tqdm(grid, desc="HSO sweep"):
        cfg = HSOConfig(segment=segment, cache_size=cache, lr=lr, hso_steps=hso_steps, recompute=recompute)
        r = hso_nll(params, tokens[None], cfg)
        runs.append({"lr": lr, "hso_steps": hso_steps, "ppl": r.ppl, "mean_nll": r.mean_nll,
                     "delta_nll_vs_lr0": r.mean_nll - base.mean_nll, "seconds": r.seconds, "compiles": r.compiles})
        tqdm.write(f"hso_steps={hso_steps} lr={lr:g}: ppl {r.ppl:.3f} (lr=0: {base.ppl:.3f}), {r.seconds:.1f} s")
    best = min(runs, key=lambda r: r["ppl"])
    return {"n_tokens": len(tokens), "n_scored": base.n_tokens, "segment": segment, "cache": cache,
            "recompute": recompute, "lr0": {"ppl": base.ppl, "mean_nll": base.mean_nll, "seconds": base.seconds},
            "sliding_window": {"ppl": sliding.ppl, "context": segment + cache, "stride": segment,
                               "seconds": sliding_seconds},
            "runs": runs, "best": best}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for hso_steps in sorted({r["hso_steps"] for r in result["runs"]}):
        rows = sorted((r for r in result["runs"] if r["hso_steps"] == hso_steps), key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in rows], [r["ppl"] for r in rows], marker="o", label=f"HSO, hso_steps={hso_steps}")
    ax.axhline(result["lr0"]["ppl"], color="k", linestyle="--", label="same loop, lr=0")
    sw = result["sliding_window"]
    ax.axhline(sw["ppl"], color="gray", linestyle=":", label=f"sliding window ({sw['context']}/{sw['stride']})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("perplexity (per token)")
    ax.set_title(f"HSO on SmolLM2-135M, Austen ({result['n_scored']} tokens, segment {result['segment']}, "
                 f"cache {result['cache']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_rows(payload: dict) -> list[dict]:
    """Headline rows for docs/RESULTS.md: lr=0, the best HSO setting and the sliding window."""
    b, sw = payload["best"], payload["sliding_window"]
    return [report_row("HSO", f"perplexity, SmolLM2-135M on Persuasion ({payload['n_scored']} tokens, segment "
                              f"{payload['segment']}, cache {payload['cache']}, no sink)",
                       f"lr=0 {payload['lr0']['ppl']:.2f}; best HSO {b['ppl']:.2f} (lr {b['lr']:g}, {b['hso_steps']} "
                       f"steps); sliding window {sw['context']}/{sw['stride']} {sw['ppl']:.2f}")]


def write_results(result: dict, info: dict, name: str, command: str) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = [RESULTS / f"{name}.{ext}" for ext in ("json", "md", "png")]
    payload = {"machine": info, "command": command, **result}
    paths[0].write_text(json.dumps({**payload, "report": report_rows(payload)}, indent=2))
    b, sw = result["best"], result["sliding_window"]
    lines = [f"# HSO sweep: learning rate x hso_steps ({name})", "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), "",
             f"Command: `{command}`", "",
             (f"SmolLM2-135M (default GGUF model, float32), bundled Austen sample: {result['n_tokens']} tokens "
             f"({result['n_scored']} scored), segment {result['segment']}, cache {result['cache']}, recompute "
             f"{result['recompute']}, Adam betas (0.9, 0.999), eps 1e-8."), "",
             (f"Baselines: same loop with lr=0: perplexity {result['lr0']['ppl']:.3f}; strided sliding window "
             f"(context {sw['context']}, stride {sw['stride']}): {sw['ppl']:.3f}."), "",
             "| hso_steps | lr | perplexity | mean NLL change vs lr=0 (nats/token) | seconds | compiles |",
             "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['hso_steps']} | {r['lr']:g} | {r['ppl']:.3f} | {r['delta_nll_vs_lr0']:+.4f} "
                     f"| {r['seconds']:.1f} | {r['compiles']} |")
    lines += ["", (f"Best: hso_steps={b['hso_steps']}, lr={b['lr']:g}: perplexity {b['ppl']:.3f} vs "
              f"{result['lr0']['ppl']:.3f} at lr=0 ({b['delta_nll_vs_lr0']:+.4f} nats/token)."), "",
              f"![perplexity vs learning rate]({name}.png)"]
    paths[1].write_text("\n".join(lines) + "\n")
    plot(result, paths[2])
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1 minute: 257 tokens, segment 64, small grid")
    parser.add_argument("--tokens", type=int, default=None, help="first N tokens of the text (default: all)")
    parser.add_argument("--segment", type=int, default=128)
    parser.add_argument("--cache", type=int, default=384)
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS))
    parser.add_argument("--steps", default=",".join(map(str, STEPS)))
    parser.add_argument("--no-recompute", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.segment, args.cache, args.lrs = 257, 64, 128, "1e-2,1e-1"
    tokens = np.asarray(mm.load_tokenizer().encode_for_model(read_sample("austen")))[:args.tokens]
    result = sweep(tokens, args.segment, args.cache, [float(x) for x in args.lrs.split(",")],
                   [int(x) for x in args.steps.split(",")], recompute=not args.no_recompute)
    command = ("python benchmarks/hso_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    paths = write_results(result, machine(), "hso_sweep_quick" if args.quick else "hso_sweep", command)
    print("wrote " + ", ".join(str(p) for p in paths))
    b = result["best"]
    print(f"best: hso_steps={b['hso_steps']} lr={b['lr']:g} perplexity {b['ppl']:.3f} "
          f"(lr=0 {result['lr0']['ppl']:.3f}, sliding window {result['sliding_window']['ppl']:.3f})")


if __name__ == "__main__":
    main()
