"""Static model configuration: one frozen, hashable dataclass for every family.

`ModelConfig` is hashable so it can be static under `jax.jit`; `from_hf_config` builds
it from a Hugging Face `config.json` dict and names the field when something is not
supported.

Example:
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
    ...                       "n_head": 4, "vocab_size": 100, "n_positions": 32})
    >>> cfg.family, cfg.head_dim, cfg.d_ff
    ('gpt2', 16, 256)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from makemost_jax.errors import ConfigError

FAMILIES = ("gpt2", "llama", "bert")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters shared by all families.

    Dimension letters used across `models/`: B batch, T query length, S cache slots,
    L layers, D model width, H query heads, G key/value heads, K head width,
    F feed-forward width, V vocabulary.
    """

    family: str  # "gpt2" | "llama" | "bert"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_positions: int  # the context the model was trained with
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    pre_norm: bool = True  # False: BERT's post-LN blocks
    causal: bool = True
    activation: str = "gelu_new"  # "gelu_new" | "gelu" | "silu" | "relu"
    gated_mlp: bool = False  # SwiGLU-style gate projection
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    rope_theta: float | None = None  # None: learned absolute positions
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_embeddings: bool = True
    has_lm_head: bool = True
    type_vocab_size: int = 0  # BERT token types
    position_offset: int = 0  # RoBERTa starts positions at padding_idx + 1
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    hf_model_type: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"family={self.family!r} is not one of {FAMILIES}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @property
    def is_decoder(self) -> bool:
        return self.causal

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _require(hf: Mapping[str, Any], *names: str):
    for name in names:
        if name in hf and hf[name] is not None:
            return hf[name]
    raise ConfigError(f"config.json lacks {' / '.join(names)}; it is required for {hf.get('model_type')}")


def _gpt2(hf: Mapping[str, Any]) -> ModelConfig:
    d_model = _require(hf, "n_embd", "hidden_size")
    n_heads = _require(hf, "n_head", "num_attention_heads")
    act = hf.get("activation_function", "gelu_new")
    return ModelConfig(
        family="gpt2",
        vocab_size=_require(hf, "vocab_size"),
        d_model=d_model,
        n_layers=_require(hf, "n_layer", "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        d_ff=hf.get("n_inner") or 4 * d_model,
        max_positions=_require(hf, "n_positions", "n_ctx"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation={"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu",
                    "relu": "relu", "silu": "silu", "swish": "silu"}.get(act, act),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        scale_attn_weights=hf.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        hf_model_type="gpt2",
    )


def _rope_scaling(hf: Mapping[str, Any]):
    scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or None)
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported (supported: linear, llama3); "
            "remove it from config.json or use a model without it"
        )
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    items = {k: v for k, v in scaling.items() if k in keep}
    items["rope_type"] = kind
    return tuple(sorted(items.items()))


def _llama(hf: Mapping[str, Any]) -> ModelConfig:
    d_model = _require(hf, "hidden_size")
    n_heads = _require(hf, "num_attention_heads")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish", "gelu", "relu"):
        raise ConfigError(f"hidden_act={act!r} is not supported for llama models")
    rope = hf.get("rope_theta")
    if rope is None:
        rope = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="llama",
        vocab_size=_require(hf, "vocab_size"),
        d_model=d_model,
        n_layers=_require(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        d_ff=_require(hf, "intermediate_size"),
        max_positions=_require(hf, "max_position_embeddings"),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="silu" if act == "swish" else act,
        gated_mlp=True,
        qkv_bias=attention_bias,
        out_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        rope_theta=float(rope),
        rope_scaling=_rope_scaling(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        hf_model_type=hf.get("model_type", "llama"),
    )


def _bert(hf: Mapping[str, Any]) -> ModelConfig:
    d_model = _require(hf, "hidden_size")
    n_heads = _require(hf, "num_attention_heads")
    model_type = hf.get("model_type", "bert")
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ConfigError(f"position_embedding_type={pos_type!r} is not supported (only 'absolute')")
    act = hf.get("hidden_act", "gelu")
    pad = hf.get("pad_token_id", 0 if model_type == "bert" else 1)
    return ModelConfig(
        family="bert",
        vocab_size=_require(hf, "vocab_size"),
        d_model=d_model,
        n_layers=_require(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        d_ff=_require(hf, "intermediate_size"),
        max_positions=_require(hf, "max_position_embeddings"),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        pre_norm=False,
        causal=False,
        activation={"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu",
                    "gelu_pytorch_tanh": "gelu_new"}.get(act, act),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        type_vocab_size=hf.get("type_vocab_size", 2),
        position_offset=pad + 1 if model_type == "roberta" else 0,
        pad_token_id=pad,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        hf_model_type=model_type,
    )


_CONVERTERS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "roberta": _bert}


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from a Hugging Face config dict.

    Example:
        >>> from_hf_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        ...   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        ...   "vocab_size": 50, "max_position_embeddings": 64}).n_kv_heads
        2
    """
    model_type = hf.get("model_type")
    if model_type not in _CONVERTERS:
        raise ConfigError(
            f"model_type={model_type!r} is not supported; supported: {sorted(_CONVERTERS)}"
        )
    return _CONVERTERS[model_type](hf)
