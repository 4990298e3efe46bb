"""The family-independent model interface: `forward`, `init_params`, `params_from_hf`.

Every method in the library sees only these functions. The weights tree has one layout
for every family, built from the config (`init_weights`): embeddings, the stacked
blocks, the head; each family module (found through `models.registry`) only converts
its Hugging Face config and maps its checkpoint's tensors onto this tree. Every weight
declares its logical axes here or in `layers.BLOCK_AXES` (`weight_axes`).

An encoder-decoder (T5, BART, Marian; `config.encoder` set) keeps the decoder at the top
of the tree and the encoder stack under `weights["encoder"]` (its token table is the
decoder's unless the embeddings are separate). `encode` runs the encoder; `forward`
takes the source as `encoder_tokens` on a first call and carries its cross-attention
keys/values in the cache (`cache.source`) for the calls after.

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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models.cache import (
    KV_AXES,
    EncodedSource,
    KVCache,
    buffer_shape,
    init_cache,
    into_layers,
    kv_shape,
    split_layers,
)
from makemost_jax.models.config import ModelConfig
from makemost_jax.models.layers import (
    accumulation_dtype,
    activation,
    attention_context,
    block_axes,
    init_block_weights,
    norm,
    norm_weights,
    project_source,
    relative_bias,
    run_blocks,
    write_slots,
)
from makemost_jax.models.registry import family_for
from makemost_jax.models.types import ModelOutput, Params
from makemost_jax.models.vocab_nll import token_nll
from makemost_jax.sharding import constrain
from makemost_jax.sharding import is_active as sharding_active


def _normal(key, shape, dtype, std=0.02):
    return std * jax.random.normal(key, shape, dtype)


def _stack_weights(cfg: ModelConfig, key: jax.Array, dtype, tokens: bool) -> dict:
    """Embeddings (the token table when `tokens`), blocks and stack-level position weights of one stack."""
    k_tok, k_pos, k_type, k_blocks, _, k_proj = jax.random.split(key, 6)  # the split decoders always had
    e, d = cfg.embed, cfg.d_model
    width = e.project_dim or d
    embed = {"tokens": _normal(k_tok, (cfg.vocab_size, width), dtype)} if tokens else {}
    if e.positions == "learned":
        embed["positions"] = _normal(k_pos, (cfg.max_positions + e.position_offset, d), dtype, 0.01)
    if e.type_vocab_size:
        embed["types"] = _normal(k_type, (e.type_vocab_size, d), dtype)
    if e.norm:
        embed["norm"] = norm_weights(cfg, d)
    if e.project_dim:
        embed["project_in"] = {"kernel": _normal(k_proj, (width, d), dtype)}
    weights = {"embed": embed} if embed else {}  # a T5 encoder reads the shared table and nothing else
    weights["layers"] = init_block_weights(cfg, k_blocks, dtype)
    if cfg.attention.relative_buckets:
        shape = (cfg.attention.relative_buckets, cfg.n_heads)
        weights["relative_bias"] = _normal(jax.random.fold_in(key, 1), shape, dtype, 0.1)
    return weights


def init_weights(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random weights of any family (normal(0.02) embeddings, Flax default block init).

    Example:
        >>> # init_weights(cfg, jax.random.key(0))["embed"]["tokens"].shape == (V, E)
    """
    _, _, _, _, k_head, k_proj = jax.random.split(key, 6)
    d, width = cfg.d_model, cfg.embed.project_dim or cfg.d_model
    weights = _stack_weights(cfg, key, dtype, tokens=True)
    h = cfg.head
    if h.kind == "lm":
        if h.final_norm:
            weights["final_norm"] = norm_weights(cfg, d)
        if cfg.embed.project_dim:
            weights["project_out"] = {"kernel": _normal(k_proj, (d, width), dtype)}
        if not h.tied:
            weights["lm_head"] = {"kernel": _normal(k_head, (width, cfg.vocab_size), dtype)}
        if h.logits_bias:
            weights["logits_bias"] = jnp.zeros((cfg.vocab_size,), dtype)
    elif h.kind == "mlm":
        weights["mlm_head"] = {"dense": {"kernel": _normal(k_head, (d, d), dtype), "bias": jnp.zeros((d,), dtype)},
                               "norm": norm_weights(cfg, d), "bias": jnp.zeros((cfg.vocab_size,), dtype)}
    if cfg.encoder is not None:
        encoder = _stack_weights(cfg.encoder, jax.random.fold_in(key, 2), dtype, tokens=not cfg.share_embeddings)
        if cfg.encoder.head.final_norm:
            encoder["final_norm"] = norm_weights(cfg.encoder, cfg.encoder.d_model)
        weights["encoder"] = encoder
    return weights


# Logical axes of the weights outside the blocks (`layers.BLOCK_AXES` has the blocks').
TOP_AXES = {
    "embed/tokens": ("vocab", "embed"), "embed/positions": ("positions", "embed"),
    "embed/types": ("types", "embed"), "embed/norm/scale": ("norm",), "embed/norm/bias": ("norm",),
    "embed/project_in/kernel": ("embed_proj", "embed"), "project_out/kernel": ("embed", "embed_proj"),
    "final_norm/scale": ("norm",), "final_norm/bias": ("norm",), "lm_head/kernel": ("embed", "vocab"),
    "mlm_head/dense/kernel": ("embed", "norm"), "mlm_head/dense/bias": ("norm",),
    "mlm_head/norm/scale": ("norm",), "mlm_head/norm/bias": ("norm",), "mlm_head/bias": ("vocab",),
    "relative_bias": ("buckets", "heads"), "logits_bias": ("vocab",),
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

    top = {k: v for k, v in weights.items() if k not in ("layers", "encoder")}
    tree = {**jax.tree_util.tree_map_with_path(axes, top), "layers": block_axes(cfg)}
    if "encoder" in weights:
        tree["encoder"] = weight_axes(cfg.encoder, weights["encoder"])
    return tree


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Randomly initialised parameters for `cfg` (any family).

    Example:
        >>> # params = init_params(from_hf_config(hf_config_dict), jax.random.key(0))
    """
    return Params(cfg, init_weights(cfg, key, dtype))


def params_from_hf(cfg: ModelConfig, tensors: dict, dtype=None, mesh=None, rules=None) -> Params:
    """Parameters from a Hugging Face state dict (HF names -> numpy arrays or lazy tensors).

    Every tensor is mapped, shape-checked and placed lazily first (a `CheckpointError`
    names any missing, unused or misshapen tensor, and a mesh that would split an attention
    head is a `ConfigError`, all before any device memory is allocated); then each
    parameter is created in its final sharding, every device's slice read and cast on
    its own. `dtype` None keeps the checkpoint's dtype (that of the token table; float8
    becomes bfloat16). Without a `mesh` the weights go to this process's first device.

    Example:
        >>> # params = params_from_hf(from_hf_config(config), tensors)
        >>> # params = params_from_hf(cfg, tensors, "bfloat16", mesh=make_mesh(MeshConfig(fsdp=4, tensor=2)))
    """
    from makemost_jax.checkpoints.lazy import to_device
    from makemost_jax.sharding import load_shardings

    lazy = family_for(cfg.hf_model_type or cfg.family).weights_from_hf(cfg, tensors)
    dtype = checkpoint_dtype(lazy) if dtype is None else jnp.dtype(dtype)
    shardings = load_shardings(Params(cfg, lazy), mesh, rules)
    return Params(cfg, jax.tree.map(lambda t, s: to_device(t, s, dtype), lazy, shardings))


def checkpoint_dtype(weights: dict) -> jnp.dtype:
    """The dtype a checkpoint's weights keep by default: its token table's (float8: bfloat16; not a float: float32).

    Example:
        >>> import numpy as np
        >>> checkpoint_dtype({"embed": {"tokens": np.zeros(2, np.float16)}})
        dtype('float16')
    """
    stored = jnp.dtype(weights["embed"]["tokens"].dtype)
    if not jnp.issubdtype(stored, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(jnp.bfloat16) if stored.itemsize == 1 else stored


def _lookup(table_ND, ids_BT, rows_axis: str):
    """Rows `ids_BT` of an embedding table, as (B, T, D) split over the batch axes.

    Under fsdp the table's width D is split, and a gather keeps its operand's sharding:
    the rows would come out split over D, and going from that to rows split over the
    batch axes (data x fsdp) is a resharding XLA can only do by replicating the whole
    activation ("involuntary full rematerialization"). So the table's width is gathered
    whole first (what fsdp does for every weight) and the rows are taken by batch.
    """
    table_ND = constrain(table_ND, (rows_axis, None))
    return constrain(table_ND[ids_BT], ("batch", "length", None))


def embed(cfg: ModelConfig, weights: dict, tokens_BT, positions_BT, token_types_BT=None):
    """Token embeddings (scaled, projected) plus learned positions and token types, as the config says.

    Example:
        >>> # x_BTD = embed(cfg, weights, tokens_BT, positions_BT)
    """
    e, w = cfg.embed, weights["embed"]
    x_BTD = _lookup(w["tokens"], tokens_BT, "vocab")
    if e.scale != 1.0:  # Gemma: sqrt(D), rounded to the weights' dtype as Hugging Face does
        x_BTD = x_BTD * jnp.asarray(e.scale, x_BTD.dtype)
    if e.project_dim:
        x_BTD = x_BTD @ w["project_in"]["kernel"]
    if e.positions == "learned":
        x_BTD = x_BTD + _lookup(w["positions"], positions_BT + e.position_offset, "positions")
    elif e.positions == "sinusoidal":
        x_BTD = x_BTD + jnp.asarray(sinusoidal_table(cfg.max_positions, cfg.d_model), x_BTD.dtype)[positions_BT]
    if e.type_vocab_size:
        types = jnp.zeros_like(tokens_BT) if token_types_BT is None else token_types_BT
        x_BTD = x_BTD + _lookup(w["types"], types, "types")
    if e.norm:
        x_BTD = norm(cfg, w["norm"], x_BTD)
    return x_BTD


@functools.cache
def sinusoidal_table(n_positions: int, width: int) -> np.ndarray:
    """Marian's fixed position table (n_positions, width): sin(p * w_i) in the first ceil(width/2)
    columns, cos(p * w_i) in the rest, w_i = 10000 ** (-2i / width); computed in float64.

    Example:
        >>> [round(float(v), 4) for v in sinusoidal_table(3, 4)[1]]
        [0.8415, 0.01, 0.5403, 0.9999]
    """
    rates = 1.0 / np.power(10000.0, 2 * (np.arange(width) // 2) / width)
    angles = np.arange(n_positions)[:, None] * rates[None, :]
    return np.concatenate([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], axis=1).astype(np.float32)


def final_states(cfg: ModelConfig, weights: dict, x_BTD):
    """The states the output projection reads: after the final norm where the head has one.

    Example:
        >>> # final_BTD = final_states(cfg, weights, x_BTD)
    """
    if cfg.head.kind == "lm" and cfg.head.final_norm:
        return norm(cfg, weights["final_norm"], x_BTD)
    return x_BTD


def _projection_input(cfg: ModelConfig, weights: dict, x_BTD):
    """(what an LM head's vocabulary projection reads, the final states)."""
    final_BTD = final_states(cfg, weights, x_BTD)
    y = final_BTD @ weights["project_out"]["kernel"] if cfg.embed.project_dim else final_BTD
    if cfg.head.input_scale != 1.0:  # T5's tied head
        y = y * jnp.asarray(cfg.head.input_scale, y.dtype)
    return y, final_BTD


def head_nll(cfg: ModelConfig, weights: dict, x_BTD, targets_BT):
    """NLL (B, T) of `targets_BT` under an LM head at `x_BTD` (the last block's output), in the accumulation dtype.

    Equal to `-token_logprobs(head(cfg, weights, x_BTD)[0], targets_BT)` without holding the
    (B, T, V) logits: the vocabulary is read in chunks (`models.vocab_nll`), and a gradient
    with respect to the states is formed in the same pass, which is what makes HSO's step
    faster. Under `sharding.activate` the vocabulary may be split over devices, and the plain
    head keeps the layout the partitioner expects.

    Example:
        >>> # nll_BT = head_nll(cfg, weights, forward(params, tokens_BT, states_only=True).states, targets_BT)
    """
    if cfg.head.kind != "lm":
        raise ConfigError(f"head_nll needs a language-model head; {cfg.hf_model_type or cfg.family} has "
                          f"'{cfg.head.kind}'")
    if sharding_active():
        return -token_logprobs(head(cfg, weights, x_BTD)[0], targets_BT)
    y_BTE, _ = _projection_input(cfg, weights, x_BTD)
    h = cfg.head
    table = weights["embed"]["tokens"] if h.tied else weights["lm_head"]["kernel"]
    nll_N = token_nll(y_BTE.reshape(-1, y_BTE.shape[-1]), table, weights["logits_bias"] if h.logits_bias else None,
                      targets_BT.reshape(-1), h.tied, h.softcap)
    return nll_N.reshape(targets_BT.shape)


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
    y, x_BTD = _projection_input(cfg, weights, x_BTD)
    if h.tied:
        logits = jnp.einsum("btd,vd->btv", y, weights["embed"]["tokens"], preferred_element_type=wide)
    else:
        logits = jnp.einsum("btd,dv->btv", y, weights["lm_head"]["kernel"], preferred_element_type=wide)
    if h.logits_bias:
        logits = logits + weights["logits_bias"].astype(wide)
    if h.softcap is not None:
        logits = h.softcap * jnp.tanh(logits / h.softcap)
    return logits, x_BTD


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_inputs(cfg: ModelConfig, tokens_BT, cache, weights_per_layer: bool, write_cache: bool = True):
    """Raise `InputError` for shapes and values that would silently go wrong.

    Value checks run only on concrete arrays (outside `jit`); shape checks always.
    """
    _check_tokens(tokens_BT, cfg.vocab_size, "tokens")
    if cache is not None:
        if cache.batch != tokens_BT.shape[0]:
            raise InputError(f"cache has batch {cache.batch} but tokens have batch {tokens_BT.shape[0]}")
        shapes = {name: buffer_shape(getattr(cache, name)) for name in ("k", "v")}
        buffers = shapes["k"][KVCache.ROW_AXES["k"]]
        want = {name: kv_shape(cfg, buffers, cache.positions.shape[1], name) for name in ("k", "v")}
        if shapes != want or cache.batch % buffers:
            raise InputError(f"cache keys/values have shapes {shapes['k']} and {shapes['v']}; this model and "
                             f"cache need keys {KV_AXES['k']} = {want['k']} and values {KV_AXES['v']} = "
                             f"{want['v']}, with a batch that divides the {cache.batch} rows: build caches "
                             "with init_cache (and branch_rows)")
        if isinstance(cache.k, tuple) and not weights_per_layer:
            raise InputError("the cache holds its keys/values per layer (split_layers) but the weights are "
                             "stacked: pass per_layer(params, cache) for both, or stack_layers(cache)")
        if not write_cache:  # only read: the new tokens need no room
            return
        t = tokens_BT.shape[1] * cache.rows_per_buffer  # slots this call writes
        # A full cache keeps rolling only where every layer slides over one window that
        # the cache holds together with this call's tokens.
        rolls = _rolls(cfg, cache) and cache.size >= cfg.uniform_window + t - 1
        if t > cache.size or (not rolls and _concrete(cache.fill) and int(cache.fill) + t > cache.size):
            raise InputError(f"{t} new tokens' slots do not fit in the cache ({cache.size} slots); allocate a "
                             "larger cache with init_cache (models.cache.cache_size says how many)")


def _rolls(cfg: ModelConfig, cache: KVCache) -> bool:
    """Whether writes wrap around `cache`: a rolling buffer, only where every layer slides over one window.

    A cache whose rows share buffers (`branch_rows`) never rolls.
    """
    return cfg.uniform_window is not None and cache.rows_per_buffer == 1


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


def _check_positions(cfg: ModelConfig, positions_BT, what: str = "the input"):
    if cfg.embed.positions in ("learned", "sinusoidal") and _concrete(positions_BT):
        top = int(jnp.max(positions_BT))
        if top >= cfg.max_positions:
            raise InputError(f"position {top} of {what} exceeds the model's context of {cfg.max_positions} "
                             "tokens; shorten it or score it in windows")


def _check_tokens(tokens_BT, vocab_size: int, what: str):
    """Raise `InputError` for token arrays that would silently go wrong (values only when concrete)."""
    if tokens_BT.ndim != 2:
        raise InputError(f"{what} must be a (batch, length) array of token ids, got shape "
                         f"{tokens_BT.shape}; wrap a single sequence as x[None]")
    if tokens_BT.shape[0] == 0 or tokens_BT.shape[1] == 0:
        raise InputError(f"{what} has an empty dimension {tokens_BT.shape}; pass at least one token")
    if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
        raise InputError(f"{what} must be integer token ids, got dtype {tokens_BT.dtype}")
    if _concrete(tokens_BT):  # numpy: a constant inside a jitted function must not be traced
        values = np.asarray(tokens_BT)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab_size:
            raise InputError(f"{what}: token id {high if high >= vocab_size else low} is outside the "
                             f"vocabulary [0, {vocab_size}); was the text tokenized for this model?")


def encode(params: Params, encoder_tokens, encoder_mask=None) -> jax.Array:
    """An encoder-decoder's encoder: final states (B, S, D) of right-padded sources.

    `encoder_mask` (B, S) marks real source tokens (1) against padding (0); positions
    count slots from 0, as Hugging Face's encoder-decoders do (a BERT-family encoder, as in
    the NAR model, uses its family's own positions).

    Example:
        >>> # states_BSD = mm.encode(params, source_BS, source_mask_BS)
    """
    cfg = params.config
    if cfg.encoder is None:
        raise InputError(f"{cfg.hf_model_type or cfg.family} is not an encoder-decoder, so it has no encoder to "
                         "run; encode() is for T5, BART and Marian models")
    enc, w = cfg.encoder, params.weights["encoder"]
    tokens_BS = jnp.asarray(encoder_tokens)
    _check_tokens(tokens_BS, enc.vocab_size, "encoder_tokens (the source)")
    b, s = tokens_BS.shape
    mask_BS = jnp.ones((b, s), bool) if encoder_mask is None else jnp.asarray(encoder_mask).astype(bool)
    if mask_BS.shape != (b, s):
        raise InputError(f"encoder_mask has shape {mask_BS.shape} but encoder_tokens have shape {(b, s)}")
    # Slots from 0, as HF's encoder-decoders count; a BERT-family encoder (the NAR model) counts its own way.
    default_positions = getattr(family_for(enc.hf_model_type or enc.family), "default_positions", None)
    positions_BS = (jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)) if default_positions is None
                    else default_positions(enc, tokens_BS, mask_BS))
    _check_positions(enc, positions_BS, "the source")
    embed_weights = {"tokens": params.weights["embed"]["tokens"], **w.get("embed", {})}
    x_BSD = embed(enc, {"embed": embed_weights}, tokens_BS, positions_BS)
    ctx = attention_context(positions_BS, jnp.broadcast_to(mask_BS[:, None, :], (b, s, s)))
    if enc.attention.relative_buckets:
        ctx["bias"] = relative_bias(enc, w["relative_bias"], positions_BS, positions_BS)
    x_BSD, _, _, _ = run_blocks(enc, w["layers"], x_BSD, ctx)
    return norm(enc, w["final_norm"], x_BSD) if enc.head.final_norm else x_BSD


def encode_source(params: Params, encoder_tokens, encoder_mask=None) -> EncodedSource:
    """The encoder's states turned into every decoder layer's cross-attention keys and values.

    Example:
        >>> # source = encode_source(params, source_BS, source_mask_BS)   # once per source
        >>> # forward(params, tokens_BT, source=source)                  # any number of decoder calls
    """
    states_BSD = encode(params, encoder_tokens, encoder_mask)
    layers = params.weights["layers"]
    cross = _stack([layer["cross_attn"] for layer in layers]) if is_per_layer(params) else layers["cross_attn"]
    k, v = project_source(params.config, cross, states_BSD)
    b, s = states_BSD.shape[:2]
    mask_BS = jnp.ones((b, s), bool) if encoder_mask is None else jnp.asarray(encoder_mask).astype(bool)
    return EncodedSource(k=k, v=v, mask=mask_BS)


def _resolve_source(params: Params, cache, source, encoder_tokens, encoder_mask) -> EncodedSource | None:
    """The encoded source a decoder call reads, from exactly one of its three spellings."""
    cfg = params.config
    name = cfg.hf_model_type or cfg.family
    given = [n for n, v in (("encoder_tokens", encoder_tokens), ("source", source),
                            ("cache.source", None if cache is None else cache.source)) if v is not None]
    if cfg.encoder is None:
        if given:
            raise InputError(f"{name} is a decoder-only model and takes no {given[0]}; sources are for "
                             "encoder-decoders (T5, BART, Marian)")
        return None
    if len(given) > 1:
        raise InputError(f"the source was given twice ({' and '.join(given)}); pass encoder_tokens on the first "
                         "call only, later calls read it from the cache")
    if encoder_tokens is not None:
        return encode_source(params, encoder_tokens, encoder_mask)
    if source is not None or (cache is not None and cache.source is not None):
        return source if source is not None else cache.source
    raise InputError(f"{name} is an encoder-decoder: pass the source as encoder_tokens= (with encoder_mask=) on "
                     "the first decoder call")


def forward(params: Params, tokens, cache: KVCache | None = None, positions=None, mask=None,
            token_types=None, return_hidden: bool = False, extra_kv=None, encoder_tokens=None,
            encoder_mask=None, source: EncodedSource | None = None, logits_at=None,
            write_cache: bool = True, states_only: bool = False) -> ModelOutput:
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

    A cache whose rows share buffers (`models.cache.branch_rows`, a beam search's K beams
    of one prompt) takes each call's tokens of its n rows into n runs of slots, one per row,
    and each row sees only the slots its positions mark.

    `write_cache=False` only reads `cache`: every cached slot stays visible (none is
    overwritten, so no room is needed for the input), and the returned cache holds the
    input's own keys/values (T slots) for the caller to place (HSO appends them itself).

    `logits_at`, optional, computes the output layer only where it is needed: an index
    into T per row (B,) or one for all rows (e.g. -1, the last), giving logits (B, 1, V).
    The vocabulary projection is the largest matmul of small models; a search that reads
    one position should not pay for T. `states_only=True` skips the output layer and returns
    the last block's output as `states` (`logits` None), for a caller that applies the head
    itself (`head_nll`); `return_hidden` still returns every layer's states.

    Encoder-decoders: `tokens` are the decoder's. The source is given once, as
    `encoder_tokens` (B, S) with `encoder_mask` (right-padded), or as an `EncodedSource`
    (`encode_source`); the returned cache carries it, so cached decoding passes only the
    new decoder tokens after the first call.

    Example:
        >>> # out = forward(params, tokens_BT, cache=init_cache(params.config, B, 256))
        >>> # out.logits[:, -1]  # next-token logits
    """
    cfg = params.config
    weights = params.weights
    tokens_BT = jnp.asarray(tokens)
    _check_inputs(cfg, tokens_BT, cache, is_per_layer(params), write_cache)
    b, t = tokens_BT.shape
    mask_BT = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask).astype(bool)
    if mask_BT.shape != (b, t):
        raise InputError(f"mask has shape {mask_BT.shape} but tokens have shape {(b, t)}")
    _check_extra_kv(cfg, extra_kv, b)
    source = _resolve_source(params, cache, source, encoder_tokens, encoder_mask)
    if source is not None and source.batch != b:
        raise InputError(f"the source has batch {source.batch} but the decoder tokens have batch {b}")
    source_kv = None if source is None else (source.k, source.v)

    def add_source_and_bias(ctx, key_positions_BS):
        if source is not None:
            ctx["source_attend"] = source.mask[:, None, :]
        if cfg.attention.relative_buckets:
            ctx["bias"] = relative_bias(cfg, weights["relative_bias"], ctx["positions"], key_positions_BS)
        return ctx

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
        new_positions_BT = jnp.where(mask_BT, positions_BT, -1)
        if plain_causal:
            ctx = attention_context(positions_BT)
        elif fresh:  # attend to the input itself: no empty slots to read
            attend_BTT = (mask_BT[:, None, :] & (positions_BT[:, None, :] <= positions_BT[:, :, None])
                          & jnp.tril(jnp.ones((t, t), bool)))
            ctx = attention_context(positions_BT, attend_BTT, new_positions_BT)
        else:
            # Keys: the cache's slots (those this call overwrites hidden), then the input's own.
            # Rows that share buffers write to n runs of T slots, row i % n to the i-th run.
            n = cache.rows_per_buffer
            cached_BS = cache.positions
            if write_cache:
                rolls = _rolls(cfg, cache)
                slots_W = cache.fill + jnp.arange(n * t, dtype=jnp.int32)
                slots_W = slots_W % cache.size if rolls else slots_W
                cached_BS = cached_BS.at[:, slots_W].set(-1)
            key_positions_BS = jnp.concatenate([cached_BS, new_positions_BT], axis=1)
            attend_BTS = (key_positions_BS[:, None, :] >= 0) & (key_positions_BS[:, None, :] <= positions_BT[:, :, None])
            ctx = attention_context(positions_BT, attend_BTS, key_positions_BS)
        ctx = add_source_and_bias(ctx, ctx["key_positions"])
        x0_BTD = embed(cfg, weights, tokens_BT, positions_BT, token_types)
        buffers = (None, None) if fresh else (cache.k, cache.v)
        x_BTD, k_LBGKT, v_LBGTK, hidden = run_blocks(cfg, weights["layers"], x0_BTD, ctx, *buffers, return_hidden,
                                                     extra_kv, source_kv)
        if fresh or not write_cache:  # a cache of the input's own T slots
            k, v, key_positions_BS, fill = k_LBGKT, v_LBGTK, new_positions_BT, jnp.int32(t)
        else:  # one write of every layer's new keys into the cache
            def runs(x, axis):  # B/n rows, n*T slots on `axis`: the n rows' tokens one run after the other
                x = jnp.moveaxis(x.reshape(x.shape[0], b // n, n, *x.shape[2:]), 2, axis)
                return x.reshape(*x.shape[:axis], n * t, *x.shape[axis + 2:])

            def write(name, old, new):  # into the stacked buffer, or into each layer's own
                axis = KVCache.SLOT_AXES[name]
                return into_layers(lambda o, n: write_slots(o, runs(n, axis), cache.fill, axis, rolls), old, new)

            k, v = write("k", cache.k, k_LBGKT), write("v", cache.v, v_LBGTK)
            own_BNT = jnp.arange(n)[None, :, None] == (jnp.arange(b) % n)[:, None, None]
            new_BW = jnp.where(own_BNT, new_positions_BT[:, None, :], -1).reshape(b, n * t)
            key_positions_BS, fill = cache.positions.at[:, slots_W].set(new_BW), cache.fill + n * t
        dtype = jax.tree.leaves(cache.k)[0].dtype
        k, v = jax.tree.map(lambda x: x.astype(dtype), (k, v))
        new_cache = KVCache(k=k, v=v, positions=key_positions_BS,
                            fill=fill, next_position=cache.next_position + mask_BT.sum(1, dtype=jnp.int32),
                            source=source)
    else:
        if cache is not None:
            raise InputError(f"{cfg.hf_model_type} is an encoder and takes no cache; pass cache=None")
        if positions is None:
            positions = family_for(cfg.hf_model_type or cfg.family).default_positions(cfg, tokens_BT, mask_BT)
        _check_positions(cfg, positions)
        attend_BTS = jnp.broadcast_to(mask_BT[:, None, :], (b, t, t))
        ctx = add_source_and_bias(attention_context(positions, attend_BTS), positions)
        x0_BTD = embed(cfg, weights, tokens_BT, positions, token_types)
        x_BTD, _, _, hidden = run_blocks(cfg, weights["layers"], x0_BTD, ctx, return_hidden=return_hidden,
                                         extra_kv=extra_kv, source_kv=source_kv)
        new_cache = None
    logits = final_BTD = None
    if states_only:
        if logits_at is not None:
            raise InputError("states_only returns no logits; drop logits_at")
    elif logits_at is None:
        logits, final_BTD = head(cfg, weights, x_BTD)
    else:
        at_B = jnp.broadcast_to(jnp.asarray(logits_at, jnp.int32) % x_BTD.shape[1], (b,))
        logits, _ = head(cfg, weights, jnp.take_along_axis(x_BTD, at_B[:, None, None], axis=1))
    if logits is not None:
        logits = constrain(logits, ("batch", "length", "vocab"))
    if return_hidden:
        final_BTD = final_states(cfg, weights, x_BTD) if final_BTD is None else final_BTD
        hidden = jnp.concatenate([x0_BTD[None], hidden[:-1], final_BTD[None]], axis=0)
    return ModelOutput(logits=logits, cache=new_cache, hidden=hidden, states=x_BTD if states_only else None)


def per_layer(params: Params, cache: KVCache | None = None) -> tuple[Params, KVCache | None]:
    """`params` and `cache` with each layer's weights and key/value buffers held on their own.

    `forward` then runs the layers unrolled, and every layer reads its weights and its
    cache where they lie. Scanned, a layer first copies its slice of the stacked weights
    and buffers out (XLA's CPU matmuls read only whole buffers): GPT-2 small's one-token
    step inside a jitted loop, one core, took 71.5 ms this way against 93.0 ms scanned at 4
    rows, 268 against 363 ms at 64 (`benchmarks/bench_decode_step.py`). The searches run in the layout
    of the params they are given (`decode_layout`), so a process that runs many searches
    converts once: `params, _ = per_layer(params)`. The price is compile time that grows
    with depth. The other arguments of `forward` are unchanged; training, sharding and
    export take stacked weights (`stacked`).

    Example:
        >>> from makemost_jax.models.config import from_hf_config
        >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 2,
        ...                       "n_head": 2, "vocab_size": 10, "n_positions": 8})
        >>> params = init_params(cfg, jax.random.key(0))
        >>> cache = forward(params, jnp.array([[1, 2]]), cache=init_cache(cfg, 1, 4)).cache
        >>> layered, layered_cache = per_layer(params, cache)
        >>> len(layered["layers"]), len(layered_cache.k), is_per_layer(layered)
        (2, 2, True)
        >>> step, layered_step = (forward(p, jnp.array([[3]]), cache=c).logits for p, c in
        ...                       ((params, cache), (layered, layered_cache)))
        >>> bool(jnp.allclose(step, layered_step, atol=1e-6))
        True
    """
    weights = params.weights
    if not is_per_layer(params):
        stacked_layers = weights["layers"]
        weights = {**weights, "layers": tuple(jax.tree.map(lambda w, i=i: w[i], stacked_layers)
                                              for i in range(params.config.n_layers))}
    return Params(params.config, weights), None if cache is None else split_layers(cache)


def stacked(params: Params) -> Params:
    """`params` with per-layer weights (`per_layer`) stacked again: every leaf under
    `weights["layers"]` (L, ...). Stacked params are returned as they are.

    Example:
        >>> from makemost_jax.models.config import from_hf_config
        >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 2,
        ...                       "n_head": 2, "vocab_size": 10, "n_positions": 8})
        >>> params = init_params(cfg, jax.random.key(0))
        >>> back = stacked(per_layer(params)[0])   # before training, sharding or export
        >>> jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back.weights, params.weights))
        True
    """
    if not is_per_layer(params):
        return params
    return Params(params.config, {**params.weights, "layers": _stack(params.weights["layers"])})


def _stack(trees):
    """One tree of (L, ...) arrays from L trees of the same structure."""
    return jax.tree.map(lambda *w: jnp.stack(w), *trees)


def is_per_layer(params: Params) -> bool:
    """Whether `params` hold each layer's weights on their own (`per_layer`).

    Example:
        >>> # is_per_layer(per_layer(params)[0])   # True
    """
    return isinstance(params.weights.get("layers"), tuple)


def require_stacked(params: Params, caller: str) -> None:
    """Raise `InputError` where `caller` needs stacked layer weights but was given per-layer ones.

    Example:
        >>> # require_stacked(params, "save_hf")
    """
    if is_per_layer(params):
        raise InputError(f"{caller} takes stacked layer weights, but these params hold each layer on its "
                         "own (per_layer): pass stacked(params)")


def decode_layout(params: Params, cache: KVCache) -> tuple[Params, KVCache]:
    """The layout a search's decode loop runs in: that of `params`.

    Stacked params run the layers under a scan (compile time flat in depth: the choice for a
    one-off search, as the CLI's). Params held per layer (`per_layer`, converted once by the
    caller) run them unrolled, and the cache is split per layer to match: each step is
    faster on CPU, the first call compiles longer. `benchmarks/bench_beam.py --decode-layers`,
    GPT-2 small on one core: 8 prompts x 8 beams x 64 tokens took 15.3 s a call per layer
    against 18.9 s scanned, 1 x 4 x 32 2.21 against 2.49 s; a first call on 2 cores 16.9
    against 13.3 s. SmolLM2-135M (30 layers, 2 cores): greedy `generate` of 64 tokens 1.93
    against 2.65 s a call after a first call of 8.9 against 4.2 s.

    Example:
        >>> # params, cache = decode_layout(params, cache)   # before a search's while_loop
    """
    return (params, split_layers(cache)) if is_per_layer(params) else (params, cache)


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
