"""BART and mBART encoder-decoders (and the layout Marian shares with them).

Learned positions offset by 2, a LayerNorm on the embeddings (`layernorm_embedding`),
embeddings scaled by sqrt(d_model) with `scale_embedding`, biases everywhere, a head tied
to the shared token table plus `final_logits_bias`. BART's blocks are post-LayerNorm;
mBART's are pre-LayerNorm with a final LayerNorm on each stack. Encoder and decoder may
differ in depth, heads and MLP width.

Example:
    >>> cfg = config_from_hf({"model_type": "bart", "vocab_size": 40, "d_model": 16, "encoder_layers": 3,
    ...   "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 2,
    ...   "encoder_ffn_dim": 24, "decoder_ffn_dim": 20, "max_position_embeddings": 32})
    >>> cfg.n_heads, cfg.encoder.n_heads, cfg.embed.position_offset, cfg.head.logits_bias
    (2, 4, 2, True)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from makemost_jax.checkpoints.lazy import Stacked
from makemost_jax.errors import CheckpointError
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


def seq2seq_config(hf, *, family: str, pre_norm: bool, positions: str, position_offset: int, embed_norm: bool,
                   final_norms: bool, decoder_vocab: int | None = None, share_embeddings: bool = True) -> ModelConfig:
    """The decoder's `ModelConfig` (the encoder's inside) of a BART-layout HF config.

    Example:
        >>> # seq2seq_config(hf, family="bart", pre_norm=False, positions="learned", position_offset=2,
        >>> #                embed_norm=True, final_norms=False)
    """
    model_type = hf.get("model_type", family)
    d = require(hf, "d_model")
    scale = math.sqrt(d) if hf.get("scale_embedding", False) else 1.0
    act = activation_name(hf, "activation_function", default="gelu")

    def stack(side: str, vocab: int, causal: bool, head: HeadConfig, **extra) -> ModelConfig:
        heads = require(hf, f"{side}_attention_heads")
        return ModelConfig(
            family=family, hf_model_type=model_type, vocab_size=vocab, d_model=d,
            n_layers=require(hf, f"{side}_layers"), max_positions=require(hf, "max_position_embeddings"),
            attention=AttentionConfig(n_heads=heads, n_kv_heads=heads, head_dim=d // heads, causal=causal),
            mlp=MlpConfig(d_ff=require(hf, f"{side}_ffn_dim"), activation=act),
            norm=NormConfig(kind="layernorm", eps=1e-5, placement="pre" if pre_norm else "post"),
            embed=EmbedConfig(positions=positions, position_offset=position_offset, scale=scale, norm=embed_norm),
            head=head, pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"), **extra)

    vocab = require(hf, "vocab_size")
    encoder = stack("encoder", vocab, False, HeadConfig(kind="none", final_norm=final_norms))
    return stack("decoder", decoder_vocab or vocab, True,
                 HeadConfig(tied=bool(hf.get("tie_word_embeddings", True)), final_norm=final_norms, logits_bias=True),
                 encoder=encoder, share_embeddings=share_embeddings,
                 decoder_start_token_id=hf.get("decoder_start_token_id"))


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF BART or mBART config.

    Example:
        >>> # config_from_hf(json.load(open("bart-base/config.json"))).norm.placement
        >>> # 'post'
    """
    mbart = hf.get("model_type") == "mbart"
    for field in ("normalize_before", "add_final_layer_norm"):  # fairseq-era BART variants
        refuse(hf, field, (mbart,), "this BART variant's block layout is not supported")
    refuse(hf, "normalize_embedding", (True,))
    refuse(hf, "add_bias_logits", (False,))
    return seq2seq_config(hf, family="bart", pre_norm=mbart, positions="learned", position_offset=2,
                          embed_norm=True, final_norms=mbart)


def token_table(cfg: ModelConfig) -> str:
    """The HF name of the decoder's token table (the shared one unless the embeddings are separate).

    Example:
        >>> # token_table(marian_cfg_with_separate_vocabularies) == "model.decoder.embed_tokens.weight"
    """
    return "model.shared.weight" if cfg.share_embeddings else "model.decoder.embed_tokens.weight"


def entries(cfg: ModelConfig, embed_norm: bool, learned_positions: bool) -> list[mapping.Entry]:
    """Our paths and the HF names of a BART-layout state dict (`model.encoder.*`, `model.decoder.*`).

    Example:
        >>> # ("embed/tokens", "model.shared.weight", False) in entries(bart_cfg, True, True)
    """
    def attention(ours: str, hf: str) -> list[mapping.Entry]:
        return [(f"{ours}/{p}/{kind}", f"{hf}.{name}.{hf_kind}", kind == "kernel")
                for p, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj"))
                for kind, hf_kind in (("kernel", "weight"), ("bias", "bias"))]

    def layer_norm(ours: str, hf: str) -> list[mapping.Entry]:
        return [(f"{ours}/scale", f"{hf}.weight", False), (f"{ours}/bias", f"{hf}.bias", False)]

    def stack(ours: str, side: str) -> list[mapping.Entry]:
        hf = f"model.{side}"
        layer = f"{hf}.layers.{{i}}"
        out = (attention(f"{ours}layers/attn", f"{layer}.self_attn")
               + layer_norm(f"{ours}layers/attn_norm", f"{layer}.self_attn_layer_norm")
               + layer_norm(f"{ours}layers/mlp_norm", f"{layer}.final_layer_norm")
               + [(f"{ours}layers/mlp/{p}/{kind}", f"{layer}.{fc}.{hf_kind}", kind == "kernel")
                  for p, fc in (("up", "fc1"), ("down", "fc2"))
                  for kind, hf_kind in (("kernel", "weight"), ("bias", "bias"))])
        if side == "decoder":
            out += (attention("layers/cross_attn", f"{layer}.encoder_attn")
                    + layer_norm("layers/cross_norm", f"{layer}.encoder_attn_layer_norm"))
        if learned_positions:
            out.append((f"{ours}embed/positions", f"{hf}.embed_positions.weight", False))
        if embed_norm:
            out += layer_norm(f"{ours}embed/norm", f"{hf}.layernorm_embedding")
        if cfg.head.final_norm:
            out += layer_norm(f"{ours}final_norm", f"{hf}.layer_norm")
        return out

    return ([("embed/tokens", token_table(cfg), False),
             ("encoder/embed/tokens", "model.encoder.embed_tokens.weight", False),
             ("lm_head/kernel", "lm_head.weight", True), ("logits_bias", "final_logits_bias", False)]
            + stack("encoder/", "encoder") + stack("", "decoder"))


def prepare_tensors(cfg: ModelConfig, tensors: dict) -> dict:
    """A copy of a BART-layout state dict without the tied copies older checkpoints save
    (each checked equal to its table) and with `final_logits_bias` flattened.

    Example:
        >>> # tensors = prepare_tensors(cfg, read_hf_checkpoint("bart-base")[1])
    """
    tensors = dict(tensors)
    table, copies = token_table(cfg), []
    if cfg.share_embeddings:
        if table not in tensors and "model.decoder.embed_tokens.weight" in tensors:
            tensors[table] = tensors.pop("model.decoder.embed_tokens.weight")
        copies = ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"]
    mapping.drop_tied_copies(tensors, table, copies + (["lm_head.weight"] if cfg.head.tied else []))
    if "final_logits_bias" in tensors:
        bias = np.asarray(tensors["final_logits_bias"])
        if bias.shape != (1, cfg.vocab_size):
            raise CheckpointError(f"tensor 'final_logits_bias' has shape {bias.shape}, but the config implies "
                                  f"{(1, cfg.vocab_size)}; the checkpoint and its config.json do not match")
        tensors["final_logits_bias"] = bias.reshape(-1)
    return tensors


def settle_config(cfg: ModelConfig, tensors: dict) -> ModelConfig:
    """Untie the head when the checkpoint has its own, different `lm_head.weight`.

    Example:
        >>> # settle_config(cfg, tensors).head.tied
    """
    if mapping.distinct_copy(tensors, "lm_head.weight", token_table(cfg)):
        return cfg.replace(head=dataclasses.replace(cfg.head, tied=False))
    return cfg


def weights_from_hf(cfg: ModelConfig, tensors: dict) -> dict:
    """Map a Hugging Face BART / mBART (ForConditionalGeneration) state dict.

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint("bart-base")[1])
    """
    return mapping.assemble(prepare_tensors(cfg, tensors), entries(cfg, embed_norm=True, learned_positions=True),
                            mapping.expected_shapes(cfg), {"encoder/": cfg.encoder.n_layers, "": cfg.n_layers})


def seq2seq_config_to_hf(cfg: ModelConfig, architecture: str) -> dict:
    """The `config.json` keys every BART-layout model shares (the inverse of `seq2seq_config`).

    Example:
        >>> # seq2seq_config_to_hf(cfg, "BartForConditionalGeneration")["encoder_layers"] == cfg.encoder.n_layers
    """
    enc = cfg.encoder
    return {"model_type": cfg.hf_model_type, "architectures": [architecture], "vocab_size": enc.vocab_size,
            "d_model": cfg.d_model, "encoder_layers": enc.n_layers, "decoder_layers": cfg.n_layers,
            "encoder_attention_heads": enc.n_heads, "decoder_attention_heads": cfg.n_heads,
            "encoder_ffn_dim": enc.d_ff, "decoder_ffn_dim": cfg.d_ff, "max_position_embeddings": cfg.max_positions,
            "activation_function": cfg.activation,
            "scale_embedding": math.isclose(cfg.embed.scale, math.sqrt(cfg.d_model)),
            "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id,
            "decoder_start_token_id": cfg.decoder_start_token_id, "tie_word_embeddings": cfg.head.tied,
            "is_encoder_decoder": True}


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a BART or mBART `ModelConfig`.

    Example:
        >>> cfg = config_from_hf({"model_type": "mbart", "vocab_size": 40, "d_model": 16, "encoder_layers": 3,
        ...   "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 2,
        ...   "encoder_ffn_dim": 24, "decoder_ffn_dim": 20, "max_position_embeddings": 32})
        >>> config_from_hf(config_to_hf(cfg)) == cfg
        True
    """
    return seq2seq_config_to_hf(cfg, {"bart": "BartForConditionalGeneration",
                                      "mbart": "MBartForConditionalGeneration"}[cfg.hf_model_type])


def seq2seq_weights_to_hf(cfg: ModelConfig, weights: dict, embed_norm: bool, learned_positions: bool) -> dict:
    """HF-named lazy tensors of BART-layout weights (`entries`), `final_logits_bias` as HF's (1, V).

    Example:
        >>> # seq2seq_weights_to_hf(cfg, params.weights, True, True)["final_logits_bias"].shape == (1, V)
    """
    tensors = mapping.disassemble(weights, entries(cfg, embed_norm, learned_positions),
                                  {"encoder/": cfg.encoder.n_layers, "": cfg.n_layers})
    tensors["final_logits_bias"] = Stacked([tensors["final_logits_bias"]])
    return tensors


def weights_to_hf(cfg: ModelConfig, weights: dict) -> dict:
    """HF-named lazy tensors of BART / mBART weights (`*ForConditionalGeneration` names; learned
    positions with their 2 offset rows, as loaded; a tied head is not written).

    Example:
        >>> # weights_to_hf(cfg, params.weights)["model.shared.weight"].shape == (V, D)
    """
    return seq2seq_weights_to_hf(cfg, weights, embed_norm=True, learned_positions=True)
