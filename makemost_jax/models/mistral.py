"""Mistral: the Llama layout with sliding-window attention in every layer.

With `sliding_window` set, every layer sees its query and the W - 1 tokens before it,
so the cache is a rolling buffer of W slots during generation (`models.cache`).

Example:
    >>> cfg = config_from_hf({"model_type": "mistral", "hidden_size": 32, "num_hidden_layers": 2,
    ...   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
    ...   "vocab_size": 50, "max_position_embeddings": 64, "sliding_window": 8})
    >>> cfg.uniform_window
    8
"""

from __future__ import annotations

from makemost_jax.models.config import ModelConfig, require
from makemost_jax.models.llama import decoder_config, decoder_config_to_hf, weights_from_hf, weights_to_hf

__all__ = ["config_from_hf", "config_to_hf", "weights_from_hf", "weights_to_hf"]


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF Mistral config (no window: plain causal attention).

    Example:
        >>> # config_from_hf(json.load(open("mistral/config.json"))).sliding_layers
    """
    window = hf.get("sliding_window")
    return decoder_config(hf, "mistral", windows=[window] * require(hf, "num_hidden_layers"))


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a Mistral `ModelConfig` (what `transformers.MistralConfig` reads).

    Example:
        >>> cfg = config_from_hf({"model_type": "mistral", "hidden_size": 8, "num_hidden_layers": 2,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 8,
        ...   "sliding_window": 4})
        >>> config_from_hf(config_to_hf(cfg)) == cfg
        True
    """
    return {**decoder_config_to_hf(cfg, "MistralForCausalLM"), "sliding_window": cfg.uniform_window}
