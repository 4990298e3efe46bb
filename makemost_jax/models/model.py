"""The family-independent model interface: `forward`, `init_params`, `params_from_hf`.

Every method in the library sees only these functions. The weights tree has one layout
for every family, built from the config (`init_weights`): embeddings, the stacked
blocks, the head; each family module (found through `models.registry`) only converts
its Hugging Face config and maps its checkpoint's tensors onto this tree. Every weight
declares its logical axes here or in `layers.BLOCK_AXES` (`weight_axes`).

Dimensions: B batch, T new tokens, S cache slots, L layers, D width, E embedding width
(D unless projected), V vocabulary.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from makemost_jax.models.config import from_hf_config
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 2,
    ...                       "n_head": 2, "vocab_size": 10, "n_positions": 8})
    >>> params = init_params(cfg, jax.random.key(0))
    >>> out = forward(params, jnp.array([[1, 2, 3]]))
    >>> out.logits.shape, int(out.cache.fill)
    ((1, 3, 10), 3)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models.cache import KVCache, init_cache
from makemost_jax.models.config import ModelConfig
from makemost_jax.models.layers import (
    accumulation_dtype,
    activation,
    attention_context,
    block_axes,
    init_block_weights,
    norm,
    norm_weights,
    run_blocks,
)
from makemost_jax.models.registry import family_for
from makemost_jax.models.types import ModelOutput, Params
from makemost_jax.sharding import constrain


def init_weights(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random weights of any family (normal(0.02) embeddings, Flax default block init).

    Example:
        >>> # init_weights(cfg, jax.random.key(0))["embed"]["tokens"].shape == (V, E)
    """
    k_tok, k_pos, k_type, k_blocks, k_head, k_proj = jax.random.split(key, 6)
    e, d = cfg.embed, cfg.d_model
    width = e.project_dim or d

    def normal(k, shape, std=0.02):
        return std * jax.random.normal(k, shape, dtype)

    embed = {"tokens": normal(k_tok, (cfg.vocab_size, width))}
    if e.positions == "learned":
        embed["positions"] = normal(k_pos, (cfg.max_positions + e.position_offset, d), 0.01)
    if e.type_vocab_size:
        embed["types"] = normal(k_type, (e.type_vocab_size, d))
    if e.norm:
        embed["norm"] = norm_weights(cfg, d)
    if e.project_dim:
        embed["project_in"] = {"kernel": normal(k_proj, (width, d))}
    weights = {"embed": embed, "layers": init_block_weights(cfg, k_blocks, dtype)}
    h = cfg.head
    if h.kind == "lm":
        if h.final_norm:
            weights["final_norm"] = norm_weights(cfg, d)
        if e.project_dim:
            weights["project_out"] = {"kernel": normal(k_proj, (d, width))}
        if not h.tied:
            weights["lm_head"] = {"kernel": normal(k_head, (width, cfg.vocab_size))}
    elif h.kind == "mlm":
        weights["mlm_head"] = {"dense": {"kernel": normal(k_head, (d, d)), "bias": jnp.zeros((d,), dtype)},
                               "norm": norm_weights(cfg, d), "bias": jnp.zeros((cfg.vocab_size,), dtype)}
    return weights


# Logical axes of the weights outside the blocks (`layers.BLOCK_AXES` has the blocks').
TOP_AXES = {
    "embed/tokens": ("vocab", "embed"), "embed/positions": ("positions", "embed"),
    "embed/types": ("types", "embed"), "embed/norm/scale": ("norm",), "embed/norm/bias": ("norm",),
    "embed/project_in/kernel": ("embed_proj", "embed"), "project_out/kernel": ("embed", "embed_proj"),
    "final_norm/scale": ("norm",), "final_norm/bias": ("norm",), "lm_head/kernel": ("embed", "vocab"),
    "mlm_head/dense/kernel": ("embed", "norm"), "mlm_head/dense/bias": ("norm",),
    "mlm_head/norm/scale": ("norm",), "mlm_head/norm/bias": ("norm",), "mlm_head/bias": ("vocab",),
}


def weight_axes(cfg: ModelConfig, weights: dict | None = None) -> dict:
    """Logical axis names of every weight, as a tree like the weights; an undeclared weight is an error.

    Example:
        >>> # weight_axes(cfg)["layers"]["attn"]["q"]["kernel"] == ("layers", "embed", "q_heads")
    """
    weights = weights if weights is not None else jax.eval_shape(lambda: init_weights(cfg, jax.random.key(0)))

    def axes(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name not in TOP_AXES:
            raise ConfigError(f"weight {name!r} has no logical axes; declare them in models.model.TOP_AXES")
        return TOP_AXES[name]

    top = {k: v for k, v in weights.items() if k != "layers"}
    return {**jax.tree_util.tree_map_with_path(axes, top), "layers": block_axes(cfg)}


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Randomly initialised parameters for `cfg` (any family).

    Example:
        >>> # params = init_params(from_hf_config(hf_config_dict), jax.random.key(0))
    """
    return Params(cfg, init_weights(cfg, key, dtype))


def params_from_hf(cfg: ModelConfig, tensors: dict, dtype=jnp.float32) -> Params:
    """Parameters from a Hugging Face state dict (HF names -> numpy arrays).

    Raises `CheckpointError` naming any missing, unused or misshapen tensor.

    Example:
        >>> # params = params_from_hf(from_hf_config(config), tensors)
    """
    return Params(cfg, family_for(cfg.hf_model_type or cfg.family).weights_from_hf(cfg, tensors, dtype))


def embed(cfg: ModelConfig, weights: dict, tokens_BT, positions_BT, token_types_BT=None):
    """Token embeddings (scaled, projected) plus learned positions and token types, as the config says.

    Example:
        >>> # x_BTD = embed(cfg, weights, tokens_BT, positions_BT)
    """
    e, w = cfg.embed, weights["embed"]
    x_BTD = w["tokens"][tokens_BT]
    if e.scale != 1.0:  # Gemma: sqrt(D), rounded to the weights' dtype as Hugging Face does
        x_BTD = x_BTD * jnp.asarray(e.scale, x_BTD.dtype)
    if e.project_dim:
        x_BTD = x_BTD @ w["project_in"]["kernel"]
    if e.positions == "learned":
        x_BTD = x_BTD + w["positions"][positions_BT + e.position_offset]
    if e.type_vocab_size:
        types = jnp.zeros_like(tokens_BT) if token_types_BT is None else token_types_BT
        x_BTD = x_BTD + w["types"][types]
    if e.norm:
        x_BTD = norm(cfg, w["norm"], x_BTD)
    return x_BTD


def head(cfg: ModelConfig, weights: dict, x_BTD):
    """The output layer; returns (float32 logits or None, final states).

    Example:
        >>> # logits_BTV, final_BTD = head(cfg, weights, x_BTD)
    """
    h, wide = cfg.head, accumulation_dtype(x_BTD.dtype)
    if h.kind == "none":
        return None, x_BTD
    if h.kind == "mlm":
        m = weights["mlm_head"]
        y = activation(cfg.mlp.activation)(x_BTD @ m["dense"]["kernel"] + m["dense"]["bias"])
        y = norm(cfg, m["norm"], y)
        logits = jnp.einsum("btd,vd->btv", y, weights["embed"]["tokens"],
                            preferred_element_type=wide) + m["bias"]
        return logits, x_BTD
    if h.final_norm:
        x_BTD = norm(cfg, weights["final_norm"], x_BTD)
    y = x_BTD @ weights["project_out"]["kernel"] if cfg.embed.project_dim else x_BTD
    if h.tied:
        logits = jnp.einsum("btd,vd->btv", y, weights["embed"]["tokens"], preferred_element_type=wide)
    else:
        logits = jnp.einsum("btd,dv->btv", y, weights["lm_head"]["kernel"], preferred_element_type=wide)
    if h.softcap is not None:
        logits = h.softcap * jnp.tanh(logits / h.softcap)
    return logits, x_BTD


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_inputs(cfg: ModelConfig, tokens_BT, cache):
    """Raise `InputError` for shapes and values that would silently go wrong.

    Value checks run only on concrete arrays (outside `jit`); shape checks always.
    """
    if tokens_BT.ndim != 2:
        raise InputError(f"tokens must be a (batch, length) array of token ids, got shape "
                         f"{tokens_BT.shape}; wrap a single sequence as tokens[None]")
    if tokens_BT.shape[0] == 0 or tokens_BT.shape[1] == 0:
        raise InputError(f"tokens has an empty dimension {tokens_BT.shape}; pass at least one token")
    if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
        raise InputError(f"tokens must be integer token ids, got dtype {tokens_BT.dtype}")
    if _concrete(tokens_BT):
        low, high = int(tokens_BT.min()), int(tokens_BT.max())
        if low < 0 or high >= cfg.vocab_size:
            raise InputError(f"token id {high if high >= cfg.vocab_size else low} is outside the "
                             f"vocabulary [0, {cfg.vocab_size}); was the text tokenized for this model?")
    if cache is not None:
        if cache.batch != tokens_BT.shape[0]:
            raise InputError(f"cache has batch {cache.batch} but tokens have batch {tokens_BT.shape[0]}")
        t, window = tokens_BT.shape[1], cfg.uniform_window
        # A full cache keeps rolling only where every layer slides over one window that
        # the cache holds together with this call's tokens.
        rolls = window is not None and cache.size >= window + t - 1
        if t > cache.size or (not rolls and _concrete(cache.fill) and int(cache.fill) + t > cache.size):
            raise InputError(f"{t} new tokens do not fit in the cache ({cache.size} slots); allocate a "
                             "larger cache with init_cache (models.cache.cache_size says how many)")


def _check_extra_kv(cfg: ModelConfig, extra_kv, batch: int):
    if extra_kv is None:
        return
    shapes = [getattr(x, "shape", None) for x in extra_kv]
    if len(shapes) != 3 or None in shapes or len(shapes[0]) != 5 or shapes[0] != shapes[1]:
        raise InputError("extra_kv must be (k, v, gate): keys and values of one shape (layers, batch, slots, "
                         f"kv_heads, head_dim) and a gate (layers, heads), got shapes {shapes}")
    want = (cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim)
    shape = shapes[0]
    if (shape[0], shape[1], shape[3], shape[4]) != want or shapes[2] != (cfg.n_layers, cfg.n_heads):
        raise InputError(f"extra_kv has shapes {shapes}; this model and batch need keys and values of shape "
                         f"({want[0]}, {want[1]}, slots, {want[2]}, {want[3]}) and a gate of shape "
                         f"({cfg.n_layers}, {cfg.n_heads})")


def _check_positions(cfg: ModelConfig, positions_BT):
    if cfg.embed.positions == "learned" and _concrete(positions_BT):
        top = int(jnp.max(positions_BT))
        if top >= cfg.max_positions:
            raise InputError(f"position {top} exceeds the model's context of {cfg.max_positions} "
                             "tokens; shorten the input or score it in windows")


def forward(params: Params, tokens, cache: KVCache | None = None, positions=None, mask=None,
            token_types=None, return_hidden: bool = False, extra_kv=None) -> ModelOutput:
    """Run the model on `tokens` (B, T); a pure function of its arguments.

    Decoders write the new tokens' keys/values into `cache` at slots fill, fill+1, ...
    (modulo its size: a rolling buffer for sliding-window models) and return the updated
    cache (a fresh T-slot cache when `cache` is None). `mask` (B, T) marks real tokens (1)
    against padding (0); default positions continue each row's count of real tokens, so
    left-padded batches give the same results as their unpadded rows. Which cached keys
    a query sees follows from the slots' positions: causal, padding and sliding windows.
    Encoders attend bidirectionally and return `cache=None`. `hidden` (L+1, B, T, D)
    follows Hugging Face's `hidden_states`.

    `extra_kv`, optional, is `(k, v, gate)`: keys and values (L, B, M, G, K) of M extra
    slots per layer (rotary keys already rotated) and a gate (L, H) per query head. Each
    head mixes its attention with the attention over [extra slots, keys] as if the slots
    were prepended to the cache: `(1 - gate) * plain + gate * joint` (`layers.attention`).
    Gates of 0 leave the model exactly unchanged; the recurrence memory
    (`makemost_jax.recurrence`) enters this way, with gates that start at 0.

    Example:
        >>> # out = forward(params, tokens_BT, cache=init_cache(params.config, B, 256))
        >>> # out.logits[:, -1]  # next-token logits
    """
    cfg = params.config
    weights = params.weights
    tokens_BT = jnp.asarray(tokens)
    _check_inputs(cfg, tokens_BT, cache)
    b, t = tokens_BT.shape
    mask_BT = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask).astype(bool)
    if mask_BT.shape != (b, t):
        raise InputError(f"mask has shape {mask_BT.shape} but tokens have shape {(b, t)}")
    _check_extra_kv(cfg, extra_kv, b)

    if cfg.causal:
        # A fresh cache without padding or windows is plain causal attention over the input.
        plain_causal = cache is None and mask is None and not cfg.sliding_layers
        fresh = cache is None
        if cache is None:
            cache = init_cache(cfg, b, t, weights["embed"]["tokens"].dtype)
        if positions is None:
            counts_BT = jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32) - 1
            positions = jnp.maximum(cache.next_position[:, None] + counts_BT, 0)
        positions_BT = jnp.asarray(positions, jnp.int32)
        _check_positions(cfg, positions_BT)
        slots_T = (cache.fill + jnp.arange(t, dtype=jnp.int32)) % cache.size
        key_positions_BS = cache.positions.at[:, slots_T].set(jnp.where(mask_BT, positions_BT, -1))
        if plain_causal:
            ctx = attention_context(positions_BT)
        elif fresh:  # attend to the input itself: no empty slots to read
            attend_BTT = (mask_BT[:, None, :] & (positions_BT[:, None, :] <= positions_BT[:, :, None])
                          & jnp.tril(jnp.ones((t, t), bool)))
            ctx = attention_context(positions_BT, attend_BTT, jnp.where(mask_BT, positions_BT, -1))
        else:
            attend_BTS = (key_positions_BS[:, None, :] >= 0) & (key_positions_BS[:, None, :] <= positions_BT[:, :, None])
            ctx = attention_context(positions_BT, attend_BTS, key_positions_BS, slots_T)
        x0_BTD = embed(cfg, weights, tokens_BT, positions_BT, token_types)
        buffers = (None, None) if fresh else (cache.k, cache.v)
        x_BTD, k, v, hidden = run_blocks(cfg, weights["layers"], x0_BTD, ctx, *buffers, return_hidden, extra_kv)
        new_cache = KVCache(k=k, v=v, positions=key_positions_BS, fill=cache.fill + t,
                            next_position=cache.next_position + mask_BT.sum(1, dtype=jnp.int32))
    else:
        if cache is not None:
            raise InputError(f"{cfg.hf_model_type} is an encoder and takes no cache; pass cache=None")
        if positions is None:
            positions = family_for(cfg.hf_model_type or cfg.family).default_positions(cfg, tokens_BT, mask_BT)
        _check_positions(cfg, positions)
        attend_BTS = jnp.broadcast_to(mask_BT[:, None, :], (b, t, t))
        x0_BTD = embed(cfg, weights, tokens_BT, positions, token_types)
        x_BTD, _, _, hidden = run_blocks(cfg, weights["layers"], x0_BTD, attention_context(positions, attend_BTS),
                                         return_hidden=return_hidden, extra_kv=extra_kv)
        new_cache = None
    logits, final_BTD = head(cfg, weights, x_BTD)
    if logits is not None:
        logits = constrain(logits, ("batch", "length", "vocab"))
    if return_hidden:
        hidden = jnp.concatenate([x0_BTD[None], hidden[:-1], final_BTD[None]], axis=0)
    return ModelOutput(logits=logits, cache=new_cache, hidden=hidden)


def token_logprobs(logits_BTV, targets_BT):
    """log p(target) under each position's logits, in float32.

    Example:
        >>> import jax.numpy as jnp
        >>> logp = token_logprobs(jnp.zeros((1, 2, 4)), jnp.array([[0, 3]]))  # uniform over 4
        >>> [round(float(v), 3) for v in logp[0]]
        [-1.386, -1.386]
    """
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(accumulation_dtype(logits_BTV.dtype)), axis=-1)
    return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
