"""CBS where the classifier matters: two attributes no prefix decides, judged at the end.

Conditional beam search (METHODS.md section 2) adds a per-token classifier's log q(a | x, y<=t)
to beam search's ranking. On an attribute every prefix decides (minimum length), beam search
plus a filter already finds what CBS finds (`real_model_cbs.md`). Here the attribute is known
only once the output is complete:

- **positive**: the continuation of the first five words of a movie-review sentence is
  positive, as judged by a sentiment classifier trained on `../shared/data/sentiment` (a
  different model from the CBS head: MiniLM sentence embeddings in PyTorch + logistic
  regression, its L2 strength chosen on a dev split of the training sentences, accuracy
  reported on the held-out test sentences). The judge reads the continuation alone.
- **ends-in-window**: the answer to "Summarize this movie review in a few words: ..." (chat
  template) ends with EOS after at least M and at most M+N tokens
  (`min-length:M+max-length:M+N`, with room for longer outputs).

For each attribute the per-token head (`fit_classifier`) is trained on samples of
SmolLM2-135M-Instruct at temperature 1 on training-sentence prompts, labelled by the judge.
Then, on prompts made from held-out test sentences, at equal beam size K:

- beam: plain beam search, its best output;
- beam + rerank: the likeliest of beam search's K finished outputs the judge accepts;
- beam + filter: beam search keeping only finished hypotheses the judge accepts (in the loop);
- FUDGE: greedy decoding with each of the `prefilter` likeliest next tokens reweighted by the
  same head (beam search with one beam and the head as its term, no filter);
- CBS: beam search with the head as its term and the judge as its filter.

Reported per method: success rate under the judge (no output found counts as a failure),
paired differences CBS minus each baseline with 95% intervals over prompts, mean
log-likelihood log p(y | x) of the outputs (EOS included), distinct-1/2 over all outputs,
mean length, and wall time per prompt (one compiled search per method: prompts padded to one
length, a warm-up call excluded).

Example:
    python benchmarks/cbs_experiment.py                         # the recorded run (one core: ~60 min)
    python benchmarks/cbs_experiment.py --quick --out-dir /tmp/cbs   # plumbing check, < 5 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, machine, machine_line, report_row, write_results

import makemost_jax as mm
from makemost_jax.data.pairs import asset_path
from makemost_jax.decoding import Labeller, beam_search, conditional_beam_search, fit_classifier, parse_attribute
from makemost_jax.decoding.sampling import pad_prompts
from makemost_jax.nar import resolve_mlm
from makemost_jax.training import TrainConfig

SENTIMENT = ROOT.parent / "shared" / "data" / "sentiment"
METHODS = ("beam", "beam + rerank", "beam + filter", "FUDGE", "CBS")
FULL = {"judge_train": None, "head_prompts": 320, "samples_per_prompt": 8, "head_steps": 400, "eval_prompts": 160,
        "beams": 8, "prefilter": 32, "search_batch": 8, "positive_tokens": 20, "window": (8, 8), "window_tokens": 24}
QUICK = {"judge_train": 400, "head_prompts": 12, "samples_per_prompt": 4, "head_steps": 20, "eval_prompts": 6,
         "beams": 2, "prefilter": 4, "search_batch": 3, "positive_tokens": 6, "window": (2, 3), "window_tokens": 8}


def read_sentences(split: str, limit: int | None = None) -> tuple[list[str], np.ndarray, str]:
    """(texts, labels 0/1, source): the shared data's split when present, else the bundled sample."""
    path = SENTIMENT / f"{split}.jsonl"
    if not path.is_file():
        path = Path(asset_path(f"sentiment_{split}.jsonl"))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit:  # balanced, in file order
        rows = [r for r in rows if r["label"] == "positive"][:limit // 2] + \
               [r for r in rows if r["label"] == "negative"][:limit // 2]
    return [r["text"] for r in rows], np.array([r["label"] == "positive" for r in rows]), os.path.relpath(path, ROOT)


class SentimentJudge:
    """P(positive | text): mean-pooled, normalised MiniLM embeddings (PyTorch) and logistic regression (numpy).

    Verdicts are cached by text: the search asks about the same outputs more than once.

    Example:
        >>> # judge = SentimentJudge(); judge.fit(texts, labels); judge.prob(["A wonderful film."])
    """

    def __init__(self, folder: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        folder = folder or resolve_mlm("minilm")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
        self.weights = None
        self.cache: dict[str, float] = {}

    def embed(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        out = []
        with self._torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=64,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(self._torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float64)

    @staticmethod
    def _logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 30) -> np.ndarray:
        """Newton's method on the mean log loss + l2/2 |w|^2 (bias not penalised)."""
        x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        w = np.zeros(x1.shape[1])
        penalty = np.full(x1.shape[1], l2)
        penalty[-1] = 0.0
        for _ in range(iterations):
            p = 1 / (1 + np.exp(-x1 @ w))
            grad = x1.T @ (p - y) / len(y) + penalty * w
            hess = (x1.T * (p * (1 - p))) @ x1 / len(y) + np.diag(penalty + 1e-9)
            w -= np.linalg.solve(hess, grad)
        return w

    def fit(self, texts: list[str], labels: np.ndarray, l2_grid=(1e-4, 1e-3, 1e-2), dev_fraction: float = 0.2,
            seed: int = 0) -> dict:
        """Choose the L2 strength on a dev split of `texts`, then fit on all of them; returns the dev scores."""
        x, y = self.embed(texts), labels.astype(np.float64)
        dev = np.random.default_rng(seed).random(len(y)) < dev_fraction
        scores = {}
        for l2 in l2_grid:
            w = self._logistic(x[~dev], y[~dev], l2)
            scores[l2] = float(((np.concatenate([x[dev], np.ones((dev.sum(), 1))], 1) @ w > 0) == y[dev]).mean())
        best = max(l2_grid, key=lambda l2: scores[l2])
        self.weights = self._logistic(x, y, best)
        self.cache.clear()
        return {"l2": best, "dev_accuracy": scores, "train_sentences": len(y)}

    def prob(self, texts: list[str]) -> np.ndarray:
        new = sorted({t for t in texts if t not in self.cache})
        if new:
            logits = np.concatenate([self.embed(new), np.ones((len(new), 1))], 1) @ self.weights
            self.cache.update(zip(new, (1 / (1 + np.exp(-logits))).tolist()))
        return np.array([self.cache[t] for t in texts])


def distinct(outputs: list[list[int]], n: int) -> float:
    """Distinct-n: unique n-grams over all n-grams of all outputs (token level)."""
    grams = [tuple(o[i:i + n]) for o in outputs for i in range(len(o) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def paired_interval(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of a - b over prompts with a 95% normal interval (per-prompt differences in {-1, 0, 1})."""
    d = a.astype(float) - b.astype(float)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half)}


def run_method(method: str, params, prompts_BT, mask_BT, head, attribute, size: dict, n_new: int, eos: int,
               pad: int, accept) -> dict:
    """One method over all prompts, batch by batch; outputs, log-likelihoods and warm wall time."""
    k, batch = size["beams"], size["search_batch"]
    common = {"max_new_tokens": n_new, "eos_id": eos, "pad_id": pad}

    def search(tokens, mask):
        if method in ("beam", "beam + rerank"):
            return beam_search(params, tokens, mask, beams=k, **common)
        if method == "beam + filter":
            return beam_search(params, tokens, mask, beams=k, attribute=attribute, **common)
        if method == "FUDGE":
            return beam_search(params, tokens, mask, beams=1, term=head, prefilter=size["prefilter"], **common)
        return conditional_beam_search(params, tokens, head, attribute, beams=k, prefilter=size["prefilter"],
                                       **common)

    jax.block_until_ready(search(prompts_BT[:batch], mask_BT[:batch]).tokens)  # compile and warm up
    outputs, logps, seconds = [], [], 0.0
    for i in range(0, len(prompts_BT), batch):
        t0 = time.perf_counter()
        result = search(prompts_BT[i:i + batch], mask_BT[i:i + batch])
        jax.block_until_ready(result.tokens)
        seconds += time.perf_counter() - t0
        tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
        found, logp = np.asarray(result.finished), np.asarray(result.logprobs)
        for row in range(tokens.shape[0]):
            candidates = [j for j in range(tokens.shape[1]) if found[row, j]]
            if method == "beam + rerank":  # the likeliest finished output the judge accepts
                verdicts = accept([tokens[row, j, :lengths[row, j]].tolist() for j in candidates])
                candidates = [j for j, ok in zip(candidates, verdicts) if ok]
            j = candidates[0] if candidates else None
            outputs.append(None if j is None else tokens[row, j, :lengths[row, j]].tolist())
            logps.append(None if j is None else float(logp[row, j]))
    return {"outputs": outputs, "logprobs": logps, "seconds": seconds}


def evaluate_attribute(name: str, params, tok, attribute, accept, train_prompts, eval_prompts, n_new: int,
                       size: dict, progress: bool) -> dict:
    """Train the head for one attribute, run every method on the evaluation prompts, score them."""
    eos, pad = tok.eos_id, tok.pad_id
    train_ids = [tok.encode_for_model(p) for p in train_prompts]
    t0 = time.perf_counter()
    head, head_report = fit_classifier(
        params, train_ids, attribute, eos_id=eos, pad_id=pad, samples_per_prompt=size["samples_per_prompt"],
        max_new_tokens=n_new, mlp_width=128, train_embeddings=False, progress=progress,
        train_config=TrainConfig(steps=size["head_steps"], learning_rate=1e-3, warmup_steps=max(size["head_steps"] // 10, 1),
                                 progress=progress))
    head_report["seconds"] = time.perf_counter() - t0
    print(name, "head", json.dumps(head_report, default=float), flush=True)
    ids = [tok.encode_for_model(p) for p in eval_prompts]
    prompts_BT, mask_BT = pad_prompts(ids, pad_id=pad, bucket=max(map(len, ids)))
    rows, per_prompt = {}, {}
    for method in METHODS:
        run = run_method(method, params, prompts_BT, mask_BT, head, attribute, size, n_new, eos, pad, accept)
        found = [o is not None for o in run["outputs"]]
        success = np.array(found) & accept([o if o is not None else [] for o in run["outputs"]])
        kept = [o for o in run["outputs"] if o is not None]
        logps = [lp for lp in run["logprobs"] if lp is not None]
        per_prompt[method] = success
        rows[method] = {
            "success": float(success.mean()), "found": float(np.mean(found)),
            "mean_logprob": float(np.mean(logps)) if logps else None,
            "mean_logprob_per_token": float(np.sum(logps) / max(sum(len(o) + 1 for o in kept), 1)) if kept else None,
            "distinct_1": distinct(kept, 1), "distinct_2": distinct(kept, 2),
            "mean_length": float(np.mean([len(o) for o in kept])) if kept else None,
            "seconds_per_prompt": run["seconds"] / len(ids), "per_prompt_success": success.tolist(),
            "examples": [{"prompt": p, "output": None if o is None else tok.decode(o)}
                         for p, o in zip(eval_prompts[:4], run["outputs"][:4])]}
        print(name, method, json.dumps({k: v for k, v in rows[method].items()
                                        if k not in ("examples", "per_prompt_success")}), flush=True)
    for method in METHODS[:-1]:
        rows[method]["cbs_minus_this"] = paired_interval(per_prompt["CBS"], per_prompt[method])
    return {"attribute": attribute.name, "max_new_tokens": n_new, "train_prompts": len(train_prompts),
            "eval_prompts": len(eval_prompts), "head": head_report, "methods": rows}


def review_prompts(texts: list[str], words: int = 5) -> list[str]:
    """The first `words` words of each sentence long enough to go on after them, without repeats."""
    seen, out = set(), []
    for t in texts:
        parts = t.split()
        if len(parts) >= words + 3 and (p := " ".join(parts[:words])) not in seen:
            seen.add(p)
            out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, < 5 min: checks the script end to end")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the JSON, markdown and plot go")
    args = ap.parse_args()
    size = QUICK if args.quick else FULL
    stem = "cbs_experiment" + ("_quick" if args.quick else "")
    info, t_start = machine(), time.perf_counter()
    progress = not args.quick

    # The judge: trained on the training sentences, scored on the held-out test sentences.
    train_texts, train_labels, train_source = read_sentences("train", size["judge_train"])
    test_texts, test_labels, test_source = read_sentences("test")
    judge = SentimentJudge()
    t0 = time.perf_counter()
    judge_report = judge.fit(train_texts, train_labels)
    judge_report.update(test_accuracy=float(((judge.prob(test_texts) > 0.5) == test_labels).mean()),
                        test_sentences=len(test_texts), train_source=train_source, test_source=test_source,
                        seconds=time.perf_counter() - t0)
    print("judge", json.dumps(judge_report), flush=True)

    params, tok = mm.load(), mm.load_tokenizer()

    def positive(outputs: list[list[int]]) -> np.ndarray:
        return judge.prob([tok.decode(o) for o in outputs]) > 0.5

    judge_attribute = Labeller(lambda prompts, outputs: positive(outputs), name="positive-continuation",
                               batched=True)
    m, n = size["window"]
    window_attribute = parse_attribute(f"min-length:{m}+max-length:{m + n}")

    def in_window(outputs: list[list[int]]) -> np.ndarray:
        return np.array([window_attribute.check([], o) for o in outputs], bool)

    # Prompts: training sentences for the heads, held-out test sentences for the evaluation.
    rng = np.random.default_rng(0)
    head_train = [train_texts[i] for i in rng.permutation(len(train_texts))]
    eval_texts = [test_texts[i] for i in rng.permutation(len(test_texts))]
    summary = "Summarize this movie review in a few words: {}"
    results = {
        "positive": evaluate_attribute(
            "positive", params, tok, judge_attribute, positive, review_prompts(head_train)[:size["head_prompts"]],
            review_prompts(eval_texts)[:size["eval_prompts"]], size["positive_tokens"], size, progress),
        "ends-in-window": evaluate_attribute(
            "ends-in-window", params, tok, window_attribute, in_window,
            [tok.user_turn(summary.format(t)) for t in head_train[:size["head_prompts"]]],
            [tok.user_turn(summary.format(t)) for t in eval_texts[:size["eval_prompts"]]],
            size["window_tokens"], size, progress)}
    payload = {"sizes": {**size, "window": list(size["window"])}, "judge": judge_report, "results": results,
               "seconds": time.perf_counter() - t_start}
    write(stem, info, payload, Path(args.out_dir))


def write(stem: str, info: dict, payload: dict, out_dir: Path):
    """Markdown table, plot and report rows from the payload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size, judge, results = payload["sizes"], payload["judge"], payload["results"]
    lines = ["# CBS where the classifier matters: SmolLM2-135M-Instruct, attributes decided only at the end", "",
             machine_line(info), "",
             (f"Judge: MiniLM embeddings + logistic regression trained on {judge['train_sentences']} sentences "
              f"({judge['train_source']}, L2 {judge['l2']:g} chosen on a dev split); accuracy on "
              f"{judge['test_sentences']} held-out sentences ({judge['test_source']}): "
              f"**{judge['test_accuracy']:.3f}**."),
             (f"Searches: K = {size['beams']} beams, FUDGE and CBS rerank the {size['prefilter']} likeliest next "
              f"tokens with the head at weight 1; evaluation prompts from held-out test sentences. Whole script: "
              f"{payload['seconds'] / 60:.1f} min."), ""]
    report = []
    for key, r in results.items():
        h = r["head"]
        held = h["held_out"] or {}
        lines += [f"## {key}: `{r['attribute']}`, {r['max_new_tokens']} new tokens at most, {r['eval_prompts']} prompts",
                  "",
                  (f"Head: {h['samples']} samples of {r['train_prompts']} training prompts, positive rate "
                   f"{h['positive_samples']:.2f}; held-out prefix accuracy {held.get('accuracy', float('nan')):.3f} "
                   f"(majority {held.get('majority', float('nan')):.3f}); {h['seconds']:.0f} s to sample and train."),
                  "", ("| method | success | CBS minus this (95% CI) | mean log p(y given x) | per token | distinct-1 | "
                       "distinct-2 | mean length | s / prompt |"), "|---|---|---|---|---|---|---|---|---|"]
        for method, row in r["methods"].items():
            diff = row.get("cbs_minus_this")
            diff_s = f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]" if diff else ""
            lp = "n/a" if row["mean_logprob"] is None else f"{row['mean_logprob']:.2f}"
            lpt = "n/a" if row["mean_logprob_per_token"] is None else f"{row['mean_logprob_per_token']:.2f}"
            ml = "n/a" if row["mean_length"] is None else f"{row['mean_length']:.1f}"
            lines.append(f"| {method} | {row['success']:.3f} | {diff_s} | {lp} | {lpt} | {row['distinct_1']:.3f} | "
                         f"{row['distinct_2']:.3f} | {ml} | {row['seconds_per_prompt']:.2f} |")
        lines += ["", "Examples (first prompts; CBS):", ""]
        for ex in r["methods"]["CBS"]["examples"][:3]:
            lines.append(f"- {ex['prompt'][-90:]!r} → {ex['output']!r}")
        lines.append("")
        m = r["methods"]
        report.append(report_row(
            "CBS", f"{key} ({r['attribute']}), success under the judge, K={size['beams']}, {r['eval_prompts']} prompts",
            ", ".join(f"{name} {m[name]['success']:.2f}" for name in METHODS)
            + f"; CBS - beam+filter {m['beam + filter']['cbs_minus_this']['mean']:+.2f} "
              f"[{m['beam + filter']['cbs_minus_this']['low']:+.2f}, {m['beam + filter']['cbs_minus_this']['high']:+.2f}]"))
    report.append(report_row("CBS", "sentiment judge accuracy on held-out sentences (MiniLM + logistic regression)",
                             f"{judge['test_accuracy']:.3f} on {judge['test_sentences']}"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (key, r) in zip(axes, results.items()):
        for method, row in r["methods"].items():
            if row["mean_logprob"] is not None:
                ax.scatter(row["mean_logprob"], row["success"], s=60)
                ax.annotate(method, (row["mean_logprob"], row["success"]), textcoords="offset points", xytext=(5, 4))
        ax.set(xlabel="mean log p(y | x) of the outputs (nats)", ylabel="success rate under the judge",
               title=f"{key}: {r['attribute']}", ylim=(-0.05, 1.05))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"{stem}.png", dpi=100)
    plt.close(fig)
    lines.append(f"![success against log-likelihood]({stem}.png)")
    path = write_results(stem, payload, "\n".join(lines), report=report, out_dir=out_dir)
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
