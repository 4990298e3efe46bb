"""T5 and mT5 encoder-decoders: relative position buckets, RMSNorm without mean or bias,
unscaled attention scores, ReLU or gated-GELU MLPs, no biases anywhere.

Both stacks are pre-norm with a final RMSNorm. Each stack has one relative-position
table (stored in its first layer by Hugging Face) whose bias every layer of the stack
adds to its self-attention scores: bidirectional buckets in the encoder, causal ones in
the decoder; cross-attention has none. The decoder's head is the shared token table
unless the checkpoint carries its own `lm_head.weight` (T5 v1.1, flan-T5, mT5: untied).
T5's tied head scales the final states by d_model ** -0.5 (`scale_decoder_outputs`, or
for older configs `tie_word_embeddings` not False); mT5 never scales, as transformers.

Example:
    >>> cfg = config_from_hf({"model_type": "t5", "vocab_size": 32, "d_model": 16, "d_kv": 4, "d_ff": 24,
    ...   "num_layers": 3, "num_decoder_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu"})
    >>> cfg.n_layers, cfg.encoder.n_layers, cfg.mlp.gated, cfg.head.input_scale
    (2, 3, True, 0.25)
"""

from __future__ import annotations

import dataclasses


from makemost_jax.errors import ConfigError
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

DEFAULT_CONTEXT = 512  # relative positions set no hard limit; T5 was trained on 512 tokens


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF T5 or mT5 config (the decoder's, with the encoder's inside).

    Example:
        >>> # config_from_hf(json.load(open("flan-t5-small/config.json"))).encoder.attention.causal
        >>> # False
    """
    model_type = hf.get("model_type", "t5")
    d, heads = require(hf, "d_model"), require(hf, "num_heads")
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConfigError(f"{model_type}: feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
    act = activation_name({"model_type": model_type, "act": "gelu_new" if proj == "gated-gelu" else parts[-1]},
                          "act", default="relu")
    if model_type == "t5":
        scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    else:  # mT5 never scales (transformers' MT5ForConditionalGeneration)
        scale = False

    def stack(n_layers: int, causal: bool, head: HeadConfig, **extra) -> ModelConfig:
        return ModelConfig(
            family="t5", hf_model_type=model_type, vocab_size=require(hf, "vocab_size"), d_model=d,
            n_layers=n_layers, max_positions=int(hf.get("n_positions") or DEFAULT_CONTEXT),
            attention=AttentionConfig(n_heads=heads, n_kv_heads=heads, head_dim=require(hf, "d_kv"), qkv_bias=False,
                                      out_bias=False, scale=1.0, causal=causal,
                                      relative_buckets=hf.get("relative_attention_num_buckets", 32),
                                      relative_max_distance=hf.get("relative_attention_max_distance", 128)),
            mlp=MlpConfig(d_ff=require(hf, "d_ff"), activation=act, gated=parts[0] == "gated", bias=False),
            norm=NormConfig(kind="rmsnorm", eps=hf.get("layer_norm_epsilon", 1e-6), placement="pre"),
            embed=EmbedConfig(positions="none"), head=head,
            pad_token_id=hf.get("pad_token_id", 0), eos_token_id=hf.get("eos_token_id", 1), **extra)

    encoder = stack(require(hf, "num_layers"), False, HeadConfig(kind="none", final_norm=True))
    return stack(hf.get("num_decoder_layers") or encoder.n_layers, True,
                 HeadConfig(tied=True, final_norm=True, input_scale=d ** -0.5 if scale else 1.0),
                 encoder=encoder, decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)))


def settle_config(cfg: ModelConfig, tensors: dict) -> ModelConfig:
    """Untie the head when the checkpoint has its own `lm_head.weight` (as transformers does).

    Example:
        >>> # settle_config(cfg, {"lm_head.weight": ..., "shared.weight": ...}).head.tied == False
    """
    tied = not mapping.distinct_copy(tensors, "lm_head.weight", "shared.weight")
    return cfg.replace(head=dataclasses.replace(cfg.head, tied=tied))


def _entries(gated: bool) -> list[mapping.Entry]:
    def block(ours: str, hf: str, sublayers: list[tuple[str, str, str]]) -> list[mapping.Entry]:
        entries = []
        for n, (path, norm, attr) in enumerate(sublayers):
            layer = f"{hf}.block.{{i}}.layer.{n}."
            entries.append((f"{ours}layers/{norm}/scale", layer + "layer_norm.weight", False))
            if path == "mlp":  # gated: act(wi_0 x) * wi_1 x
                pieces = (("gate", "wi_0"), ("up", "wi_1")) if gated else (("up", "wi"),)
                entries += [(f"{ours}layers/mlp/{p}/kernel", f"{layer}DenseReluDense.{w}.weight", True)
                            for p, w in pieces + (("down", "wo"),)]
            else:
                entries += [(f"{ours}layers/{path}/{p}/kernel", f"{layer}{attr}.{p}.weight", True) for p in "qkvo"]
        return entries

    mlp = ("mlp", "mlp_norm", "")
    return ([("embed/tokens", "shared.weight", False), ("lm_head/kernel", "lm_head.weight", True),
             ("final_norm/scale", "decoder.final_layer_norm.weight", False),
             ("encoder/final_norm/scale", "encoder.final_layer_norm.weight", False),
             ("relative_bias", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),
             ("encoder/relative_bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False)]
            + block("encoder/", "encoder", [("attn", "attn_norm", "SelfAttention"), mlp])
            + block("", "decoder", [("attn", "attn_norm", "SelfAttention"),
                                    ("cross_attn", "cross_norm", "EncDecAttention"), mlp]))


def weights_from_hf(cfg: ModelConfig, tensors: dict) -> dict:
    """Map a Hugging Face T5 / mT5 (ForConditionalGeneration) state dict.

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint("t5-small")[1])
    """
    tensors = dict(tensors)
    mapping.drop_tied_copies(tensors, "shared.weight", ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
                             + (["lm_head.weight"] if cfg.head.tied else []))
    # Cross-attention has no position bias; some checkpoints carry an unused table for it.
    tensors.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
    return mapping.assemble(tensors, _entries(cfg.mlp.gated), mapping.expected_shapes(cfg),
                            {"encoder/": cfg.encoder.n_layers, "": cfg.n_layers})


_ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a T5 or mT5 `ModelConfig` (what `transformers.T5Config` / `MT5Config` read).

    T5 writes whether the head input is scaled both as `scale_decoder_outputs` and as
    `tie_word_embeddings`, the key transformers decides it by; whether the head is tied
    shows in the weights (an untied head writes its own `lm_head.weight`).

    Example:
        >>> cfg = config_from_hf({"model_type": "t5", "vocab_size": 32, "d_model": 16, "d_kv": 4, "d_ff": 24,
        ...   "num_layers": 3, "num_decoder_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu"})
        >>> hf = config_to_hf(cfg); hf["feed_forward_proj"], hf["scale_decoder_outputs"]
        ('gated-gelu', True)
        >>> config_from_hf(hf) == cfg
        True
    """
    a, model_type = cfg.attention, cfg.hf_model_type
    act = "gelu" if cfg.mlp.gated and cfg.activation == "gelu_new" else cfg.activation  # "gated-gelu" is gelu_new
    scaled = cfg.head.input_scale != 1.0
    return {"model_type": model_type, "architectures": [_ARCHITECTURES[model_type]], "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "d_kv": a.head_dim, "d_ff": cfg.d_ff, "num_layers": cfg.encoder.n_layers,
            "num_decoder_layers": cfg.n_layers, "num_heads": a.n_heads,
            "relative_attention_num_buckets": a.relative_buckets,
            "relative_attention_max_distance": a.relative_max_distance, "layer_norm_epsilon": cfg.norm.eps,
            "feed_forward_proj": f"gated-{act}" if cfg.mlp.gated else act, "n_positions": cfg.max_positions,
            "is_encoder_decoder": True, "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
            "decoder_start_token_id": cfg.decoder_start_token_id,
            **({"scale_decoder_outputs": scaled, "tie_word_embeddings": scaled} if model_type == "t5"
               else {"tie_word_embeddings": cfg.head.tied})}


def weights_to_hf(cfg: ModelConfig, weights: dict) -> dict:
    """HF-named lazy tensors of T5 / mT5 weights: one `shared.weight` (the encoder's and decoder's
    tables are tied to it, as transformers saves them) and `lm_head.weight` only when untied.

    Example:
        >>> # sorted(weights_to_hf(cfg, params.weights))[:1] == ["decoder.block.0.layer.0.SelfAttention.k.weight"]
    """
    return mapping.disassemble(weights, _entries(cfg.mlp.gated), {"encoder/": cfg.encoder.n_layers, "": cfg.n_layers})
