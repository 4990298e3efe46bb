"""GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU (tanh) MLP, tied head.

Hugging Face stores GPT-2's projections as `Conv1D` weights that are already
(in, out), and fuses q/k/v into one `c_attn`; `weights_from_hf` splits it.

Example:
    >>> cfg = config_from_hf({"model_type": "gpt2", "n_embd": 16, "n_layer": 2,
    ...                       "n_head": 2, "vocab_size": 10, "n_positions": 8})
    >>> cfg.embed.positions, cfg.attention.head_dim
    ('learned', 8)
"""

from __future__ import annotations


from makemost_jax.models import mapping
from makemost_jax.models.config import (
    AttentionConfig,
    EmbedConfig,
    HeadConfig,
    MlpConfig,
    ModelConfig,
    NormConfig,
    activation_name,
    require,
)


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF GPT-2 config.

    Example:
        >>> config_from_hf({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
        ...                 "vocab_size": 10, "n_positions": 8}).d_ff
        32
    """
    d = require(hf, "n_embd", "hidden_size")
    heads = require(hf, "n_head", "num_attention_heads")
    return ModelConfig(
        family="gpt2", hf_model_type="gpt2", vocab_size=require(hf, "vocab_size"), d_model=d,
        n_layers=require(hf, "n_layer", "num_hidden_layers"), max_positions=require(hf, "n_positions", "n_ctx"),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=heads, head_dim=d // heads,
                                  scale=None if hf.get("scale_attn_weights", True) else 1.0,
                                  scale_by_inverse_layer=bool(hf.get("scale_attn_by_inverse_layer_idx", False))),
        mlp=MlpConfig(d_ff=hf.get("n_inner") or 4 * d,
                      activation=activation_name(hf, "activation_function", default="gelu_new")),
        norm=NormConfig(kind="layernorm", eps=hf.get("layer_norm_epsilon", 1e-5)),
        embed=EmbedConfig(positions="learned"),
        head=HeadConfig(tied=hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"))


_LAYER = "h.{i}."
_ENTRIES = [
    ("embed/tokens", "wte.weight", False),
    ("embed/positions", "wpe.weight", False),
    ("final_norm/scale", "ln_f.weight", False),
    ("final_norm/bias", "ln_f.bias", False),
    ("lm_head/kernel", "lm_head.weight", True),
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


def weights_from_hf(cfg: ModelConfig, tensors: dict) -> dict:
    """Map a Hugging Face GPT-2 state dict (with or without the `transformer.` prefix).

    Example:
        >>> # weights = weights_from_hf(cfg, {k: v.numpy() for k, v in hf_model.state_dict().items()})
    """
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    d = cfg.d_model
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            # Conv1D (D, 3D): q, k, v along the last axis
            mapping.split_rows(tensors, f"h.{i}.attn.c_attn.{kind}",
                               {f"h.{i}.attn.{p}.{kind}": d for p in "qkv"}, axis=-1)
    return mapping.assemble(tensors, _ENTRIES, mapping.expected_shapes(cfg), cfg.n_layers,
                            ignored=("h.{i}.attn.bias", "h.{i}.attn.masked_bias"))


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a GPT-2 `ModelConfig` (what `transformers.GPT2Config` reads).

    Example:
        >>> cfg = config_from_hf({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
        ...                       "vocab_size": 10, "n_positions": 8})
        >>> config_from_hf(config_to_hf(cfg)) == cfg
        True
    """
    a = cfg.attention
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": a.n_heads, "n_positions": cfg.max_positions,
            "n_inner": cfg.d_ff, "activation_function": cfg.activation, "layer_norm_epsilon": cfg.norm.eps,
            "scale_attn_weights": a.scale is None, "scale_attn_by_inverse_layer_idx": a.scale_by_inverse_layer,
            "tie_word_embeddings": cfg.head.tied, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}


def weights_to_hf(cfg: ModelConfig, weights: dict) -> dict:
    """HF-named lazy tensors of GPT-2 weights (`GPT2LMHeadModel` names, q/k/v fused into `c_attn`).

    Example:
        >>> # weights_to_hf(cfg, params.weights)["transformer.h.0.attn.c_attn.weight"].shape == (D, 3 * D)
    """
    tensors = mapping.disassemble(weights, _ENTRIES, cfg.n_layers)
    for i in range(cfg.n_layers):
        for kind, axis in (("weight", 1), ("bias", 0)):  # Conv1D (D, 3D): q, k, v along the last axis
            mapping.fuse(tensors, f"h.{i}.attn.c_attn.{kind}", [f"h.{i}.attn.{p}.{kind}" for p in "qkv"], axis)
    return {name if name.startswith("lm_head.") else "transformer." + name: t for name, t in tensors.items()}
