"""The `makemost demo` tour.

`run_demo` loads the embedded SmolLM2-135M-Instruct model, scores the two bundled text
samples, generates from a few short prompts, reads the Austen sample with
hidden-state optimisation and shows conditional beam search on a prompt whose beam-search
output is empty, all offline and in about a minute on a 2-core CPU.

Example:
    >>> from makemost_jax.demo import run_demo
    >>> report = run_demo(json=True)          # doctest: +SKIP
    >>> report["perplexity"]["austen"]["ppl"]  # doctest: +SKIP
    19.2...
"""

from __future__ import annotations

import time

from makemost_jax.assets import SAMPLES, read_sample
from makemost_jax.decoding import generate_text
from makemost_jax.decoding.classifier import load_classifier, search_text
from makemost_jax.hso import HSOConfig, compare_on_tokens
from makemost_jax.loading import load, load_tokenizer, model_summary
from makemost_jax.perplexity import perplexity_of_text

# Disjoint windows of 512 tokens: each sample costs ~6 windows, seconds on a laptop CPU.
DEMO_CONTEXT = 512
DEMO_STRIDE = 512
DEMO_MAX_NEW_TOKENS = 24
GREEDY_PROMPTS = ("The capital of France is", "Jane Austen was an English novelist who")
SAMPLED_PROMPTS = ("Once upon a time, in a small village,",)
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "seed": 0}
# HSO on the first 1025 tokens of the Austen sample: 8 segments, the cache full from the fourth on.
DEMO_HSO = HSOConfig()  # the defaults: segment 128, cache 384, lr 1e-2, sink 4
DEMO_HSO_TOKENS = 1025
# Conditional beam search: a prompt whose beam-search output is empty, and the bundled
# min-length:8 classifier (makemost_jax/assets/README.md).
CBS_PROMPT = "The end."
CBS_SEARCH = {"beams": 4, "max_new_tokens": 24}


def _print_report(report: dict):
    m = report["model"]
    print(f"model     SmolLM2-135M-Instruct (embedded GGUF, dequantized to {m['dtype']}): "
          f"{m['n_params'] / 1e6:.1f} M parameters, {m['n_layers']} layers, width {m['d_model']}, "
          f"context {m['max_positions']}")
    print(f"loaded in {report['load_seconds']:.1f} s")
    print()
    print(f"perplexity (windows of {DEMO_CONTEXT} tokens, stride {DEMO_STRIDE})")
    print(f"  {'sample':8} {'tokens':>7} {'words':>6} {'ppl/token':>10} {'ppl/word':>9} {'seconds':>8}")
    for name, r in report["perplexity"].items():
        print(f"  {name:8} {r['n_tokens']:7d} {r['n_words']:6d} {r['ppl']:10.2f} {r['word_ppl']:9.2f} "
              f"{r['seconds']:8.1f}")
    for name, (_, what) in SAMPLES.items():
        print(f"  {name}: {what}")
    print()
    for g in report["generations"]:
        print(f"[{g['mode']}] {g['prompt']}\u2192{g['completion']!r}")
    print()
    h = report["hso"]
    print(f"hidden-state optimisation on the austen sample ({h['hso']['n_tokens']} tokens, segment "
          f"{DEMO_HSO.segment}, cache {DEMO_HSO.cache_size}, first {DEMO_HSO.sink} kept, lr {DEMO_HSO.lr})")
    for key, name in (("hso", "HSO (Adam on the cached keys/values)"), ("lr0", "same loop, update off"),
                      ("sliding", "sliding window, recomputed")):
        print(f"  {name:38} ppl {h[key]['ppl']:7.2f}  {h[key]['seconds']:5.1f} s")
    print()
    c = report["cbs"]
    print(f"conditional beam search on {c['prompt']!r}: {CBS_SEARCH['beams']} beams, up to "
          f"{CBS_SEARCH['max_new_tokens']} tokens ({c['seconds']:.1f} s)")
    for name, g in (("beam search", c["beam"]), (f"CBS, {c['attribute']}", c["cbs"])):
        text = "(no output found)" if g["completion"] is None else f"log p {g['logprob']:7.2f}  {g['completion']!r}"
        print(f"  {name:22} {text}")
    print()
    print(f"total {report['total_seconds']:.1f} s")


def _cbs_demo(params, tokenizer) -> dict:
    """Beam search and CBS (the bundled min-length:8 head) on CBS_PROMPT: outputs and log-likelihoods."""
    t0 = time.perf_counter()
    head = load_classifier("default", params)
    beam = search_text(params, tokenizer, [CBS_PROMPT], search="beam", **CBS_SEARCH)[0]
    cbs = search_text(params, tokenizer, [CBS_PROMPT], search="cbs", classifier=head, **CBS_SEARCH)[0]
    return {"prompt": CBS_PROMPT, "attribute": head.config.attribute, "beam": beam, "cbs": cbs,
            "seconds": time.perf_counter() - t0}


def run_demo(json: bool = False) -> dict:
    """Load the default model, score the bundled samples, generate; print unless `json`.

    Returns the report dict that `makemost demo --json` prints: model summary,
    load_seconds, perplexity per sample, generations, hso (HSO, lr=0 and sliding-window
    perplexity), cbs (beam search vs conditional beam search on one prompt), total_seconds.

    Example:
        >>> # report = run_demo(json=True); report["generations"][0]["completion"]
    """
    t0 = time.perf_counter()
    params = load()
    tokenizer = load_tokenizer()
    load_seconds = time.perf_counter() - t0

    scores = {}
    for name in SAMPLES:
        r = perplexity_of_text(params, tokenizer, read_sample(name), context=DEMO_CONTEXT,
                               stride=DEMO_STRIDE, progress=not json)
        scores[name] = r.to_dict()

    generations = []
    for g in generate_text(params, tokenizer, GREEDY_PROMPTS, DEMO_MAX_NEW_TOKENS):
        generations.append({"mode": "greedy", **g})
    for g in generate_text(params, tokenizer, SAMPLED_PROMPTS, DEMO_MAX_NEW_TOKENS, **SAMPLING):
        generations.append({"mode": "sampled, " + ", ".join(f"{k}={v}" for k, v in SAMPLING.items()),
                            **g})

    ids = tokenizer.encode_for_model(read_sample("austen"))[:DEMO_HSO_TOKENS]
    hso = compare_on_tokens(params, ids, DEMO_HSO)

    report = {"model": model_summary(params), "load_seconds": load_seconds, "perplexity": scores,
              "generations": generations, "hso": hso, "cbs": _cbs_demo(params, tokenizer),
              "total_seconds": time.perf_counter() - t0}
    if not json:
        _print_report(report)
    return report
