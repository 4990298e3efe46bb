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
    >>> from makemost_jax.models.model import init_weights
    >>> sorted(init_weights(cfg, jax.random.key(0)))
    ['embed', 'layers', 'mlm_head']
"""

from __future__ import annotations

import jax.numpy as jnp

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
    """`ModelConfig` of a HF BERT or RoBERTa config (the head kind is settled from the tensors).

    Example:
        >>> config_from_hf({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10,
        ...   "max_position_embeddings": 8}).norm.placement
        'post'
    """
    d = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    model_type = hf.get("model_type", "bert")
    refuse(hf, "position_embedding_type", ("absolute",))
    pad = hf.get("pad_token_id", 0 if model_type == "bert" else 1)
    return ModelConfig(
        family="bert", hf_model_type=model_type, vocab_size=require(hf, "vocab_size"), d_model=d,
        n_layers=require(hf, "num_hidden_layers"), max_positions=require(hf, "max_position_embeddings"),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=heads, head_dim=d // heads, causal=False),
        mlp=MlpConfig(d_ff=require(hf, "intermediate_size"), activation=activation_name(hf, "hidden_act",
                                                                                      default="gelu")),
        norm=NormConfig(kind="layernorm", eps=hf.get("layer_norm_eps", 1e-12), placement="post"),
        embed=EmbedConfig(positions="learned", type_vocab_size=max(hf.get("type_vocab_size", 2), 1), norm=True),
        head=HeadConfig(kind="mlm", tied=True),
        pad_token_id=pad, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def position_start(cfg: ModelConfig) -> int:
    """The first position id of a sequence: 0 for BERT, padding_idx + 1 for RoBERTa.

    Example:
        >>> # position_start(roberta_cfg) == 2
    """
    return cfg.pad_token_id + 1 if cfg.hf_model_type == "roberta" else 0


def default_positions(cfg: ModelConfig, tokens_BT, mask_BT):
    """BERT counts 0..T-1; RoBERTa counts real tokens from padding_idx + 1, padding at padding_idx.

    Example:
        >>> # default_positions(roberta_cfg, jnp.array([[0, 5, 1]]), None).tolist() == [[2, 3, 1]]
    """
    if cfg.hf_model_type != "roberta":
        return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    real = (tokens_BT != cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + cfg.pad_token_id


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


def settle_config(cfg: ModelConfig, tensors: dict) -> ModelConfig:
    """The head the checkpoint has: the MLM head, or none for a bare encoder.

    Example:
        >>> # settle_config(cfg, read_hf_checkpoint(minilm_dir)[1]).head.kind == "none"
    """
    return cfg.with_head("mlm" if has_mlm_head(tensors) else "none")


def has_mlm_head(tensors: dict) -> bool:
    """Whether a BERT/RoBERTa state dict carries a masked-LM head.

    Example:
        >>> has_mlm_head({"cls.predictions.bias": None}), has_mlm_head({"pooler.dense.bias": None})
        (True, False)
    """
    return any(_rename(n).startswith("head.") for n in tensors)


def weights_from_hf(cfg: ModelConfig, tensors: dict) -> dict:
    """Map a Hugging Face BERT/RoBERTa (MaskedLM or bare) state dict.

    Example:
        >>> # weights = weights_from_hf(cfg, read_hf_checkpoint(minilm_dir)[1])
    """
    tensors = {_rename(k): v for k, v in tensors.items()}
    return mapping.assemble(tensors, _ENTRIES, mapping.expected_shapes(cfg), cfg.n_layers,
                            ignored=_IGNORED)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The `config.json` of a BERT or RoBERTa `ModelConfig` (a `*ForMaskedLM`, or the bare `*Model`).

    Example:
        >>> cfg = config_from_hf({"model_type": "roberta", "hidden_size": 8, "num_hidden_layers": 1,
        ...   "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 12,
        ...   "type_vocab_size": 1, "pad_token_id": 1})
        >>> hf = config_to_hf(cfg); hf["architectures"]
        ['RobertaForMaskedLM']
        >>> config_from_hf(hf) == cfg
        True
    """
    name = {"bert": "Bert", "roberta": "Roberta"}[cfg.hf_model_type]
    return {"model_type": cfg.hf_model_type,
            "architectures": [f"{name}ForMaskedLM" if cfg.head.kind == "mlm" else f"{name}Model"],
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": cfg.activation,
            "max_position_embeddings": cfg.max_positions, "type_vocab_size": cfg.embed.type_vocab_size,
            "layer_norm_eps": cfg.norm.eps, "position_embedding_type": "absolute", "pad_token_id": cfg.pad_token_id,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}


def weights_to_hf(cfg: ModelConfig, weights: dict) -> dict:
    """HF-named lazy tensors of BERT / RoBERTa weights.

    With the MLM head: `BertForMaskedLM` (`bert.*`, `cls.predictions.*`) or `RobertaForMaskedLM`
    (`roberta.*`, `lm_head.*`) names, the decoder tied to the word embeddings; a bare encoder
    gets `BertModel` / `RobertaModel` names, without the pooler (never loaded, so not written:
    transformers initialises it afresh, which changes no hidden state).

    Example:
        >>> # weights_to_hf(cfg, params.weights)["cls.predictions.bias"].shape == (V,)
    """
    head = "cls." if cfg.hf_model_type == "bert" else "lm_head."
    head_names = {ours: theirs for theirs, ours in _HEAD_NAMES.items() if theirs.startswith(head)}
    prefix = f"{cfg.hf_model_type}." if cfg.head.kind == "mlm" else ""

    def hf_name(name: str) -> str:
        ours = next((o for o in head_names if name.startswith(o)), None)
        return prefix + name if ours is None else head_names[ours] + name[len(ours):]

    return {hf_name(name): t for name, t in mapping.disassemble(weights, _ENTRIES, cfg.n_layers).items()}
