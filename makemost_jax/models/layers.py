"""Transformer building blocks shared by every family, as Flax NNX modules.

One `Block` covers every family: pre-, post- or sandwich norms, sequential or parallel
residuals, grouped-query attention with optional q/k norms, score soft-capping, partial
rotary and a per-layer sliding window, plain or gated MLPs; the config picks the
variant. Blocks are stored stacked (leading L axis) and run under one `lax.scan` by
`run_blocks`; what differs between layers (window, rotary frequencies) is scanned
alongside the weights as per-layer arrays, so compile time stays flat in depth whatever
the layer pattern. The NNX module becomes a pure function of (weights pytree, inputs)
through `nnx.split` / `nnx.merge`.

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
import numpy as np
from flax import nnx

from makemost_jax.errors import ConfigError
from makemost_jax.models.config import ModelConfig, RotaryConfig
from makemost_jax.sharding import constrain

# `nnx.to_pure_dict` is the current spelling; older Flax only has the State method.
_to_pure_dict = getattr(nnx, "to_pure_dict", lambda state: state.to_pure_dict())

_ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}
NO_WINDOW = np.iinfo(np.int32).max  # the window of a full-attention layer


def activation(name: str):
    """The activation function called `name` (HF names, normalised by the config).

    Example:
        >>> float(activation("relu")(jnp.array(-1.0)))
        0.0
    """
    return _ACTIVATIONS[name]


def accumulation_dtype(dtype):
    """The dtype sums are taken in: float32 for 16- and 32-bit models, float64 for a float64 one
    (so a float64 model, under `jax.enable_x64`, is float64 throughout: gradient checks need it).

    Example:
        >>> accumulation_dtype(jnp.bfloat16)
        dtype('float32')
    """
    return jnp.promote_types(dtype, jnp.float32)


def apply_norm(x, scale, bias, eps: float):
    """LayerNorm (with `bias`) or RMSNorm (`bias=None`), statistics in float32 (or wider).

    Example:
        >>> y = apply_norm(jnp.array([[3.0, 4.0]]), jnp.ones(2), None, 0.0)  # x / rms(x)
        >>> [round(float(v), 3) for v in y[0]]
        [0.849, 1.131]
    """
    x32 = x.astype(accumulation_dtype(x.dtype))
    if bias is None:
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return (y * scale).astype(x.dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm as the config says (parameters `scale`, and `bias` for LayerNorm).

    Gemma's `(1 + w)` RMSNorm is this one with the 1 added to `w` when loading.
    """

    def __init__(self, cfg: ModelConfig, width: int, kind: str | None = None):
        self.eps = cfg.norm.eps
        kind = kind or cfg.norm.kind
        self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32)) if kind == "layernorm" else None

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
    return apply_norm(x, weights["scale"], weights.get("bias"), cfg.norm.eps)


# ----------------------------------------------------------------------------- rotary

def rotary_frequencies(rot: RotaryConfig, head_dim: int, seq_len=None):
    """(inverse frequencies (R/2,), cos/sin factor) of one rotary setting, as Hugging Face computes them.

    R = int(head_dim * fraction) is the rotated width. `seq_len` (max position + 1 of the
    current call, may be traced) drives the types that depend on it: `dynamic` (NTK base
    growth past the context) and `longrope` (long factors past the original context).

    Example:
        >>> inv, factor = rotary_frequencies(RotaryConfig(theta=10000.0), 4)
        >>> [round(float(v), 4) for v in inv], factor
        ([1.0, 0.01], 1.0)
    """
    dim = int(head_dim * rot.fraction)
    s = dict(rot.scaling)
    kind = rot.kind
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    base = rot.theta
    factor = 1.0
    if kind == "dynamic":
        seq = jnp.maximum(jnp.asarray(rot.max_positions if seq_len is None else seq_len, jnp.float32),
                          rot.max_positions)
        grown = base * ((s["factor"] * seq / rot.max_positions) - (s["factor"] - 1)) ** (dim / (dim - 2))
        return 1.0 / grown ** jnp.asarray(exponents), factor
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        scale, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_context = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / scale + smooth * inv_freq
        inv_freq = np.where(wavelen > old_context / low, inv_freq / scale,
                            np.where(wavelen < old_context / high, inv_freq, smoothed))
    elif kind == "yarn":
        original = s["original_max_position_embeddings"]
        scale = s.get("factor") or rot.max_positions / original
        factor = s.get("attention_factor")
        if factor is None:
            def mscale(m):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            factor = (mscale(s["mscale"]) / mscale(s["mscale_all_dim"])
                      if s.get("mscale") and s.get("mscale_all_dim") else mscale(1.0))
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high + 0.001 if low == high else high) - low),
                       0, 1)
        extrapolate = 1 - ramp
        inv_freq = inv_freq / scale * (1 - extrapolate) + inv_freq * extrapolate
    elif kind == "longrope":
        original = s["original_max_position_embeddings"]
        scale = s.get("factor") or rot.max_positions / original
        factor = s.get("attention_factor")
        if factor is None:
            factor = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
        short = 1.0 / (np.asarray(s["short_factor"], np.float32) * base ** exponents)
        long = 1.0 / (np.asarray(s["long_factor"], np.float32) * base ** exponents)
        if seq_len is None:
            return short, float(factor)
        return jnp.where(seq_len > original, long, short), float(factor)
    return np.asarray(inv_freq, np.float32), float(factor)


def rotary_switch_length(cfg: ModelConfig) -> int | None:
    """The sequence length past which the rotary frequencies change (longrope's original
    context: short factors up to it, long ones beyond), or None when they never do within
    the model's context.

    Example:
        >>> # rotary_switch_length(phi3_128k_config) == 4096
    """
    lengths = {dict(kind.rotary.scaling)["original_max_position_embeddings"]
               for kind in cfg.layers if kind.rotary is not None and kind.rotary.kind == "longrope"}
    return min(lengths) if lengths else None


def rotary_inverse_frequencies(cfg: ModelConfig) -> jax.Array:
    """The global layers' rotary frequencies (R/2,) at the model's own context.

    Example:
        >>> # rotary_inverse_frequencies(cfg).shape == (cfg.head_dim // 2,)
    """
    return jnp.asarray(rotary_frequencies(cfg.rotary, cfg.head_dim)[0])


def layer_rotary(cfg: ModelConfig, positions_BT):
    """Per-layer rotary tables: (inverse frequencies (L, R/2), cos/sin factors (L,)), or None.

    Example:
        >>> # inv_LR, factor_L = layer_rotary(cfg, positions_BT)
    """
    if cfg.rotary is None:
        return None
    seq_len = jnp.max(positions_BT) + 1
    kinds = sorted({k.rotary for k in cfg.layers}, key=repr)
    tables = [rotary_frequencies(kind, cfg.head_dim, seq_len) for kind in kinds]
    # Gathered by a constant index, so the program does not grow with depth.
    index_L = np.asarray([kinds.index(k.rotary) for k in cfg.layers], np.int32)
    inv_NR = jnp.stack([jnp.asarray(inv, jnp.float32) for inv, _ in tables])
    factor_N = jnp.asarray(np.asarray([factor for _, factor in tables], np.float32))
    return inv_NR[index_L], factor_N[index_L]


def apply_rotary(x_BTNK: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array, factor=1.0) -> jax.Array:
    """Rotate the first R = 2 * len(inv_freq) dims of each head by position (HF's rotate-half
    convention within them; the rest pass through), in float32; cos/sin are scaled by `factor`.

    Example:
        >>> x = jnp.ones((1, 1, 1, 4))
        >>> apply_rotary(x, jnp.zeros((1, 1), int), jnp.ones(2)).tolist()  # position 0: unchanged
        [[[[1.0, 1.0, 1.0, 1.0]]]]
    """
    rot = 2 * inv_freq.shape[-1]
    wide = accumulation_dtype(x_BTNK.dtype)
    angles_BTk = positions_BT[..., None].astype(wide) * inv_freq.astype(wide)
    angles_BTR = jnp.concatenate([angles_BTk, angles_BTk], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BTR) * factor, jnp.sin(angles_BTR) * factor
    x = x_BTNK.astype(wide)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    if x_pass.shape[-1]:
        out = jnp.concatenate([out, x_pass], axis=-1)
    return out.astype(x_BTNK.dtype)


# ----------------------------------------------------------------------------- attention

class Attention(nnx.Module):
    """Multi-head attention with grouped key/value heads over an explicit cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, source_width: int | None = None):
        a = cfg.attention
        d, h, g, k = cfg.d_model, a.n_heads, a.n_kv_heads, a.head_dim
        cross = source_width is not None  # keys and values come from the encoder's states
        self.q = nnx.Linear(d, h * k, use_bias=a.qkv_bias, rngs=rngs)
        self.k = nnx.Linear(source_width or d, g * k, use_bias=a.qkv_bias, rngs=rngs)
        self.v = nnx.Linear(source_width or d, g * k, use_bias=a.qkv_bias, rngs=rngs)
        self.o = nnx.Linear(h * k, d, use_bias=a.out_bias, rngs=rngs)
        self.q_norm = Norm(cfg, k, "rmsnorm") if a.qk_norm and not cross else None
        self.k_norm = Norm(cfg, k, "rmsnorm") if a.qk_norm and not cross else None

    def __call__(self, cfg: ModelConfig, x_BTD, ctx: dict, layer: dict, k_BGKS, v_BGSK, extra=None):
        """Returns (output, the input's own keys (B, G, K, T) and values (B, G, T, K), as the cache keeps them)."""
        b, t, _ = x_BTD.shape
        a = cfg.attention
        h, g, k = a.n_heads, a.n_kv_heads, a.head_dim
        q_BTHK = self.q(x_BTD).reshape(b, t, h, k)
        k_BTGK = self.k(x_BTD).reshape(b, t, g, k)
        v_BTGK = self.v(x_BTD).reshape(b, t, g, k)
        if a.qk_norm:
            q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
        if "inv_freq" in layer:
            q_BTHK = apply_rotary(q_BTHK, ctx["positions"], layer["inv_freq"], layer["rope_factor"])
            k_BTGK = apply_rotary(k_BTGK, ctx["positions"], layer["inv_freq"], layer["rope_factor"])
        # The cache is only read here: its keys come first, the input's own after them, and
        # `forward` writes the new keys into the cache once, after all layers.
        k_BGKT, v_BGTK = k_BTGK.transpose(0, 2, 3, 1), v_BTGK.transpose(0, 2, 1, 3)
        keys = (k_BGKT,) if k_BGKS is None else (k_BGKS, k_BGKT)
        values = (v_BGTK,) if v_BGSK is None else (v_BGSK, v_BGTK)
        if a.scale_by_inverse_layer:
            q_BTHK = q_BTHK / (layer["index"] + 1).astype(q_BTHK.dtype)
        attend_BTS = ctx["attend"]
        if attend_BTS is not None and cfg.sliding_layers:
            near_BTS = ctx["positions"][:, :, None] - ctx["key_positions"][:, None, :] < layer["window"]
            attend_BTS = attend_BTS & near_BTS
        scale = 1.0 / math.sqrt(k) if a.scale is None else a.scale
        out_BTHK = attention(q_BTHK, keys, values, attend_BTS, scale, extra, a.softcap, ctx.get("bias"))
        return self.o(out_BTHK.reshape(b, t, h * k).astype(x_BTD.dtype)), k_BGKT, v_BGTK

    def attend_source(self, cfg: ModelConfig, x_BTD, k_BGKS, v_BGSK, attend_BTS):
        """Cross-attention: queries from `x`, keys/values of the encoded source (`project_source`)."""
        b, t, _ = x_BTD.shape
        a = cfg.attention
        q_BTHK = self.q(x_BTD).reshape(b, t, a.n_heads, a.head_dim)
        scale = 1.0 / math.sqrt(a.head_dim) if a.scale is None else a.scale
        out_BTHK = attention(q_BTHK, k_BGKS, v_BGSK, attend_BTS, scale)
        return self.o(out_BTHK.reshape(b, t, a.n_heads * a.head_dim).astype(x_BTD.dtype))


def project_source(cfg: ModelConfig, cross_weights: dict, source_BSD):
    """Every layer's cross-attention keys (L, B, G, K, S) and values (L, B, G, S, K) of an encoded source.

    Computed once per source; decoding reads them at every step.

    Example:
        >>> # k_LBGKS, v_LBGSK = project_source(cfg, weights["layers"]["cross_attn"], encoded_BSD)
    """
    shape = (cfg.n_layers, *source_BSD.shape[:2], cfg.n_kv_heads, cfg.head_dim)

    def project(w, order):
        y_LBSE = jnp.einsum("bsd,lde->lbse", source_BSD, w["kernel"].astype(source_BSD.dtype))
        if "bias" in w:
            y_LBSE = y_LBSE + w["bias"][:, None, None].astype(y_LBSE.dtype)
        return y_LBSE.reshape(shape).transpose(order)

    return project(cross_weights["k"], (0, 1, 3, 4, 2)), project(cross_weights["v"], (0, 1, 3, 2, 4))


def relative_buckets(relative_BTS, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each relative position (key - query): exact for small distances,
    logarithmic up to `max_distance`, split by direction when `bidirectional`.

    Example:
        >>> relative_buckets(jnp.array([-3, -1, 0, 1, 200]), True, 8, 16).tolist()
        [2, 1, 0, 5, 7]
    """
    buckets = jnp.zeros_like(relative_BTS)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_BTS > 0).astype(relative_BTS.dtype) * num_buckets
        distance = jnp.abs(relative_BTS)
    else:
        distance = -jnp.minimum(relative_BTS, 0)
    exact = num_buckets // 2
    # float32 as in the reference; clamped below so log(0) never matters.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    large = jnp.minimum(exact + (log_ratio * (num_buckets - exact)).astype(relative_BTS.dtype), num_buckets - 1)
    return buckets + jnp.where(distance < exact, distance, large)


def relative_bias(cfg: ModelConfig, table_NH, query_positions_BT, key_positions_BS):
    """The additive attention bias (B, H, T, S) of T5's relative positions, from the positions
    of the queries and of the key slots (bidirectional buckets for an encoder).

    Example:
        >>> # ctx["bias"] = relative_bias(cfg, weights["relative_bias"], positions_BT, key_positions_BS)
    """
    a = cfg.attention
    relative_BTS = key_positions_BS[:, None, :] - query_positions_BT[:, :, None]
    buckets_BTS = relative_buckets(relative_BTS, not a.causal, a.relative_buckets, a.relative_max_distance)
    return jnp.moveaxis(table_NH[buckets_BTS], -1, 1)


def write_slots(buffer, new, start, axis: int = 1, wrap: bool = False):
    """`new` written into `buffer` at slots start, start + 1, ... of `axis` (modulo its size if `wrap`).

    Example:
        >>> write_slots(jnp.zeros((1, 3, 1, 1)), jnp.ones((1, 2, 1, 1)), 2, wrap=True)[0, :, 0, 0].tolist()
        [1.0, 0.0, 1.0]
    """
    new = new.astype(buffer.dtype)
    width, size = new.shape[axis], buffer.shape[axis]
    if not wrap or width == 1:  # consecutive slots: a cheap in-place update
        return jax.lax.dynamic_update_slice_in_dim(buffer, new, start % size if wrap else start, axis)
    index = (slice(None),) * axis + ((start + jnp.arange(width)) % size,)
    return buffer.at[index].set(new, unique_indices=True)


def _use_cudnn(dtype) -> bool:
    """Fused cuDNN attention for plain causal prefill on GPU in 16-bit (MAKEMOST_ATTENTION overrides)."""
    choice = os.environ.get("MAKEMOST_ATTENTION", "auto")
    if choice not in ("auto", "xla", "cudnn"):
        raise ConfigError(f"MAKEMOST_ATTENTION={choice!r} must be auto, xla or cudnn")
    if choice == "auto":
        return jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
    return choice == "cudnn"


def attention(q_BTHK, k_BGKS, v_BGSK, attend_BTS, scale: float, extra=None, softcap=None, bias_BHTS=None):
    """Softmax attention of T queries over S keys with grouped key/value heads.

    Keys (B, G, K, S) and values (B, G, S, K) are heads first and laid out as the batched
    matmuls q @ k and weights @ v read them (and as the cache keeps them). They may come
    in parts, tuples of (B, G, K, S_i) keys and (B, G, S_i, K) values (a cache and the new
    tokens' own): one softmax runs over all S = sum S_i keys, in the parts' order, without
    joining them into one buffer (which would copy the cache) unless the queries outnumber
    twice the head width, when the joined keys are smaller than the joined scores.
    A part with fewer rows than the queries, (B / n, ...), is shared: each of its
    rows serves n consecutive query rows (a beam search's prompts and tree of generated
    tokens, `models.cache.branch_rows`), so it is read once for all n of them.
    `attend_BTS` is a boolean mask over those S keys; None means plain causal attention
    over the queries' own keys (S == T), where a fused kernel can be used.

    `softcap`, optional, squashes the scores to (-softcap, softcap) (Gemma 2).
    `bias_BHTS`, optional, is added to the scaled scores (T5's relative positions; B may be 1).
    `extra`, optional, is `(k_BMGK, v_BMGK, gate_H)` (not heads first): M more key/value
    slots that every query may read. Head h returns `(1 - gate[h]) * plain + gate[h] * joint`, where `joint`
    is the attention over the extra slots and the keys together (one softmax, as if the
    slots were prepended to the cache). A gate of 0 gives exactly the plain attention, so
    a module that starts with zero gates leaves a pretrained model unchanged (the
    recurrence memory enters this way).

    Example:
        >>> q = jnp.ones((1, 3, 4, 8)); k = jnp.ones((1, 2, 8, 3)); v = jnp.ones((1, 2, 3, 8))
        >>> attention(q, k, v, None, 8 ** -0.5).shape
        (1, 3, 4, 8)
        >>> cache_k, cache_v = jnp.ones((1, 2, 8, 5)), jnp.ones((1, 2, 5, 8)); mask = jnp.ones((1, 3, 8), bool)
        >>> attention(q, (cache_k, k), (cache_v, v), mask, 8 ** -0.5).shape   # 5 cached + 3 own keys
        (1, 3, 4, 8)
        >>> q2 = jnp.ones((2, 3, 4, 8))    # two query rows sharing the one-row cache
        >>> attention(q2, (cache_k, jnp.ones((2, 2, 8, 3))), (cache_v, jnp.ones((2, 2, 3, 8))),
        ...           jnp.ones((2, 3, 8), bool), 8 ** -0.5).shape
        (2, 3, 4, 8)
    """
    keys = k_BGKS if isinstance(k_BGKS, tuple) else (k_BGKS,)
    values = v_BGSK if isinstance(v_BGSK, tuple) else (v_BGSK,)
    b, t, h, k = q_BTHK.shape
    g = keys[0].shape[1]
    if attend_BTS is None:
        if len(keys) == 1 and extra is None and softcap is None and bias_BHTS is None and _use_cudnn(q_BTHK.dtype):
            k_BSGK, v_BSGK = keys[0].transpose(0, 3, 1, 2), values[0].transpose(0, 2, 1, 3)
            return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, scale=scale, is_causal=True,
                                                implementation="cudnn")
        attend_BTS = jnp.tril(jnp.ones((1, t, t), bool))
    r = h // g
    # Many queries per key head (a prefill after a cache, HSO's segment): joining the parts' keys and values
    # copies less than joining their score matrices, and the backward pass then splits the small key and
    # value gradients instead of the scores' (HSO's loop 4% faster). One token per step keeps the parts.
    if len(keys) > 1 and r * t >= 2 * k and all(part.shape[0] == b for part in keys):
        keys = (jnp.concatenate([part.astype(q_BTHK.dtype) for part in keys], axis=-1),)
        values = (jnp.concatenate([part.astype(q_BTHK.dtype) for part in values], axis=2),)
    wide = accumulation_dtype(q_BTHK.dtype)
    # Fold the R query heads that share a key/value head into the query axis: one plain
    # batched matmul per (batch, group), which XLA runs much faster than a 5-D einsum.
    q_BGQK = q_BTHK.reshape(b, t, g, r, k).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, k)

    scores_BGRTS = jnp.concatenate([_part_product("bgqk,bgks->bgqs", q_BGQK, k_part.astype(q_BTHK.dtype), wide)
                                    for k_part in keys], axis=-1).reshape(b, g, r, t, -1) * scale
    if bias_BHTS is not None:
        scores_BGRTS = scores_BGRTS + bias_BHTS.reshape(bias_BHTS.shape[0], g, r, t, -1).astype(wide)
    if softcap is not None:
        scores_BGRTS = softcap * jnp.tanh(scores_BGRTS / softcap)
    # A finite floor (not -inf) keeps fully masked rows (padding queries) NaN-free.
    scores_BGRTS = jnp.where(attend_BTS[:, None, None], scores_BGRTS, jnp.finfo(wide).min)
    # Softmax with the normalisation applied after the value product: one pass less
    # over the (T, S) scores. The max shift cancels exactly, so it carries no gradient.
    shift_BGRT1 = jax.lax.stop_gradient(scores_BGRTS.max(axis=-1, keepdims=True))
    weights_BGQS = jnp.exp(scores_BGRTS - shift_BGRT1).reshape(b, g, r * t, -1)
    num_BGQK, start = 0, 0
    for v_part in values:
        width = v_part.shape[2]  # (values: slots before the head dimension)
        w_BGQS = weights_BGQS[..., start:start + width].astype(q_BTHK.dtype)
        num_BGQK = num_BGQK + _part_product("bgqs,bgsk->bgqk", w_BGQS, v_part.astype(q_BTHK.dtype), wide)
        start += width
    num_BGRTK = num_BGQK.reshape(b, g, r, t, k)
    den_BGRT1 = weights_BGQS.sum(axis=-1).reshape(b, g, r, t, 1)
    out_BGRTK = num_BGRTK / den_BGRT1
    if extra is not None:
        out_BGRTK = _mix_extra_slots(out_BGRTK, num_BGRTK, den_BGRT1, shift_BGRT1, q_BGQK, *extra, scale,
                                     softcap)
    return out_BGRTK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, k).astype(q_BTHK.dtype)


def _part_product(spec: str, x_BGQX, part_BGXY, wide):
    """`einsum(spec, x, part)` per row; a shared part (fewer rows) serves consecutive groups of rows.

    The n rows that share a part row are folded into the query axis, so the part is
    read once for all of them (one matmul with n times the rows).
    """
    b, u = x_BGQX.shape[0], part_BGXY.shape[0]  # u = B / n part rows
    if u == b:
        return jnp.einsum(spec, x_BGQX, part_BGXY, preferred_element_type=wide)
    n, (_, g, q, x) = b // u, x_BGQX.shape
    x_UGQX = x_BGQX.reshape(u, n, g, q, x).transpose(0, 2, 1, 3, 4).reshape(u, g, n * q, x)
    y_UGQY = jnp.einsum(spec, x_UGQX, part_BGXY, preferred_element_type=wide)
    return y_UGQY.reshape(u, g, n, q, -1).transpose(0, 2, 1, 3, 4).reshape(b, g, q, -1)


def _mix_extra_slots(out_BGRTK, num_BGRTK, den_BGRT1, shift_BGRT1, q_BGQK, k_BMGK, v_BMGK, gate_H, scale,
                     softcap=None):
    """`out + gate * (joint - out)`: joint = softmax over [extra slots, keys], from the keys' sums.

    The keys' unnormalised sums are rescaled to a shift that also covers the extra
    scores, so `joint` is finite however large either side is; `out` itself is untouched,
    hence exact when the gate is 0.
    """
    b, g, r, t, k = out_BGRTK.shape
    dtype, wide = q_BGQK.dtype, accumulation_dtype(q_BGQK.dtype)
    k_BGMK = k_BMGK.astype(dtype).transpose(0, 2, 1, 3)
    v_BGMK = v_BMGK.astype(dtype).transpose(0, 2, 1, 3)
    scores_BGRTM = jnp.einsum("bgqk,bgmk->bgqm", q_BGQK, k_BGMK,
                              preferred_element_type=wide).reshape(b, g, r, t, -1) * scale
    if softcap is not None:
        scores_BGRTM = softcap * jnp.tanh(scores_BGRTM / softcap)
    joint_shift_BGRT1 = jax.lax.stop_gradient(jnp.maximum(shift_BGRT1, scores_BGRTM.max(axis=-1, keepdims=True)))
    rescale_BGRT1 = jnp.exp(shift_BGRT1 - joint_shift_BGRT1)
    weights_BGRTM = jnp.exp(scores_BGRTM - joint_shift_BGRT1)
    extra_BGQK = jnp.einsum("bgqm,bgmk->bgqk", weights_BGRTM.reshape(b, g, r * t, -1).astype(dtype), v_BGMK,
                            preferred_element_type=wide)
    joint_BGRTK = ((num_BGRTK * rescale_BGRT1 + extra_BGQK.reshape(b, g, r, t, k))
                   / (den_BGRT1 * rescale_BGRT1 + weights_BGRTM.sum(axis=-1, keepdims=True)))
    gate_GR11 = gate_H.astype(wide).reshape(g, r, 1, 1)
    return out_BGRTK + gate_GR11 * (joint_BGRTK - out_BGRTK)


class Mlp(nnx.Module):
    """Two-layer MLP, or the gated variant (`act(gate(x)) * up(x)`) when `cfg.mlp.gated`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.mlp
        self.up = nnx.Linear(cfg.d_model, m.d_ff, use_bias=m.bias, rngs=rngs)
        self.gate = nnx.Linear(cfg.d_model, m.d_ff, use_bias=m.bias, rngs=rngs) if m.gated else None
        self.down = nnx.Linear(m.d_ff, cfg.d_model, use_bias=m.bias, rngs=rngs)

    def __call__(self, cfg: ModelConfig, x_BTD):
        act = activation(cfg.mlp.activation)
        hidden_BTF = act(self.gate(x_BTD)) * self.up(x_BTD) if cfg.mlp.gated else act(self.up(x_BTD))
        return self.down(hidden_BTF)


class Block(nnx.Module):
    """One transformer layer: attention and MLP sub-layers with their norms and residuals."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        sandwich = cfg.norm.placement == "sandwich"
        cross = cfg.encoder is not None
        self.attn_norm = Norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = Norm(cfg, cfg.d_model) if sandwich else None
        self.cross_attn = Attention(cfg, rngs=rngs, source_width=cfg.encoder.d_model) if cross else None
        self.cross_norm = Norm(cfg, cfg.d_model) if cross and cfg.cross_norm else None
        self.mlp_norm = Norm(cfg, cfg.d_model)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.post_mlp_norm = Norm(cfg, cfg.d_model) if sandwich else None

    def _cross(self, cfg: ModelConfig, x_BTD, ctx: dict, source):
        """The cross-attention sub-layer (a no-op for decoder-only models)."""
        if self.cross_attn is None:
            return x_BTD

        def attend(h_BTD):
            return self.cross_attn.attend_source(cfg, h_BTD, *source, ctx["source_attend"])

        if self.cross_norm is None:  # the NAR decoder: x + cross(x), no norm
            return x_BTD + attend(x_BTD)
        if cfg.norm.placement == "post":
            return self.cross_norm(x_BTD + attend(x_BTD))
        return x_BTD + attend(self.cross_norm(x_BTD))

    def __call__(self, cfg: ModelConfig, x_BTD, ctx: dict, layer: dict, k_BGKS, v_BGSK, extra=None, source=None):
        def attn(h_BTD):
            return self.attn(cfg, h_BTD, ctx, layer, k_BGKS, v_BGSK, extra)  # (out, the input's own k, v)

        placement = cfg.norm.placement
        if placement == "post":  # BERT, BART, Marian, OPT without layer_norm_before
            a_BTD, k_BGKT, v_BGTK = attn(x_BTD)
            x_BTD = self._cross(cfg, self.attn_norm(x_BTD + a_BTD), ctx, source)
            return self.mlp_norm(x_BTD + self.mlp(cfg, x_BTD)), k_BGKT, v_BGTK
        a_BTD, k_BGKT, v_BGTK = attn(self.attn_norm(x_BTD))
        if cfg.norm.parallel:  # GPT-NeoX: both sub-layers read the block input
            return x_BTD + a_BTD + self.mlp(cfg, self.mlp_norm(x_BTD)), k_BGKT, v_BGTK
        if placement == "sandwich":
            a_BTD = self.post_attn_norm(a_BTD)
        x_BTD = self._cross(cfg, x_BTD + a_BTD, ctx, source)
        m_BTD = self.mlp(cfg, self.mlp_norm(x_BTD))
        if placement == "sandwich":
            m_BTD = self.post_mlp_norm(m_BTD)
        return x_BTD + m_BTD, k_BGKT, v_BGTK


# Logical axes of every Block parameter (without the leading "layers" axis). A parameter
# missing here is an error in `block_axes`, so nothing is replicated by accident.
BLOCK_AXES = {
    "attn/q/kernel": ("embed", "q_heads"), "attn/q/bias": ("q_heads",),
    "attn/k/kernel": ("embed", "kv_heads"), "attn/k/bias": ("kv_heads",),
    "attn/v/kernel": ("embed", "kv_heads"), "attn/v/bias": ("kv_heads",),
    "attn/o/kernel": ("q_heads", "embed"), "attn/o/bias": ("norm",),
    "attn/q_norm/scale": ("head_dim",), "attn/k_norm/scale": ("head_dim",),
    "mlp/up/kernel": ("embed", "mlp"), "mlp/up/bias": ("mlp",),
    "mlp/gate/kernel": ("embed", "mlp"), "mlp/gate/bias": ("mlp",),
    "mlp/down/kernel": ("mlp", "embed"), "mlp/down/bias": ("norm",),
    "cross_attn/q/kernel": ("embed", "q_heads"), "cross_attn/q/bias": ("q_heads",),
    "cross_attn/k/kernel": ("embed", "kv_heads"), "cross_attn/k/bias": ("kv_heads",),
    "cross_attn/v/kernel": ("embed", "kv_heads"), "cross_attn/v/bias": ("kv_heads",),
    "cross_attn/o/kernel": ("q_heads", "embed"), "cross_attn/o/bias": ("norm",),
    **{f"{n}/{p}": ("norm",) for n in ("attn_norm", "post_attn_norm", "cross_norm", "mlp_norm", "post_mlp_norm")
       for p in ("scale", "bias")},
}


def block_axes(cfg: ModelConfig) -> dict:
    """Logical axes of the stacked block weights, as a tree like `init_block_weights`'.

    Example:
        >>> # block_axes(cfg)["attn"]["q"]["kernel"] == ("layers", "embed", "q_heads")
    """
    def axes(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name not in BLOCK_AXES:
            raise ConfigError(f"block parameter {name!r} has no logical axes; declare them in BLOCK_AXES")
        return ("layers",) + BLOCK_AXES[name]

    return jax.tree_util.tree_map_with_path(axes, _block_template(cfg)[2])


_LAYER_REMAT: contextvars.ContextVar = contextvars.ContextVar("makemost_layer_remat", default=None)
_UNROLL: contextvars.ContextVar = contextvars.ContextVar("makemost_unroll", default=False)


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


@contextlib.contextmanager
def unrolled_loops():
    """While tracing inside this context, the model's loops are unrolled: one copy of the block per layer,
    one copy of the output layer's work per vocabulary chunk (`models.vocab_nll`).

    XLA's cost analysis counts a loop's body once, not once per trip, so a program traced
    with the layers scanned reports the FLOPs of one layer; traced here, of all of them.
    For counting (`recurrence.evaluate.compiled_stats`), not for running: compiling is slower.

    Example:
        >>> # with unrolled_loops():
        >>> #     flops = jax.jit(f).lower(params, tokens).compile().cost_analysis()["flops"]
    """
    token = _UNROLL.set(True)
    try:
        yield
    finally:
        _UNROLL.reset(token)


def loops_unrolled() -> bool:
    """Whether the trace runs under `unrolled_loops`.

    Example:
        >>> loops_unrolled()
        False
    """
    return _UNROLL.get()


@functools.cache
def _block_template(cfg: ModelConfig):
    """(graphdef, abstract state, abstract pure dict) of one Block; built once per config."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
    return graphdef, state, _to_pure_dict(state)


def init_block_weights(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Randomly initialised weights of all L blocks, stacked on a leading axis.

    Example:
        >>> # w = init_block_weights(cfg, jax.random.key(0)); w["mlp"]["up"]["kernel"].shape == (L, D, F)
    """
    def one(k):
        return _to_pure_dict(nnx.split(Block(cfg, rngs=nnx.Rngs(k)))[1])

    weights = jax.vmap(one)(jax.random.split(key, cfg.n_layers))
    return jax.tree.map(lambda w: w.astype(dtype), weights)


def attention_context(positions_BT, attend_BTS=None, key_positions_BS=None) -> dict:
    """What every layer's attention needs besides its weights.

    `attend_BTS`: which keys each query may see before any sliding window (None: plain
    causal over the queries themselves); `key_positions_BS`: each key's position (for
    windows and relative biases), the cache's slots first, then the queries' own keys.

    Example:
        >>> # ctx = attention_context(positions_BT, attend_BTS, key_positions_BS)
    """
    return {"positions": positions_BT, "attend": attend_BTS,
            "key_positions": positions_BT if key_positions_BS is None else key_positions_BS}


def _layer(x, i: int):
    """Layer i of a stacked array (L, ...) or of a tuple of per-layer arrays (1, ...)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return x[i][0]  # dropping a unit axis: no copy
    return x[i]


def run_blocks(cfg: ModelConfig, layer_weights: dict, x_BTD, ctx: dict, k_LBGKS=None, v_LBGSK=None,
               return_hidden: bool = False, extra_kv=None, source_kv=None):
    """Run all L blocks under one `lax.scan`; returns (x, k, v, hidden or None).

    `ctx` comes from `attention_context`. `k_LBGKS`/`v_LBGSK` are the cache buffers (None
    for encoders and fresh prefills), only read: the returned keys (L, B, G, K, T) and values
    (L, B, G, T, K) are the input tokens' own, for the caller to write into its cache once (writing inside the
    scan would copy the whole cache at every layer). Per-layer settings (index, sliding
    window, rotary frequencies) are scanned with the weights. `extra_kv`, optional, is a triple
    `(k_LBMGK, v_LBMGK, gate_LH)` of M extra key/value slots per layer, mixed into every
    query's attention by a per-head gate (see `attention` and `forward`). `source_kv`, for
    a decoder with cross-attention, is `(k_LBGKS, v_LBGSK)` of the encoded source
    (`project_source`); `ctx["source_attend"]` (B, 1, S) says which source slots are real.

    Weights given as a tuple of L per-layer trees (`model.per_layer`) run unrolled, each
    layer reading its weights and its buffers (stacked, or tuples of per-layer (1, ...)
    arrays) where they lie; the scan copies every layer's slices out first.

    Example:
        >>> # x, k, v, _ = run_blocks(cfg, params["layers"], x, ctx, cache.k, cache.v)
    """
    graphdef, abstract_state, _ = _block_template(cfg)
    windows = np.asarray([NO_WINDOW if k.window is None else k.window for k in cfg.layers], np.int32)
    per_layer = {"index": jnp.arange(cfg.n_layers), "window": jnp.asarray(windows)}
    rotary = layer_rotary(cfg, ctx["positions"])
    if rotary is not None:
        per_layer["inv_freq"], per_layer["rope_factor"] = rotary

    def step(x_BTD, xs):
        weights, layer, k_BGKS, v_BGSK, extra, source = xs
        x_BTD = constrain(x_BTD, ("batch", "length", "activation"))
        state = jax.tree.map(lambda leaf: leaf, abstract_state)
        nnx.replace_by_pure_dict(state, weights)
        block = nnx.merge(graphdef, state)
        y_BTD, k_BGKT, v_BGTK = block(cfg, x_BTD, ctx, layer, k_BGKS, v_BGSK, extra, source)
        return y_BTD, (k_BGKT, v_BGTK, y_BTD if return_hidden else None)

    policy = _LAYER_REMAT.get()
    if policy is not None:
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)  # prevent_cse: not needed in scan
    if isinstance(layer_weights, tuple):  # weights and buffers held per layer (`model.per_layer`): unrolled
        outputs = []
        for i, weights in enumerate(layer_weights):
            layer = jax.tree.map(lambda a, i=i: a[i], per_layer)
            extra = None if extra_kv is None else tuple(a[i] for a in extra_kv)
            source = None if source_kv is None else tuple(_layer(a, i) for a in source_kv)
            x_BTD, out = step(x_BTD, (weights, layer, _layer(k_LBGKS, i), _layer(v_LBGSK, i), extra, source))
            outputs.append(out)
        k_LBGKT, v_LBGTK, hidden_LBTD = (None if out[0] is None else jnp.stack(out) for out in zip(*outputs))
        # The new keys leave with the last layer's output: the caller's write into a layer's
        # buffer then follows that layer's read, and XLA writes in place instead of copying it.
        x_BTD, k_LBGKT, v_LBGTK = jax.lax.optimization_barrier((x_BTD, k_LBGKT, v_LBGTK))
        return x_BTD, k_LBGKT, v_LBGTK, hidden_LBTD
    x_BTD, (k_LBGKT, v_LBGTK, hidden_LBTD) = jax.lax.scan(
        step, x_BTD, (layer_weights, per_layer, k_LBGKS, v_LBGSK, extra_kv, source_kv),
        unroll=cfg.n_layers if _UNROLL.get() else 1)
    return x_BTD, k_LBGKT, v_LBGTK, hidden_LBTD
