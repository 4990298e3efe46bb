"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases (none on the output projection).

Sliding windows follow `layer_types`, or without it the layers from `max_window_layers`
on when `use_sliding_window` is set.

Example:
    >>> cfg = config_from_hf({"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 3,
    ...   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
    ...   "vocab_size": 50, "max_position_embeddings": 64, "use_sliding_window": True,
    ...   "sliding_window": 8, "max_window_layers": 1})
    >>> cfg.sliding_layers, cfg.attention.qkv_bias, cfg.attention.out_bias
    ((1, 2), True, False)
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
    """`ModelConfig` of a HF Qwen2 config.

    Example:
        >>> # config_from_hf(json.load(open("qwen2.5-0.5b/config.json"))).attention.qkv_bias
    """
    return decoder_config(hf, "qwen2", qkv_bias=True, out_bias=False, windows=layer_windows(hf))


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a Qwen2 `ModelConfig` (what `transformers.Qwen2Config` reads).

    Example:
        >>> cfg = config_from_hf({"model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 3,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 8,
        ...   "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1})
        >>> config_from_hf(config_to_hf(cfg)) == cfg
        True
    """
    return {**decoder_config_to_hf(cfg, "Qwen2ForCausalLM"), **layer_windows_to_hf(cfg)}
