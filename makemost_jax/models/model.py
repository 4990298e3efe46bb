"""The family-independent model interface: `forward`, `init_params`, `params_from_hf`.

Every method in the library sees only these functions; the family modules
(`gpt2`, `llama`, `bert`) supply embeddings, head and checkpoint mapping.

Dimensions: B batch, T new tokens, S cache slots, L layers, D width, V vocabulary.

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

from makemost_jax.errors import InputError
from makemost_jax.models import bert, gpt2, llama
from makemost_jax.models.cache import KVCache, init_cache
from makemost_jax.models.config import ModelConfig
from makemost_jax.models.layers import run_blocks
from makemost_jax.models.types import ModelOutput, Params
from makemost_jax.sharding import constrain

FAMILY_MODULES = {"gpt2": gpt2, "llama": llama, "bert": bert}


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Randomly initialised parameters for `cfg` (any family).

    Example:
        >>> # params = init_params(from_hf_config(hf_config_dict), jax.random.key(0))
    """
    return Params(cfg, FAMILY_MODULES[cfg.family].init_weights(cfg, key, dtype))


def params_from_hf(cfg: ModelConfig, tensors: dict, dtype=jnp.float32) -> Params:
    """Parameters from a Hugging Face state dict (HF names -> numpy arrays).

    Raises `CheckpointError` naming any missing, unused or misshapen tensor.

    Example:
        >>> # params = params_from_hf(from_hf_config(config), tensors)
    """
    return Params(cfg, FAMILY_MODULES[cfg.family].weights_from_hf(cfg, tensors, dtype))


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
        if tokens_BT.shape[1] > cache.size or (
                _concrete(cache.fill) and int(cache.fill) + tokens_BT.shape[1] > cache.size):
            raise InputError(f"{tokens_BT.shape[1]} new tokens do not fit in the cache "
                             f"({cache.size} slots); allocate a larger cache with init_cache")


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
    if cfg.rope_theta is None and _concrete(positions_BT):
        top = int(jnp.max(positions_BT))
        if top >= cfg.max_positions:
            raise InputError(f"position {top} exceeds the model's context of {cfg.max_positions} "
                             "tokens; shorten the input or score it in windows")


def forward(params: Params, tokens, cache: KVCache | None = None, positions=None, mask=None,
            token_types=None, return_hidden: bool = False, extra_kv=None) -> ModelOutput:
    """Run the model on `tokens` (B, T); a pure function of its arguments.

    Decoders write the new tokens' keys/values into `cache` at slots [fill, fill+T)
    and return the updated cache (a fresh T-slot cache when `cache` is None).
    `mask` (B, T) marks real tokens (1) against padding (0); default positions
    continue each row's count of real tokens, so left-padded batches give the same
    results as their unpadded rows. Encoders attend bidirectionally and return
    `cache=None`. `hidden` (L+1, B, T, D) follows Hugging Face's `hidden_states`.

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
    family = FAMILY_MODULES[cfg.family]
    weights = params.weights
    tokens_BT = jnp.asarray(tokens)
    _check_inputs(cfg, tokens_BT, cache)
    b, t = tokens_BT.shape
    mask_BT = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask).astype(bool)
    if mask_BT.shape != (b, t):
        raise InputError(f"mask has shape {mask_BT.shape} but tokens have shape {(b, t)}")
    _check_extra_kv(cfg, extra_kv, b)

    if cfg.causal:
        # A fresh cache with no padding is plain causal attention over the input itself.
        plain_causal = cache is None and mask is None
        if cache is None:
            cache = init_cache(cfg, b, t, weights["embed"]["tokens"].dtype)
        if positions is None:
            counts_BT = jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32) - 1
            positions = jnp.maximum(cache.next_position[:, None] + counts_BT, 0)
        _check_positions(cfg, positions)
        valid_BS = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask_BT, cache.fill, 1)
        slot_S = jnp.arange(cache.size)
        query_slot_T = cache.fill + jnp.arange(t)
        attend_BTS = None if plain_causal else (
            valid_BS[:, None, :] & (slot_S[None, None, :] <= query_slot_T[None, :, None]))
        x0_BTD = family.embed(cfg, weights, tokens_BT, positions, token_types)
        buffers = (None, None) if plain_causal else (cache.k, cache.v)
        x_BTD, k, v, hidden = run_blocks(cfg, weights["layers"], x0_BTD, positions, attend_BTS,
                                         *buffers, cache.fill, return_hidden, extra_kv)
        new_cache = KVCache(k=k, v=v, valid=valid_BS, fill=cache.fill + t,
                            next_position=cache.next_position + mask_BT.sum(1, dtype=jnp.int32))
    else:
        if cache is not None:
            raise InputError(f"{cfg.hf_model_type} is an encoder and takes no cache; pass cache=None")
        if positions is None:
            positions = family.default_positions(cfg, tokens_BT, mask_BT)
        _check_positions(cfg, positions)
        attend_BTS = jnp.broadcast_to(mask_BT[:, None, :], (b, t, t))
        x0_BTD = family.embed(cfg, weights, tokens_BT, positions, token_types)
        x_BTD, _, _, hidden = run_blocks(cfg, weights["layers"], x0_BTD, positions, attend_BTS,
                                         return_hidden=return_hidden, extra_kv=extra_kv)
        new_cache = None
    logits, final_BTD = family.head(cfg, weights, x_BTD)
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
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
