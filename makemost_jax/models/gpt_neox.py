"""GPT-NeoX (Pythia): LayerNorm blocks with parallel or sequential residuals, partial rotary,
and a query/key/value projection fused per head.

`query_key_value` rows are grouped by head, [q_h; k_h; v_h] for each head h, and are
split on load. `rotary_pct` (default 0.25) of each head is rotated with base
`rotary_emb_base`; `use_parallel_residual` makes attention and MLP read the same input.
The untied head is stored as `embed_out`.

Example:
    >>> cfg = config_from_hf({"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2,
    ...   "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 50, "max_position_embeddings": 64})
    >>> cfg.norm.parallel, cfg.rotary.fraction
    (True, 0.25)
"""

from __future__ import annotations

import numpy as np

from makemost_jax.checkpoints.lazy import Taken, as_lazy
from makemost_jax.models import mapping
from makemost_jax.models.config import (
    AttentionConfig,
    HeadConfig,
    LayerKind,
    MlpConfig,
    ModelConfig,
    NormConfig,
    activation_name,
    require,
    rotary_config,
)
from makemost_jax.models.llama import rope_to_hf


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF GPT-NeoX config (old `rotary_pct` / `rotary_emb_base` keys too).

    Example:
        >>> # config_from_hf(json.load(open("pythia-160m/config.json"))).rotary.fraction
    """
    d = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    legacy = {"rope_theta": hf.get("rotary_emb_base", 10000.0)}
    rotary = rotary_config({**legacy, **hf}, d // heads, fraction=hf.get("rotary_pct", 0.25))
    bias = bool(hf.get("attention_bias", True))
    return ModelConfig(
        family="gpt_neox", hf_model_type="gpt_neox", vocab_size=require(hf, "vocab_size"), d_model=d,
        n_layers=require(hf, "num_hidden_layers"), max_positions=require(hf, "max_position_embeddings"),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=heads, head_dim=d // heads, qkv_bias=bias, out_bias=bias),
        mlp=MlpConfig(d_ff=require(hf, "intermediate_size"), activation=activation_name(hf, "hidden_act",
                                                                                       default="gelu")),
        norm=NormConfig(kind="layernorm", eps=hf.get("layer_norm_eps", 1e-5),
                        parallel=bool(hf.get("use_parallel_residual", True))),
        head=HeadConfig(tied=bool(hf.get("tie_word_embeddings", False))),
        layers=(LayerKind(rotary=rotary),) * require(hf, "num_hidden_layers"),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"))


_LAYER = "gpt_neox.layers.{i}."
_ENTRIES = [
    ("embed/tokens", "gpt_neox.embed_in.weight", False),
    ("final_norm/scale", "gpt_neox.final_layer_norm.weight", False),
    ("final_norm/bias", "gpt_neox.final_layer_norm.bias", False),
    ("lm_head/kernel", "embed_out.weight", True),
    ("layers/attn_norm/scale", _LAYER + "input_layernorm.weight", False),
    ("layers/attn_norm/bias", _LAYER + "input_layernorm.bias", False),
    ("layers/mlp_norm/scale", _LAYER + "post_attention_layernorm.weight", False),
    ("layers/mlp_norm/bias", _LAYER + "post_attention_layernorm.bias", False),
    ("layers/attn/o/kernel", _LAYER + "attention.dense.weight", True),
    ("layers/attn/o/bias", _LAYER + "attention.dense.bias", False),
    ("layers/mlp/up/kernel", _LAYER + "mlp.dense_h_to_4h.weight", True),
    ("layers/mlp/up/bias", _LAYER + "mlp.dense_h_to_4h.bias", False),
    ("layers/mlp/down/kernel", _LAYER + "mlp.dense_4h_to_h.weight", True),
    ("layers/mlp/down/bias", _LAYER + "mlp.dense_4h_to_h.bias", False),
] + [(f"layers/attn/{p}/{kind}", f"{_LAYER}attention.{p}.{hf_kind}", kind == "kernel")
     for p in "qkv" for kind, hf_kind in (("kernel", "weight"), ("bias", "bias"))]


def weights_from_hf(cfg: ModelConfig, tensors: dict) -> dict:
    """Map a Hugging Face GPT-NeoX state dict, splitting the per-head fused q/k/v.

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint("pythia-70m")[1])
    """
    tensors = dict(tensors)
    if "lm_head.weight" in tensors:  # the in-memory name of embed_out
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
    if cfg.tie_embeddings:
        tensors.pop("embed_out.weight", None)
    h, k = cfg.n_heads, cfg.head_dim
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            name = f"gpt_neox.layers.{i}.attention.query_key_value.{kind}"
            if name in tensors:
                fused = as_lazy(tensors.pop(name))
                if fused.shape[0] != 3 * h * k:
                    raise mapping.CheckpointError(f"tensor {name!r} has {fused.shape[0]} rows, but the config "
                                                  f"implies {3 * h * k}; the checkpoint and config.json do not match")
                rows_H3K = np.arange(3 * h * k).reshape(h, 3, k)  # per head: its q rows, k rows, v rows
                for j, p in enumerate("qkv"):
                    tensors[f"gpt_neox.layers.{i}.attention.{p}.{kind}"] = Taken(fused, 0, rows_H3K[:, j].reshape(-1))
    return mapping.assemble(tensors, _ENTRIES, mapping.expected_shapes(cfg), cfg.n_layers,
                            ignored=("gpt_neox.layers.{i}.attention.bias", "gpt_neox.layers.{i}.attention.masked_bias",
                                     "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"))


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a GPT-NeoX `ModelConfig` (what `transformers.GPTNeoXConfig` reads).

    Example:
        >>> cfg = config_from_hf({"model_type": "gpt_neox", "hidden_size": 8, "num_hidden_layers": 1,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 8})
        >>> config_from_hf(config_to_hf(cfg)) == cfg
        True
    """
    a = cfg.attention
    rope = {**rope_to_hf(cfg.rotary), "partial_rotary_factor": cfg.rotary.fraction}  # the default is not 1 here
    return {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": a.n_heads,
            "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_positions,
            "hidden_act": cfg.activation, "layer_norm_eps": cfg.norm.eps, "use_parallel_residual": cfg.norm.parallel,
            "attention_bias": a.qkv_bias, "tie_word_embeddings": cfg.head.tied, "rope_parameters": rope,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}


def weights_to_hf(cfg: ModelConfig, weights: dict) -> dict:
    """HF-named lazy tensors of GPT-NeoX weights, q/k/v fused per head into `query_key_value`.

    Example:
        >>> # weights_to_hf(cfg, params.weights)["gpt_neox.layers.0.attention.query_key_value.weight"]
    """
    tensors = mapping.disassemble(weights, _ENTRIES, cfg.n_layers)
    # Fused row j is [q; k; v]'s row rows[j]: per head h, its q rows, then its k rows, then its v rows.
    rows = np.arange(3 * cfg.n_heads * cfg.head_dim).reshape(3, cfg.n_heads, cfg.head_dim).swapaxes(0, 1).reshape(-1)
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            prefix = f"gpt_neox.layers.{i}.attention."
            fused = f"{prefix}query_key_value.{kind}"
            mapping.fuse(tensors, fused, [f"{prefix}{p}.{kind}" for p in "qkv"], axis=0)
            if fused in tensors:
                tensors[fused] = Taken(tensors[fused], 0, rows)
    return tensors
