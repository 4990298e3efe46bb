"""HSO: the JAX loop (`makemost_jax.hso.hso_nll`) against the plain PyTorch reference.

The reference (`benchmarks/hso_torch_reference.py`) transcribes the protocol directly on
Hugging Face models with a `DynamicCache` of leaf tensors. Both run on the same tiny
random GPT-2 and Llama (grouped-query attention) checkpoints, with the update switched
on hard enough to move the NLLs, over enough segments that the cache fills and evicts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, make_hf_gpt2, make_hf_llama
from transformers import AutoModelForCausalLM

import makemost_jax as mm
from makemost_jax.hso import HSOConfig, hso_nll

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from hso_torch_reference import HSOState, adam_step, hso_segment_nlls

SEGMENT, CACHE = 8, 20  # cache not a multiple of the segment: eviction cuts through a segment
N_TOKENS = 53  # 52 targets -> 7 segments, the last one partial; the cache is full from segment 3
LENGTHS = np.array([N_TOKENS, 38])  # the second row ends inside segment 5
LR = 5e-2  # large enough that HSO visibly changes the NLLs of these random models
ATOL = 1e-4  # per-segment NLL sums (nats)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (JAX params, PyTorch model) for a tiny GPT-2 and a tiny GQA Llama."""
    root = tmp_path_factory.mktemp("hso")
    folders = {"gpt2": make_hf_gpt2(root / "gpt2", tokenizer=False, n_layer=3),
               "llama": make_hf_llama(root / "llama", tokenizer=False, num_attention_heads=4,
                                      num_key_value_heads=2)}
    return {name: (mm.load(str(folder)), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
            for name, folder in folders.items()}


@pytest.fixture(scope="module")
def tokens():
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, N_TOKENS))
    ids[1, LENGTHS[1]:] = 0  # right padding
    return ids


def reference(torch_model, tokens, **kw):
    return hso_segment_nlls(torch_model, tokens, segment=SEGMENT, cache_size=CACHE, lengths=LENGTHS, **kw)


def jax_nll(params, tokens, **kw):
    cfg = HSOConfig(segment=SEGMENT, cache_size=CACHE, sink=0, **kw)  # the reference has no sinks
    result = hso_nll(params, np.asarray(tokens, np.int32), cfg, lengths=LENGTHS)
    return np.asarray(result.nll, np.float64), np.asarray(result.counts), result


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("hso_steps, recompute", [(1, True), (1, False), (2, True), (2, False)])
def test_hso_matches_pytorch_reference(models, tokens, name, hso_steps, recompute):
    params, torch_model = models[name]
    kw = {"lr": LR, "hso_steps": hso_steps, "recompute": recompute}
    ref_nll, ref_counts = reference(torch_model, tokens, **kw)
    ours_nll, ours_counts, result = jax_nll(params, tokens, **kw)
    n_seg = -(-(N_TOKENS - 1) // SEGMENT)
    assert ours_nll.shape == ref_nll.shape == (2, n_seg)
    np.testing.assert_array_equal(ours_counts, ref_counts)
    assert ref_counts[1].sum() == LENGTHS[1] - 1 and ref_counts[1, -1] == 0
    np.testing.assert_allclose(ours_nll, ref_nll, rtol=0, atol=ATOL)
    assert result.ppl == pytest.approx(np.exp(ref_nll.sum() / ref_counts.sum()), rel=1e-5)

    # the update really acts: same first segment (nothing cached yet), clearly different afterwards
    base_nll, _ = reference(torch_model, tokens, lr=0.0, hso_steps=hso_steps, recompute=recompute)
    np.testing.assert_allclose(ref_nll[:, 0], base_nll[:, 0], atol=1e-5)
    assert np.abs(ref_nll - base_nll)[:, 1:].max() > 100 * ATOL
    assert np.abs(ours_nll - base_nll).max() > 100 * ATOL


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_lr_zero_matches_reference_and_a_plain_forward(models, tokens, name):
    """lr=0 is the plain cached sliding evaluation; without eviction it is one full forward."""
    params, torch_model = models[name]
    ref_nll, _ = reference(torch_model, tokens, lr=0.0)
    ours_nll, _, _ = jax_nll(params, tokens, lr=0.0)
    np.testing.assert_allclose(ours_nll, ref_nll, rtol=0, atol=ATOL)

    # a cache as large as the text never evicts: then every segment sees exactly the full prefix
    whole, counts = hso_segment_nlls(torch_model, tokens[:1], segment=SEGMENT, cache_size=N_TOKENS, lr=0.0)
    with torch.no_grad():
        logits = torch_model(torch.as_tensor(tokens[:1])).logits.double()
    token_nll = -torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.as_tensor(tokens[0, 1:])[:, None])[:, 0]
    per_segment = np.add.reduceat(token_nll.numpy(), np.arange(0, N_TOKENS - 1, SEGMENT))
    np.testing.assert_allclose(whole[0], per_segment, rtol=0, atol=ATOL)
    assert counts.sum() == N_TOKENS - 1


def test_reference_adam_is_per_slot():
    """First step moves each element by lr*sign(g); a slot's bias correction uses its own step count."""
    g = torch.tensor([[[[0.5, -2.0], [3.0, 1e-3]]]])  # (B=1, H=1, P=2 slots, K=2)
    zeros = torch.zeros_like(g)
    state = HSOState([zeros.clone()], [zeros.clone()], [zeros], [zeros], [zeros], [zeros],
                     torch.tensor([0, 4]))  # slot 1 has already taken 4 steps (with zero gradients)
    new = adam_step(state, [g, g], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    assert new.steps.tolist() == [1, 5]
    np.testing.assert_allclose(new.keys[0][0, 0, 0].numpy(), -0.1 * np.sign(g[0, 0, 0].numpy()), rtol=1e-6)
    # slot 1 at step 5: m_hat = 0.1 g / (1 - 0.9^5), v_hat = 0.001 g^2 / (1 - 0.999^5)
    m_hat = 0.1 * g[0, 0, 1].double() / (1 - 0.9 ** 5)
    v_hat = 0.001 * g[0, 0, 1].double() ** 2 / (1 - 0.999 ** 5)
    np.testing.assert_allclose(new.values[0][0, 0, 1].numpy(), (-0.1 * m_hat / (v_hat.sqrt() + 1e-8)).numpy(), rtol=1e-5)


def test_reference_update_descends(models, tokens):
    """A small Adam step on the past lowers the NLL of the segment it learned from (the sign is right)."""
    from hso_torch_reference import random_state, segment_loss

    _, torch_model = models["llama"]
    state = random_state(torch_model, batch=2, n_cached=CACHE)
    inputs = torch.as_tensor(tokens[:, :SEGMENT])
    targets = torch.as_tensor(tokens[:, 1:SEGMENT + 1])
    weights = torch.ones(targets.shape)
    positions = (CACHE + torch.arange(SEGMENT)).expand(2, SEGMENT)
    leaves = [t.requires_grad_(True) for t in state.tensors()]
    loss, _, _, _ = segment_loss(torch_model, state, inputs, targets, weights, positions)
    grads = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        after, _, _, _ = segment_loss(torch_model, adam_step(state, list(grads), 1e-3, 0.9, 0.999, 1e-8),
                                      inputs, targets, weights, positions)
    assert after < loss - 1e-3
