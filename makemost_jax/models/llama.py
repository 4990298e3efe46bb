"""Llama-family decoders (Llama 1-3, SmolLM2, any HF `LlamaForCausalLM` config).

Rotary positions (rotate-half convention, `rope_theta`, every rotary scaling type),
grouped-query attention, pre-RMSNorm blocks, SwiGLU MLP, tied or untied head. HF
`nn.Linear` weights are (out, in) and are transposed on load. Mistral, Qwen2 and Qwen3
share this layout and build on `decoder_config` and `weights_from_hf` here.

Example:
    >>> cfg = config_from_hf({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
    ...   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
    ...   "vocab_size": 50, "max_position_embeddings": 64})
    >>> cfg.attention.n_kv_heads, cfg.rotary.theta
    (2, 10000.0)
"""

from __future__ import annotations


from makemost_jax.errors import ConfigError
from makemost_jax.models import mapping
from makemost_jax.models.config import (
    AttentionConfig,
    HeadConfig,
    LayerKind,
    MlpConfig,
    ModelConfig,
    NormConfig,
    activation_name,
    refuse,
    require,
    rotary_config,
)


def decoder_config(hf, family: str, *, qkv_bias: bool | None = None, out_bias: bool | None = None,
                   qk_norm: bool = False, windows=None, **parts) -> ModelConfig:
    """The `ModelConfig` of a Llama-layout decoder; `windows` gives each layer's sliding window.

    Families that differ further replace parts of the result (`dataclasses.replace`).

    Example:
        >>> # decoder_config(hf, "mistral", windows=[4096] * 32)
    """
    d = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or d // heads
    n_layers = require(hf, "num_hidden_layers")
    bias = bool(hf.get("attention_bias", False))
    refuse(hf, "pretraining_tp", (1, None), "set pretraining_tp to 1 (it only changes how matmuls are split)")
    rotary = rotary_config(hf, head_dim)
    windows = windows or [None] * n_layers
    return ModelConfig(
        family=family, hf_model_type=hf.get("model_type", family), vocab_size=require(hf, "vocab_size"),
        d_model=d, n_layers=n_layers, max_positions=require(hf, "max_position_embeddings"),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                                  head_dim=head_dim, qkv_bias=bias if qkv_bias is None else qkv_bias,
                                  out_bias=bias if out_bias is None else out_bias, qk_norm=qk_norm),
        mlp=MlpConfig(d_ff=require(hf, "intermediate_size"), gated=True, bias=bool(hf.get("mlp_bias", False)),
                      activation=activation_name(hf, "hidden_act", default="silu")),
        norm=NormConfig(kind="rmsnorm", eps=hf.get("rms_norm_eps", 1e-6)),
        head=HeadConfig(tied=bool(hf.get("tie_word_embeddings", False))),
        layers=tuple(LayerKind(window=w, rotary=rotary) for w in windows),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"), **parts)


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF Llama config.

    Example:
        >>> config_from_hf({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10,
        ...   "max_position_embeddings": 8}).norm.kind
        'rmsnorm'
    """
    return decoder_config(hf, "llama")


def layer_windows(hf) -> list:
    """Each layer's sliding window from `layer_types` (or, without it, Qwen2's rule: the layers
    from `max_window_layers` on slide when `use_sliding_window`).

    Example:
        >>> layer_windows({"num_hidden_layers": 3, "sliding_window": 4, "use_sliding_window": True,
        ...                "max_window_layers": 1})
        [None, 4, 4]
    """
    n = require(hf, "num_hidden_layers")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", 0)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ConfigError(f"{hf.get('model_type')}: layer_types={types!r} must list 'sliding_attention' or "
                          f"'full_attention' for each of the {n} layers")
    if "sliding_attention" in types and not window:
        raise ConfigError(f"{hf.get('model_type')}: layer_types has sliding layers but sliding_window="
                          f"{hf.get('sliding_window')!r}; set a window or make every layer full_attention")
    return [window if t == "sliding_attention" else None for t in types]


_LAYER = "model.layers.{i}."
ENTRIES = [
    ("embed/tokens", "model.embed_tokens.weight", False),
    ("final_norm/scale", "model.norm.weight", False),
    ("lm_head/kernel", "lm_head.weight", True),
    ("layers/attn_norm/scale", _LAYER + "input_layernorm.weight", False),
    ("layers/mlp_norm/scale", _LAYER + "post_attention_layernorm.weight", False),
    ("layers/attn/q_norm/scale", _LAYER + "self_attn.q_norm.weight", False),
    ("layers/attn/k_norm/scale", _LAYER + "self_attn.k_norm.weight", False),
] + [(f"layers/attn/{p}/kernel", f"{_LAYER}self_attn.{p}_proj.weight", True) for p in "qkvo"] \
  + [(f"layers/attn/{p}/bias", f"{_LAYER}self_attn.{p}_proj.bias", False) for p in "qkvo"] \
  + [(f"layers/mlp/{p}/kernel", f"{_LAYER}mlp.{p}_proj.weight", True) for p in ("up", "gate", "down")] \
  + [(f"layers/mlp/{p}/bias", f"{_LAYER}mlp.{p}_proj.bias", False) for p in ("up", "gate", "down")]


def weights_from_hf(cfg: ModelConfig, tensors: dict, entries=ENTRIES) -> dict:
    """Map a Hugging Face Llama-layout state dict; a tied head's stored copy is dropped.

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint("SmolLM2-135M")[1])
    """
    tensors = dict(tensors)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return mapping.assemble(tensors, entries, mapping.expected_shapes(cfg), cfg.n_layers,
                            ignored=("model.layers.{i}.self_attn.rotary_emb.inv_freq",))




def rope_to_hf(rotary) -> dict:
    """The transformers `rope_parameters` dict that `rotary_config` reads back to `rotary`.

    Example:
        >>> rope_to_hf(rotary_config({"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, 8))
        {'rope_type': 'linear', 'rope_theta': 500000.0, 'factor': 2.0}
    """
    params = {"rope_type": rotary.kind, "rope_theta": rotary.theta}
    params.update({k: list(v) if isinstance(v, tuple) else v for k, v in rotary.scaling
                   if v is not None and k != "rope_type"})
    if rotary.fraction != 1.0:
        params["partial_rotary_factor"] = rotary.fraction
    return params


def decoder_config_to_hf(cfg: ModelConfig, architecture: str) -> dict:
    """The `config.json` keys every Llama-layout decoder shares (the inverse of `decoder_config`).

    Example:
        >>> cfg = config_from_hf({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 8})
        >>> decoder_config_to_hf(cfg, "LlamaForCausalLM")["rope_parameters"]
        {'rope_type': 'default', 'rope_theta': 10000.0}
    """
    a = cfg.attention
    return {"model_type": cfg.hf_model_type, "architectures": [architecture], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim, "intermediate_size": cfg.d_ff,
            "max_position_embeddings": cfg.max_positions, "hidden_act": cfg.activation, "mlp_bias": cfg.mlp.bias,
            "attention_bias": a.qkv_bias, "rms_norm_eps": cfg.norm.eps, "tie_word_embeddings": cfg.head.tied,
            "rope_parameters": rope_to_hf(cfg.rotary), "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}


def layer_windows_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` keys `layer_windows` reads back to `cfg`'s per-layer sliding windows.

    Example:
        >>> # layer_windows_to_hf(qwen2_cfg)["layer_types"] == ["full_attention", "sliding_attention", ...]
    """
    sliding = cfg.sliding_layers
    return {"use_sliding_window": bool(sliding),
            "sliding_window": max((cfg.layers[i].window for i in sliding), default=None),
            "max_window_layers": sliding[0] if sliding else cfg.n_layers,
            "layer_types": ["full_attention" if k.window is None else "sliding_attention" for k in cfg.layers]}


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a Llama `ModelConfig` (what `transformers.LlamaConfig` reads).

    Example:
        >>> cfg = config_from_hf({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 8})
        >>> config_from_hf(config_to_hf(cfg)) == cfg
        True
    """
    return decoder_config_to_hf(cfg, "LlamaForCausalLM")


def weights_to_hf(cfg: ModelConfig, weights: dict, entries=ENTRIES) -> dict:
    """HF-named lazy tensors of Llama-layout weights (a tied head is not written).

    Example:
        >>> # tensors = weights_to_hf(params.config, params.weights); tensors["lm_head.weight"].shape == (V, D)
    """
    return mapping.disassemble(weights, entries, cfg.n_layers)
