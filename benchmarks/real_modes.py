"""Exact modes of the real default model (SmolLM2-135M-Instruct) for fixed chat and plain prompts.

For every prompt: the unconditional mode (outputs of at most `--max-length` tokens; is it
empty, a copy of the prompt, or something else?) and the length-conditional modes for the
lengths in `--lengths`, each by exact branch-and-bound search (`makemost_jax.decoding.exact_mode`)
with a node budget; their log-likelihoods, whether the search proved them optimal, and the
prefixes it expanded. A result the budget cut short is the best found, reported as unproved.

Writes benchmarks/results/real_modes_<tag>.json / .md (the table for the README and the notebook),
rewritten after every prompt so a run cut short still leaves its rows.

Example:
    python benchmarks/real_modes.py                    # 20 prompts, 23 min on 2 busy CPU cores (load 10-16)
    python benchmarks/real_modes.py --plain 2 --chat 2 --node-budget 128 --tag smoke
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, command_line, machine, machine_line, report_row, write_results

import makemost_jax as mm
from makemost_jax.decoding.exact import exact_mode

# Fixed prompts: 10 user messages (wrapped in the model's chat template) and 10 plain openings.
CHAT_PROMPTS = [
    "What is the largest planet in our solar system?",
    "How many legs does a spider have?",
    "Name a famous painter.",
    "What is the boiling point of water in Fahrenheit?",
    "Can you recommend a good book?",
    "What is the capital of Japan?",
    "Translate 'thank you' into French.",
    "Give me a word that rhymes with cat.",
    "Who wrote Romeo and Juliet?",
    "What color is the sky on a clear day?",
]
PLAIN_PROMPTS = [
    "The history of the Roman Empire",
    "In the morning, the farmer",
    "Scientists have discovered that",
    "The recipe calls for",
    "My grandmother always told me",
    "The capital of France is",
    "Once upon a time, there was a",
    "The best way to learn a language is",
    "Water boils at",
    "The first thing you should do",
]
KINDS = ("empty", "no words", "prompt copy", "other")
COPY_WORDS = 3  # an output whose first 3 words (or all, if fewer) occur in a row in the prompt is a copy


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: a copy may change case or drop the question mark."""
    return re.findall(r"[a-z0-9']+", text.lower())


def kind_of(prompt: str, text: str | None) -> str:
    """"empty", "no words" (punctuation only), "prompt copy" or "other" ("none found" without a result);
    `prompt` is the user's text."""
    if text is None:
        return "none found"
    out, source = words(text), words(prompt)
    if not out:
        return "empty" if not text.strip() else "no words"
    head = out[:COPY_WORDS]
    copies = any(source[i:i + len(head)] == head for i in range(len(source)))
    return "prompt copy" if copies else "other"


def mode_row(tok, prompt: str, mode) -> dict:
    row = mode.to_dict()
    row["text"] = None if mode.tokens is None else tok.decode(mode.tokens)
    row["kind"] = kind_of(prompt, row["text"])
    return row


def best_known(result: dict, max_length: int) -> dict:
    """The unconditional row: the unconditional search's result, unless a length-conditional search (a length
    <= max_length) found a likelier output; that one is then reported, unproved (`from_length_search`)."""
    found = [m for m in (result["mode"], *result["length_modes"])
             if m["text"] is not None and m["length"] <= max_length]
    best = max(found, key=lambda m: m["loglik"], default=result["mode"])
    # The same output scored in another batch row can differ in the last float bits.
    if best is result["mode"] or (result["mode"]["text"] is not None
                                  and best["loglik"] <= result["mode"]["loglik"] + 1e-4):
        return result["mode"]
    return {**best, "proved_optimal": False, "nodes_expanded": result["mode"]["nodes_expanded"],
            "from_length_search": True}


def cell(row: dict) -> str:
    """`"text"` log p, with a dagger when unproved (Markdown-safe)."""
    if row["text"] is None:
        return "(none found)"
    text = repr(row["text"]).replace("|", "\\|")
    mark = "" if row["proved_optimal"] else " ‡" if row.get("from_length_search") else " †"
    return f"{text} ({row['loglik']:.2f}{mark})"


def markdown(results: list[dict], args, info: dict, seconds: float, command: str) -> str:
    lengths = args.lengths
    n = len(results)
    uncond = [r["mode"] for r in results]
    count = {k: sum(m["kind"] == k for m in uncond) for k in KINDS}
    lines = [f"# Exact modes of SmolLM2-135M-Instruct ({n} prompts)", "", machine_line(info), "",
             f"Command: `{command}` ({seconds / 60:.1f} min).",
             "",
             (f"Unconditional mode: the most likely output of at most {args.max_length} tokens + EOS (node budget "
              f"{args.node_budget}); length-L mode: the most likely output of exactly L tokens + EOS (node budget "
              f"{args.length_budget} each). Exact branch-and-bound search seeded by beam search (batch "
              f"{args.batch_size} prefixes per model call). Each cell: the output and its log p(output, EOS | "
              "prompt); † = the budget ran out before the search proved it optimal (the best found); ‡ = the "
              "unconditional search's best was beaten by a length-conditional search's output, shown instead. Kind: "
              f"empty, no words (punctuation only), prompt copy (its first {COPY_WORDS} words, case and punctuation aside, occur in a row in "
              "the prompt), other."
              ), "",
             (f"Unconditional modes: {count['empty']}/{n} empty, {count['no words']}/{n} punctuation only, "
              f"{count['prompt copy']}/{n} prompt copies, {count['other']}/{n} other; "
              f"{sum(m['proved_optimal'] for m in uncond)}/{n} proved optimal."), "",
             "| prompt | chat | unconditional mode | kind | nodes | " + " | ".join(f"length {L}" for L in lengths)
             + " |", "|---|---|---|---|---|" + "---|" * len(lengths)]
    for r in results:
        prompt = r["prompt"].replace("|", "\\|")
        lines.append(f"| {prompt} | {'yes' if r['chat'] else 'no'} | {cell(r['mode'])} | {r['mode']['kind']} | "
                     f"{r['mode']['nodes_expanded']} | " + " | ".join(cell(m) for m in r["length_modes"]) + " |")
    proved = [sum(r["length_modes"][i]["proved_optimal"] for r in results) for i in range(len(lengths))]
    lines += ["", "Length-conditional modes proved optimal: "
              + ", ".join(f"length {L}: {p}/{n}" for L, p in zip(lengths, proved)) + "."]
    return "\n".join(lines)


def report(results: list[dict], args) -> list[dict]:
    n = len(results)
    rows = []
    for chat in (True, False):
        group = [r for r in results if r["chat"] == chat]
        if not group:
            continue
        kinds = [r["mode"]["kind"] for r in group]
        rows.append(report_row(
            "Likelihood vs quality",
            f"exact unconditional modes of SmolLM2-135M-Instruct, {len(group)} {'chat' if chat else 'plain'} prompts "
            f"(<= {args.max_length} tokens)",
            f"empty {kinds.count('empty')}, punctuation only {kinds.count('no words')}, prompt copy "
            f"{kinds.count('prompt copy')}, other {kinds.count('other')}; "
            f"proved optimal {sum(r['mode']['proved_optimal'] for r in group)}/{len(group)}"))
    longest = max(args.lengths)
    worded = sum(r["length_modes"][args.lengths.index(longest)]["kind"] in ("other", "prompt copy") for r in results)
    rows.append(report_row("Likelihood vs quality",
                           f"length-conditional exact modes (lengths {', '.join(map(str, args.lengths))}), {n} prompts",
                           f"length {longest}: words (not empty or punctuation) for {worded}/{n}; proved optimal "
                           f"{sum(m['proved_optimal'] for r in results for m in r['length_modes'])}/"
                           f"{n * len(args.lengths)} (node budget {args.length_budget} each)"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chat", type=int, default=len(CHAT_PROMPTS), help="how many chat prompts (of 10)")
    parser.add_argument("--plain", type=int, default=len(PLAIN_PROMPTS), help="how many plain prompts (of 10)")
    parser.add_argument("--max-length", type=int, default=6, help="longest output of the unconditional search")
    parser.add_argument("--node-budget", type=int, default=320, help="prefixes per unconditional search")
    parser.add_argument("--lengths", default="1,3", help="output lengths of the length-conditional modes")
    parser.add_argument("--length-budget", type=int, default=64, help="prefixes per length-conditional search")
    parser.add_argument("--batch-size", type=int, default=32, help="prefixes per model call")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from the JSON")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    if args.report_only:
        saved = json.loads((RESULTS / f"real_modes_{args.tag}.json").read_text())
        vars(args).update({k: v for k, v in saved["settings"].items() if k != "tag"})
        for r in saved["results"]:
            r.setdefault("mode_search", r["mode"])
            for m in (r["mode_search"], *r["length_modes"]):
                m["kind"] = kind_of(r["prompt"], m["text"])
            r["mode"] = best_known({**r, "mode": r["mode_search"]}, args.max_length)
        write_results(f"real_modes_{args.tag}", {k: saved[k] for k in ("machine", "command", "model", "settings",
                                                                         "copy_words", "seconds", "results")},
                      markdown(saved["results"], args, saved["machine"], saved["seconds"], saved["command"]),
                      report=report(saved["results"], args))
        return
    t0 = time.perf_counter()
    params, tok = mm.load(), mm.load_tokenizer()
    prompts = [(p, True) for p in CHAT_PROMPTS[:args.chat]] + [(p, False) for p in PLAIN_PROMPTS[:args.plain]]
    results = []
    search = {"eos_id": tok.eos_id, "batch_size": args.batch_size}
    for text, chat in prompts:
        shown = tok.user_turn(text) if chat else text
        ids = tok.encode_for_model(shown)
        mode = exact_mode(params, ids, max_length=args.max_length, node_budget=args.node_budget, **search)
        lengths = [exact_mode(params, ids, max_length=L, length=L, node_budget=args.length_budget, **search)
                   for L in args.lengths]
        r = {"prompt": text, "chat": chat, "prompt_tokens": len(ids), "mode_search": mode_row(tok, text, mode),
             "length_modes": [mode_row(tok, text, m) for m in lengths]}
        r["mode"] = best_known({**r, "mode": r["mode_search"]}, args.max_length)
        results.append(r)
        print(f"[{time.perf_counter() - t0:6.0f} s] {'chat ' if chat else 'plain'} {text!r}: {r['mode']['kind']} "
              f"{r['mode']['text']!r} {mode.loglik:.2f} proved={mode.proved_optimal} nodes={mode.nodes_expanded} | "
              + " | ".join(f"{m['text']!r} {m['loglik']:.2f}{'' if m['proved_optimal'] else '†'}"
                           for m in r["length_modes"] if m["text"] is not None), flush=True)
        payload = {"model": "SmolLM2-135M-Instruct (mm.load())",
                   "settings": {k: v for k, v in vars(args).items() if k != "report_only"},
                   "copy_words": COPY_WORDS, "seconds": time.perf_counter() - t0, "results": results}
        write_results(f"real_modes_{args.tag}", payload,
                      markdown(results, args, machine(), time.perf_counter() - t0, command_line()),
                      report=report(results, args))


if __name__ == "__main__":
    main()
