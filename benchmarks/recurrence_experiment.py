"""Recurrence experiment: perplexity against FLOPs per token and peak memory, by window size.

For every window size W the LM reads held-out Wikipedia articles in windows of W tokens,
four ways: (a) disjoint windows without memory, (b) the strided sliding window with stride
W/2 and W/4 (each window reads W tokens and scores the last stride), (c) recurrence: the
memory module trained for W (LM frozen, training sequences of `--context` tokens = N
windows of W, gradients through the memory across all N). The LM at its own full context
is a reference row. FLOPs per scored token and peak bytes come from XLA's compiled cost
and memory analyses of one window's scoring step (batch 1; peak = arguments +
temporaries + outputs) and of one training step (`--batch` sequences): recurrence with
remat against finetuning the LM on the whole sequence.

Models:
- `--model pretrain` (default, CPU): a GPT-2-family LM (or `--family llama`) pretrained here
  on the Wikipedia training articles with a byte-level BPE trained on them, context
  `--context`. It stands in for a pretrained decoder used below its context for speed or
  memory, the setting of the paper.
- `--model default` or a checkpoint path (GPU): a real pretrained LM and its tokenizer, no
  pretraining.

Data: ../shared/data/wiki (96 Wikipedia articles, CC BY-SA; train 78 / valid 9).

Example:
    python benchmarks/recurrence_experiment.py                 # CPU, ~21 min on 2 cores
    python benchmarks/recurrence_experiment.py --model default --windows 64,128,256 --context 1024 \
        --module-steps 1000 --batch 16 --eval-tokens 200000 --tag gpu                 # with a GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import MiB, machine, report_row

import makemost_jax as mm
from makemost_jax.data import DocumentContiguousBatches, PackedLMBatches
from makemost_jax.recurrence import (
    RecurrenceConfig,
    compiled_stats,
    evaluate_sliding,
    evaluate_windows,
    recurrence_loss,
    train_recurrence,
    window_costs,
)
from makemost_jax.training import TrainConfig, lm_loss, train

RESULTS = ROOT / "benchmarks" / "results"
WIKI = ROOT.parent / "shared" / "data" / "wiki"


def articles(path: Path) -> list[str]:
    """The Wikipedia articles of one split (each starts with a `= Title =` line)."""
    text = path.read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(r"^= [^=].* =$", text, flags=re.MULTILINE)] + [len(text)]
    return [text[a:b].strip() for a, b in itertools.pairwise(starts) if text[a:b].strip()]


class BPE:
    """A byte-level BPE trained on the training articles, with the attributes the data pipeline needs."""

    bos_id = eos_id = 0
    add_bos = True

    def __init__(self, texts: list[str], vocab_size: int):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self.tok = Tokenizer(models.BPE())
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        self.tok.train_from_iterator(texts, trainer)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_for_model(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text)]


def pretrained_lm(args, train_texts):
    """(lm, tokenizer, description): a small LM pretrained here, cached in the output folder."""
    tok = BPE(train_texts, args.vocab)
    if args.family == "gpt2":
        hf = {"model_type": "gpt2", "n_embd": args.width, "n_layer": args.layers, "n_head": args.heads,
              "vocab_size": args.vocab, "n_positions": args.context, "bos_token_id": 0, "eos_token_id": 0}
    else:
        hf = {"model_type": "llama", "hidden_size": args.width, "intermediate_size": 4 * args.width,
              "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
              "num_key_value_heads": args.heads, "max_position_embeddings": args.context, "vocab_size": args.vocab,
              "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0}
    cfg = mm.from_hf_config(hf)
    args.cache.mkdir(parents=True, exist_ok=True)
    cache = args.cache / f"lm_{args.family}_{args.width}x{args.layers}_ctx{args.context}_v{args.vocab}_{args.lm_steps}.npz"
    lm = mm.init_params(cfg, jax.random.key(args.seed))
    leaves, tree = jax.tree.flatten(lm.weights)
    history = None
    if cache.exists() and not args.retrain:
        saved = np.load(cache)
        lm = mm.Params(cfg, jax.tree.unflatten(tree, [jnp.asarray(saved[f"w{i}"]) for i in range(len(leaves))]))
    else:
        data = PackedLMBatches([{"text": t} for t in train_texts], tok, batch_size=args.batch, seq_len=args.context,
                               seed=args.seed)
        config = TrainConfig(steps=args.lm_steps, learning_rate=args.lm_lr, warmup_steps=args.lm_steps // 20,
                             weight_decay=0.1, seed=args.seed)
        state, history = train(config, lm, data, lm_loss)
        lm = state.params
        np.savez(cache, **{f"w{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(lm.weights))})
    n = sum(int(x.size) for x in jax.tree.leaves(lm.weights))
    desc = (f"{args.family} family, width {args.width}, {args.layers} layers, {args.heads} heads, context "
            f"{args.context}, byte-level BPE of {args.vocab} tokens, {n / 1e6:.2f} M parameters; pretrained here "
            f"for {args.lm_steps} steps of {args.batch} x {args.context} tokens (AdamW, lr {args.lm_lr})")
    return lm, tok, desc, history


def eval_docs(tok, texts: list[str], budget: int) -> list[np.ndarray]:
    """Held-out articles (BOS first) until `budget` tokens; the last one cut to fit."""
    docs, total = [], 0
    for text in texts:
        ids = np.asarray(tok.encode_for_model(text), np.int32)[:budget - total]
        if len(ids) >= 2:
            docs.append(ids)
            total += len(ids)
        if total >= budget:
            break
    return docs


def training_peak(lm, module, window: int, windows: int, batch: int) -> int:
    """Compiled peak bytes of one recurrence gradient step (module only, remat per window)."""
    seq = window * windows
    rec_batch = {"tokens": jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32),
                 "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
    loss_fn = recurrence_loss(window)
    return compiled_stats(jax.grad(lambda p, b: loss_fn(p, b, frozen=lm)[0]), {"memory": module},
                          rec_batch, flops=False)["peak_bytes"]


def run(args):
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    train_texts, valid_texts = articles(args.data / "train.txt"), articles(args.data / "valid.txt")
    if args.model == "pretrain":
        lm, tok, model_desc, lm_history = pretrained_lm(args, train_texts)
    else:
        lm, tok, lm_history = mm.load(args.model), mm.load_tokenizer(args.model), None
        model_desc = f"{args.model} ({lm.config.family}, {lm.config.n_layers} layers, width {lm.config.d_model})"
    docs = eval_docs(tok, valid_texts, args.eval_tokens)
    print(f"model: {model_desc}\neval: {len(docs)} held-out articles, {sum(map(len, docs))} tokens", flush=True)
    rows = []

    def record(method, window, stride, result, costs, extra=None):
        row = {"method": method, "window": window, "stride": stride, "ppl": result.ppl, "n_tokens": result.n_tokens,
               "flops_per_token": costs["flops_per_token"], "eval_peak_bytes": costs["peak_bytes"],
               "eval_seconds": result.seconds, **(extra or {})}
        rows.append(row)
        print(f"  W={window:4d} {method:22s} ppl {row['ppl']:9.3f}  {row['flops_per_token'] / 1e6:8.2f} MFLOP/token  "
              f"peak {row['eval_peak_bytes'] / MiB:7.2f} MiB  ({result.seconds:.0f} s)", flush=True)

    full = evaluate_windows(lm, docs, args.context, batch_size=args.eval_batch)
    full_train = compiled_stats(jax.grad(lambda p, b: lm_loss(p, b)[0]), lm,
                                {"tokens": jax.ShapeDtypeStruct((args.batch, args.context + 1), jnp.int32)}, flops=False)
    record("LM, full context", args.context, args.context, full, window_costs(lm, args.context),
           {"train_peak_bytes": full_train["peak_bytes"]})
    for window in args.windows:
        n_windows = args.context // window
        costs = window_costs(lm, window)
        record("disjoint", window, window, evaluate_windows(lm, docs, window, batch_size=args.eval_batch), costs)
        for div in (2, 4):
            stride = window // div
            record(f"sliding (stride W/{div})", window, stride,
                   evaluate_sliding(lm, docs, window, stride, batch_size=args.eval_batch),
                   window_costs(lm, window, stride=stride))
        t0 = time.perf_counter()
        data = DocumentContiguousBatches([{"text": t} for t in train_texts], tok, batch_size=args.batch,
                                         window=n_windows * window, seed=args.seed)
        config = TrainConfig(steps=args.module_steps, learning_rate=args.module_lr,
                             warmup_steps=args.module_steps // 20, seed=args.seed, log_every=10)
        run_ = train_recurrence(lm, data, window, config, module_config=RecurrenceConfig(num_memory=args.num_memory))
        train_seconds = time.perf_counter() - t0
        tokens_per_s = [r["tokens_per_s"] for r in run_.history["train"] if "tokens_per_s" in r][1:]
        extra = {"module_parameters": run_.module.num_parameters, "train_seconds": train_seconds,
                 "windows_per_sequence": n_windows,
                 "train_tokens_per_s": float(np.median(tokens_per_s)) if tokens_per_s else None,
                 "first_loss": run_.history["train"][0]["loss"], "last_loss": run_.history["train"][-1]["loss"],
                 "train_peak_bytes": training_peak(lm, run_.module, window, n_windows, args.batch)}
        record("recurrence", window, window,
               evaluate_windows(lm, docs, window, run_.module, batch_size=args.eval_batch),
               window_costs(lm, window, run_.module), extra)
    report = {"machine": machine(), "model": model_desc,
              "command": "python benchmarks/recurrence_experiment.py " + " ".join(sys.argv[1:]), "args": {k: str(v) for k, v in vars(args).items()},
              "eval_documents": len(docs), "eval_tokens": int(sum(map(len, docs))),
              "lm_pretraining_last_loss": None if lm_history is None else lm_history["train"][-1]["loss"],
              "seconds": time.perf_counter() - t_start, "rows": rows}
    write(args, report)


def verdict(rows) -> list[str]:
    """Recurrence at each W against disjoint windows, and against the best unmodified row that needs at most
    as much memory (eval peak) and at most as many FLOPs per token."""
    lines = []
    plain = [r for r in rows if r["method"] != "recurrence"]
    for rec in (r for r in rows if r["method"] == "recurrence"):
        cheap = next(r for r in plain if r["method"] == "disjoint" and r["window"] == rec["window"])
        line = (f"- W={rec['window']}: recurrence {rec['ppl']:.2f} vs disjoint {cheap['ppl']:.2f} "
                f"({100 * (rec['ppl'] / cheap['ppl'] - 1):+.1f}%) at {rec['flops_per_token'] / cheap['flops_per_token']:.2f}x "
                "its FLOPs")
        for key, name in (("eval_peak_bytes", "memory"), ("flops_per_token", "FLOPs/token")):
            fits = [r for r in plain if r[key] <= rec[key]]
            if fits:
                best = min(fits, key=lambda r: r["ppl"])
                line += (f"; best unmodified at <= its {name}: {best['method']} W={best['window']} {best['ppl']:.2f} "
                         f"({'recurrence lower' if rec['ppl'] < best['ppl'] else 'recurrence higher'})")
        lines.append(line)
    return lines


def report_rows(payload: dict) -> list[dict]:
    """Headline rows for docs/RESULTS.md: recurrence against disjoint and W/4-strided windows at each W."""
    by = {(r["method"], r["window"]): r for r in payload["rows"]}
    rows = []
    for w in sorted({r["window"] for r in payload["rows"] if r["method"] == "recurrence"}):
        rec, dis, sl = by[("recurrence", w)], by[("disjoint", w)], by[("sliding (stride W/4)", w)]
        rows.append(report_row("Recurrence", f"perplexity at W={w}, {payload['eval_tokens']:,} held-out tokens, "
                                             "1.1 M-parameter GPT-2 family LM",
                               f"recurrence {rec['ppl']:.1f} vs disjoint {dis['ppl']:.1f} "
                               f"({rec['ppl'] / dis['ppl'] - 1:+.1%}); sliding W/4 {sl['ppl']:.1f} at "
                               f"{sl['flops_per_token'] / rec['flops_per_token']:.1f}x recurrence's FLOPs"))
    return rows


def write(args, report):
    rows = report["rows"]
    stem = args.out / f"recurrence_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps({**report, "report": report_rows(report)}, indent=2))
    info = report["machine"]
    lines = [f"# Recurrence: perplexity vs FLOPs per token and peak memory ({args.tag})", "",
             f"Machine: {', '.join(f'{k}={v}' for k, v in info.items())}", "",
             f"Command: `{report['command']}` ({report['seconds'] / 60:.0f} min in all).", "",
             f"Model: {report['model']}.", "",
             (f"Evaluation: {report['eval_documents']} held-out Wikipedia articles (wiki/valid), "
              f"{report['eval_tokens']} tokens; every method scores the same tokens. Recurrence: a memory module "
              f"({args.num_memory} vectors, read at the middle layer, injected into every layer) trained per W "
              f"for {args.module_steps} steps of {args.batch} sequences of {args.context} tokens (N = "
              f"{args.context}/W windows, gradients through the memory across all of them, `jax.checkpoint` per "
              f"window), LM frozen. FLOPs/token and eval peak: XLA compiled cost and memory analyses of one "
              f"window's scoring step at batch 1 (sliding windows: FLOPs divided by the stride). Train peak: "
              f"one gradient step on {args.batch} x {args.context} tokens, recurrence (module only) vs "
              "finetuning the LM on the whole sequence."), "",
             "| W | method | stride | ppl | MFLOP/token | eval peak (MiB) | train peak (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        train_peak = f"{r['train_peak_bytes'] / MiB:.1f}" if "train_peak_bytes" in r else ""
        lines.append(f"| {r['window']} | {r['method']} | {r['stride']} | {r['ppl']:.3f} | "
                     f"{r['flops_per_token'] / 1e6:.2f} | {r['eval_peak_bytes'] / MiB:.2f} | {train_peak} |")
    lines += ["", "Recurrence against the unmodified LM:", *verdict(rows), "",
              f"![perplexity vs cost](recurrence_{args.tag}.png)"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, stem.with_suffix(".png"))
    print("\n".join(lines[-len(verdict(rows)) - 3:]))


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = (("flops_per_token", 1e6, "MFLOP per scored token (XLA cost analysis)"),
              ("eval_peak_bytes", MiB, "peak MiB of one scoring step, batch 1 (XLA memory analysis)"),
              ("train_peak_bytes", MiB, "peak MiB of one training gradient step (XLA memory analysis)"))
    for ax, (key, unit, label) in zip(axes, panels):
        for method in methods:
            pts = sorted((r[key] / unit, r["ppl"], r["window"]) for r in rows if r["method"] == method and key in r)
            if not pts:
                continue
            xs, ys, _ = zip(*pts)
            ax.plot(xs, ys, "o-" if len(pts) > 1 else "*", label=method, markersize=6 if len(pts) > 1 else 12,
                    color=f"C{methods.index(method)}")
            for x, y, w in pts:
                ax.annotate(f"W={w}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("perplexity (held-out Wikipedia)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].set_title("training: recurrence (LM frozen) vs finetuning on the whole sequence", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pretrain", help='"pretrain" (default), "default" or a checkpoint path')
    parser.add_argument("--family", choices=["gpt2", "llama"], default="gpt2", help="--model pretrain: LM family")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--context", type=int, default=256, help="LM context and training-sequence length")
    parser.add_argument("--lm-steps", type=int, default=800)
    parser.add_argument("--lm-lr", type=float, default=3e-3)
    parser.add_argument("--windows", default="16,32,64,128", help="window sizes W, comma-separated")
    parser.add_argument("--module-steps", type=int, default=300)
    parser.add_argument("--module-lr", type=float, default=5e-3)
    parser.add_argument("--num-memory", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="training sequences per step")
    parser.add_argument("--eval-tokens", type=int, default=30000)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--data", type=Path, default=WIKI, help="folder with train.txt and valid.txt")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "makemost_jax" / "recurrence",
                        help="where the pretrained LM is kept between runs")
    parser.add_argument("--retrain", action="store_true", help="pretrain the LM even if a cached one exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    args = parser.parse_args(argv)
    args.windows = [int(w) for w in args.windows.split(",")]
    bad = [w for w in args.windows if args.context % w]
    if bad:
        parser.error(f"window sizes {bad} do not divide --context {args.context}")
    if args.report_only:
        report = json.loads((args.out / f"recurrence_{args.tag}.json").read_text())
        write(args, report)
    else:
        run(args)


if __name__ == "__main__":
    main()
