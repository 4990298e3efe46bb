"""GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU (tanh) MLP, tied head.

Hugging Face stores GPT-2's projections as `Conv1D` weights that are already
(in, out), and fuses q/k/v into one `c_attn`; `weights_from_hf` splits it.

Dimensions: B batch, T tokens, D width, V vocabulary, P max positions.

Example:
    >>> import jax
    >>> from makemost_jax.models.config import from_hf_config
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 2,
    ...                       "n_head": 2, "vocab_size": 10, "n_positions": 8})
    >>> init_weights(cfg, jax.random.key(0))["embed"]["positions"].shape
    (8, 16)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.models import mapping
from makemost_jax.models.config import ModelConfig
from makemost_jax.models.layers import init_block_weights, norm, norm_weights


def init_weights(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32,
                 learned_positions: bool = True) -> dict:
    """Random decoder weights (normal(0.02) embeddings, Flax default block init).

    Shared by the Llama family, which has no learned position table.

    Example:
        >>> # weights = init_weights(cfg, jax.random.key(0)); weights["embed"]["positions"].shape == (P, D)
    """
    k_tok, k_pos, k_blocks, k_head = jax.random.split(key, 4)
    weights = {
        "embed": {"tokens": 0.02 * jax.random.normal(k_tok, (cfg.vocab_size, cfg.d_model), dtype)},
        "layers": init_block_weights(cfg, k_blocks, dtype),
        "final_norm": norm_weights(cfg, cfg.d_model),
    }
    if learned_positions:
        weights["embed"]["positions"] = 0.01 * jax.random.normal(k_pos, (cfg.max_positions, cfg.d_model), dtype)
    if not cfg.tie_embeddings:
        weights["lm_head"] = {"kernel": 0.02 * jax.random.normal(k_head, (cfg.d_model, cfg.vocab_size), dtype)}
    return weights


def embed(cfg: ModelConfig, weights: dict, tokens_BT, positions_BT, token_types_BT=None):
    """Token plus learned position embeddings.

    Example:
        >>> # x_BTD = embed(cfg, weights, tokens_BT, positions_BT)
    """
    return weights["embed"]["tokens"][tokens_BT] + weights["embed"]["positions"][positions_BT]


def head(cfg: ModelConfig, weights: dict, x_BTD):
    """Final LayerNorm and output projection; returns (float32 logits, normed states).

    Example:
        >>> # logits_BTV, final_BTD = head(cfg, weights, x_BTD)
    """
    x_BTD = norm(cfg, weights["final_norm"], x_BTD)
    if cfg.tie_embeddings:
        logits = jnp.einsum("btd,vd->btv", x_BTD, weights["embed"]["tokens"],
                            preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", x_BTD, weights["lm_head"]["kernel"],
                            preferred_element_type=jnp.float32)
    return logits, x_BTD


_LAYER = "h.{i}."
_ENTRIES = [
    ("embed/tokens", "wte.weight", False),
    ("embed/positions", "wpe.weight", False),
    ("final_norm/scale", "ln_f.weight", False),
    ("final_norm/bias", "ln_f.bias", False),
    ("layers/attn_norm/scale", _LAYER + "ln_1.weight", False),
    ("layers/attn_norm/bias", _LAYER + "ln_1.bias", False),
    ("layers/mlp_norm/scale", _LAYER + "ln_2.weight", False),
    ("layers/mlp_norm/bias", _LAYER + "ln_2.bias", False),
    ("layers/attn/o/kernel", _LAYER + "attn.c_proj.weight", False),
    ("layers/attn/o/bias", _LAYER + "attn.c_proj.bias", False),
    ("layers/mlp/up/kernel", _LAYER + "mlp.c_fc.weight", False),
    ("layers/mlp/up/bias", _LAYER + "mlp.c_fc.bias", False),
    ("layers/mlp/down/kernel", _LAYER + "mlp.c_proj.weight", False),
    ("layers/mlp/down/bias", _LAYER + "mlp.c_proj.bias", False),
] + [(f"layers/attn/{p}/{kind}", f"{_LAYER}attn.{p}.{kind_hf}", False)
     for p in "qkv" for kind, kind_hf in (("kernel", "weight"), ("bias", "bias"))]


def weights_from_hf(cfg: ModelConfig, tensors: dict, dtype=jnp.float32) -> dict:
    """Map a Hugging Face GPT-2 state dict (with or without the `transformer.` prefix).

    Example:
        >>> # weights = weights_from_hf(cfg, {k: v.numpy() for k, v in hf_model.state_dict().items()})
    """
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    head_weight = tensors.pop("lm_head.weight", None)
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            fused = tensors.pop(f"h.{i}.attn.c_attn.{kind}", None)
            if fused is not None:  # Conv1D (D, 3D): split the last axis into q, k, v
                for p, part in zip("qkv", np.split(np.asarray(fused), 3, axis=-1)):
                    tensors[f"h.{i}.attn.{p}.{kind}"] = part
    if head_weight is not None and not cfg.tie_embeddings:
        tensors["lm_head.weight"] = head_weight
    entries = _ENTRIES + ([] if cfg.tie_embeddings else [("lm_head/kernel", "lm_head.weight", True)])
    expected = mapping.expected_shapes(init_weights, cfg)
    return mapping.assemble(tensors, entries, expected, cfg.n_layers, dtype=dtype,
                            ignored=("h.{i}.attn.bias", "h.{i}.attn.masked_bias"))
