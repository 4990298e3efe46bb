"""Recurrence on a pretrained LM (SmolLM2-135M): perplexity against FLOPs, scoring memory and training memory.

The question: does the memory module let a pretrained LM read long documents in windows of W tokens better
than the ways that need no training, at the same cost? For every W in `--windows` the LM scores held-out
documents of `--doc-tokens` tokens (Austen's Persuasion, the novel held out of training, and Wikipedia, out of
domain) eight ways:

- disjoint windows (no memory), and the strided sliding window at strides W/2 and W/4 (every window reads W
  tokens and scores the last stride): no training;
- recurrence, the memory module trained with the LM frozen; and the same module scored with its memory reset
  to its learned initial memory at every window (what it gives as a learned prefix, without carrying anything);
- recurrence, the module and the LM trained together;
- the control for that: the LM finetuned with the same budget on the same disjoint windows, no memory, so
  that domain adaptation is not credited to recurrence;
- and, once, the LM at full context (the whole document in one pass).

Training reads chapters of the other five novels in sequences of `--seq` tokens (`--seq`/W windows, gradients
through the memory across all of them), `--steps` steps of `--batch` sequences. FLOPs per scored token and the
scoring peak come from XLA's compiled cost and memory analyses of one window's scoring step at batch 1; the
training peak from XLA's memory analysis of one gradient step (`jax.checkpoint` per window, the library's
default; the runs themselves train without it, which gives the same gradients faster).

Work is split into units (`full`, and `W:baselines`, `W:sink`, `W:frozen`, `W:finetuned`, `W:finetune-only`
per W), each
saved when done under `<out-dir>/recurrence_smollm2_units/`: a killed run resumes where it stopped, and two
processes can share the units (`--units`; one skips a unit that another live process is running) to use both
cores. The report is written once every unit is there.

Example:
    python benchmarks/recurrence_smollm2.py --quick --out-dir /tmp/rq    # ~3 min: tiny random LM, real tokenizer
    taskset -c 0 python benchmarks/recurrence_smollm2.py --units 64:finetuned,128:finetuned,...  &   # full run,
    taskset -c 1 python benchmarks/recurrence_smollm2.py --units full,64:frozen,...              &   # two cores
    python benchmarks/recurrence_smollm2.py --report-only
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    ROOT,
    MiB,
    machine,
    machine_line,
    report_row,
    run_units,
    saved_units,
    unit_free_command,
    write_results,
)

import makemost_jax as mm
from makemost_jax.assets import read_sample
from makemost_jax.data import DocumentContiguousBatches
from makemost_jax.recurrence import (
    RecurrenceConfig,
    compiled_stats,
    evaluate_sliding,
    evaluate_windows,
    recurrence_loss,
    train_recurrence,
    window_costs,
)
from makemost_jax.training import TrainConfig, lm_loss, make_optimizer, train

STEM = "recurrence_smollm2"
KINDS = ("baselines", "sink", "frozen", "finetuned", "finetune-only")
SINK = "disjoint + BOS sink"
METHODS = {"frozen": "recurrence, LM frozen", "finetuned": "recurrence + LM finetuned",
           "finetune-only": "LM finetuned, disjoint"}
# The frozen-LM module scored with its memory reset to the learned initial memory at every window: what the
# module gives as a learned prefix alone, without carrying anything from window to window.
NO_CARRY = "frozen-LM module, memory reset each window"
TRAINED = (*METHODS.values(), NO_CARRY)
DOMAINS = {"austen": "Persuasion (held out)", "wiki": "Wikipedia (out of domain)"}
QUICK = {"windows": "16", "seq": 64, "steps": 2, "eval_docs": 1, "doc_tokens": 129}


def chapters(text: str) -> list[str]:
    """A novel's chapters (split at its `CHAPTER I` / `Chapter 1` headings); the front matter dropped."""
    parts = re.split(r"^(?:CHAPTER|Chapter) [0-9IVXLC]+\.?\s*$", text, flags=re.MULTILINE)
    return [p.strip() for p in parts[1:] if p.strip()]


def texts(args) -> tuple[list[str], dict[str, list[str]]]:
    """(training chapters, {domain: evaluation texts}): five novels to train on, Persuasion and Wikipedia to test.

    `--quick` uses the bundled samples: the Austen sample's first half trains, its second half and the
    Wikipedia sample test.
    """
    if args.quick:
        paragraphs = [p for p in read_sample("austen").split("\n\n") if p.strip()]
        half = len(paragraphs) // 2
        train_docs = ["\n\n".join(paragraphs[i:i + 4]) for i in range(0, half, 4)]
        return train_docs, {"austen": ["\n\n".join(paragraphs[half:])], "wiki": [read_sample("wiki")]}
    austen = args.data / "austen"
    train_docs = [c for path in sorted(austen.glob("*.txt")) if path.stem != "persuasion"
                  for c in chapters(path.read_text(encoding="utf-8"))]
    wiki = (args.data / "wiki" / "valid.txt").read_text(encoding="utf-8")
    articles = [a for a in re.split(r"^(?== [^=].* =$)", wiki, flags=re.MULTILINE) if a.strip()]
    return train_docs, {"austen": chapters((austen / "persuasion.txt").read_text(encoding="utf-8")),
                        "wiki": articles}


def documents(tok, sources: list[str], n_docs: int, length: int) -> list[np.ndarray]:
    """`n_docs` documents of exactly `length` tokens (BOS + `length - 1` text tokens), evenly spaced over the
    consecutive pieces of `sources` (a source shorter than a piece gives none)."""
    pieces = []
    for text in sources:
        ids = tok.encode(text)
        pieces += [ids[i:i + length - 1] for i in range(0, len(ids) - length + 2, length - 1)]
    if len(pieces) < n_docs:
        raise SystemExit(f"only {len(pieces)} pieces of {length} tokens in the evaluation text; lower --eval-docs "
                         "or --doc-tokens")
    picks = np.linspace(0, len(pieces) - 1, n_docs).round().astype(int)
    return [np.asarray([tok.bos_id, *pieces[i]], np.int32) for i in picks]


def load_lm(args):
    """(LM, tokenizer, description). `--quick`: a tiny random Llama with the real tokenizer (checks the script,
    measures nothing)."""
    tok = mm.load_tokenizer()
    if args.quick:
        cfg = mm.from_hf_config({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "vocab_size": tok.vocab_size, "max_position_embeddings": 256})
        return mm.init_params(cfg, jax.random.key(0)), tok, "tiny random Llama (quick check, not a result)"
    lm = mm.load() if args.model == "default" else mm.load(args.model)
    n = sum(int(x.size) for x in jax.tree.leaves(lm.weights))
    name = "SmolLM2-135M-Instruct (the embedded default, Q4_1 GGUF dequantized to float32)" \
        if args.model == "default" else args.model
    return lm, tok, f"{name}: {lm.config.family}, {lm.config.n_layers} layers, width {lm.config.d_model}, {n / 1e6:.1f} M parameters"


class Costs:
    """XLA cost and memory numbers, each compiled once per process."""

    def __init__(self, lm, args):
        self.lm, self.args, self.cache = lm, args, {}

    def _get(self, key, fn):
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    def scoring(self, window: int, module=None, stride: int | None = None) -> dict:
        """FLOPs per scored token and peak bytes of one window's scoring step (batch 1)."""
        stats = self._get(("score", window, module is not None),
                          lambda: window_costs(self.lm, window, module))
        return {"flops_per_token": stats["flops"] / (stride or window), "eval_peak_bytes": stats["peak_bytes"]}

    def training(self, kind: str, window: int, module=None) -> int:
        """Peak bytes of one training gradient step on `--batch` x `--seq` tokens."""
        a = self.args
        seq_batch = {"tokens": jax.ShapeDtypeStruct((a.batch, a.seq + 1), jnp.int32),
                     "loss_mask": jax.ShapeDtypeStruct((a.batch, a.seq), jnp.float32)}

        def peak():
            if kind == "full":
                return compiled_stats(jax.grad(lambda p, b: lm_loss(p, b)[0]), self.lm, seq_batch,
                                      flops=False)["peak_bytes"]
            loss_fn = recurrence_loss(window)
            params = {"frozen": {"memory": module}, "finetuned": {"memory": module, "lm": self.lm},
                      "finetune-only": {"lm": self.lm}}[kind]
            frozen = self.lm if kind == "frozen" else None
            return compiled_stats(jax.grad(lambda p, b: loss_fn(p, b, frozen=frozen)[0]), params, seq_batch,
                                  flops=False)["peak_bytes"]

        return self._get(("train", kind, window), peak)


def windows_of(doc: np.ndarray, window: int, sink: int | None = None) -> list[np.ndarray]:
    """`doc` as one-window documents (each overlaps the next by one token, so every target is scored once).

    With `sink` (a token id, BOS), every window starts with it instead: `[sink] + W` text tokens, W inputs and W
    targets per window, the first target predicted from the sink alone.
    """
    if sink is None:
        return [doc[i:i + window + 1] for i in range(0, len(doc) - 1, window)]
    return [np.concatenate([[sink], doc[i:i + window]]).astype(np.int32) for i in range(1, len(doc), window)]


def score(lm, docs: dict[str, list[np.ndarray]], window: int, stride: int | None = None, module=None,
          carry: bool = True, sink: int | None = None) -> dict:
    """{domain: per-document NLL sums and token counts} for one method (sliding when `stride` is given;
    `carry=False`: every window on its own, from the module's initial memory, or from `sink`)."""
    out = {}
    for domain, doc_list in docs.items():
        if not carry:
            pieces = [windows_of(d, window, sink) for d in doc_list]
            results = [evaluate_windows(lm, p, window, module, batch_size=len(p)) for p in pieces]
        else:
            results = [evaluate_sliding(lm, [d], window, stride) if stride else
                       evaluate_windows(lm, [d], window, module, batch_size=1) for d in doc_list]
        out[domain] = {"doc_nll": [r.nll_sum for r in results], "doc_tokens": [r.n_tokens for r in results]}
    return out


def rows_for(method: str, window: int, stride: int, scores: dict, costs: dict, extra: dict | None = None) -> list:
    rows = []
    for domain, s in scores.items():
        nll, n = sum(s["doc_nll"]), sum(s["doc_tokens"])
        rows.append({"method": method, "window": window, "stride": stride, "domain": domain, "nll_sum": nll,
                     "n_tokens": n, "ppl": float(np.exp(nll / n)), **s, **costs, **(extra or {})})
        print(f"  {domain:7s} W={window:5d} {method:28s} ppl {rows[-1]['ppl']:8.3f}  "
              f"{costs['flops_per_token'] / 1e6:8.1f} MFLOP/token", flush=True)
    return rows


def two_rate_optimizer(config: TrainConfig, rates: dict[str, float]) -> optax.GradientTransformation:
    """The training loop's own optimizer for `config` (`make_optimizer`), with a learning rate per top-level
    group of the trainable dict."""
    return optax.multi_transform({name: make_optimizer(dataclasses.replace(config, learning_rate=lr))[0]
                                  for name, lr in rates.items()},
                                 lambda params: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()})


def train_unit(kind: str, lm, tok, train_docs: list[str], window: int, args):
    """Train one variant; returns (module or None, LM to score with, training record)."""
    data = DocumentContiguousBatches([{"text": t} for t in train_docs], tok, batch_size=args.batch,
                                     window=args.seq, seed=args.seed)
    warmup = max(1, args.steps // 10)
    base = {"steps": args.steps, "warmup_steps": warmup, "seed": args.seed, "log_every": 5, "progress": False}
    module_config = RecurrenceConfig(num_memory=args.num_memory)
    t0 = time.perf_counter()
    if kind == "frozen":
        run = train_recurrence(lm, data, window, TrainConfig(learning_rate=args.module_lr, **base),
                               module_config=module_config, remat=False)
        module, scored_lm, history = run.module, lm, run.history
    elif kind == "finetuned":
        optimizer = two_rate_optimizer(TrainConfig(**base), {"memory": args.module_lr, "lm": args.lm_lr})
        run = train_recurrence(lm, data, window, TrainConfig(optimizer=optimizer, **base),
                               module_config=module_config, finetune=True, remat=False)
        module, scored_lm, history = run.module, run.lm, run.history
    else:
        state, history = train(TrainConfig(learning_rate=args.lm_lr, **base), {"lm": jax.tree.map(jnp.copy, lm)},
                               data, recurrence_loss(window, remat=False))
        module, scored_lm = None, state.params["lm"]
    losses = [r["loss"] for r in history["train"]]
    speeds = [r["tokens_per_s"] for r in history["train"] if "tokens_per_s" in r][1:]
    record = {"seconds": time.perf_counter() - t0, "first_loss": losses[0], "last_loss": losses[-1],
              "mean_loss_last_5": float(np.mean(losses[-5:])), "losses": losses,
              "tokens_per_s": float(np.median(speeds)) if speeds else None,
              "module_parameters": None if module is None else module.num_parameters}
    print(f"  trained {kind} W={window}: loss {losses[0]:.3f} -> {record['mean_loss_last_5']:.3f} (last 5) in "
          f"{record['seconds']:.0f} s", flush=True)
    return module, scored_lm, record


def run_unit(unit: str, lm, tok, train_docs, docs, costs: Costs, args) -> list[dict]:
    if unit == "full":
        length = args.doc_tokens
        extra = {"train_peak_bytes": costs.training("full", length)}
        return rows_for("full context", length, length, score(lm, docs, length), costs.scoring(length), extra)
    window, kind = int(unit.split(":")[0]), unit.split(":")[1]
    if kind == "baselines":
        rows = rows_for("disjoint", window, window, score(lm, docs, window), costs.scoring(window))
        for div in (2, 4):
            stride = window // div
            rows += rows_for(f"sliding W/{div}", window, stride, score(lm, docs, window, stride),
                             costs.scoring(window, stride=stride))
        return rows
    if kind == "sink":
        return rows_for(SINK, window, window, score(lm, docs, window, carry=False, sink=tok.bos_id),
                        costs.scoring(window))
    module, scored_lm, record = train_unit(kind, lm, tok, train_docs, window, args)
    extra = {"train_peak_bytes": costs.training(kind, window, module), "training": record}
    rows = rows_for(METHODS[kind], window, window, score(scored_lm, docs, window, module=module),
                    costs.scoring(window, module), extra)
    if kind == "frozen":
        rows += rows_for(NO_CARRY, window, window, score(lm, docs, window, module=module, carry=False),
                         costs.scoring(window, module), extra)
    return rows


def all_units(windows: list[int]) -> list[str]:
    return ["full", *(f"{w}:{k}" for w in windows for k in KINDS)]


def run(args):
    stem = STEM + ("_quick" if args.quick else "")
    unit_dir = args.out_dir / f"{stem}_units"
    unit_dir.mkdir(parents=True, exist_ok=True)
    units = all_units(args.windows) if args.units == "all" else args.units.split(",")
    unknown = sorted(set(units) - set(all_units(args.windows)))
    if unknown:
        raise SystemExit(f"unknown units {unknown}; choose from {all_units(args.windows)}")
    lm, tok, desc = load_lm(args)
    train_docs, sources = texts(args)
    docs = {d: documents(tok, s, args.eval_docs, args.doc_tokens) for d, s in sources.items()}
    print(f"model: {desc}\ntraining: {len(train_docs)} chapters; evaluation: "
          f"{', '.join(f'{len(v)} x {args.doc_tokens} tokens of {d}' for d, v in docs.items())}", flush=True)
    costs = Costs(lm, args)
    run_units(units, unit_dir, lambda unit: {"model": desc, "machine": machine(), "rows": run_unit(
        unit, lm, tok, train_docs, docs, costs, args)}, time_key="seconds")
    report(args, stem, unit_dir)


def report(args, stem: str, unit_dir: Path):
    """Write JSON, Markdown and plot once every unit is saved."""
    saved = saved_units(all_units(args.windows), unit_dir)
    if saved is None:
        return
    saved = list(saved.values())
    rows = [r for s in saved for r in s["rows"]]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("report_only", "units", "out_dir")}
    payload = {"machine": saved[0]["machine"], "command": unit_free_command(), "model": saved[0]["model"], "settings": settings,
               "unit_seconds": {s["unit"]: s["seconds"] for s in saved}, "rows": rows}
    lines = verdict(rows)
    markdown = markdown_report(payload, lines, stem)
    write_results(stem, payload, markdown, report_rows(rows, args), out_dir=args.out_dir)
    plot(rows, args.out_dir / f"{stem}.png")
    print("\n".join(lines))


def best_at_most(rows, rec, key):
    fits = [r for r in rows if r[key] <= rec[key] * 1.0001 and r["method"] not in TRAINED]
    return min(fits, key=lambda r: r["ppl"]) if fits else None


def verdict(rows) -> list[str]:
    """Per domain and W: each recurrence variant against its control and the best untrained method that costs
    no more FLOPs per token, and no more scoring memory."""
    by = {(r["domain"], r["method"], r["window"]): r for r in rows}
    lines = []
    for domain, domain_name in DOMAINS.items():
        for window in sorted({r["window"] for r in rows if r["method"] == METHODS["frozen"]}):
            frozen, tuned = by[(domain, METHODS["frozen"], window)], by[(domain, METHODS["finetuned"], window)]
            disjoint, control = by[(domain, "disjoint", window)], by[(domain, METHODS["finetune-only"], window)]
            reset = by[(domain, NO_CARRY, window)]
            line = (f"- {domain_name}, W={window}: frozen-LM recurrence {frozen['ppl']:.2f} vs disjoint "
                    f"{disjoint['ppl']:.2f} ({frozen['ppl'] / disjoint['ppl'] - 1:+.1%}) and vs the same module with "
                    f"its memory reset every window {reset['ppl']:.2f} ({frozen['ppl'] / reset['ppl'] - 1:+.1%}); "
                    "recurrence + finetuning "
                    f"{tuned['ppl']:.2f} vs finetuning alone {control['ppl']:.2f} "
                    f"({tuned['ppl'] / control['ppl'] - 1:+.1%})")
            for key, name in (("flops_per_token", "FLOPs/token"), ("eval_peak_bytes", "scoring memory")):
                best = best_at_most(rows=[r for r in rows if r["domain"] == domain], rec=frozen, key=key)
                if best:
                    line += (f"; best untrained method at <= frozen recurrence's {name}: {best['method']} "
                             f"W={best['window']} {best['ppl']:.2f}")
            lines.append(line + ".")
    return lines


def markdown_report(payload: dict, lines: list[str], stem: str) -> str:
    s = payload["settings"]
    rows = payload["rows"]
    head = ["# Recurrence on a pretrained LM: perplexity vs FLOPs, scoring memory and training memory", "",
            machine_line(payload["machine"]), "",
            f"Model: {payload['model']}.", "",
            (f"Evaluation: {s['eval_docs']} documents of {s['doc_tokens']} tokens from each domain (Persuasion, held "
             f"out of training; Wikipedia valid articles, out of domain); every method scores the same tokens. "
             f"Training (per W and variant): {s['steps']} steps of {s['batch']} x {s['seq']} tokens from the "
             f"chapters of the other five novels ({s['steps'] * s['batch'] * s['seq']:,} tokens), memory module lr "
             f"{s['module_lr']}, LM lr {s['lm_lr']}, {s['num_memory']} memory vectors. FLOPs/token and scoring "
             "peak: XLA cost and memory analyses of one window's scoring step, batch 1 (sliding: FLOPs divided by "
             "the stride). Training peak: XLA memory analysis of one gradient step on the training batch, "
             "`jax.checkpoint` per window."), "",
            f"Wall time per unit (s): {', '.join(f'{k} {v:.0f}' for k, v in payload['unit_seconds'].items())}.", ""]
    table = [("| domain | W | method | stride | ppl | MFLOP/token | scoring peak (MiB) | training peak (MiB) | "
              "train loss first -> last 5 |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["domain"], r["window"])):
        peak = f"{r['train_peak_bytes'] / MiB:.0f}" if "train_peak_bytes" in r else ""
        loss = (f"{r['training']['first_loss']:.3f} -> {r['training']['mean_loss_last_5']:.3f}"
                if "training" in r else "")
        table.append(f"| {r['domain']} | {r['window']} | {r['method']} | {r['stride']} | {r['ppl']:.3f} | "
                     f"{r['flops_per_token'] / 1e6:.1f} | {r['eval_peak_bytes'] / MiB:.0f} | {peak} | {loss} |")
    return "\n".join(head + table + ["", "Where recurrence stands:", *lines, "", f"![perplexity vs cost]({stem}.png)"])


def report_rows(rows, args) -> list[dict]:
    by = {(r["domain"], r["method"], r["window"]): r for r in rows}
    out = []
    for domain, domain_name in DOMAINS.items():
        for w in args.windows:
            f, t = by[(domain, METHODS["frozen"], w)], by[(domain, METHODS["finetuned"], w)]
            d, c, s4 = by[(domain, "disjoint", w)], by[(domain, METHODS["finetune-only"], w)], by[(domain, "sliding W/4", w)]
            reset = by[(domain, NO_CARRY, w)]
            out.append(report_row("Recurrence", f"SmolLM2-135M perplexity, {domain_name}, W={w} "
                                                 f"({args.steps} x {args.batch * args.seq} training tokens)",
                                  f"frozen-LM recurrence {f['ppl']:.2f} (memory reset each window "
                                  f"{reset['ppl']:.2f}) vs disjoint {d['ppl']:.2f}; with finetuning "
                                  f"{t['ppl']:.2f} vs finetuning alone {c['ppl']:.2f}; sliding W/4 {s4['ppl']:.2f} "
                                  f"at {s4['flops_per_token'] / f['flops_per_token']:.1f}x the FLOPs"))
    return out


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("flops_per_token", 1e6, "MFLOP per scored token (XLA cost analysis)"),
              ("eval_peak_bytes", MiB, "peak MiB of one scoring step, batch 1 (XLA)"),
              ("train_peak_bytes", MiB, "peak MiB of one training step (XLA)"))
    fig, axes = plt.subplots(len(DOMAINS), 3, figsize=(18, 9), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, domain in enumerate(DOMAINS):
        for ax, (key, unit, label) in zip(axes[i], panels):
            for m in methods:
                pts = sorted((r[key] / unit, r["ppl"], r["window"]) for r in rows
                             if r["method"] == m and r["domain"] == domain and key in r)
                if not pts:
                    continue
                xs, ys, _ = zip(*pts)
                ax.plot(xs, ys, "o-" if len(pts) > 1 else "*", color=f"C{methods.index(m)}", label=m,
                        markersize=6 if len(pts) > 1 else 12)
                for x, y, w in pts:
                    ax.annotate(f"W={w}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
            ax.set_xscale("log")
            ax.set_xlabel(label, fontsize=9)
            ax.set_ylabel(f"perplexity, {DOMAINS[domain]}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help='"default" (SmolLM2-135M) or a checkpoint path')
    parser.add_argument("--windows", default="64,128,256", help="window sizes W, comma-separated")
    parser.add_argument("--seq", type=int, default=1024, help="training sequence length (a multiple of every W)")
    parser.add_argument("--batch", type=int, default=1, help="training sequences per step")
    parser.add_argument("--steps", type=int, default=50, help="training steps per W and variant")
    parser.add_argument("--module-lr", type=float, default=5e-3)
    parser.add_argument("--lm-lr", type=float, default=3e-5)
    parser.add_argument("--num-memory", type=int, default=4)
    parser.add_argument("--eval-docs", type=int, default=3, help="evaluation documents per domain")
    parser.add_argument("--doc-tokens", type=int, default=2048, help="tokens per evaluation document")
    parser.add_argument("--units", default="all", help="comma-separated units to run (see the module docstring)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="tiny random LM, bundled samples: checks the script")
    parser.add_argument("--report-only", action="store_true", help="write the report from the saved units")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.windows = [int(w) for w in str(args.windows).split(",")]
    bad = [w for w in args.windows if args.seq % w]
    if bad:
        parser.error(f"window sizes {bad} do not divide --seq {args.seq}")
    if args.report_only:
        stem = STEM + ("_quick" if args.quick else "")
        report(args, stem, args.out_dir / f"{stem}_units")
    else:
        run(args)


if __name__ == "__main__":
    main()
