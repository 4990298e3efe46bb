"""The KV cache: fixed-size buffers plus a fill count, as an explicit pytree.

Slots are filled left to right, the same slot range for every batch row; `valid`
marks which slots hold a real (non-padding) token, and `next_position` is each row's
position for its next token. Because it is a plain pytree, `jax.grad` with respect to
the cache, `lax.scan` over windows and `lax.while_loop` over decoding steps all work.

Example:
    >>> from makemost_jax.models.config import from_hf_config
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
    ...                       "n_head": 4, "vocab_size": 100, "n_positions": 32})
    >>> cache = init_cache(cfg, batch=3, size=16)
    >>> cache.k.shape, int(cache.fill)
    ((2, 3, 16, 4, 16), 0)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from makemost_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # (L, B, S, G, K); rotary keys are stored already rotated
    v: jax.Array  # (L, B, S, G, K)
    valid: jax.Array  # (B, S) bool: slot holds a real token
    fill: jax.Array  # () int32: slots [0, fill) are written
    next_position: jax.Array  # (B,) int32: position id of each row's next token

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def init_cache(config: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of `size` slots for `batch` rows.

    Example:
        >>> # cache = init_cache(params.config, batch=2, size=128, dtype=jnp.bfloat16)
    """
    shape = (config.n_layers, batch, size, config.n_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, size), bool),
        fill=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch,), jnp.int32),
    )
