"""Beam search vs conditional beam search on the real default model (SmolLM2-135M-Instruct).

24 fixed prompts: 12 chat questions (the model's chat template), 6 plain openings and 6
plain sentences that read like the end of a text. For each search, the best output per
prompt is "degenerate" when it is empty, repeats a 4-gram, or copies the prompt
(`non_degenerate()`: `MinLength(1)`, `NoRepeatNgram(4)`, `NoPromptCopy(8)`). CBS uses
the classifier bundled with the package for `min-length:8` (trained by `makemost
cbs-train` on the model's samples for 80 other prompts; see makemost_jax/assets/README.md)
with weight 1, and keeps only outputs of at least 8 tokens. A third search, beam search
whose finished outputs must have the attribute but without the classifier's term, shows
what the filter alone does. The searches are `benchmarks/real_model_methods.py`'s (which records
the numbers for docs/RESULTS.md); here they are printed (run with -s) and checked: the claims asserted are the ones this model shows: beam search returns the
empty output for some of the sentence-ending prompts, CBS for none, every CBS output has
the attribute, and conditioning costs likelihood.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

import makemost_jax as mm
from makemost_jax.decoding.attributes import MinLength
from makemost_jax.decoding.classifier import load_classifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from real_model_methods import CBS_LENGTH, CBS_SEARCH, cbs_searches, read_search_prompts


@pytest.mark.slow
def test_cbs_avoids_the_empty_outputs_of_beam_search():
    params, tok = mm.load(), mm.load_tokenizer()
    assert load_classifier("default", params).config.attribute == f"min-length:{CBS_LENGTH}"
    prompts = read_search_prompts()
    texts = prompts["chat"] + prompts["openings"] + prompts["endings"]
    rows = cbs_searches(params, tok)

    print(f"\n{len(texts)} prompts ({len(prompts['chat'])} chat, {len(prompts['openings'])} openings, "
          f"{len(prompts['endings'])} endings), {CBS_SEARCH['beams']} beams, up to {CBS_SEARCH['max_new_tokens']} "
          "new tokens")
    print(f"{'search':20} {'found':>6} {'degenerate':>10} {'empty':>6} {'mean log p':>10} {'mean length':>11}")
    for r in rows:
        print(f"{r['search']:20} {r['found']:6.2f} {r['degenerate']:10.3f} {r['empty']:6.3f} {r['mean_loglik']:10.2f} "
              f"{r['mean_length']:11.1f}")
    for i, text in enumerate(texts):
        print(f"{text!r}")
        for r in rows:
            print(f"    {r['search']:18} {r['logp'][i]:7.2f}  {tok.decode(r['outputs'][i])!r}")

    beam_row, _, cbs_row = rows
    for r in rows:
        assert 0.0 <= r["degenerate"] <= 1.0 and np.isfinite(r["mean_loglik"]) and r["mean_length"] >= 0
    ending = slice(len(prompts["chat"]) + len(prompts["openings"]), None)
    assert (np.array(beam_row["lengths"])[ending] == 0).sum() >= 2  # the empty output wins for sentence endings
    assert cbs_row["found"] == 1.0 and cbs_row["empty"] == 0.0
    assert all(MinLength(CBS_LENGTH).check([], o) for o in cbs_row["outputs"])
    assert cbs_row["mean_loglik"] < beam_row["mean_loglik"]  # conditioning costs likelihood
