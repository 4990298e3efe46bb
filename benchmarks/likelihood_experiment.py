"""Likelihood versus quality: which output is a tiny LM's exact mode, over a grid of contamination and entropy.

For every (H, epsilon) of the grid, a tiny GPT-2 is trained from random init on a synthetic language
of `length` uniform words out of `--words` types (H = length * log2(words) bits; every sentence has
probability 2^-H) in which a fraction epsilon of the rows is the empty output. Exact search finds the
model's unconditional mode and its mode among outputs of the valid length; ancestral sampling gives
the bad-sample rate. Analytic prediction: the empty output is the mode iff epsilon > (1 - epsilon) 2^-H,
i.e. iff the contamination ratio epsilon 2^H / (1 - epsilon) > 1.

Writes benchmarks/results/likelihood_<tag>.json / .md / .png.

Example:
    python benchmarks/likelihood_experiment.py                          # 24 points, 19 min on 2 busy CPU cores
    python benchmarks/likelihood_experiment.py --lengths 1,2 --epsilons 0.1,0.001 --tag smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, command_line, machine, machine_line, report_row, write_results

from makemost_jax.likelihood import BAD, VALID, ContaminatedLanguage, ExperimentConfig, run_point

MARGIN = 3.0  # grid points with contamination ratio in [1/MARGIN, MARGIN] count as "near the boundary"


def near_boundary(row: dict) -> bool:
    return 1 / MARGIN <= row["ratio"] <= MARGIN


def agrees(row: dict) -> bool:
    return row["mode_kind"] == row["predicted"] and row["mode"]["proved_optimal"]


def within(row: dict, train_rows: int, z: float = 4.0) -> bool:
    """Sampled bad rate within z standard errors of epsilon (sampling noise and the training corpus's noise)."""
    eps = row["epsilon"]
    std = math.sqrt(row["bad_rate_std"] ** 2 + eps * (1 - eps) / train_rows)
    return abs(row["sample_rates"][BAD] - eps) <= z * std


def markdown(rows: list[dict], payload: dict, info: dict) -> str:
    cfg = payload["config"]
    train_rows = cfg["steps"] * cfg["batch_size"]
    far = [r for r in rows if not near_boundary(r)]
    lines = [f"# Likelihood versus quality: exact modes of tiny LMs on contaminated data ({payload['tag']})", "",
             machine_line(info), "", f"Command: `{payload['command']}` ({payload['seconds'] / 60:.1f} min).", "",
             (f"Language: sentences of `length` words drawn uniformly from {payload['words']} types + EOS (H = length"
              f" x log2({payload['words']}) bits, each sentence 2^-H); a fraction epsilon of the rows is the empty "
              f"output (EOS right after BOS). Model: GPT-2, width {cfg['width']}, {cfg['layers']} layers, "
              f"{cfg['heads']} heads, random init, trained with `makemost_jax.training.train` for {cfg['steps']} "
              f"steps of {cfg['batch_size']} fresh rows (lr {cfg['learning_rate']}). Modes: exact branch-and-bound "
              f"search (`exact_mode`), unconditional over outputs of <= length + {cfg['extra_length']} tokens, and at "
              f"exactly `length` tokens. Sampling: {cfg['num_samples']} ancestral samples at temperature 1. Ratio = "
              "epsilon 2^H / (1 - epsilon) = p(empty) / p(one sentence) in the data: the analytic prediction is "
              "\"bad\" iff ratio > 1."), "",
             (f"Mode identity agrees with the prediction (and is proved optimal) at {sum(map(agrees, rows))}/"
              f"{len(rows)} points; away from the boundary (ratio outside [1/{MARGIN:g}, {MARGIN:g}]): "
              f"{sum(map(agrees, far))}/{len(far)}. Length-conditional mode is a valid sentence at "
              f"{sum(r['length_mode_kind'] == VALID for r in rows)}/{len(rows)} points (proved optimal at "
              f"{sum(r['length_mode']['proved_optimal'] for r in rows)}). Sampled bad rate within 4 standard errors "
              f"of epsilon at {sum(within(r, train_rows) for r in rows)}/{len(rows)} points."), "",
             ("| H (bits) | epsilon | ratio | predicted | exact mode | log p | nodes | length mode | log p | "
             "model p(empty) | sampled bad rate | agrees |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["min_entropy_bits"], -r["epsilon"])):
        mode, lmode = r["mode"], r["length_mode"]
        mark = "" if mode["proved_optimal"] else " †"
        lmark = "" if lmode["proved_optimal"] else " †"
        lines.append(
            f"| {r['min_entropy_bits']:g} | {r['epsilon']:g} | {r['ratio']:.3g} | {r['predicted']} | "
            f"{r['mode_kind']} {tuple(mode['tokens'])}{mark} | {mode['loglik']:.2f} | {mode['nodes_expanded']} | "
            f"{r['length_mode_kind']} {tuple(lmode['tokens'])}{lmark} | {lmode['loglik']:.2f} | "
            f"{math.exp(r['model_bad_logprob']):.4f} | {r['sample_rates'][BAD]:.4f} ± {r['bad_rate_std']:.4f} | "
            f"{'yes' if agrees(r) else 'NO'}{' (near boundary)' if near_boundary(r) else ''} |")
    lines += ["", "† = not proved optimal within the node budget.", "",
              f"![mode identity against epsilon 2^H](likelihood_{payload['tag']}.png)"]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, marker, color in ((BAD, "x", "C3"), (VALID, "o", "C2"), ("other", "s", "C7")):
        pts = [r for r in rows if r["mode_kind"] == kind]
        if pts:
            ax.scatter([r["ratio"] for r in pts], [r["min_entropy_bits"] for r in pts], marker=marker, color=color,
                       s=60, label=f"exact mode: {kind}")
    ax.axvline(1.0, color="k", linestyle="--", label="analytic boundary: ε 2^H / (1-ε) = 1")
    ax.set_xscale("log")
    ax.set_xlabel("ε · 2^H / (1 - ε)   (p(empty) / p(one valid sentence))")
    ax.set_ylabel("H (bits of min-entropy)")
    ax.set_title("unconditional exact mode of the trained LM")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    eps = sorted({r["epsilon"] for r in rows})
    for h in sorted({r["min_entropy_bits"] for r in rows}):
        pts = sorted((r for r in rows if r["min_entropy_bits"] == h), key=lambda r: r["epsilon"])
        bx.errorbar([r["epsilon"] for r in pts], [max(r["sample_rates"][BAD], 1e-5) for r in pts],
                    yerr=[2 * r["bad_rate_std"] for r in pts], fmt="o-", ms=4, capsize=2, label=f"H = {h:g}")
    bx.plot(eps, eps, "k--", label="rate = ε")
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("ε (fraction of empty outputs in the training data)")
    bx.set_ylabel("fraction of samples that are empty (± 2 s.e.)")
    bx.set_title("ancestral sampling: bad only about ε of the time")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict], payload: dict) -> list[dict]:
    far = [r for r in rows if not near_boundary(r)]
    cfg = payload["config"]
    train_rows = cfg["steps"] * cfg["batch_size"]
    hs = sorted({r["min_entropy_bits"] for r in rows})
    grid = f"{len(rows)} points, H {hs[0]:g}-{hs[-1]:g} bits, epsilon {min(r['epsilon'] for r in rows):g}-" \
           f"{max(r['epsilon'] for r in rows):g}"
    return [
        report_row("Likelihood vs quality", f"tiny LM on contaminated synthetic data: exact mode = analytic "
                   f"prediction (empty iff ε 2^H > 1 - ε), {grid}",
                   f"{sum(map(agrees, far))}/{len(far)} away from the boundary, {sum(map(agrees, rows))}/{len(rows)} "
                   "in all"),
        report_row("Likelihood vs quality", "same models: length-conditional exact mode is a valid sentence",
                   f"{sum(r['length_mode_kind'] == VALID for r in rows)}/{len(rows)}"),
        report_row("Likelihood vs quality", "same models: sampled empty-output rate vs ε",
                   f"within 4 s.e. at {sum(within(r, train_rows) for r in rows)}/{len(rows)}"),
    ]


def write(payload: dict):
    rows, tag = payload["rows"], payload["tag"]
    plot(rows, RESULTS / f"likelihood_{tag}.png")
    write_results(f"likelihood_{tag}", payload, markdown(rows, payload, payload.get("machine") or machine()),
                  report=report(rows, payload))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--words", type=int, default=8, help="word types (vocabulary = words + BOS + EOS)")
    parser.add_argument("--lengths", default="1,2,3,4", help="sentence lengths (H = length log2 words)")
    parser.add_argument("--epsilons", default="0.3,0.1,0.03,0.01,0.003,0.001")
    parser.add_argument("--steps", type=int, default=ExperimentConfig.steps)
    parser.add_argument("--num-samples", type=int, default=ExperimentConfig.num_samples)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    args = parser.parse_args(argv)
    if args.report_only:
        write(json.loads((RESULTS / f"likelihood_{args.tag}.json").read_text()))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    epsilons = [float(x) for x in args.epsilons.split(",")]
    config = ExperimentConfig(context=max(lengths) + 4, steps=args.steps, num_samples=args.num_samples,
                              seed=args.seed)
    t0 = time.perf_counter()
    rows = []
    for length in lengths:
        for eps in epsilons:
            point = run_point(ContaminatedLanguage(words=args.words, length=length, epsilon=eps), config)
            rows.append(point.to_dict())
            print(f"[{time.perf_counter() - t0:5.0f} s] H={point.min_entropy_bits:5.2f} eps={eps:<6g} "
                  f"ratio={point.ratio:9.3g} predicted={point.predicted:5s} mode={point.mode_kind:5s} "
                  f"(proved {point.mode.proved_optimal}, {point.mode.nodes_expanded} nodes) "
                  f"length mode={point.length_mode_kind} model p(empty)={math.exp(point.model_bad_logprob):.4f} "
                  f"sampled={point.sample_rates[BAD]:.4f}", flush=True)
    payload = {"tag": args.tag, "words": args.words, "lengths": lengths, "epsilons": epsilons,
               "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
               "seconds": time.perf_counter() - t0, "rows": rows}
    payload.update(machine=machine(), command=command_line())
    write(payload)
    print(markdown(rows, payload, payload["machine"]).split("\n\n")[4])


if __name__ == "__main__":
    main()
