"""OPT: learned positions offset by 2, ReLU MLP, pre- or post-LayerNorm blocks, and optional
projections between a narrower embedding and the model width (`word_embed_proj_dim`).

`do_layer_norm_before=False` (OPT-350m) gives post-LN blocks and no final norm, as does
`_remove_final_layer_norm`. Checkpoints with or without the `model.` prefix load.

Example:
    >>> cfg = config_from_hf({"model_type": "opt", "hidden_size": 32, "num_hidden_layers": 2,
    ...   "num_attention_heads": 4, "ffn_dim": 64, "vocab_size": 50, "max_position_embeddings": 64,
    ...   "word_embed_proj_dim": 16})
    >>> cfg.embed.position_offset, cfg.embed.project_dim, cfg.norm.placement
    (2, 16, 'pre')
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
    refuse,
    require,
)


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF OPT config.

    Example:
        >>> # config_from_hf(json.load(open("opt-125m/config.json"))).mlp.activation
    """
    d = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    refuse(hf, "layer_norm_elementwise_affine", (True,), "OPT checkpoints without LayerNorm weights are not supported")
    before = bool(hf.get("do_layer_norm_before", True))
    projected = hf.get("word_embed_proj_dim") or d
    bias = bool(hf.get("enable_bias", True))
    return ModelConfig(
        family="opt", hf_model_type="opt", vocab_size=require(hf, "vocab_size"), d_model=d,
        n_layers=require(hf, "num_hidden_layers"), max_positions=require(hf, "max_position_embeddings"),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=heads, head_dim=d // heads, qkv_bias=bias, out_bias=bias),
        mlp=MlpConfig(d_ff=require(hf, "ffn_dim"), bias=bias,
                      activation=activation_name(hf, "activation_function", default="relu")),
        norm=NormConfig(kind="layernorm", eps=1e-5, placement="pre" if before else "post"),
        embed=EmbedConfig(positions="learned", position_offset=2, project_dim=projected if projected != d else None),
        head=HeadConfig(tied=bool(hf.get("tie_word_embeddings", True)),
                        final_norm=before and not hf.get("_remove_final_layer_norm", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"))


_LAYER = "decoder.layers.{i}."
_ENTRIES = [
    ("embed/tokens", "decoder.embed_tokens.weight", False),
    ("embed/positions", "decoder.embed_positions.weight", False),
    ("embed/project_in/kernel", "decoder.project_in.weight", True),
    ("project_out/kernel", "decoder.project_out.weight", True),
    ("final_norm/scale", "decoder.final_layer_norm.weight", False),
    ("final_norm/bias", "decoder.final_layer_norm.bias", False),
    ("lm_head/kernel", "lm_head.weight", True),
    ("layers/attn_norm/scale", _LAYER + "self_attn_layer_norm.weight", False),
    ("layers/attn_norm/bias", _LAYER + "self_attn_layer_norm.bias", False),
    ("layers/mlp_norm/scale", _LAYER + "final_layer_norm.weight", False),
    ("layers/mlp_norm/bias", _LAYER + "final_layer_norm.bias", False),
    ("layers/mlp/up/kernel", _LAYER + "fc1.weight", True),
    ("layers/mlp/up/bias", _LAYER + "fc1.bias", False),
    ("layers/mlp/down/kernel", _LAYER + "fc2.weight", True),
    ("layers/mlp/down/bias", _LAYER + "fc2.bias", False),
] + [(f"layers/attn/{p}/{kind}", f"{_LAYER}self_attn.{name}_proj.{hf_kind}", kind == "kernel")
     for p, name in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))
     for kind, hf_kind in (("kernel", "weight"), ("bias", "bias"))]


def weights_from_hf(cfg: ModelConfig, tensors: dict) -> dict:
    """Map a Hugging Face OPT state dict (`model.decoder.*` or `decoder.*`).

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint("opt-125m")[1])
    """
    # Entries take the file's own prefix, so an error names the tensor as the file spells it.
    prefix = "model." if any(k.startswith("model.decoder.") for k in tensors) else ""
    entries = [(path, name if name.startswith("lm_head.") else prefix + name, transpose)
               for path, name, transpose in _ENTRIES]
    tensors = dict(tensors)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return mapping.assemble(tensors, entries, mapping.expected_shapes(cfg), cfg.n_layers)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of an OPT `ModelConfig` (what `transformers.OPTConfig` reads).

    Example:
        >>> cfg = config_from_hf({"model_type": "opt", "hidden_size": 8, "num_hidden_layers": 1,
        ...   "num_attention_heads": 2, "ffn_dim": 16, "vocab_size": 10, "max_position_embeddings": 8,
        ...   "word_embed_proj_dim": 4})
        >>> config_from_hf(config_to_hf(cfg)) == cfg
        True
    """
    before = cfg.norm.placement == "pre"
    return {"model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "ffn_dim": cfg.d_ff, "max_position_embeddings": cfg.max_positions, "activation_function": cfg.activation,
            "do_layer_norm_before": before, "_remove_final_layer_norm": before and not cfg.head.final_norm,
            "word_embed_proj_dim": cfg.embed.project_dim or cfg.d_model, "enable_bias": cfg.attention.qkv_bias,
            "layer_norm_elementwise_affine": True, "tie_word_embeddings": cfg.head.tied,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}


def weights_to_hf(cfg: ModelConfig, weights: dict) -> dict:
    """HF-named lazy tensors of OPT weights (`OPTForCausalLM` names: `model.decoder.*`).

    The learned positions keep their 2 offset rows: the table is saved as it was loaded.

    Example:
        >>> # weights_to_hf(cfg, params.weights)["model.decoder.embed_positions.weight"].shape == (P + 2, D)
    """
    return {name if name.startswith("lm_head.") else "model." + name: t
            for name, t in mapping.disassemble(weights, _ENTRIES, cfg.n_layers).items()}
