"""The output layer's NLL read in vocabulary chunks (`models.vocab_nll`, `model.head_nll`) equals the plain head.

The plain head (`model.head`, then a log-softmax) is the one the family tests hold to
Hugging Face's logits; here the chunked NLL must give its values and its gradients with
respect to the states and to every weight, on heads that are tied, untied, projected
(OPT) and soft-capped (Gemma 2), and with a logits bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_families import CONFIGS

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models import from_hf_config, init_params, vocab_nll
from makemost_jax.models.model import forward, head, head_nll, token_logprobs
from makemost_jax.recurrence.evaluate import compiled_stats

GPT2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "vocab_size": 101, "n_positions": 32}
RNG = np.random.default_rng(0)
TARGETS = jnp.asarray(RNG.integers(0, 101, (2, 5)))
COTANGENT = jnp.asarray(RNG.random((2, 5)), jnp.float32)  # uneven weights per token, as HSO's padding gives


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(vocab_nll, "CHUNK", 16)  # a vocabulary of 101: six full chunks and a rest of five


def model_config(name: str):
    if name == "gpt2":
        return from_hf_config(GPT2)
    _, _, kwargs = CONFIGS[name]
    return from_hf_config({**kwargs, "model_type": name})


@pytest.mark.parametrize("name", ["gpt2", "mistral", "gemma2", "opt"])  # tied, untied, soft-capped, projected
def test_head_nll_and_its_gradients_equal_the_plain_head(name):
    cfg = model_config(name)
    weights = init_params(cfg, jax.random.key(1)).weights
    x_BTD = jnp.asarray(RNG.standard_normal((2, 5, cfg.d_model)), jnp.float32)

    def loss(nll_fn):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(COTANGENT * nll_fn(x, w)), argnums=(0, 1)))

    def plain(x, w):
        return -token_logprobs(head(cfg, w, x)[0], TARGETS)

    value, grads = loss(lambda x, w: head_nll(cfg, w, x, TARGETS))(x_BTD, weights)
    plain_value, plain_grads = loss(plain)(x_BTD, weights)
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    np.testing.assert_allclose(head_nll(cfg, weights, x_BTD, TARGETS), plain(x_BTD, weights), atol=1e-5)
    jax.tree_util.tree_map_with_path(
        lambda path, got, want: np.testing.assert_allclose(got, want, atol=1e-5, err_msg=jax.tree_util.keystr(path)),
        grads, plain_grads)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_token_nll_with_a_logits_bias(tied, softcap):
    y_ND = jnp.asarray(RNG.standard_normal((7, 6)), jnp.float32)
    table = jnp.asarray(RNG.standard_normal((101, 6) if tied else (6, 101)), jnp.float32)
    bias_V = jnp.asarray(RNG.standard_normal(101), jnp.float32)
    targets_N, ct_N = jnp.asarray(RNG.integers(0, 101, 7)), jnp.asarray(RNG.random(7), jnp.float32)

    def plain(y, table, bias):
        raw = (y @ table.T if tied else y @ table) + bias
        logits = raw if softcap is None else softcap * jnp.tanh(raw / softcap)
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets_N[:, None], 1)[:, 0]

    def chunked(y, table, bias):
        return vocab_nll.token_nll(y, table, bias, targets_N, tied, softcap)

    for got, want in zip(*(jax.value_and_grad(lambda *a, f=f: jnp.sum(ct_N * f(*a)), argnums=(0, 1, 2))(
            y_ND, table, bias_V) for f in (chunked, plain))):
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5), got, want)


def test_flop_count_sees_every_chunk():
    """`compiled_stats` (tracing under `layers.unrolled_loops`) counts every chunk: the plain head's FLOPs."""
    cfg = model_config("mistral")
    weights = init_params(cfg, jax.random.key(1)).weights
    x_BTD = jnp.ones((2, 5, cfg.d_model), jnp.float32)

    def flops(nll_fn):
        return compiled_stats(jax.value_and_grad(lambda x: jnp.sum(nll_fn(x))), x_BTD, memory=False)["flops"]

    chunked = flops(lambda x: head_nll(cfg, weights, x, TARGETS))
    plain = flops(lambda x: -token_logprobs(head(cfg, weights, x)[0], TARGETS))
    # The chunks' running maxima and rescaling add elementwise work (+6% at this tiny width); the loop counted
    # once would report about a quarter of the plain head's FLOPs here.
    assert 0.95 * plain < chunked < 1.3 * plain, (chunked, plain)


def test_states_only_returns_the_states_and_the_hidden_layers_and_refuses_logits_at():
    params = init_params(from_hf_config(GPT2), jax.random.key(0))
    out = forward(params, TARGETS, states_only=True, return_hidden=True)
    full = forward(params, TARGETS, return_hidden=True)
    assert out.logits is None and out.states.shape == (2, 5, 16)
    np.testing.assert_array_equal(np.asarray(out.hidden), np.asarray(full.hidden))  # the last: after the final norm
    with pytest.raises(InputError, match="states_only returns no logits; drop logits_at"):
        forward(params, TARGETS, states_only=True, logits_at=-1)


def test_head_nll_refuses_a_model_without_a_language_model_head():
    cfg = from_hf_config({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "intermediate_size": 32, "vocab_size": 50, "max_position_embeddings": 16})
    weights = init_params(cfg, jax.random.key(0)).weights
    with pytest.raises(ConfigError, match="head_nll needs a language-model head; bert has 'mlm'"):
        head_nll(cfg, weights, jnp.ones((1, 2, 16)), jnp.zeros((1, 2), jnp.int32))
