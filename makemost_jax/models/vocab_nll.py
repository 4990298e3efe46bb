"""Token NLLs of the output layer read in vocabulary chunks, and their gradient in the same pass.

The loss of a language model at N positions is `logsumexp(c) - c[target]` over the
capped logits `c = softcap * tanh((y @ W.T + b) / softcap)` of V tokens. Written plainly,
it materialises the (N, V) logits, and its gradient with respect to the states `y` reads
the vocabulary table a second time after a softmax over those logits. Here the table is
read once, in chunks of `CHUNK` tokens, with a running maximum and sum (as flash attention
does over keys), and a differentiated call forms `dNLL/dy = E_p[g W] - g_t W_t` in the same
pass (`g` the softcap's derivative, 1 without one): no (N, V) array is ever held.

Why: the vocabulary's backward product is the slowest dense product of the HSO step on
CPU: XLA's kernel runs that long reduction over V at about 70% of the forward product's
rate (167 against 237 GFLOP/s at GPT-2's head on 2 cores, `benchmarks/results/hso_cpu.md`).
For 128 positions on this 2-core CPU, the value and gradient of the NLL take 127 ms plainly
against 89 ms here at SmolLM2-135M's head (49152 x 576), and 152 against 114 ms at GPT-2's
(50257 x 768); the value alone takes the same time either way.

Gradients with respect to the table and the bias are exact too (recomputed chunk by chunk
in the backward pass); XLA drops that work when nothing asks for them, as in HSO, where
only the states are differentiated.

Dimensions: N positions, D width, V vocabulary, C tokens in a chunk.

Example:
    >>> import jax, jax.numpy as jnp
    >>> y_ND, table_VD = jnp.ones((2, 3)), jnp.arange(15.0).reshape(5, 3) / 10
    >>> nll_N = token_nll(y_ND, table_VD, None, jnp.array([0, 4]), tied=True, softcap=None)
    >>> plain_N = jax.nn.logsumexp(y_ND @ table_VD.T, -1) - (y_ND @ table_VD.T)[jnp.arange(2), jnp.array([0, 4])]
    >>> bool(jnp.allclose(nll_N, plain_N))
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from makemost_jax.models.layers import accumulation_dtype, loops_unrolled

# Tokens per chunk: 2048, 4096 and 8192 measured the same within noise (value and gradient at SmolLM2's and
# GPT-2's heads, 2 CPU cores); a chunk of a 576-768 wide float32 table is then 9-12 MiB.
CHUNK = 4096


def _over_vocab(vocab: int, fn, carry):
    """`carry = fn(carry, start, size)` for each chunk of the vocabulary: a loop over the full ones, then the rest.

    Under `layers.unrolled_loops` every chunk is traced (XLA's FLOP count sees them all).
    """
    if loops_unrolled():
        for start in range(0, vocab, CHUNK):
            carry = fn(carry, start, min(CHUNK, vocab - start))
        return carry
    full = vocab // CHUNK
    if full:  # (a loop of no steps would still trace a chunk larger than the table)
        carry = jax.lax.fori_loop(0, full, lambda i, c: fn(c, i * CHUNK, CHUNK), carry)
    rest = vocab - full * CHUNK
    return fn(carry, full * CHUNK, rest) if rest else carry


def _vocab_axis(tied: bool) -> int:
    """The table's vocabulary axis: (V, D) tied to the embedding, (D, V) an untied head's kernel."""
    return 0 if tied else 1


def _rows(table, start, size: int, tied: bool):
    """The table's weights of tokens [start, start + size): (C, D) tied, (D, C) untied."""
    return jax.lax.dynamic_slice_in_dim(table, start, size, _vocab_axis(tied))


def _capped(raw, softcap):
    """Capped logits and their derivative with respect to the raw ones (None without a cap)."""
    if softcap is None:
        return raw, None
    t = jnp.tanh(raw / softcap)
    return softcap * t, 1 - t * t


def _chunk_logits(y_ND, table, bias_V, start, size: int, tied: bool, softcap):
    """(capped logits (N, C) in the accumulation dtype, their softcap derivative or None, the chunk's weights)."""
    w = _rows(table, start, size, tied)
    raw = jnp.einsum("nd,cd->nc" if tied else "nd,dc->nc", y_ND, w,
                     preferred_element_type=accumulation_dtype(y_ND.dtype))
    if bias_V is not None:
        raw = raw + jax.lax.dynamic_slice_in_dim(bias_V, start, size).astype(raw.dtype)
    return (*_capped(raw, softcap), w)


def _apply_rows(p_NC, w, tied: bool):
    """p @ W over the chunk's tokens: (N, D)."""
    return jnp.einsum("nc,cd->nd" if tied else "nc,dc->nd", p_NC, w.astype(p_NC.dtype))


def _target_rows(y_ND, table, bias_V, targets_N, tied: bool, softcap):
    """(capped target logits (N,), their softcap derivative or None, the targets' weights (N, D))."""
    wide = accumulation_dtype(y_ND.dtype)
    w_ND = (table[targets_N] if tied else table[:, targets_N].T).astype(wide)
    raw = jnp.sum(y_ND.astype(wide) * w_ND, axis=-1)
    if bias_V is not None:
        raw = raw + bias_V[targets_N].astype(wide)
    return (*_capped(raw, softcap), w_ND)


def _forward(y_ND, table, bias_V, targets_N, tied: bool, softcap, with_grad: bool):
    """(nll (N,), log-sum-exp (N,), dNLL/dy (N, D) or None), one read of the table."""
    n, d = y_ND.shape
    wide = accumulation_dtype(y_ND.dtype)

    def chunk(carry, start, size):
        max_N, sum_N, acc_ND = carry
        c_NC, g_NC, w = _chunk_logits(y_ND, table, bias_V, start, size, tied, softcap)
        new_max_N = jnp.maximum(max_N, c_NC.max(axis=1))
        rescale_N = jnp.exp(max_N - new_max_N)
        p_NC = jnp.exp(c_NC - new_max_N[:, None])
        sum_N = sum_N * rescale_N + p_NC.sum(axis=1)
        if with_grad:
            acc_ND = acc_ND * rescale_N[:, None] + _apply_rows(p_NC if g_NC is None else p_NC * g_NC, w, tied)
        return new_max_N, sum_N, acc_ND

    init = (jnp.full((n,), -jnp.inf, wide), jnp.zeros((n,), wide), jnp.zeros((n, d) if with_grad else (), wide))
    max_N, sum_N, acc_ND = _over_vocab(table.shape[_vocab_axis(tied)], chunk, init)
    lse_N = max_N + jnp.log(sum_N)
    c_t, g_t, w_t = _target_rows(y_ND, table, bias_V, targets_N, tied, softcap)
    if not with_grad:
        return lse_N - c_t, lse_N, None
    dy_ND = acc_ND / sum_N[:, None] - (w_t if g_t is None else g_t[:, None] * w_t)
    return lse_N - c_t, lse_N, dy_ND


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def token_nll(y_ND, table, bias_V, targets_N, tied: bool, softcap):
    """NLL (N,) of `targets_N` under logits `y @ table.T + bias` (tied: table (V, D); else (D, V)), capped.

    In the accumulation dtype of `y` (float32 for bfloat16 and float32, float64 for
    float64); `bias_V` may be None, `softcap` None or the cap.

    Example:
        >>> y, table = jnp.zeros((1, 2)), jnp.zeros((4, 2))    # uniform over 4 tokens
        >>> round(float(token_nll(y, table, None, jnp.array([3]), True, None)[0]), 4)
        1.3863
    """
    return _forward(y_ND, table, bias_V, targets_N, tied, softcap, with_grad=False)[0]


def _token_nll_fwd(y_ND, table, bias_V, targets_N, tied, softcap):
    nll_N, lse_N, dy_ND = _forward(y_ND, table, bias_V, targets_N, tied, softcap, with_grad=True)
    return nll_N, (y_ND, table, bias_V, targets_N, lse_N, dy_ND)


def _token_nll_bwd(tied, softcap, residuals, ct_N):
    y_ND, table, bias_V, targets_N, lse_N, dy_ND = residuals
    wide = lse_N.dtype
    ct_N = ct_N.astype(wide)

    def chunk(grads, start, size):  # dNLL/dlogit = (p - onehot(target)) * g, weighted by the cotangent
        d_table, d_bias = grads
        c_NC, g_NC, _ = _chunk_logits(y_ND, table, bias_V, start, size, tied, softcap)
        onehot_NC = targets_N[:, None] == start + jnp.arange(size)
        d_NC = (jnp.exp(c_NC - lse_N[:, None]) - onehot_NC) * ct_N[:, None]
        d_NC = d_NC if g_NC is None else d_NC * g_NC
        d_w = jnp.einsum("nc,nd->cd" if tied else "nc,nd->dc", d_NC, y_ND.astype(wide)).astype(table.dtype)
        d_table = jax.lax.dynamic_update_slice_in_dim(d_table, d_w, start, _vocab_axis(tied))
        if d_bias is not None:
            d_bias = jax.lax.dynamic_update_slice_in_dim(d_bias, d_NC.sum(0).astype(d_bias.dtype), start, 0)
        return d_table, d_bias

    d_table, d_bias = _over_vocab(table.shape[_vocab_axis(tied)], chunk,
                                  (jnp.zeros_like(table), None if bias_V is None else jnp.zeros_like(bias_V)))
    return (ct_N[:, None] * dy_ND).astype(y_ND.dtype), d_table, d_bias, None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
