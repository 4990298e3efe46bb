"""The methods on the real default model (SmolLM2-135M-Instruct): HSO perplexity, few-shot accuracy, CBS.

The same settings as the slow tests that check these claims (tests/test_hso_real.py, tests/test_cbs_real.py),
run once more to record the numbers in `benchmarks/results/real_model_<part>.json` / `.md`, from which
`makemost report` builds docs/RESULTS.md.

    python benchmarks/real_model_methods.py                  # all parts (about 15 min on 2 CPU cores)
    python benchmarks/real_model_methods.py --parts cbs      # one part: hso, fewshot or cbs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import command_line, machine, machine_line, report_row, write_results

import makemost_jax as mm
from makemost_jax.assets import read_sample, read_search_prompts
from makemost_jax.decoding.attributes import MinLength, label, non_degenerate
from makemost_jax.decoding.beam import beam_search
from makemost_jax.decoding.classifier import conditional_beam_search, load_classifier
from makemost_jax.hso import HSOConfig, compare_on_tokens
from makemost_jax.hso.fewshot import fewshot_classify, load_sentiment_sample

AUSTEN_TOKENS = 2049  # 16 segments of 128 after the first token
HSO_PROTOCOLS = ((0, 3e-2), (4, 1e-2))  # (sink, lr): METHODS.md's protocol, and the one that keeps 4 tokens
FEWSHOT = {"k": 4, "draws": 5, "seed": 0, "per_label": 100}
CBS_SEARCH = {"beams": 4, "max_new_tokens": 24}
CBS_LENGTH = 8  # the bundled head's attribute, min-length:8


def search_prompts(tok) -> list[str]:
    """The fixed prompts: chat questions in the model's chat template, then plain openings and endings."""
    prompts = read_search_prompts()
    return [tok.user_turn(q) for q in prompts["chat"]] + prompts["openings"] + prompts["endings"]


def balanced_test(test: list[dict], per_label: int) -> list[dict]:
    """The first `per_label` positive then the first `per_label` negative test sentences."""
    return [r for r in test if r["label"] == "positive"][:per_label] + \
        [r for r in test if r["label"] == "negative"][:per_label]


def degeneracy_summary(name: str, prompt_ids: list[list[int]], result) -> dict:
    """Per search: found / degenerate / empty fractions, mean log-likelihood and length of the best outputs.

    "Degenerate": empty, repeats a 4-gram or copies the prompt (`non_degenerate()`); a prompt with no
    finished output counts as degenerate.
    """
    found = np.asarray(result.finished[:, 0])
    lengths = np.asarray(result.lengths[:, 0])
    outputs = [np.asarray(result.tokens[i, 0, :lengths[i]]).tolist() for i in range(len(prompt_ids))]
    good = label(non_degenerate(), prompt_ids, outputs) & found
    logp = np.asarray(result.logprobs[:, 0])
    return {"search": name, "found": float(found.mean()), "degenerate": float(1 - good.mean()),
            "empty": float(np.mean(found & (lengths == 0))), "mean_loglik": float(logp[found].mean()),
            "mean_length": float(lengths[found].mean()), "outputs": outputs, "lengths": lengths.tolist(),
            "logp": logp.tolist()}


def cbs_searches(params, tok) -> list[dict]:
    """Beam search, beam search with the exact min-length filter, and CBS with the bundled head."""
    ids = [tok.encode_for_model(t) for t in search_prompts(tok)]
    head = load_classifier("default", params)
    search = {**CBS_SEARCH, "eos_id": tok.eos_id}
    return [degeneracy_summary("beam search", ids, beam_search(params, ids, **search)),
            degeneracy_summary("beam + filter", ids, beam_search(params, ids, attribute=MinLength(CBS_LENGTH),
                                                                  **search)),
            degeneracy_summary(f"CBS, min-length:{CBS_LENGTH}", ids, conditional_beam_search(params, ids, head,
                                                                                            **search))]


def part_hso(params, tok) -> tuple[dict, list[dict], list[str]]:
    ids = tok.encode_for_model(read_sample("austen"))[:AUSTEN_TOKENS]
    runs, rows, lines = [], [], ["| sink | lr | HSO | lr=0 | sliding window (512, stride 128) |", "|---|---|---|---|---|"]
    for sink, lr in HSO_PROTOCOLS:
        r = compare_on_tokens(params, ids, HSOConfig(segment=128, cache_size=384, lr=lr, sink=sink))
        runs.append({"sink": sink, "lr": lr, **r})
        lines.append(f"| {sink} | {lr:g} | {r['hso']['ppl']:.2f} | {r['lr0']['ppl']:.2f} | {r['sliding']['ppl']:.2f} |")
        rows.append(report_row("HSO", f"perplexity, SmolLM2-135M on Persuasion ({len(ids) - 1} tokens, segment 128, "
                                      f"cache 384, sink {sink}, lr {lr:g})",
                               f"HSO {r['hso']['ppl']:.2f}, lr=0 {r['lr0']['ppl']:.2f}, sliding window "
                               f"{r['sliding']['ppl']:.2f}"))
    return {"tokens": len(ids), "runs": runs}, rows, lines


def part_fewshot(params, tok) -> tuple[dict, list[dict], list[str]]:
    train, test = load_sentiment_sample()
    test = balanced_test(test, FEWSHOT["per_label"])
    result = fewshot_classify(params, tok, train, test, k=FEWSHOT["k"], draws=FEWSHOT["draws"], seed=FEWSHOT["seed"],
                              hso=HSOConfig(lr=1e-2))
    summary = result.summary()
    lines = ["| method | mean accuracy | std | min | max |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['mean']:.3f} | {s['std']:.3f} | {s['min']:.3f} | {s['max']:.3f} |"
              for name, s in summary.items()]
    setting = f"k={FEWSHOT['k']}, {len(test)} balanced test sentences, {FEWSHOT['draws']} draws"
    rows = [report_row("Few-shot", f"sentiment accuracy, SmolLM2-135M, {setting}",
                       ", ".join(f"{name} {s['mean']:.3f} ± {s['std']:.3f}" for name, s in summary.items()))]
    return {"settings": FEWSHOT, "n_test": len(test), "summary": summary, "accuracy": result.accuracy}, rows, lines


def part_cbs(params, tok) -> tuple[dict, list[dict], list[str]]:
    searches = cbs_searches(params, tok)
    lines = ["| search | found | degenerate | empty | mean log-likelihood | mean length |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['search']} | {r['found']:.2f} | {r['degenerate']:.3f} | {r['empty']:.3f} | "
              f"{r['mean_loglik']:.2f} | {r['mean_length']:.1f} |" for r in searches]
    n = len(searches[0]["lengths"])
    rows = [report_row("CBS", f"degenerate / empty best outputs, SmolLM2-135M, {n} prompts, {CBS_SEARCH['beams']} "
                              f"beams, up to {CBS_SEARCH['max_new_tokens']} tokens",
                       "; ".join(f"{r['search']}: {r['degenerate']:.3f} / {r['empty']:.3f}, mean log p "
                                 f"{r['mean_loglik']:.2f}" for r in searches))]
    return {"settings": CBS_SEARCH, "prompts": read_search_prompts(), "searches": searches}, rows, lines


PARTS = {"hso": part_hso, "fewshot": part_fewshot, "cbs": part_cbs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="hso,fewshot,cbs", help="comma-separated: hso, fewshot, cbs")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {sorted(PARTS)}")
    params, tok = mm.load(), mm.load_tokenizer()
    for name in parts:
        info, t0 = machine(), time.perf_counter()
        payload, rows, table = PARTS[name](params, tok)
        seconds = time.perf_counter() - t0
        markdown = "\n".join([f"# {name} on SmolLM2-135M-Instruct", "", machine_line(info), "",
                              f"Command: `{command_line()}`", "", *table, "", f"{seconds:.0f} s."])
        path = write_results(f"real_model_{name}", {"machine": info, **payload, "seconds": seconds}, markdown,
                             report=rows)
        print("\n".join(table))
        print(f"{name}: {seconds:.0f} s -> {path}")

if __name__ == "__main__":
    main()
