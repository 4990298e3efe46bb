"""The inadequacy of the mode in translation, on a Marian-shaped model trained here (issue 17).

Two stages, each resumable:

    python benchmarks/translation_modes.py train    [--run-dir runs/en-es] [--steps 1800]
    python benchmarks/translation_modes.py evaluate [--run-dir runs/en-es] [--sentences 200] [--budget 1000]

`train` learns a joint 8k BPE tokenizer on the bundled Bible en->es training sample
(12,000 verse pairs, `makemost_jax/assets/bible_en_es_train.jsonl`), then trains a
Marian-shaped transformer from scratch with the shared training loop (length-bucketed
batches, AdamW, Orbax checkpoints every 500 steps: a killed run resumes), and saves it
as a Hugging Face folder under `<run-dir>/model`. `evaluate` compares, on the test
sentences (John 1-7), copying the source, greedy, beam search of sizes 1-10, the exact
unconditional mode, the exact length-conditional modes at the beam's length and at the
reference length, and conditional beam search with a minimum-length attribute: BLEU and
chrF (sacrebleu), length ratio, mean log-likelihood, the share of empty outputs, and the
proof rates of the exact searches at their node budgets. Results: JSON, markdown and a
plot under benchmarks/results/translation_*.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, command_line, machine, machine_line, report_row, write_results

import makemost_jax as mm
from makemost_jax import seq2seq
from makemost_jax.data.pairs import BucketedBatches, asset_path, bucket_by_length, fixed_batches, read_pairs
from makemost_jax.training import TrainConfig

MAX_LENGTH = 64  # tokens per side (incl. </s>); longer pairs are dropped from training


def load_pairs(split: str):
    return read_pairs(asset_path(f"bible_en_es_{split}.jsonl"), "en", "es")


def train(args):
    os.makedirs(args.run_dir, exist_ok=True)
    tok_dir = os.path.join(args.run_dir, "tokenizer")
    train_pairs, valid_pairs = load_pairs("train"), load_pairs("valid")
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        tok = mm.load_tokenizer(tok_dir)
    else:
        tok = seq2seq.train_tokenizer([side for pair in train_pairs for side in pair], vocab_size=args.vocab)
        seq2seq.save_tokenizer(tok, tok_dir)
    data = seq2seq.encode_translation_pairs(tok, train_pairs, MAX_LENGTH, MAX_LENGTH, start_id=tok.pad_id)
    valid = seq2seq.encode_translation_pairs(tok, valid_pairs, MAX_LENGTH, MAX_LENGTH, start_id=tok.pad_id)
    buckets = bucket_by_length(data, [32])
    sizes = [args.batch_size * MAX_LENGTH // (b["source"].shape[1]) for b in buckets]
    batches = BucketedBatches(buckets, sizes, seed=0)
    cfg = seq2seq.marian_config(tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id, d_model=args.width,
                                layers=args.layers, heads=args.heads, ffn=4 * args.width)
    params = mm.init_params(cfg, jax.random.key(0))
    config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=400, b2=0.98, weight_decay=0.01,
                         eval_every=250, log_every=50, checkpoint_dir=os.path.abspath(os.path.join(args.run_dir,
                                                                                                  "checkpoints")),
                         checkpoint_every=500)
    t0 = time.perf_counter()
    params, history = seq2seq.train_translation(params, batches, config, valid=fixed_batches(valid, 50))
    seconds = time.perf_counter() - t0
    seq2seq.save_translation_model(params, tok, os.path.join(args.run_dir, "model"))
    n_params = sum(int(x.size) for x in jax.tree.leaves(params.weights))
    payload = {"machine": machine(), "command": command_line(), "train_pairs": len(data["index"]),
               "buckets": [{"width": int(b["source"].shape[1]), "rows": len(b["index"]), "batch": s}
                           for b, s in zip(buckets, sizes)],
               "model": {"params": n_params, "width": args.width, "layers": args.layers, "heads": args.heads,
                         "vocab": tok.vocab_size},
               "train": {"steps": args.steps, "lr": args.lr, "seconds": seconds,
                         "first_loss": history["train"][0]["loss"], "last_loss": history["train"][-1]["loss"]},
               "eval": history["eval"]}
    (RESULTS / "translation_train.json").write_text(json.dumps(payload, indent=2))
    print(f"trained {n_params:,} parameters for {args.steps} steps in {seconds / 60:.1f} min; "
          f"valid loss {history['eval'][-1]['loss']:.3f}" if history["eval"] else "")


def _summary(rows: list[dict], refs: list[str]) -> dict:
    """Scores of one search's outputs: BLEU, chrF, length ratio, mean log p, empty share, proof rate."""
    from makemost_jax.seq2seq.translate import score_translations

    found = [r for r in rows if r["found"]]
    scored = [r["logprob"] for r in found if r["logprob"] is not None]
    out = score_translations([r["translation"] for r in rows], refs)
    out.update(found=len(found) / len(rows), empty=sum(r["n_tokens"] == 0 for r in found) / len(rows),
               mean_logprob=float(np.mean(scored)) if scored else None,
               mean_tokens=float(np.mean([r["n_tokens"] for r in found])) if found else None)
    if "proved_optimal" in rows[0]:
        out["proved"] = sum(r["proved_optimal"] for r in rows) / len(rows)
        proved = [r for r in rows if r["proved_optimal"] and r["found"]]
        out["empty_among_proved"] = sum(r["n_tokens"] == 0 for r in proved) / max(len(proved), 1)
    return out


def _length_modes(params, tok, sources: list[list[int]], lengths: list[int], budget: int) -> list[dict]:
    """The exact mode of each source among outputs of exactly its length (sources of one length searched together)."""
    from makemost_jax.decoding.exact import exact_mode

    rows: list[dict | None] = [None] * len(sources)
    for length in sorted(set(lengths)):
        group = [i for i, n in enumerate(lengths) if n == length]
        modes = exact_mode(params, sources=[sources[i] for i in group], max_length=length, length=length,
                           node_budget=budget, batch_size=64)
        for i, m in zip(group, modes):
            rows[i] = {"translation": None if m.tokens is None else tok.decode(m.tokens), "found": m.tokens is not None,
                       "n_tokens": None if m.tokens is None else len(m.tokens),
                       "logprob": m.loglik if m.tokens is not None else None, "proved_optimal": m.proved_optimal}
    return rows


def evaluate(args):
    from makemost_jax.decoding import fit_classifier, parse_attribute
    from makemost_jax.seq2seq.translate import translate

    model_dir = os.path.join(args.run_dir, "model")
    params, tok = mm.load(model_dir), mm.load_tokenizer(model_dir)
    test = load_pairs("test")[:args.sentences]
    lines, refs = [en for en, _ in test], [es for _, es in test]
    sources = [tok.encode_source(line) for line in lines]
    settings = {"max_new_tokens": args.max_new_tokens, "batch_size": 20, "progress": True}
    results, outputs, seconds = {}, {}, {}

    def run(name, fn):
        t0 = time.perf_counter()
        outputs[name] = fn()
        seconds[name] = time.perf_counter() - t0
        results[name] = {**_summary(outputs[name], refs), "seconds": seconds[name]}
        print(f"{name:>28}: BLEU {results[name]['bleu']:5.2f}  chrF {results[name]['chrf']:5.2f}  "
              f"empty {results[name]['empty']:.2f}  ({seconds[name]:.0f} s)", flush=True)

    run("copy the source", lambda: [{"translation": line, "found": True, "n_tokens": len(tok.encode(line)),
                                     "logprob": None} for line in lines])
    run("greedy", lambda: translate(params, tok, lines, search="greedy", **settings))
    for k in range(1, 11):
        run(f"beam {k}", lambda k=k: translate(params, tok, lines, search="beam", beams=k, **settings))
    run("exact mode", lambda: translate(params, tok, lines, search="exact", node_budget=args.budget, **settings))
    beam_lengths = [max(r["n_tokens"] or 0, 1) for r in outputs["beam 5"]]
    reference_lengths = [min(max(len(tok.encode(ref)), 1), args.max_new_tokens) for ref in refs]
    run("exact mode at beam-5 length", lambda: _length_modes(params, tok, sources, beam_lengths, args.budget))
    run("exact mode at reference length", lambda: _length_modes(params, tok, sources, reference_lengths,
                                                                args.budget))
    # CBS: a head for min-length:L trained on the model's own samples of the training sources.
    attribute = parse_attribute(f"min-length:{args.min_length}")
    train_sources = [tok.encode_source(en) for en, _ in load_pairs("train")[:args.head_sources]]
    t0 = time.perf_counter()
    head, head_report = fit_classifier(params, None, attribute, sources=train_sources, eos_id=tok.eos_id,
                                       pad_id=tok.pad_id, samples_per_prompt=8, max_new_tokens=args.max_new_tokens,
                                       train_config=TrainConfig(steps=400, learning_rate=1e-3, warmup_steps=20,
                                                                progress=False), progress=True)
    head_seconds = time.perf_counter() - t0
    run(f"CBS 5, min-length:{args.min_length}", lambda: translate(params, tok, lines, search="cbs", beams=5,
                                                                  classifier=head, attribute=attribute, **settings))
    run(f"beam 5 + filter min-length:{args.min_length}",
        lambda: translate(params, tok, lines, search="beam", beams=5, attribute=attribute, **settings))
    payload = {"machine": machine(), "command": command_line(), "sentences": len(lines),
               "node_budget": args.budget, "max_new_tokens": args.max_new_tokens, "results": results,
               "cbs_head": {**{k: v for k, v in head_report.items() if k != "held_out_eos"}, "seconds": head_seconds},
               "examples": [{"source": lines[i], "reference": refs[i],
                             **{name: outputs[name][i]["translation"] for name in outputs}} for i in range(5)],
               "train": json.loads((RESULTS / "translation_train.json").read_text())
               if (RESULTS / "translation_train.json").exists() else None}
    write_results("translation_modes", payload, markdown(payload), report(payload))
    plot(payload)


def markdown(payload: dict) -> str:
    r = payload["results"]
    train = payload["train"]
    lines = ["# The inadequacy of the mode in translation (Bible en -> es, Marian-shaped model trained here)", "",
             machine_line(payload["machine"]), "", f"Command: `{payload['command']}`", ""]
    if train:
        m, t = train["model"], train["train"]
        lines += [(f"Model: {m['params']:,} parameters (width {m['width']}, {m['layers']} + {m['layers']} layers, "
                  f"{m['heads']} heads, joint BPE vocabulary of {m['vocab']}), trained from scratch for {t['steps']} "
                  f"steps on {train['train_pairs']:,} verse pairs in {t['seconds'] / 60:.0f} min "
                  f"(`python benchmarks/translation_modes.py train`); final validation loss "
                  f"{train['eval'][-1]['loss']:.3f}."), ""]
    lines += [(f"Test: the first {payload['sentences']} verses of John (bundled `bible_en_es_test.jsonl`); outputs up "
              f"to {payload['max_new_tokens']} tokens; exact searches with {payload['node_budget']} node expansions "
              "per sentence. BLEU and chrF: sacrebleu defaults. `empty`: share of sentences whose output is the "
              "empty translation; `proved`: share whose result is proved optimal."), "",
              "| search | BLEU | chrF | length ratio | mean log p | empty | proved | empty among proved | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, x in r.items():
        def fmt(key, spec, x=x):
            return "-" if x.get(key) is None else format(x[key], spec)
        lines.append(f"| {name} | {x['bleu']:.2f} | {x['chrf']:.2f} | {x['length_ratio']:.3f} | "
                     f"{fmt('mean_logprob', '.2f')} | {x['empty']:.2f} | {fmt('proved', '.2f')} | "
                     f"{fmt('empty_among_proved', '.2f')} | {x['seconds']:.0f} |")
    lines += ["", "![BLEU and log-likelihood against beam size](translation_modes.png)", "", "Examples:", ""]
    for ex in payload["examples"][:3]:
        lines += [f"- source: {ex['source']}", f"  - reference: {ex['reference']}"]
        for name in ("greedy", "beam 5", "exact mode", "exact mode at reference length"):
            lines.append(f"  - {name}: {ex[name]!r}")
    return "\n".join(lines) + "\n"


def report(payload: dict) -> list[dict]:
    r = payload["results"]
    area, n = "Translation", payload["sentences"]
    exact = r["exact mode"]
    return [report_row(area, f"BLEU: copy / greedy / beam 5 / exact mode, Bible en-es, {n} verses",
                       f"{r['copy the source']['bleu']:.1f} / {r['greedy']['bleu']:.1f} / {r['beam 5']['bleu']:.1f} / "
                       f"{exact['bleu']:.1f}"),
            report_row(area, f"exact mode is the empty translation: of modes found / of modes proved, {n} verses",
                       f"{exact['empty']:.0%} / {exact['empty_among_proved']:.0%} (proved {exact['proved']:.0%} at "
                       f"{payload['node_budget']} nodes)"),
            report_row(area, "BLEU of the exact mode at the reference length / at the beam-5 length",
                       f"{r['exact mode at reference length']['bleu']:.1f} / "
                       f"{r['exact mode at beam-5 length']['bleu']:.1f}")]


def plot(payload: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = payload["results"]
    ks = list(range(1, 11))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [r[f"beam {k}"]["bleu"] for k in ks], "o-", label="BLEU")
    ax.axhline(r["exact mode"]["bleu"], color="C3", linestyle="--", label="exact mode BLEU")
    ax.axhline(r["copy the source"]["bleu"], color="grey", linestyle=":", label="copy the source")
    ax.set_xlabel("beam size")
    ax.set_ylabel("BLEU")
    twin = ax.twinx()
    twin.plot(ks, [r[f"beam {k}"]["mean_logprob"] for k in ks], "s-", color="C1", label="mean log p (right)")
    twin.set_ylabel("mean log p(y | x)")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="lower right", fontsize=8)
    ax.set_title("Beam search curse: BLEU and log-likelihood against beam size")
    fig.tight_layout()
    fig.savefig(RESULTS / "translation_modes.png", dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["train", "evaluate"])
    parser.add_argument("--run-dir", default="runs/en-es")
    parser.add_argument("--steps", type=int, default=1800,
                        help="1800: at 4000 the validation loss bottoms out near step 1750 and then rises (no dropout)")
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per batch of the longest bucket")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--budget", type=int, default=1000, help="node expansions per sentence (exact searches)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--min-length", type=int, default=5, help="CBS attribute: outputs of at least this many tokens")
    parser.add_argument("--head-sources", type=int, default=400, help="training sources sampled for the CBS head")
    args = parser.parse_args(argv)
    if args.stage == "train":
        train(args)
    else:
        evaluate(args)


if __name__ == "__main__":
    main()
