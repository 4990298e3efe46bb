"""Phi-3 (and Phi-3.5 / Phi-4-mini): the Llama layout with fused projections, partial rotary
and LongRoPE.

`qkv_proj` stacks the q, k and v rows and `gate_up_proj` the gate and up rows; they are
split on load. `partial_rotary_factor` rotates the first part of each head. Rotary
scaling is `longrope` (old configs say `su` or `yarn` for it) with the top-level
`original_max_position_embeddings`; `sliding_window`, when set, applies to every layer.

Example:
    >>> cfg = config_from_hf({"model_type": "phi3", "hidden_size": 32, "num_hidden_layers": 2,
    ...   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
    ...   "vocab_size": 50, "max_position_embeddings": 64, "partial_rotary_factor": 0.5})
    >>> cfg.rotary.fraction
    0.5
"""

from __future__ import annotations


from makemost_jax.models import llama, mapping
from makemost_jax.models.config import ModelConfig, require, rope_parameters


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF Phi-3 config.

    Example:
        >>> # config_from_hf(json.load(open("Phi-3-mini-128k-instruct/config.json"))).rotary.kind
    """
    rope = rope_parameters(hf)
    if rope.get("rope_type") == "yarn":  # Phi-3's configs name LongRoPE "yarn" too
        rope["rope_type"] = "longrope"
    if hf.get("original_max_position_embeddings") and rope.get("rope_type", "default") != "default":
        rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    if hf.get("partial_rotary_factor") is not None:
        rope.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    hf = {**hf, "rope_parameters": rope, "rope_scaling": None, "attention_bias": False}
    window = hf.get("sliding_window")
    return llama.decoder_config(hf, "phi3", windows=[window] * require(hf, "num_hidden_layers"))


def weights_from_hf(cfg: ModelConfig, tensors: dict) -> dict:
    """Map a Hugging Face Phi-3 state dict, splitting the fused projections.

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint("Phi-3-mini-4k-instruct")[1])
    """
    tensors = dict(tensors)
    q, kv, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    for i in range(cfg.n_layers):
        layer = f"model.layers.{i}."
        mapping.split_rows(tensors, layer + "self_attn.qkv_proj.weight",
                           {layer + f"self_attn.{p}_proj.weight": n for p, n in (("q", q), ("k", kv), ("v", kv))})
        mapping.split_rows(tensors, layer + "mlp.gate_up_proj.weight",
                           {layer + "mlp.gate_proj.weight": f, layer + "mlp.up_proj.weight": f})
    return llama.weights_from_hf(cfg, tensors)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a Phi-3 `ModelConfig` (what `transformers.Phi3Config` reads).

    Example:
        >>> cfg = config_from_hf({"model_type": "phi3", "hidden_size": 8, "num_hidden_layers": 1,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 8,
        ...   "partial_rotary_factor": 0.5})
        >>> config_from_hf(config_to_hf(cfg)) == cfg
        True
    """
    hf = llama.decoder_config_to_hf(cfg, "Phi3ForCausalLM")
    rope = hf["rope_parameters"]
    hf.update(sliding_window=cfg.uniform_window, partial_rotary_factor=cfg.rotary.fraction)
    if "original_max_position_embeddings" in rope:  # Phi-3 keeps it at the top level too (and reads it first)
        hf["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    return hf


def weights_to_hf(cfg: ModelConfig, weights: dict) -> dict:
    """HF-named lazy tensors of Phi-3 weights, q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj`.

    Example:
        >>> # weights_to_hf(cfg, params.weights)["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * F, D)
    """
    tensors = llama.weights_to_hf(cfg, weights)
    for i in range(cfg.n_layers):
        layer = f"model.layers.{i}."
        mapping.fuse(tensors, layer + "self_attn.qkv_proj.weight", [layer + f"self_attn.{p}_proj.weight" for p in "qkv"],
                     axis=0)
        mapping.fuse(tensors, layer + "mlp.gate_up_proj.weight", [layer + "mlp.gate_proj.weight",
                                                                  layer + "mlp.up_proj.weight"], axis=0)
    return tensors
