"""Exact search throughput on SmolLM2-135M: nodes/s against the model's batched decode rate, before and after.

One process per code version, on the real default model (`mm.load()`, float32):

1. the batched one-token decode rate: one jitted `decode_step` at the search's batch size on a
   cache of prompt + max_length slots, median of repeats (tokens/s): what this machine allows;
2. the length-conditional modes 0..L of one short prompt (the question `bench_beam.py` asks):
   wall time, nodes, whether every length was proved; and the bare expansion rate (no beam
   seed, so no bound: the node budget runs out), nodes/s, as a fraction of the decode rate;
3. proof rates: the length-L modes (L in `--proof-lengths`) of the 20 prompts of
   `real_modes.py` (10 chat, 10 plain), searched together, at node budgets `--proof-budgets`
   per question: how many were proved optimal, and the time.

`--before REF` runs parts 1-2 again with the code at git revision REF (a worktree under /tmp,
in a subprocess) so before and after are measured on the same machine in one run.

Results: benchmarks/results/exact_<tag>.json / .md.

Example:
    python benchmarks/bench_exact.py --before 89e0cc6          # ~15 min on 2 CPU cores
    python benchmarks/bench_exact.py --quick                   # ~2 min smoke run (tag <backend>_quick)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import command_line, machine, machine_line, median_ms, report_row, write_results
from real_modes import CHAT_PROMPTS, PLAIN_PROMPTS

PROMPT = "The capital of France is"


def decode_rate(params, prompt_ids, batch: int, max_length: int, repeats: int) -> dict:
    """Tokens/s of one jitted decode step at `batch` rows after the prompt (the search's shapes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from makemost_jax.decoding.sampling import decode_step, prefill

    prompts = jnp.asarray(np.tile(np.asarray(prompt_ids, np.int32), (batch, 1)))
    cache, logits = jax.jit(prefill, static_argnames=("cache_size",))(
        params, prompts, jnp.ones_like(prompts), cache_size=prompts.shape[1] + max_length)
    step = jax.jit(decode_step)
    tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    seconds = median_ms(lambda: jax.block_until_ready(step(params, cache, tokens)), repeats, warmup=1) / 1e3
    return {"batch": batch, "seconds_per_step": seconds, "tokens_per_s": batch / seconds}


def search_rates(max_length: int, budget: int, batch: int, rate_budget: int, repeats: int) -> dict:
    """Parts 1 and 2 with whatever makemost_jax this process imports."""
    import makemost_jax as mm
    from makemost_jax.decoding.exact import exact_length_modes

    params, tok = mm.load(), mm.load_tokenizer()
    ids = tok.encode_for_model(PROMPT)
    settings = {"eos_id": tok.eos_id, "max_length": max_length, "node_budget": budget, "batch_size": batch}
    # Each search twice: the first call compiles (its shapes may depend on the budget), the second is timed.
    t0 = time.perf_counter()
    exact_length_modes(params, ids, **settings)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    modes = exact_length_modes(params, ids, **settings)
    seconds = time.perf_counter() - t0
    bare_settings = {**settings, "node_budget": rate_budget, "seed_beams": 0}
    exact_length_modes(params, ids, **bare_settings)
    bare = max(exact_length_modes(params, ids, **bare_settings), key=lambda m: m.seconds)
    return {
        "code": str(Path(mm.__file__).parent), "prompt": PROMPT, "prompt_tokens": len(ids),
        "max_length": max_length, "node_budget": budget, "batch_size": batch, "first_call_seconds": first,
        "seconds": seconds, "all_proved_optimal": all(m.proved_optimal for m in modes),
        "nodes_expanded": max(m.nodes_expanded for m in modes),
        "modes": [{**m.to_dict(), "text": None if m.tokens is None else tok.decode(m.tokens)} for m in modes],
        "bare": {"node_budget": rate_budget, "nodes": bare.nodes_expanded, "seconds": bare.seconds,
                 "nodes_per_s": bare.nodes_expanded / bare.seconds},
        "decode": decode_rate(params, ids, batch, max(max_length, 1), repeats),
    }


def proof_rates(lengths: list[int], budgets: list[int], batch: int, n_prompts: int) -> list[dict]:
    """Part 3: the length-L modes of the real_modes prompts, all questions in one search per (L, budget)."""
    import makemost_jax as mm
    from makemost_jax.decoding.exact import exact_mode

    params, tok = mm.load(), mm.load_tokenizer()
    texts = [(p, True) for p in CHAT_PROMPTS] + [(p, False) for p in PLAIN_PROMPTS]
    texts = texts[:n_prompts]
    prompts = [tok.encode_for_model(tok.user_turn(p) if chat else p) for p, chat in texts]
    rows = []
    for length in lengths:
        for budget in budgets:
            t0 = time.perf_counter()
            modes = exact_mode(params, prompts=prompts, eos_id=tok.eos_id, max_length=length, length=length,
                               node_budget=budget, batch_size=batch)
            rows.append({"length": length, "node_budget": budget, "questions": len(modes),
                         "proved": sum(m.proved_optimal for m in modes), "seconds": time.perf_counter() - t0,
                         "nodes": sum(m.nodes_expanded for m in modes)})
            print(f"length {length}, budget {budget}: {rows[-1]['proved']}/{len(modes)} proved, "
                  f"{rows[-1]['seconds']:.1f} s", flush=True)
    return rows


def before(ref: str, args) -> dict:
    """Parts 1-2 with the code at `ref`, in a subprocess on a git worktree."""
    tree = Path(f"/tmp/makemost_bench_exact_{ref}")
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)
    # The worktree's own copy of this script, so its makemost_jax (not this checkout's) is imported.
    script = tree / "benchmarks" / Path(__file__).name
    script.write_text(Path(__file__).read_text())
    out = subprocess.run([sys.executable, str(script), "--rates-only", "--max-length", str(args.max_length),
                          "--budget", str(args.budget), "--batch", str(args.batch), "--rate-budget",
                          str(args.rate_budget), "--repeats", str(args.repeats)],
                         env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["code"].startswith(str(tree)):
        raise RuntimeError(f"the 'before' run imported {result['code']}, not the worktree {tree}")
    return result


def markdown(after: dict, old: dict | None, proofs: list[dict], info: dict, args) -> str:
    lines = [f"# Exact search throughput on SmolLM2-135M ({info.get('backend', 'cpu')})", "",
             machine_line(info), "", f"Command: `{command_line()}`", "",
             (f"Question: `exact_length_modes` of {PROMPT!r} ({after['prompt_tokens']} tokens), lengths "
             f"0..{args.max_length}, node budget {args.budget}, {args.batch} prefixes per call, seeded by beam search; "
             "each search run twice, the second timed (the first compiles). "
             f"Bare rate: no seed, budget {args.rate_budget}. Decode rate: one jitted one-token step at batch "
             f"{args.batch} on the same cache shape, median of {args.repeats}."), "",
             "| code | lengths proved | wall (s) | nodes | bare nodes/s | decode tokens/s | bare / decode |",
             "|---|---|---|---|---|---|---|"]
    for name, r in ((f"before ({args.before})", old), ("after", after)):
        if r is None:
            continue
        bare, decode = r["bare"]["nodes_per_s"], r["decode"]["tokens_per_s"]
        lines.append(f"| {name} | {sum(m['proved_optimal'] for m in r['modes'])}/{len(r['modes'])} | "
                     f"{r['seconds']:.1f} | {r['nodes_expanded']} | {bare:.0f} | {decode:.0f} | {bare / decode:.2f} |")
    lines += ["", "| length | mode | log p | proved | nodes when settled |", "|---|---|---|---|---|"]
    lines += [f"| {m['length']} | {m['text']!r} | " + ("-" if m["loglik"] is None else f"{m['loglik']:.2f}")
              + f" | {m['proved_optimal']} | {m['nodes_expanded']} |" for m in after["modes"]]
    if proofs:
        lines += ["", (f"Proof rates: the length-L modes of {proofs[0]['questions']} prompts (real_modes.py's chat and "
                  "plain prompts), searched together."), "",
                  "| length | node budget per question | proved | nodes | wall (s) |", "|---|---|---|---|---|"]
        lines += [f"| {r['length']} | {r['node_budget']} | {r['proved']}/{r['questions']} | {r['nodes']} | "
                  f"{r['seconds']:.0f} |" for r in proofs]
    if old is not None:
        lines += ["", (f"wall time after / before: {after['seconds'] / old['seconds']:.2f}x; bare nodes/s after / "
                  f"before: {after['bare']['nodes_per_s'] / old['bare']['nodes_per_s']:.2f}x")]
    lines.append(f"bare expansion rate / decode rate (after): "
                 f"{after['bare']['nodes_per_s'] / after['decode']['tokens_per_s']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-length", type=int, default=3)
    parser.add_argument("--budget", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rate-budget", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--before", default=None, help="a git revision to measure parts 1-2 with as well")
    parser.add_argument("--proof-lengths", default="1,3")
    parser.add_argument("--proof-budgets", default="1000,10000", help="'' to skip the proof rates")
    parser.add_argument("--prompts", type=int, default=20, help="how many of the 20 real_modes prompts")
    parser.add_argument("--proofs-from", default=None, help="take the proof-rate rows from this results JSON")
    parser.add_argument("--quick", action="store_true", help="small budgets and 2 prompts")
    parser.add_argument("--rates-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()
    if args.quick:
        args.budget, args.rate_budget, args.repeats, args.prompts = 512, 128, 3, 2
        args.proof_budgets = "64"
    if args.rates_only:
        print(json.dumps(search_rates(args.max_length, args.budget, args.batch, args.rate_budget, args.repeats)))
        return
    import jax

    old = before(args.before, args) if args.before else None
    after = search_rates(args.max_length, args.budget, args.batch, args.rate_budget, args.repeats)
    print(f"after: {after['seconds']:.1f} s, bare {after['bare']['nodes_per_s']:.0f} nodes/s, decode "
          f"{after['decode']['tokens_per_s']:.0f} tokens/s", flush=True)
    budgets = [int(x) for x in args.proof_budgets.split(",") if x]
    if args.proofs_from:  # proof rates do not depend on the 'before' code: reuse a recorded run's rows
        proofs = json.loads(Path(args.proofs_from).read_text())["proof_rates"]
    else:
        proofs = proof_rates([int(x) for x in args.proof_lengths.split(",")], budgets, args.batch, args.prompts) \
            if budgets else []
    info = {**machine(), "backend": jax.default_backend()}
    tag = args.tag or jax.default_backend() + ("_quick" if args.quick else "")
    ratio = after["bare"]["nodes_per_s"] / after["decode"]["tokens_per_s"]
    report = [report_row("Exact search", f"expansion rate on SmolLM2-135M, lengths 0..{args.max_length}, "
                         f"batch {args.batch}",
                         f"{after['bare']['nodes_per_s']:.0f} nodes/s = {ratio:.2f}x the batched decode rate"
                         + (f" (before: {old['bare']['nodes_per_s']:.0f} nodes/s); length modes proved in "
                            f"{after['seconds']:.1f} s (before {old['seconds']:.1f} s)" if old else ""))]
    report += [report_row("Exact search", f"length-{r['length']} modes proved, {r['questions']} prompts, "
                          f"{r['node_budget']} nodes each", f"{r['proved']}/{r['questions']} ({r['seconds']:.0f} s)")
               for r in proofs]
    payload = {"after": after, "before": old, "before_ref": args.before, "proof_rates": proofs,
               "settings": vars(args)}
    text = markdown(after, old, proofs, info, args)
    path = write_results(f"exact_{tag}", payload, text, report=report)
    print(text, f"\nwrote {path}", sep="\n")


if __name__ == "__main__":
    main()
