"""The KV cache: fixed-size buffers whose slots record their positions, as an explicit pytree.

Every slot holds the position of the token written there (-1: empty or padding), so
every mask (causal, sliding window, padding, rolling buffer) is computed from positions,
never from slot indices. Tokens are written at slots `fill, fill + 1, ...` modulo the
size: a cache smaller than the text is a rolling buffer, which is exact for models whose
every layer slides over the same window (`ModelConfig.uniform_window`) as long as it
holds the window plus the tokens of one call (`cache_size`). Because it is a plain
pytree, `jax.grad` with respect to the cache, `lax.scan` over windows and
`lax.while_loop` over decoding steps all work on it.

An encoder-decoder's cache also carries its `EncodedSource`: every decoder layer's
cross-attention keys and values, computed once per source, and the source's mask.

Keys and values are stored heads first, so a decode step's batched matmuls read each
layer's cache as it lies: values (L, B, G, S, K), keys (L, B, G, K, S) with the slots last,
which makes the score product q @ k a plain matmul. With the slots before the head
dimension (q @ k^T), XLA's CPU matmul is slower over a beam search's shared buffer (the
scores of 8 x 8 beams over 536 slots, 12 layers, one core: 231 ms against 29 ms in a first
run, 64 against 43 ms in a later one), and with
the slots before the heads (L, B, S, G, K) every step first transposed the whole cache
(`benchmarks/bench_decode_step.py`).

Rows may share buffers (`branch_rows`): a beam search keeps each prompt's keys once for
all its beams, and every beam's generated tokens in one buffer per prompt. Keys and
values then have B / n rows, one per group of n consecutive rows, while `positions` stays
per row: a row sees only the slots its positions mark (its prompt and its own history),
and each call writes the n rows' new tokens to n distinct runs of slots. Attention reads
a shared buffer once for the n rows (`layers.attention`), and moving a beam to its
parent's history is a gather of the (B, S) positions, not of the keys.

Methods never rebuild a cache field by field: `repeat_rows` and `gather_rows` work on
any cache that declares the batch axis of its fields in `ROW_AXES` (nested pytrees that
declare their own, like the encoded source, included).

Example:
    >>> from makemost_jax.models.config import from_hf_config
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
    ...                       "n_head": 4, "vocab_size": 100, "n_positions": 32})
    >>> cache = init_cache(cfg, batch=3, size=10)
    >>> cache.k.shape, cache.v.shape, int(cache.fill), repeat_rows(cache, 2).batch
    ((2, 3, 4, 16, 10), (2, 3, 4, 10, 16), 0, 6)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models.config import ModelConfig

# Logical axes of `KVCache.k` / `.v` and `EncodedSource.k` / `.v` (sharding rules and every
# method's slot axis read them here): keys have their slots last, values before the head dimension.
K_AXES = ("layers", "batch", "kv_heads", "head_dim", "cache_slots")
V_AXES = ("layers", "batch", "kv_heads", "cache_slots", "head_dim")
KV_AXES = {"k": K_AXES, "v": V_AXES}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EncodedSource:
    """What a decoder's cross-attention reads of one batch of sources."""

    k: jax.Array  # (L, B, G, K, S) every decoder layer's cross-attention keys (B / n rows: shared)
    v: jax.Array  # (L, B, G, S, K)
    mask: jax.Array  # (B, S) bool: real source tokens

    ROW_AXES: ClassVar[dict] = {"k": K_AXES.index("batch"), "v": V_AXES.index("batch"), "mask": 0}
    BUFFERS: ClassVar[tuple] = ("k", "v")  # fields whose rows `branch_rows` shares

    @property
    def batch(self) -> int:
        return self.mask.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # (L, B, G, K, S), slots last; rotary keys are stored already rotated (B / n rows: shared)
    v: jax.Array  # (L, B, G, S, K); both may be held per layer instead (`split_layers`)
    positions: jax.Array  # (B, S) int32: position of the token in each slot, -1 if none
    fill: jax.Array  # () int32: tokens written so far; the next goes to slot fill % S
    next_position: jax.Array  # (B,) int32: position id of each row's next token
    source: EncodedSource | None = None  # encoder-decoders: the encoded source the decoder reads

    # Fields with a batch axis (a nested pytree with ROW_AXES of its own: None).
    ROW_AXES: ClassVar[dict] = {"k": K_AXES.index("batch"), "v": V_AXES.index("batch"), "positions": 0,
                                "next_position": 0, "source": None}
    BUFFERS: ClassVar[tuple] = ("k", "v")  # fields whose rows `branch_rows` shares
    SLOT_AXES: ClassVar[dict] = {"k": K_AXES.index("cache_slots"), "v": V_AXES.index("cache_slots"),
                                 "positions": 1}  # fields with a slot axis

    @property
    def size(self) -> int:
        return buffer_shape(self.k)[self.SLOT_AXES["k"]]

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def rows_per_buffer(self) -> int:
        """Rows that share each row of the key/value buffers: 1, or n after `branch_rows`."""
        return self.batch // buffer_shape(self.k)[self.ROW_AXES["k"]]

    @property
    def valid(self) -> jax.Array:
        """(B, S) bool: the slot holds a real token."""
        return self.positions >= 0


def kv_shape(config: ModelConfig, batch: int, size: int, field: str) -> tuple:
    """The shape of a cache's keys (`field` "k") or values ("v") of `size` slots for `batch` rows.

    Example:
        >>> from makemost_jax.models.config import from_hf_config
        >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
        ...                       "n_head": 4, "vocab_size": 100, "n_positions": 32})
        >>> kv_shape(cfg, 3, 10, "k"), kv_shape(cfg, 3, 10, "v")
        ((2, 3, 4, 16, 10), (2, 3, 4, 10, 16))
    """
    sizes = {"layers": config.n_layers, "batch": batch, "kv_heads": config.n_kv_heads,
             "head_dim": config.head_dim, "cache_slots": size}
    return tuple(sizes[axis] for axis in KV_AXES[field])


def init_cache(config: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of `size` slots for `batch` rows.

    Example:
        >>> # cache = init_cache(params.config, batch=2, size=128, dtype=jnp.bfloat16)
    """
    return KVCache(
        k=jnp.zeros(kv_shape(config, batch, size, "k"), dtype),
        v=jnp.zeros(kv_shape(config, batch, size, "v"), dtype),
        positions=jnp.full((batch, size), -1, jnp.int32),
        fill=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch,), jnp.int32),
    )


def cache_size(config: ModelConfig, prompt_length: int, total_length: int) -> int:
    """Slots a generation of `total_length` tokens needs after a `prompt_length` prefill.

    Models whose every layer slides over one window W keep a rolling buffer of
    max(prompt, W) slots, so memory stays bounded however long the decode; others keep
    every token.

    Example:
        >>> # cache_size(mistral_cfg_with_window_4096, 100, 100_000) == 4096
    """
    window = config.uniform_window
    if window is None:
        return total_length
    return min(total_length, max(prompt_length, window))


def _map_rows(cache, rows, buffers):
    """`rows(field, axis)` on every per-row field and `buffers(field, axis, batch)` on the key/value
    buffers (which `branch_rows` may share), nested pytrees like the encoded source included."""
    def one(name, value, axis):
        if value is None:
            return None
        if axis is None:
            return _map_rows(value, rows, buffers)
        if name in type(cache).BUFFERS:
            return jax.tree.map(lambda x: buffers(x, axis, cache.batch), value)  # one array, or one per layer
        return rows(value, axis)

    return dataclasses.replace(cache, **{name: one(name, getattr(cache, name), axis)
                                         for name, axis in type(cache).ROW_AXES.items()})


def _shared(buffer, axis: int, batch: int) -> bool:
    return buffer.shape[axis] != batch


def repeat_rows(cache, n: int):
    """Each row of `cache` repeated `n` times in place (row i becomes rows i*n .. i*n+n-1).

    Every copy gets its own buffers; `branch_rows` shares them instead.

    Example:
        >>> # rows_cache = repeat_rows(prompt_cache, questions_per_prompt)
    """
    def repeat(x, axis, batch=None):
        if batch is not None and _shared(x, axis, batch):
            raise ConfigError(f"this cache's rows share key/value buffers ({batch} rows, {x.shape[axis]} "
                              "buffers; `branch_rows`): its rows cannot be repeated")
        return jnp.repeat(x, n, axis=axis)

    return _map_rows(cache, repeat, repeat)


def gather_rows(cache, rows_R):
    """The cache of rows `rows_R` (R,) of `cache` (any order, repeats allowed).

    Where rows share buffers (`branch_rows`), only their positions move, so row i may
    only take a row of its own group (i // n * n .. i // n * n + n - 1), as a beam takes
    its parent among the beams of its prompt; the buffers are left as they are.

    Example:
        >>> # cache = gather_rows(cache, parent_R)   # beams follow their parents
    """
    def take(x, axis):
        return jnp.take(x, rows_R, axis=axis)

    def buffers(x, axis, batch):
        if not _shared(x, axis, batch):
            return take(x, axis)
        n = batch // x.shape[axis]
        if jnp.shape(rows_R) != (batch,):
            raise InputError(f"rows has shape {jnp.shape(rows_R)}; a cache whose rows share buffers "
                             f"(`branch_rows`) keeps its {batch} rows: give one source row per row")
        if not isinstance(rows_R, jax.core.Tracer):
            wrong = np.flatnonzero(np.asarray(rows_R) // n != np.arange(batch) // n)
            if wrong.size:
                raise InputError(f"rows[{wrong[0]}] = {int(np.asarray(rows_R)[wrong[0]])} is outside row "
                                 f"{wrong[0]}'s group of {n} rows that share a buffer (`branch_rows`); "
                                 "take rows only within the group")
        return x

    return _map_rows(cache, take, buffers)


def branch_rows(cache, n: int):
    """Each row of `cache` becomes n rows (row i: rows i*n .. i*n+n-1) that share its buffers.

    The n rows all see row i's slots, and from now on each sees only its own new tokens:
    every call writes the n rows' tokens to n distinct runs of slots of the shared buffer,
    so the cache needs room for n times the tokens that follow. An encoder-decoder's
    source is shared the same way. Nothing is copied but the (B, S) positions; reading
    the shared slots once for n rows is what makes beam search cheap (`decoding.beam`).

    Example:
        >>> from makemost_jax.models.config import from_hf_config
        >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
        ...                       "n_head": 4, "vocab_size": 100, "n_positions": 32})
        >>> beams = branch_rows(init_cache(cfg, batch=3, size=16), 4)
        >>> beams.batch, beams.k.shape[1], beams.rows_per_buffer
        (12, 3, 4)
    """
    def keep(x, axis, batch):
        if _shared(x, axis, batch):
            raise ConfigError("branch_rows takes a cache whose rows have their own buffers")
        return x

    return _map_rows(cache, lambda x, axis: jnp.repeat(x, n, axis=axis), keep)


def extend_slots(cache: KVCache, n: int) -> KVCache:
    """`cache` with `n` more empty slots at the end (for a continuation of `n` tokens).

    Example:
        >>> # longer = extend_slots(prompt_cache, 16)   # room for 16 more tokens
    """
    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n)
        return jnp.pad(x, widths, constant_values=-1 if x.dtype == jnp.int32 else 0)

    return dataclasses.replace(cache, **{name: jax.tree.map(lambda x, axis=axis: pad(x, axis), getattr(cache, name))
                                         for name, axis in KVCache.SLOT_AXES.items()})


def buffer_shape(buffer) -> tuple:
    """The (L, ...) shape of a key or value buffer, stacked or held per layer (`split_layers`).

    Example:
        >>> buffer_shape(jnp.zeros((2, 3, 4))), buffer_shape((jnp.zeros((1, 3, 4)),) * 5)
        ((2, 3, 4), (5, 3, 4))
    """
    if isinstance(buffer, tuple):
        return (len(buffer), *buffer[0].shape[1:])
    return buffer.shape


def into_layers(write, buffer, new_L):
    """`write(buffer, new_L)` on a stacked (L, ...) buffer, or `write(buffer_i, new_L[i:i + 1])` on each
    layer's own buffer of a per-layer one (`split_layers`): new entries for all L layers, either layout.

    Example:
        >>> add = lambda old, new: old + new
        >>> into_layers(add, jnp.zeros((2, 3)), jnp.ones((2, 3))).shape
        (2, 3)
        >>> [b.tolist() for b in into_layers(add, (jnp.zeros((1, 2)),) * 2, jnp.arange(4.0).reshape(2, 2))]
        [[[0.0, 1.0]], [[2.0, 3.0]]]
    """
    if not isinstance(buffer, tuple):
        return write(buffer, new_L)
    return tuple(write(b, new_L[i:i + 1]) for i, b in enumerate(buffer))


def split_layers(cache):
    """`cache` with its key/value buffers (the encoded source's too) held per layer: tuples of L arrays
    (1, ...), each shaped like the stacked buffer with one layer, so every axis keeps its index.

    With per-layer weights (`models.model.per_layer`), `forward` then runs the layers unrolled,
    each reading its own buffer where it lies; a scanned layer copies its slice of a stacked
    buffer (and of the stacked weights) out first. `stack_layers` undoes it.

    Example:
        >>> from makemost_jax.models.config import from_hf_config
        >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
        ...                       "n_head": 4, "vocab_size": 100, "n_positions": 32})
        >>> layered = split_layers(init_cache(cfg, batch=3, size=10))
        >>> len(layered.k), layered.k[0].shape, layered.size, stack_layers(layered).v.shape
        (2, (1, 3, 4, 16, 10), 10, (2, 3, 4, 10, 16))
    """
    if isinstance(cache.k, tuple):
        return cache
    return _map_rows(cache, lambda x, axis: x, lambda x, axis, batch: tuple(x[i:i + 1] for i in range(x.shape[0])))


def stack_layers(cache):
    """`cache` with per-layer key/value buffers (`split_layers`) stacked again: (L, ...) arrays.

    Example:
        >>> # cache = stack_layers(search_cache)
    """
    # Per-layer buffers are a cache's only tuples.
    return jax.tree.map(lambda x: jnp.concatenate(x, axis=0) if isinstance(x, tuple) else x, cache,
                        is_leaf=lambda x: isinstance(x, tuple))
