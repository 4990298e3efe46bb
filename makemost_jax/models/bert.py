"""BERT and RoBERTa encoders with their masked-LM heads.

Post-LayerNorm blocks, bidirectional attention, learned absolute positions (RoBERTa's
start at `padding_idx + 1` and skip padding), token-type embeddings, and the MLM head
(dense + activation + LayerNorm, then the tied word embeddings plus a bias). A bare
encoder checkpoint (e.g. all-MiniLM-L6-v2) loads without a head; its logits are None.

Dimensions: B batch, T tokens, D width, V vocabulary.

Example:
    >>> import jax
    >>> from makemost_jax.models.config import from_hf_config
    >>> cfg = from_hf_config({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2,
    ...   "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 30,
    ...   "max_position_embeddings": 20})
    >>> sorted(init_weights(cfg, jax.random.key(0)))
    ['embed', 'layers', 'mlm_head']
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from makemost_jax.models import mapping
from makemost_jax.models.config import ModelConfig
from makemost_jax.models.layers import activation, init_block_weights, norm, norm_weights


def init_weights(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random BERT weights (with an MLM head when `cfg.has_lm_head`).

    Example:
        >>> # init_weights(cfg, jax.random.key(0))["mlm_head"]["bias"].shape == (V,)
    """
    k_tok, k_pos, k_type, k_blocks, k_head = jax.random.split(key, 5)
    d = cfg.d_model
    weights = {
        "embed": {
            "tokens": 0.02 * jax.random.normal(k_tok, (cfg.vocab_size, d), dtype),
            "positions": 0.02 * jax.random.normal(k_pos, (cfg.max_positions, d), dtype),
            "types": 0.02 * jax.random.normal(k_type, (max(cfg.type_vocab_size, 1), d), dtype),
            "norm": norm_weights(cfg, d),
        },
        "layers": init_block_weights(cfg, k_blocks, dtype),
    }
    if cfg.has_lm_head:
        weights["mlm_head"] = {
            "dense": {"kernel": 0.02 * jax.random.normal(k_head, (d, d), dtype),
                      "bias": jnp.zeros((d,), dtype)},
            "norm": norm_weights(cfg, d),
            "bias": jnp.zeros((cfg.vocab_size,), dtype),
        }
    return weights


def default_positions(cfg: ModelConfig, tokens_BT, mask_BT):
    """BERT counts 0..T-1; RoBERTa counts real tokens from padding_idx + 1, padding at padding_idx.

    Example:
        >>> # default_positions(roberta_cfg, jnp.array([[0, 5, 1]]), None).tolist() == [[2, 3, 1]]
    """
    if cfg.position_offset == 0:
        return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    real = (tokens_BT != cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + cfg.position_offset - 1


def embed(cfg: ModelConfig, weights: dict, tokens_BT, positions_BT, token_types_BT=None):
    """Word + position + token-type embeddings, then LayerNorm.

    Example:
        >>> # x_BTD = embed(cfg, weights, tokens_BT, positions_BT, token_types_BT)
    """
    e = weights["embed"]
    types = jnp.zeros_like(tokens_BT) if token_types_BT is None else token_types_BT
    x = e["tokens"][tokens_BT] + e["positions"][positions_BT] + e["types"][types]
    return norm(cfg, e["norm"], x)


def head(cfg: ModelConfig, weights: dict, x_BTD):
    """MLM head; returns (float32 logits or None, final states).

    Example:
        >>> # logits_BTV, x_BTD = head(cfg, weights, x_BTD)
    """
    if not cfg.has_lm_head:
        return None, x_BTD
    h = weights["mlm_head"]
    y = activation(cfg.activation)(x_BTD @ h["dense"]["kernel"] + h["dense"]["bias"])
    y = norm(cfg, h["norm"], y)
    logits = jnp.einsum("btd,vd->btv", y, weights["embed"]["tokens"],
                        preferred_element_type=jnp.float32) + h["bias"]
    return logits, x_BTD


_LAYER = "encoder.layer.{i}."
_ENTRIES = [
    ("embed/tokens", "embeddings.word_embeddings.weight", False),
    ("embed/positions", "embeddings.position_embeddings.weight", False),
    ("embed/types", "embeddings.token_type_embeddings.weight", False),
    ("embed/norm/scale", "embeddings.LayerNorm.weight", False),
    ("embed/norm/bias", "embeddings.LayerNorm.bias", False),
    ("layers/attn/o/kernel", _LAYER + "attention.output.dense.weight", True),
    ("layers/attn/o/bias", _LAYER + "attention.output.dense.bias", False),
    ("layers/attn_norm/scale", _LAYER + "attention.output.LayerNorm.weight", False),
    ("layers/attn_norm/bias", _LAYER + "attention.output.LayerNorm.bias", False),
    ("layers/mlp/up/kernel", _LAYER + "intermediate.dense.weight", True),
    ("layers/mlp/up/bias", _LAYER + "intermediate.dense.bias", False),
    ("layers/mlp/down/kernel", _LAYER + "output.dense.weight", True),
    ("layers/mlp/down/bias", _LAYER + "output.dense.bias", False),
    ("layers/mlp_norm/scale", _LAYER + "output.LayerNorm.weight", False),
    ("layers/mlp_norm/bias", _LAYER + "output.LayerNorm.bias", False),
    ("mlm_head/dense/kernel", "head.dense.weight", True),
    ("mlm_head/dense/bias", "head.dense.bias", False),
    ("mlm_head/norm/scale", "head.norm.weight", False),
    ("mlm_head/norm/bias", "head.norm.bias", False),
    ("mlm_head/bias", "head.bias", False),
] + [(f"layers/attn/{p}/{kind}", f"{_LAYER}attention.self.{name}.{kind_hf}", kind == "kernel")
     for p, name in (("q", "query"), ("k", "key"), ("v", "value"))
     for kind, kind_hf in (("kernel", "weight"), ("bias", "bias"))]

# HF names of the two MLM heads, renamed to the neutral "head.*" names above.
_HEAD_NAMES = {
    "cls.predictions.transform.dense.": "head.dense.",
    "cls.predictions.transform.LayerNorm.": "head.norm.",
    "cls.predictions.bias": "head.bias",
    "lm_head.dense.": "head.dense.",
    "lm_head.layer_norm.": "head.norm.",
    "lm_head.bias": "head.bias",
}
# Present in HF checkpoints but not part of this model: tied decoder copies, the
# pooler (sentence classification), position-id buffers.
_IGNORED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
            "lm_head.decoder.weight", "lm_head.decoder.bias", "pooler.dense.weight",
            "pooler.dense.bias", "embeddings.position_ids", "cls.seq_relationship.weight",
            "cls.seq_relationship.bias")


def _rename(name: str) -> str:
    for prefix in ("bert.", "roberta."):
        name = name.removeprefix(prefix)
    for old, new in _HEAD_NAMES.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def has_mlm_head(tensors: dict) -> bool:
    """Whether a BERT/RoBERTa state dict carries a masked-LM head.

    Example:
        >>> has_mlm_head({"cls.predictions.bias": None}), has_mlm_head({"pooler.dense.bias": None})
        (True, False)
    """
    return any(_rename(n).startswith("head.") for n in tensors)


def weights_from_hf(cfg: ModelConfig, tensors: dict, dtype=jnp.float32) -> dict:
    """Map a Hugging Face BERT/RoBERTa (MaskedLM or bare) state dict.

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint(minilm_dir)[1])
    """
    tensors = {_rename(k): v for k, v in tensors.items()}
    expected = mapping.expected_shapes(init_weights, cfg)
    return mapping.assemble(tensors, _ENTRIES, expected, cfg.n_layers, dtype=dtype,
                            ignored=_IGNORED)
