"""HSO on the real default model (SmolLM2-135M-Instruct): perplexity and few-shot accuracy.

The perplexity tests run the README's protocols in full and print its numbers. The few-shot test runs a
smaller version of the README's table (40 test sentences, 2 draws: 44 s instead of 215 s alone on 2 cores); the table
itself comes from `python benchmarks/real_model_methods.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import makemost_jax as mm
from makemost_jax.assets import read_sample
from makemost_jax.hso import HSOConfig, compare_on_tokens
from makemost_jax.hso.fewshot import fewshot_classify, load_sentiment_sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# The settings benchmarks/real_model_methods.py records the numbers with. AUSTEN_TOKENS: the bundled
# opening of Persuasion, out of the instruction-tuned model's usual domain.
from real_model_methods import AUSTEN_TOKENS, FEWSHOT, HSO_PROTOCOLS, balanced_test

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return mm.load(), mm.load_tokenizer()


@pytest.mark.parametrize("sink,lr", HSO_PROTOCOLS)
def test_hso_lowers_perplexity_on_austen(model, sink, lr):
    """METHODS.md's protocol (sink=0) and the variant that keeps the first 4 tokens cached."""
    params, tok = model
    ids = tok.encode_for_model(read_sample("austen"))[:AUSTEN_TOKENS]
    assert len(ids) == AUSTEN_TOKENS
    r = compare_on_tokens(params, ids, HSOConfig(segment=128, cache_size=384, lr=lr, sink=sink))
    print(f"\nAusten, {r['hso']['n_tokens']} tokens, segment 128, cache 384, sink {sink}: HSO (lr {lr}) ppl "
          f"{r['hso']['ppl']:.3f}, lr=0 ppl {r['lr0']['ppl']:.3f}, sliding window (512, stride 128) ppl "
          f"{r['sliding']['ppl']:.3f}")
    assert r["hso"]["n_tokens"] == r["lr0"]["n_tokens"] == r["sliding"]["n_tokens"] == AUSTEN_TOKENS - 1
    assert r["hso"]["ppl"] < r["lr0"]["ppl"] * 0.99  # at least 1% lower
    if sink:  # with its first tokens kept, the cached loop is about as good as recomputing every window
        assert r["lr0"]["ppl"] == pytest.approx(r["sliding"]["ppl"], rel=0.1)
    else:  # without them, perplexity degrades once the text's opening is evicted (StreamingLLM's finding)
        assert r["lr0"]["ppl"] > 1.3 * r["sliding"]["ppl"]


FEWSHOT_TEST = {**FEWSHOT, "per_label": 20, "draws": 2}


def test_fewshot_with_and_without_hso(model):
    params, tok = model
    train, test = load_sentiment_sample()
    test = balanced_test(test, FEWSHOT_TEST["per_label"])
    draws = FEWSHOT_TEST["draws"]
    result = fewshot_classify(params, tok, train, test, k=FEWSHOT_TEST["k"], draws=draws, seed=FEWSHOT_TEST["seed"],
                              hso=HSOConfig(lr=1e-2))
    summary = result.summary()
    print(f"\nsentiment few-shot, k={FEWSHOT_TEST['k']}, {len(test)} test sentences, {draws} draws:")
    for name, s in summary.items():
        print(f"  {name:16} {s['mean']:.3f} +- {s['std']:.3f} (min {s['min']:.3f}, max {s['max']:.3f})")
    assert result.n_test == 2 * FEWSHOT_TEST["per_label"] and len(result.draws) == draws
    assert all(len(a) == draws for a in result.accuracy.values())  # every method on the same draws
    assert len({tuple(d) for d in result.draws}) == draws
    assert summary["plain"]["mean"] > 0.5 and summary["hso"]["mean"] > 0.5  # above chance (balanced labels)
    assert result.majority_rate == 0.5
    assert not np.allclose(result.accuracy["plain"], result.accuracy["hso"])  # HSO changed the predictions
