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
from makemost_jax.models.llama import (
    decoder_config,
    decoder_config_to_hf,
    layer_windows,
    layer_windows_to_hf,
    weights_from_hf,
    weights_to_hf,
)

__all__ = ["config_from_hf", "config_to_hf", "weights_from_hf", "weights_to_hf"]


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF Qwen3 config (`head_dim` defaults to 128, as in transformers).

    Example:
        >>> # config_from_hf(json.load(open("qwen3-0.6b/config.json"))).attention.qk_norm
    """
    return decoder_config({"head_dim": 128, **hf}, "qwen3", qk_norm=True, windows=layer_windows(hf))


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a Qwen3 `ModelConfig` (what `transformers.Qwen3Config` reads).

    Example:
        >>> cfg = config_from_hf({"model_type": "qwen3", "hidden_size": 8, "num_hidden_layers": 2,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "head_dim": 6, "vocab_size": 10,
        ...   "max_position_embeddings": 8})
        >>> config_from_hf(config_to_hf(cfg)) == cfg
        True
    """
    return {**decoder_config_to_hf(cfg, "Qwen3ForCausalLM"), **layer_windows_to_hf(cfg)}
