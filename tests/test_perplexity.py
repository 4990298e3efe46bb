"""Perplexity: window plan, parity with a plain PyTorch loop, one compile per shape, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import makemost_jax as mm
from makemost_jax.assets import read_sample
from makemost_jax.errors import ConfigError, InputError
from makemost_jax.perplexity import perplexity, perplexity_of_text, plan_windows, window_nll_sums


def torch_window_nll(model, ids, context, stride):
    """Sum of -log p over the same scored tokens, with a straightforward PyTorch loop.

    Written independently of `plan_windows`: inputs [begin, end) predict [begin+1, end+1);
    a target is scored in the first window that predicts it.
    """
    n = len(ids)
    nll, count, next_target = 0.0, 0, 1
    for begin in range(0, n - 1, stride):
        end = min(begin + context, n - 1)
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        for t in range(max(begin + 1, next_target), end + 1):
            nll -= logp[t - begin - 1, ids[t]].item()
            count += 1
        next_target = end + 1
        if end == n - 1:
            break
    return nll, count


def random_ids(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()


@pytest.fixture(scope="module")
def tiny_models(tiny_gpt2_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    out = {}
    for name, folder in (("gpt2", tiny_gpt2_dir), ("llama", tiny_llama_dir)):
        torch_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        out[name] = (mm.load(str(folder)), torch_model)
    return out


# ---------------------------------------------------------------- the window plan


@pytest.mark.parametrize("n, context, stride", [(2, 2, 1), (10, 4, 2), (10, 4, 4), (11, 4, 4),
                                                (100, 7, 3), (100, 32, 1), (33, 32, 32), (5, 32, 7)])
def test_plan_scores_every_target_once_with_enough_context(n, context, stride):
    plan = plan_windows(n, context, stride)
    scored = []
    for k, (start, length, k_scored) in enumerate(zip(plan.starts, plan.lengths, plan.n_scored)):
        assert 1 <= length <= context and k_scored >= 1
        assert start == k * stride
        targets = list(range(start + 1, start + length + 1))[length - k_scored:]
        scored += targets
        # each scored target sees >= context - stride + 1 tokens of left context (window 0: all)
        assert k == 0 or targets[0] - start >= context - stride + 1
    assert scored == list(range(1, n))


def test_disjoint_plan_has_no_overlap():
    plan = plan_windows(13, context=4, stride=4)
    assert plan.starts.tolist() == [0, 4, 8]
    assert plan.lengths.tolist() == [4, 4, 4]
    assert plan.n_scored.tolist() == [4, 4, 4]


# ---------------------------------------------------------------- parity with PyTorch

CASES = [  # n tokens, context, stride, batch size
    (150, 64, 64, 8),  # disjoint, last window partial
    (150, 32, 8, 3),  # strided, 16 windows, batch does not divide them
    (97, 17, 5, 4),
    (40, 8, 1, 5),  # stride 1: every token gets the full context
    (20, 64, 64, 8),  # text shorter than the context: one short window
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("n, context, stride, batch", CASES)
def test_matches_pytorch_loop(tiny_models, family, n, context, stride, batch):
    params, torch_model = tiny_models[family]
    ids = random_ids(n, params.config.vocab_size, seed=n + stride)
    result = perplexity(params, ids, context=context, stride=stride, batch_size=batch, progress=False)
    ref_nll, ref_count = torch_window_nll(torch_model, ids, context, stride)
    assert result.n_tokens == ref_count == n - 1
    assert result.nll_sum == pytest.approx(ref_nll, rel=1e-4)
    assert result.ppl == pytest.approx(math.exp(ref_nll / ref_count), rel=1e-4)
    assert result.n_windows == len(plan_windows(n, context, stride).starts)


def test_defaults_are_disjoint_windows_of_the_model_context(tiny_models):
    params, torch_model = tiny_models["gpt2"]
    ids = random_ids(200, params.config.vocab_size, seed=1)
    result = perplexity(params, ids, progress=False)
    assert (result.context, result.stride) == (64, 64)
    assert result.nll_sum == pytest.approx(torch_window_nll(torch_model, ids, 64, 64)[0], rel=1e-4)


def test_one_compilation_per_shape(tiny_models):
    params, _ = tiny_models["llama"]
    before = window_nll_sums._cache_size()
    # 150 tokens, context 24, stride 7: 19 windows in 5 batches of 4 -> one (4, 24) program
    first = perplexity(params, random_ids(150, 101, seed=2), context=24, stride=7, batch_size=4,
                       progress=False)
    assert first.n_windows == 19
    assert window_nll_sums._cache_size() == before + 1
    # another text with the same window shape reuses it
    perplexity(params, random_ids(170, 101, seed=3), context=24, stride=7, batch_size=4, progress=False)
    assert window_nll_sums._cache_size() == before + 1


def test_text_helper_counts_words_and_bos(tiny_gpt2_dir, tiny_models):
    params, _ = tiny_models["gpt2"]
    tok = mm.load_tokenizer(str(tiny_gpt2_dir))
    text = read_sample("austen")[:600]
    result = perplexity_of_text(params, tok, text, context=32, stride=16, progress=False)
    ids = tok.encode(text)
    assert result.n_tokens == len(ids) - (0 if tok.add_bos else 1)
    assert result.n_words == len(text.split())
    assert result.word_ppl == pytest.approx(math.exp(result.nll_sum / result.n_words))
    assert result.word_ppl > result.ppl  # the tokenizer splits words into several tokens


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(context=1), ConfigError, "context=1"),
    (dict(context=65), ConfigError, "max_positions=64"),
    (dict(stride=0), ConfigError, "stride=0"),
    (dict(context=16, stride=17), ConfigError, "stride=17"),
    (dict(batch_size=0), ConfigError, "batch_size=0"),
    (dict(context=16.5), ConfigError, "context=16.5"),
])
def test_bad_settings_raise_config_error(tiny_models, kwargs, error, words):
    params, _ = tiny_models["gpt2"]
    with pytest.raises(error, match=words):
        perplexity(params, random_ids(50, 101), progress=False, **kwargs)


def test_bad_tokens_raise_input_error(tiny_models, tiny_gpt2_dir):
    params, _ = tiny_models["gpt2"]
    with pytest.raises(InputError, match="shorter than 2 tokens"):
        perplexity(params, [5], progress=False)
    with pytest.raises(InputError, match="shorter than 2 tokens"):
        perplexity(params, [], progress=False)
    with pytest.raises(InputError, match="token id 101"):
        perplexity(params, [1, 2, 101, 3], progress=False)
    with pytest.raises(InputError, match="1-D"):
        perplexity(params, [[1, 2], [3, 4]], progress=False)
    with pytest.raises(InputError, match="shorter than 2 tokens"):
        perplexity_of_text(params, mm.load_tokenizer(str(tiny_gpt2_dir)), "  \n", progress=False)


def test_encoder_is_rejected(hf):
    params = mm.load(str(hf.bert("bert")))
    with pytest.raises(ConfigError, match="causal"):
        perplexity(params, [1, 2, 3], progress=False)


# ---------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def real_models():
    from transformers import AutoModelForCausalLM

    from makemost_jax.checkpoints.gguf import default_gguf_path

    gguf = Path(default_gguf_path())
    torch_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    return mm.load(), mm.load_tokenizer(), torch_model


@pytest.mark.slow
def test_real_model_matches_transformers_gguf(real_models):
    params, tok, torch_model = real_models
    ids = tok.encode(read_sample("austen"))[:300]
    result = perplexity(params, ids, context=128, stride=64, batch_size=4, progress=False)
    ref_nll, ref_count = torch_window_nll(torch_model, ids, 128, 64)
    assert result.n_tokens == ref_count == 299
    assert result.nll_sum == pytest.approx(ref_nll, rel=1e-4)  # measured: ~1e-7
    assert 3 < result.ppl < 60  # real English under a real model, far below the vocabulary size
