"""Qwen3: the Llama layout with a per-head RMSNorm on queries and keys (before rotary) and a
`head_dim` independent of the width; `attention_bias` puts biases on q, k, v and o.

Example:
    >>> cfg = config_from_hf({"model_type": "qwen3", "hidden_size": 32, "num_hidden_layers": 2,
    ...   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "head_dim": 16,
    ...   "vocab_size": 50, "max_position_embeddings": 64})
    >>> cfg.attention.qk_norm, cfg.head_dim
    (True, 16)
"""

from __future__ import annotations

from makemost_jax.models.config import ModelConfig
from makemost_jax.models.llama import decoder_config, layer_windows, weights_from_hf

__all__ = ["config_from_hf", "weights_from_hf"]


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF Qwen3 config (`head_dim` defaults to 128, as in transformers).

    Example:
        >>> # config_from_hf(json.load(open("qwen3-0.6b/config.json"))).attention.qk_norm
    """
    return decoder_config({"head_dim": 128, **hf}, "qwen3", qk_norm=True, windows=layer_windows(hf))
