"""Few-shot classification: the cached, padded prompt equals the plain concatenated prompt; errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import makemost_jax as mm
from makemost_jax.errors import ConfigError, InputError
from makemost_jax.hso import HSOConfig
from makemost_jax.models.cache import KVCache
from makemost_jax.hso.fewshot import (PromptFormat, demonstration_tokens, demonstrations_cache, fewshot_classify,
                                      label_logprobs, load_sentiment_sample, load_tfds_task)

DEMOS = [{"text": "A gem of a film.", "label": "positive"}, {"text": "Dull and far too long.", "label": "negative"},
         {"text": "I loved every minute.", "label": "positive"}]
TEXTS = ["Tedious.", "A warm, funny and wise picture that I will remember.", "Bad."]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_prompt_equals_the_concatenated_prompt(hf, family):
    """Padding between demonstrations is masked out and positions skip it: same scores as one plain prompt."""
    folder = hf.gpt2("m", n_positions=512) if family == "gpt2" else hf.llama("m")
    params, tok = mm.load(str(folder)), mm.load_tokenizer(str(folder))
    fmt = PromptFormat()
    label_ids = [tok.encode(v) for _, v in fmt.verbalisers]
    assert max(len(ids) for ids in label_ids) > 1  # this tokenizer splits the verbalisers: the per-label path
    cache = demonstrations_cache(params, tok, DEMOS, fmt, hso=None).cache()
    got = label_logprobs(params, tok, cache, TEXTS, fmt)

    prefix = sum((demonstration_tokens(tok, d, fmt, first=i == 0)[0] for i, d in enumerate(DEMOS)), [])
    for row, text in enumerate(TEXTS):
        query = tok.encode(fmt.query.format(text=text))
        for j, ids in enumerate(label_ids):
            sequence = prefix + query + ids
            logp = jax.nn.log_softmax(mm.forward(params, np.array([sequence])).logits[0], -1)
            start = len(prefix) + len(query) - 1
            expected = sum(float(logp[start + n, t]) for n, t in enumerate(ids))
            np.testing.assert_allclose(got[row, j], expected, rtol=1e-4, atol=1e-4)


def test_hso_changes_the_demonstrations_cache(tiny_llama_dir):
    params, tok = mm.load(str(tiny_llama_dir)), mm.load_tokenizer(str(tiny_llama_dir))
    plain = demonstrations_cache(params, tok, DEMOS, PromptFormat(), hso=None)
    tuned = demonstrations_cache(params, tok, DEMOS, PromptFormat(), hso=HSOConfig(lr=1e-2))
    only_labels = demonstrations_cache(params, tok, DEMOS, PromptFormat(), hso=HSOConfig(lr=1e-2), labels_only=True)
    width = plain.valid.shape[1] // len(DEMOS)
    def first_values(state):  # the values of the first demonstration's slots
        return np.take(np.asarray(state.kv()[1]), np.arange(width), axis=KVCache.SLOT_AXES["v"])

    # The first demonstration's states moved: the two later demonstrations' gradients updated them.
    assert np.abs(first_values(tuned) - first_values(plain)).max() > 1e-3
    assert np.asarray(tuned.adam.steps[:width]).max() == 2 and np.asarray(tuned.adam.steps[-width:]).max() == 0
    assert not np.allclose(np.asarray(only_labels.kv()[0]), np.asarray(tuned.kv()[0]))


def test_fewshot_bad_input(tiny_gpt2_dir):
    params, tok = mm.load(str(tiny_gpt2_dir)), mm.load_tokenizer(str(tiny_gpt2_dir))
    train, test = load_sentiment_sample()
    with pytest.raises(ConfigError, match="k=401 demonstrations requested but only 400"):
        fewshot_classify(params, tok, train, test[:4], k=401)
    with pytest.raises(InputError, match="no verbaliser"):
        fewshot_classify(params, tok, train, [{"text": "x", "label": "neutral"}], k=2)
    with pytest.raises(ConfigError, match="do not fit the model's context"):
        fewshot_classify(params, tok, train, test[:4], k=40)
    with pytest.raises(ConfigError, match="unknown task"):
        load_tfds_task("imagenet")


def test_sentiment_sample_is_balanced_and_disjoint():
    train, test = load_sentiment_sample()
    assert (len(train), len(test)) == (400, 300)
    assert sum(r["label"] == "positive" for r in train) == 200
    assert not {r["text"] for r in train} & {r["text"] for r in test}
