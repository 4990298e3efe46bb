"""Transformer building blocks shared by every family, as Flax NNX modules.

One `Block` covers GPT-2 (pre-LayerNorm, GELU MLP), Llama (pre-RMSNorm, rotary,
grouped-query attention, SwiGLU) and BERT (post-LayerNorm, bidirectional); the config
picks the variant. Blocks are stored stacked (leading L axis) and run under
`lax.scan` by `run_blocks`, which turns the NNX module into a pure function of
(weights pytree, inputs) through `nnx.split` / `nnx.merge`.

Dimensions: B batch, T new tokens, S cache slots (keys), L layers, D width,
H query heads, G key/value heads, R = H // G, K head width, F MLP width.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from makemost_jax.models.config import from_hf_config
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 2,
    ...                       "n_head": 2, "vocab_size": 10, "n_positions": 8})
    >>> w = init_block_weights(cfg, jax.random.key(0))
    >>> w["attn"]["q"]["kernel"].shape
    (2, 16, 16)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from makemost_jax.errors import ConfigError
from makemost_jax.models.config import ModelConfig
from makemost_jax.sharding import constrain

# `nnx.to_pure_dict` is the current spelling; older Flax only has the State method.
_to_pure_dict = getattr(nnx, "to_pure_dict", lambda state: state.to_pure_dict())

_ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The activation function called `name` (HF names, normalised by the config).

    Example:
        >>> float(activation("relu")(jnp.array(-1.0)))
        0.0
    """
    return _ACTIVATIONS[name]


def apply_norm(x, scale, bias, eps: float):
    """LayerNorm (with `bias`) or RMSNorm (`bias=None`), statistics in float32.

    Example:
        >>> y = apply_norm(jnp.array([[3.0, 4.0]]), jnp.ones(2), None, 0.0)  # x / rms(x)
        >>> [round(float(v), 3) for v in y[0]]
        [0.849, 1.131]
    """
    x32 = x.astype(jnp.float32)
    if bias is None:
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return (y * scale).astype(x.dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm as the config says (parameters `scale`, and `bias` for LayerNorm)."""

    def __init__(self, cfg: ModelConfig, width: int):
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32)) if cfg.norm == "layernorm" else None

    def __call__(self, x):
        return apply_norm(x, self.scale[...], None if self.bias is None else self.bias[...], self.eps)


def norm_weights(cfg: ModelConfig, width: int) -> dict:
    """Fresh weights of a `Norm` (ones, zeros), for the norms outside the blocks.

    Example:
        >>> # norm_weights(cfg, 768) == {"scale": ones(768), "bias": zeros(768)} for LayerNorm
    """
    return _to_pure_dict(nnx.split(Norm(cfg, width))[1])


def norm(cfg: ModelConfig, weights: dict, x):
    """Apply a `Norm` given its weights dict (for the norms outside the blocks).

    Example:
        >>> # x_BTD = norm(cfg, weights["final_norm"], x_BTD)
    """
    return apply_norm(x, weights["scale"], weights.get("bias"), cfg.norm_eps)


def rotary_inverse_frequencies(cfg: ModelConfig) -> jax.Array:
    """Per-pair rotary frequencies (K/2,), with linear or Llama-3 scaling applied.

    Example:
        >>> # rotary_inverse_frequencies(cfg).shape == (cfg.head_dim // 2,)
    """
    k = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = jnp.where(wavelen > old_context / low, inv_freq / factor,
                             jnp.where(wavelen < old_context / high, inv_freq, smoothed))
    return inv_freq


def apply_rotary(x_BTNK: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate query/key heads by position (HF's rotate-half convention), in float32.

    Example:
        >>> x = jnp.ones((1, 1, 1, 4))
        >>> apply_rotary(x, jnp.zeros((1, 1), int), jnp.ones(2)).tolist()  # position 0: unchanged
        [[[[1.0, 1.0, 1.0, 1.0]]]]
    """
    angles_BTk = positions_BT[..., None].astype(jnp.float32) * inv_freq
    angles_BTK = jnp.concatenate([angles_BTk, angles_BTk], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BTK), jnp.sin(angles_BTK)
    x = x_BTNK.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BTNK.dtype)


class Attention(nnx.Module):
    """Multi-head attention with grouped key/value heads over an explicit cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = nnx.Linear(d, h * k, use_bias=cfg.qkv_bias, rngs=rngs)
        self.k = nnx.Linear(d, g * k, use_bias=cfg.qkv_bias, rngs=rngs)
        self.v = nnx.Linear(d, g * k, use_bias=cfg.qkv_bias, rngs=rngs)
        self.o = nnx.Linear(h * k, d, use_bias=cfg.out_bias, rngs=rngs)

    def __call__(self, cfg: ModelConfig, x_BTD, positions_BT, k_BSGK, v_BSGK, fill,
                 attend_BTS, layer_index, extra=None):
        b, t, _ = x_BTD.shape
        h, g, k = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_BTHK = self.q(x_BTD).reshape(b, t, h, k)
        k_BTGK = self.k(x_BTD).reshape(b, t, g, k)
        v_BTGK = self.v(x_BTD).reshape(b, t, g, k)
        if cfg.rope_theta is not None:
            inv_freq = rotary_inverse_frequencies(cfg)
            q_BTHK = apply_rotary(q_BTHK, positions_BT, inv_freq)
            k_BTGK = apply_rotary(k_BTGK, positions_BT, inv_freq)
        if k_BSGK is None or attend_BTS is None:  # encoder or fresh prefill: attend to the input
            k_BSGK, v_BSGK = k_BTGK, v_BTGK
        else:
            k_BSGK = jax.lax.dynamic_update_slice_in_dim(k_BSGK, k_BTGK.astype(k_BSGK.dtype), fill, 1)
            v_BSGK = jax.lax.dynamic_update_slice_in_dim(v_BSGK, v_BTGK.astype(v_BSGK.dtype), fill, 1)
        if cfg.scale_attn_by_inverse_layer_idx:
            q_BTHK = q_BTHK / (layer_index + 1).astype(q_BTHK.dtype)
        scale = 1.0 / math.sqrt(k) if cfg.scale_attn_weights else 1.0
        out_BTHK = attention(q_BTHK, k_BSGK, v_BSGK, attend_BTS, scale, extra)
        return self.o(out_BTHK.reshape(b, t, h * k).astype(x_BTD.dtype)), k_BSGK, v_BSGK


def _use_cudnn(dtype) -> bool:
    """Fused cuDNN attention for plain causal prefill on GPU in 16-bit (MAKEMOST_ATTENTION overrides)."""
    choice = os.environ.get("MAKEMOST_ATTENTION", "auto")
    if choice not in ("auto", "xla", "cudnn"):
        raise ConfigError(f"MAKEMOST_ATTENTION={choice!r} must be auto, xla or cudnn")
    if choice == "auto":
        return jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
    return choice == "cudnn"


def attention(q_BTHK, k_BSGK, v_BSGK, attend_BTS, scale: float, extra=None):
    """Softmax attention of T queries over S keys with grouped key/value heads.

    `attend_BTS` is a boolean mask; None means plain causal attention over the
    queries' own keys (S == T), where a fused kernel can be used.

    `extra`, optional, is `(k_BMGK, v_BMGK, gate_H)`: M more key/value slots that every
    query may read. Head h returns `(1 - gate[h]) * plain + gate[h] * joint`, where `joint`
    is the attention over the extra slots and the keys together (one softmax, as if the
    slots were prepended to the cache). A gate of 0 gives exactly the plain attention, so
    a module that starts with zero gates leaves a pretrained model unchanged (the
    recurrence memory enters this way).

    Example:
        >>> q = jnp.ones((1, 3, 4, 8)); kv = jnp.ones((1, 3, 2, 8))
        >>> attention(q, kv, kv, None, 8 ** -0.5).shape
        (1, 3, 4, 8)
    """
    b, t, h, k = q_BTHK.shape
    g = k_BSGK.shape[2]
    if attend_BTS is None:
        if extra is None and _use_cudnn(q_BTHK.dtype):
            return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, scale=scale, is_causal=True,
                                                implementation="cudnn")
        attend_BTS = jnp.tril(jnp.ones((1, t, t), bool))
    r = h // g
    # Fold the R query heads that share a key/value head into the query axis: one plain
    # batched matmul per (batch, group), which XLA runs much faster than a 5-D einsum.
    q_BGQK = q_BTHK.reshape(b, t, g, r, k).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, k)
    k_BGSK = k_BSGK.astype(q_BTHK.dtype).transpose(0, 2, 1, 3)
    v_BGSK = v_BSGK.astype(q_BTHK.dtype).transpose(0, 2, 1, 3)
    scores_BGRTS = jnp.einsum("bgqk,bgsk->bgqs", q_BGQK, k_BGSK,
                              preferred_element_type=jnp.float32).reshape(b, g, r, t, -1) * scale
    # A finite floor (not -inf) keeps fully masked rows (padding queries) NaN-free.
    scores_BGRTS = jnp.where(attend_BTS[:, None, None], scores_BGRTS, jnp.finfo(jnp.float32).min)
    # Softmax with the normalisation applied after the value product: one pass less
    # over the (T, S) scores. The max shift cancels exactly, so it carries no gradient.
    shift_BGRT1 = jax.lax.stop_gradient(scores_BGRTS.max(axis=-1, keepdims=True))
    weights_BGRTS = jnp.exp(scores_BGRTS - shift_BGRT1)
    num_BGQK = jnp.einsum("bgqs,bgsk->bgqk", weights_BGRTS.reshape(b, g, r * t, -1).astype(v_BGSK.dtype),
                          v_BGSK, preferred_element_type=jnp.float32)
    num_BGRTK = num_BGQK.reshape(b, g, r, t, k)
    den_BGRT1 = weights_BGRTS.sum(axis=-1, keepdims=True)
    out_BGRTK = num_BGRTK / den_BGRT1
    if extra is not None:
        out_BGRTK = _mix_extra_slots(out_BGRTK, num_BGRTK, den_BGRT1, shift_BGRT1, q_BGQK, *extra, scale)
    return out_BGRTK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, k).astype(q_BTHK.dtype)


def _mix_extra_slots(out_BGRTK, num_BGRTK, den_BGRT1, shift_BGRT1, q_BGQK, k_BMGK, v_BMGK, gate_H, scale):
    """`out + gate * (joint - out)`: joint = softmax over [extra slots, keys], from the keys' sums.

    The keys' unnormalised sums are rescaled to a shift that also covers the extra
    scores, so `joint` is finite however large either side is; `out` itself is untouched,
    hence exact when the gate is 0.
    """
    b, g, r, t, k = out_BGRTK.shape
    dtype = q_BGQK.dtype
    k_BGMK = k_BMGK.astype(dtype).transpose(0, 2, 1, 3)
    v_BGMK = v_BMGK.astype(dtype).transpose(0, 2, 1, 3)
    scores_BGRTM = jnp.einsum("bgqk,bgmk->bgqm", q_BGQK, k_BGMK,
                              preferred_element_type=jnp.float32).reshape(b, g, r, t, -1) * scale
    joint_shift_BGRT1 = jax.lax.stop_gradient(jnp.maximum(shift_BGRT1, scores_BGRTM.max(axis=-1, keepdims=True)))
    rescale_BGRT1 = jnp.exp(shift_BGRT1 - joint_shift_BGRT1)
    weights_BGRTM = jnp.exp(scores_BGRTM - joint_shift_BGRT1)
    extra_BGQK = jnp.einsum("bgqm,bgmk->bgqk", weights_BGRTM.reshape(b, g, r * t, -1).astype(dtype), v_BGMK,
                            preferred_element_type=jnp.float32)
    joint_BGRTK = ((num_BGRTK * rescale_BGRT1 + extra_BGQK.reshape(b, g, r, t, k))
                   / (den_BGRT1 * rescale_BGRT1 + weights_BGRTM.sum(axis=-1, keepdims=True)))
    gate_GR11 = gate_H.astype(jnp.float32).reshape(g, r, 1, 1)
    return out_BGRTK + gate_GR11 * (joint_BGRTK - out_BGRTK)


class Mlp(nnx.Module):
    """Two-layer MLP, or the gated (SwiGLU) variant when `cfg.gated_mlp`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(cfg.d_model, cfg.d_ff, use_bias=cfg.mlp_bias, rngs=rngs)
        self.gate = (nnx.Linear(cfg.d_model, cfg.d_ff, use_bias=cfg.mlp_bias, rngs=rngs)
                     if cfg.gated_mlp else None)
        self.down = nnx.Linear(cfg.d_ff, cfg.d_model, use_bias=cfg.mlp_bias, rngs=rngs)

    def __call__(self, cfg: ModelConfig, x_BTD):
        act = activation(cfg.activation)
        hidden_BTF = act(self.gate(x_BTD)) * self.up(x_BTD) if cfg.gated_mlp else act(self.up(x_BTD))
        return self.down(hidden_BTF)


class Block(nnx.Module):
    """One transformer layer: attention and MLP sublayers with pre- or post-norm residuals."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, cfg.d_model)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, cfg: ModelConfig, x_BTD, positions_BT, k_BSGK, v_BSGK, fill,
                 attend_BTS, layer_index, extra=None):
        if cfg.pre_norm:
            a, k_BSGK, v_BSGK = self.attn(cfg, self.attn_norm(x_BTD), positions_BT, k_BSGK,
                                          v_BSGK, fill, attend_BTS, layer_index, extra)
            x_BTD = x_BTD + a
            return x_BTD + self.mlp(cfg, self.mlp_norm(x_BTD)), k_BSGK, v_BSGK
        a, k_BSGK, v_BSGK = self.attn(cfg, x_BTD, positions_BT, k_BSGK, v_BSGK, fill,
                                      attend_BTS, layer_index, extra)
        x_BTD = self.attn_norm(x_BTD + a)
        return self.mlp_norm(x_BTD + self.mlp(cfg, x_BTD)), k_BSGK, v_BSGK


_LAYER_REMAT: contextvars.ContextVar = contextvars.ContextVar("makemost_layer_remat", default=None)


@contextlib.contextmanager
def remat_layers(policy):
    """While tracing inside this context, every transformer layer is rematerialised.

    `policy` is a `jax.checkpoint_policies` entry (e.g. `nothing_saveable`: keep only
    each layer's input, recompute the rest in the backward pass), so activation memory
    grows with one layer, not with depth. Used by the training loop's `remat` setting.

    Example:
        >>> # with remat_layers(jax.checkpoint_policies.nothing_saveable):
        >>> #     grads = jax.grad(loss)(params, batch)
    """
    token = _LAYER_REMAT.set(policy)
    try:
        yield
    finally:
        _LAYER_REMAT.reset(token)


@functools.cache
def _block_template(cfg: ModelConfig):
    """(graphdef, abstract state) of one Block; built once per config, no allocation."""
    return nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))


def init_block_weights(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Randomly initialised weights of all L blocks, stacked on a leading axis.

    Example:
        >>> # w = init_block_weights(cfg, jax.random.key(0)); w["mlp"]["up"]["kernel"].shape == (L, D, F)
    """
    def one(k):
        return _to_pure_dict(nnx.split(Block(cfg, rngs=nnx.Rngs(k)))[1])

    weights = jax.vmap(one)(jax.random.split(key, cfg.n_layers))
    return jax.tree.map(lambda w: w.astype(dtype), weights)


def run_blocks(cfg: ModelConfig, layer_weights: dict, x_BTD, positions_BT, attend_BTS,
               k_LBSGK=None, v_LBSGK=None, fill=0, return_hidden: bool = False, extra_kv=None):
    """Run all L blocks under one `lax.scan`; returns (x, k, v, hidden or None).

    `k_LBSGK`/`v_LBSGK` are the cache buffers (None for encoders); the new tokens'
    keys and values are written at slots [fill, fill + T). `extra_kv`, optional, is a
    triple `(k_LBMGK, v_LBMGK, gate_LH)` of M extra key/value slots per layer, mixed into
    every query's attention by a per-head gate (see `attention` and `forward`).

    Example:
        >>> # x, k, v, _ = run_blocks(cfg, params["layers"], x, pos, attend, cache.k, cache.v, cache.fill)
    """
    graphdef, abstract_state = _block_template(cfg)

    def step(x_BTD, layer):
        weights, layer_index, k_BSGK, v_BSGK, extra = layer
        x_BTD = constrain(x_BTD, ("batch", "length", "activation"))
        state = jax.tree.map(lambda leaf: leaf, abstract_state)
        nnx.replace_by_pure_dict(state, weights)
        block = nnx.merge(graphdef, state)
        y_BTD, k_BSGK, v_BSGK = block(cfg, x_BTD, positions_BT, k_BSGK, v_BSGK, fill,
                                      attend_BTS, layer_index, extra)
        return y_BTD, (k_BSGK, v_BSGK, y_BTD if return_hidden else None)

    policy = _LAYER_REMAT.get()
    if policy is not None:
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)  # prevent_cse: not needed in scan
    layer_index = jnp.arange(cfg.n_layers)
    x_BTD, (k_LBSGK, v_LBSGK, hidden_LBTD) = jax.lax.scan(
        step, x_BTD, (layer_weights, layer_index, k_LBSGK, v_LBSGK, extra_kv))
    return x_BTD, k_LBSGK, v_LBSGK, hidden_LBTD
