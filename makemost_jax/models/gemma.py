"""Gemma 1, 2 and 3 (text): the Llama layout with Gemma's changes.

All three: token embeddings scaled by sqrt(D), RMSNorm computing `x * (1 + w)` (the 1 is
added to the weights when loading, so the shared norm applies), GeGLU MLP, explicit
`head_dim`, tied head. Gemma 2 adds attention-score and final-logit soft-capping,
`query_pre_attn_scalar` as the score scale, a norm before *and* after each sub-layer
(sandwich), and sliding/full layers alternating (even layers slide). Gemma 3 adds per-head
q/k norms, five sliding layers to one full layer, and separate rotary settings for local
(`sliding_attention`) and global (`full_attention`) layers; it ignores attention
soft-capping, as transformers does.

Example:
    >>> cfg = config_from_hf({"model_type": "gemma2", "hidden_size": 32, "num_hidden_layers": 4,
    ...   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "head_dim": 8,
    ...   "vocab_size": 50, "max_position_embeddings": 64, "sliding_window": 16})
    >>> cfg.sliding_layers, cfg.norm.placement, cfg.attention.softcap
    ((0, 2), 'sandwich', 50.0)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from makemost_jax.checkpoints.lazy import Mapped, as_lazy
from makemost_jax.models import llama
from makemost_jax.models.config import (
    EmbedConfig,
    HeadConfig,
    LayerKind,
    ModelConfig,
    activation_name,
    refuse,
    require,
    rotary_config,
)

_DEFAULTS = {"gemma": dict(head_dim=256, tie_word_embeddings=True),
             "gemma2": dict(head_dim=256, tie_word_embeddings=True, query_pre_attn_scalar=256,
                            sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
             "gemma3_text": dict(head_dim=256, tie_word_embeddings=True, query_pre_attn_scalar=256,
                                 sliding_window=4096)}


def _layer_types(hf, model_type: str) -> list[str]:
    n = require(hf, "num_hidden_layers")
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    if model_type == "gemma2":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    period = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF Gemma, Gemma 2 or Gemma 3 (text) config.

    Example:
        >>> # config_from_hf(json.load(open("gemma-3-1b-it/config.json"))).sliding_layers
    """
    model_type = hf.get("model_type")
    hf = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    refuse(hf, "use_bidirectional_attention", (False,), "only the causal Gemma decoders load here")
    cfg = llama.decoder_config(hf, "gemma")
    d = cfg.d_model
    if model_type == "gemma":
        act = "gelu_new" if hf.get("hidden_act", "gelu") == "gelu" else activation_name(hf, "hidden_act",
                                                                                         default="gelu_new")
        return cfg.replace(mlp=dataclasses.replace(cfg.mlp, activation=act), embed=EmbedConfig(scale=math.sqrt(d)),
                           head=HeadConfig(tied=bool(hf["tie_word_embeddings"])))
    types = _layer_types(hf, model_type)
    if len(types) != cfg.n_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise llama.ConfigError(f"{model_type}: layer_types={types!r} must name sliding_attention or "
                                f"full_attention for each of the {cfg.n_layers} layers")
    window = hf["sliding_window"]
    if model_type == "gemma2":
        rotaries = {t: cfg.rotary for t in types}
    else:  # Gemma 3: local layers have their own base (rope_local_base_freq in older configs)
        local = {**hf, "rope_theta": hf.get("rope_local_base_freq", 10000.0), "rope_scaling": None}
        rotaries = {"full_attention": rotary_config({"rope_theta": 1e6, **hf}, cfg.head_dim,
                                                    layer_type="full_attention"),
                    "sliding_attention": rotary_config(local, cfg.head_dim, layer_type="sliding_attention")}
    layers = tuple(LayerKind(window=window if t == "sliding_attention" else None, rotary=rotaries[t]) for t in types)
    attention = dataclasses.replace(cfg.attention, scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
                                    softcap=hf.get("attn_logit_softcapping") if model_type == "gemma2" else None,
                                    qk_norm=model_type == "gemma3_text")
    return cfg.replace(
        hf_model_type=model_type, attention=attention, layers=layers,
        mlp=dataclasses.replace(cfg.mlp, activation=activation_name(hf, "hidden_activation", default="gelu_new")),
        norm=dataclasses.replace(cfg.norm, placement="sandwich"), embed=EmbedConfig(scale=math.sqrt(d)),
        head=HeadConfig(tied=bool(hf["tie_word_embeddings"]), softcap=hf.get("final_logit_softcapping")))


_LAYER = "model.layers.{i}."
# Gemma 2/3 norm names -> the shared block's: `post_attention_layernorm` normalises the
# attention output there, while in Gemma 1 (and Llama) it is the MLP's input norm.
_SANDWICH = [
    ("layers/post_attn_norm/scale", _LAYER + "post_attention_layernorm.weight", False),
    ("layers/mlp_norm/scale", _LAYER + "pre_feedforward_layernorm.weight", False),
    ("layers/post_mlp_norm/scale", _LAYER + "post_feedforward_layernorm.weight", False),
]
_SANDWICH_ENTRIES = [e for e in llama.ENTRIES if e[0] != "layers/mlp_norm/scale"] + _SANDWICH


def _plus_one(w: np.ndarray) -> np.ndarray:
    return w.astype(np.float32) + np.float32(1.0)


def weights_from_hf(cfg: ModelConfig, tensors: dict) -> dict:
    """Map a Hugging Face Gemma state dict; every norm weight w becomes 1 + w (in float32).

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint("gemma-2-2b")[1])
    """
    tensors = {k: (Mapped(as_lazy(v), _plus_one, np.float32) if "norm" in k else v) for k, v in tensors.items()}
    entries = _SANDWICH_ENTRIES if cfg.norm.placement == "sandwich" else llama.ENTRIES
    return llama.weights_from_hf(cfg, tensors, entries)


_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def _pre_attn_scalar(scale: float) -> float | int:
    """The `query_pre_attn_scalar` whose inverse square root is `scale` (an integer when one is exact)."""
    whole = round(scale ** -2)
    return whole if float(whole) ** -0.5 == scale else scale ** -2


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a Gemma, Gemma 2 or Gemma 3 (text) `ModelConfig`.

    Example:
        >>> cfg = config_from_hf({"model_type": "gemma2", "hidden_size": 8, "num_hidden_layers": 2,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "head_dim": 4, "vocab_size": 10,
        ...   "max_position_embeddings": 8, "query_pre_attn_scalar": 20, "sliding_window": 4})
        >>> hf = config_to_hf(cfg); hf["query_pre_attn_scalar"], hf["layer_types"]
        (20, ['sliding_attention', 'full_attention'])
        >>> config_from_hf(hf) == cfg
        True
    """
    model_type = cfg.hf_model_type
    hf = llama.decoder_config_to_hf(cfg, _ARCHITECTURES[model_type])
    activation = "gelu_pytorch_tanh" if cfg.activation == "gelu_new" else cfg.activation
    if model_type == "gemma":
        return {**hf, "hidden_act": activation}
    del hf["hidden_act"]
    types = ["full_attention" if k.window is None else "sliding_attention" for k in cfg.layers]
    hf.update(hidden_activation=activation, layer_types=types, query_pre_attn_scalar=_pre_attn_scalar(
                  cfg.attention.scale), sliding_window=max((k.window for k in cfg.layers if k.window), default=None),
              final_logit_softcapping=cfg.head.softcap)
    if model_type == "gemma2":
        hf["attn_logit_softcapping"] = cfg.attention.softcap
    else:  # Gemma 3: local and global layers have rotary settings of their own
        hf["rope_parameters"] = {t: llama.rope_to_hf(k.rotary) for t, k in zip(types, cfg.layers)}
    return hf


def _minus_one(w: np.ndarray) -> np.ndarray:
    return w.astype(np.float32) - np.float32(1.0)


def weights_to_hf(cfg: ModelConfig, weights: dict) -> dict:
    """HF-named lazy tensors of Gemma weights; every norm weight 1 + w is written as w again.

    Computed in float32 and rounded to the weights' dtype: exact in float32; in bfloat16 a
    norm weight below 0.5 (HF value below -0.5) may lose its last bits.

    Example:
        >>> # weights_to_hf(cfg, params.weights)["model.norm.weight"]
    """
    entries = _SANDWICH_ENTRIES if cfg.norm.placement == "sandwich" else llama.ENTRIES
    return {k: (Mapped(t, _minus_one, t.dtype) if "norm" in k else t)
            for k, t in llama.weights_to_hf(cfg, weights, entries).items()}
