"""The two values every family shares: `Params` (weights + static config) and `ModelOutput`.

Example:
    >>> import jax.numpy as jnp
    >>> from makemost_jax.models.config import from_hf_config
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 8, "n_layer": 1,
    ...                       "n_head": 2, "vocab_size": 10, "n_positions": 8})
    >>> p = Params(cfg, {"embed": {"tokens": jnp.zeros((10, 8))}})
    >>> p["embed"]["tokens"].shape, p.config.family
    ((10, 8), 'gpt2')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from makemost_jax.models.cache import KVCache
from makemost_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    """A model's weights as a nested dict of arrays, with its config as static metadata.

    Layer weights are stacked: every leaf under `weights["layers"]` has a leading
    L axis; `model.per_layer` holds them as a tuple of L trees instead, for decoding.
    Kernels are (in, out).
    """

    config: ModelConfig = dataclasses.field(metadata=dict(static=True))
    weights: dict[str, Any]

    def __getitem__(self, key: str):
        return self.weights[key]

    @property
    def dtype(self):
        return self.weights["embed"]["tokens"].dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits: jax.Array | None  # (B, T, V); None for an encoder without an MLM head
    cache: KVCache | None  # None for encoders
    hidden: jax.Array | None  # (L+1, B, T, D) when asked for: embeddings, then each layer
    states: jax.Array | None = None  # (B, T, D) the last block's output, with `states_only` (no head run)
