"""Marian (OPUS-MT) encoder-decoders: BART's post-LayerNorm layout with Marian's fixed
sinusoidal positions (sines in the first half of the width, cosines in the second),
embeddings scaled by sqrt(d_model), no embedding LayerNorm, SiLU ("swish") MLPs by
default, `final_logits_bias`, and optionally separate source and target vocabularies
(`share_encoder_decoder_embeddings=False` with `decoder_vocab_size`). The decoder starts
from the pad token.

Example:
    >>> cfg = config_from_hf({"model_type": "marian", "vocab_size": 40, "decoder_vocab_size": 30,
    ...   "share_encoder_decoder_embeddings": False, "d_model": 16, "encoder_layers": 2, "decoder_layers": 1,
    ...   "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 24,
    ...   "decoder_ffn_dim": 24, "max_position_embeddings": 32, "pad_token_id": 29,
    ...   "decoder_start_token_id": 29, "scale_embedding": True})
    >>> cfg.vocab_size, cfg.encoder.vocab_size, cfg.embed.positions, cfg.share_embeddings
    (30, 40, 'sinusoidal', False)
"""

from __future__ import annotations

from makemost_jax.models import bart, mapping
from makemost_jax.models.config import ModelConfig

settle_config = bart.settle_config


def config_from_hf(hf) -> ModelConfig:
    """`ModelConfig` of a HF Marian config.

    Example:
        >>> # config_from_hf(json.load(open("opus-mt-en-es/config.json"))).decoder_start_token_id
    """
    shared = bool(hf.get("share_encoder_decoder_embeddings", True))
    hf = {"activation_function": "swish", **hf}
    return bart.seq2seq_config(hf, family="marian", pre_norm=False, positions="sinusoidal", position_offset=0,
                               embed_norm=False, final_norms=False,
                               decoder_vocab=None if shared else hf.get("decoder_vocab_size"),
                               share_embeddings=shared)


def weights_from_hf(cfg: ModelConfig, tensors: dict) -> dict:
    """Map a Hugging Face Marian (MarianMTModel) state dict; saved sinusoidal tables are ignored.

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint("opus-mt-en-es")[1])
    """
    tensors = bart.prepare_tensors(cfg, tensors)
    for side in ("encoder", "decoder"):  # fixed tables, recomputed (older checkpoints saved them)
        tensors.pop(f"model.{side}.embed_positions.weight", None)
    return mapping.assemble(tensors, bart.entries(cfg, embed_norm=False, learned_positions=False),
                            mapping.expected_shapes(cfg), {"encoder/": cfg.encoder.n_layers, "": cfg.n_layers})


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a Marian `ModelConfig` (what `transformers.MarianConfig` reads).

    Example:
        >>> cfg = config_from_hf({"model_type": "marian", "vocab_size": 40, "d_model": 16, "encoder_layers": 2,
        ...   "decoder_layers": 1, "encoder_attention_heads": 4, "decoder_attention_heads": 2, "encoder_ffn_dim": 24,
        ...   "decoder_ffn_dim": 20, "max_position_embeddings": 32, "pad_token_id": 39, "eos_token_id": 0,
        ...   "decoder_start_token_id": 39, "scale_embedding": True})
        >>> config_from_hf(config_to_hf(cfg)) == cfg
        True
    """
    return {**bart.seq2seq_config_to_hf(cfg, "MarianMTModel"), "decoder_vocab_size": cfg.vocab_size,
            "share_encoder_decoder_embeddings": cfg.share_embeddings, "forced_eos_token_id": cfg.eos_token_id}


def weights_to_hf(cfg: ModelConfig, weights: dict) -> dict:
    """HF-named lazy tensors of Marian weights (`final_logits_bias` as (1, V), no sinusoid tables).

    Example:
        >>> # weights_to_hf(params.config, params.weights)["final_logits_bias"].shape == (1, V)
    """
    return bart.seq2seq_weights_to_hf(cfg, weights, embed_norm=False, learned_positions=False)
