"""Llama-family decoders (Llama 1-3, SmolLM2, any HF `LlamaForCausalLM` config).

Rotary positions (rotate-half convention, `rope_theta`, optional linear / Llama-3
scaling), grouped-query attention, pre-RMSNorm blocks, SwiGLU MLP, tied or untied head.
HF `nn.Linear` weights are (out, in) and are transposed on load.

Dimensions: B batch, T tokens, D width, V vocabulary.

Example:
    >>> import jax
    >>> from makemost_jax.models.config import from_hf_config
    >>> cfg = from_hf_config({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
    ...   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
    ...   "vocab_size": 50, "max_position_embeddings": 64})
    >>> init_weights(cfg, jax.random.key(0))["layers"]["attn"]["k"]["kernel"].shape
    (2, 32, 16)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from makemost_jax.models import gpt2, mapping
from makemost_jax.models.config import ModelConfig
from makemost_jax.models.gpt2 import head  # same final norm + (tied or untied) projection

__all__ = ["init_weights", "embed", "head", "weights_from_hf"]


def init_weights(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random Llama weights: GPT-2's layout without the learned position table.

    Example:
        >>> # init_weights(cfg, jax.random.key(0))["layers"]["mlp"]["gate"]["kernel"].shape == (L, D, F)
    """
    return gpt2.init_weights(cfg, key, dtype, learned_positions=False)


def embed(cfg: ModelConfig, weights: dict, tokens_BT, positions_BT, token_types_BT=None):
    """Token embeddings only: positions enter through rotary attention.

    Example:
        >>> # x_BTD = embed(cfg, weights, tokens_BT, positions_BT)
    """
    return weights["embed"]["tokens"][tokens_BT]


_LAYER = "model.layers.{i}."
_ENTRIES = [
    ("embed/tokens", "model.embed_tokens.weight", False),
    ("final_norm/scale", "model.norm.weight", False),
    ("lm_head/kernel", "lm_head.weight", True),
    ("layers/attn_norm/scale", _LAYER + "input_layernorm.weight", False),
    ("layers/mlp_norm/scale", _LAYER + "post_attention_layernorm.weight", False),
] + [(f"layers/attn/{p}/kernel", f"{_LAYER}self_attn.{p}_proj.weight", True) for p in "qkvo"] \
  + [(f"layers/attn/{p}/bias", f"{_LAYER}self_attn.{p}_proj.bias", False) for p in "qkvo"] \
  + [(f"layers/mlp/{p}/kernel", f"{_LAYER}mlp.{p}_proj.weight", True) for p in ("up", "gate", "down")] \
  + [(f"layers/mlp/{p}/bias", f"{_LAYER}mlp.{p}_proj.bias", False) for p in ("up", "gate", "down")]


def weights_from_hf(cfg: ModelConfig, tensors: dict, dtype=jnp.float32) -> dict:
    """Map a Hugging Face Llama state dict; a tied head's stored copy is dropped.

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint("SmolLM2-135M")[1])
    """
    tensors = dict(tensors)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    expected = mapping.expected_shapes(init_weights, cfg)
    return mapping.assemble(tensors, _ENTRIES, expected, cfg.n_layers, dtype=dtype,
                            ignored=("model.layers.{i}.self_attn.rotary_emb.inv_freq",))
