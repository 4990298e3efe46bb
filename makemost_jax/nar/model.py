"""Encoder-decoder built from a BERT-family masked LM (METHODS.md section 4), on the shared core.

Encoder = the pretrained MLM (its final hidden states). Decoder = another copy of the MLM
(embeddings, layers, MLM head) with a cross-attention sublayer added to every layer after
self-attention: `x = x + o(attention(q(x), k(enc), v(enc)))`. Its q/k/v weights are copies
of that layer's self-attention q/k/v, and its output projection `o` is zero, so at
initialisation the sublayer adds exactly 0 and the decoder computes the MLM itself (BERT's
blocks are post-LayerNorm, so the sublayer has no norm of its own: a norm would change
the MLM's activations). The MLM head is the output layer. A length head (a zero-initialised
linear classifier over lengths 0..max_target on the masked mean of the encoder states)
predicts the target length for non-autoregressive decoding.

The encoder-decoder is an ordinary model of the shared core (`models.model`): a BERT
decoder config with `encoder=` the BERT encoder config and `cross_norm=False`
(`Seq2SeqConfig.model_config`), so it runs through `forward` / `encode_source` and the
shared `Block`s like T5, BART and Marian. The same container holds the autoregressive
baseline (`Seq2SeqConfig.autoregressive`): the same encoder and decoder, with causal
self-attention in the decoder and next-token targets ([CLS] starts the target, [SEP] ends it).

Checkpoints without an MLM head (all-MiniLM-L6-v2 is a bare encoder) get one initialised
by `add_mlm_head`: dense = identity, bias 0, LayerNorm scale 1 / bias 0, output weights
tied to the word embeddings, output bias 0 (so logits = LN(gelu(h)) . E^T).

Dimensions: B batch, S source tokens, T target tokens, L layers, D width, V vocabulary,
N length classes (max_target + 1).

Example:
    >>> import jax
    >>> from makemost_jax.models import from_hf_config, init_params
    >>> mlm = init_params(from_hf_config({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2,
    ...   "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 30,
    ...   "max_position_embeddings": 20}), jax.random.key(0))
    >>> config = Seq2SeqConfig(mlm.config, max_source=8, max_target=6, pad_id=0, cls_id=1, sep_id=2, mask_id=3)
    >>> params = init_seq2seq(mlm, config)
    >>> sorted(params.weights), params.weights["model"]["layers"]["cross_attn"]["o"]["kernel"].shape
    (['length', 'model'], (2, 16, 16))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models import bert, model
from makemost_jax.models.cache import EncodedSource
from makemost_jax.models.config import HeadConfig, ModelConfig
from makemost_jax.models.layers import project_source
from makemost_jax.models.types import Params


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """Static settings of a seq2seq model (hashable, static under `jit`).

    `model` is the MLM's config (with `has_lm_head=True`). `max_source` / `max_target`
    bound the source (with [CLS]/[SEP]) and target (without specials) token counts.
    `autoregressive` selects the causal baseline decoder.

    Example:
        >>> # Seq2SeqConfig(mlm.config, max_source=48, max_target=48, pad_id=0, cls_id=101, sep_id=102,
        >>> #               mask_id=103)
    """

    model: ModelConfig
    max_source: int
    max_target: int
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    autoregressive: bool = False

    def __post_init__(self):
        if self.model.family != "bert":
            raise ConfigError(f"the seq2seq model needs a BERT-family masked LM, got family {self.model.family!r}; "
                              "load a BERT/RoBERTa checkpoint")
        if self.max_source < 3 or self.max_target < 1:
            raise ConfigError(f"max_source={self.max_source} must be >= 3 and max_target={self.max_target} >= 1")
        longest = max(self.max_source, self.max_target + 1)
        if longest + bert.position_start(self.model) > self.model.max_positions:
            raise ConfigError(f"max_source={self.max_source} / max_target={self.max_target} exceed the encoder's "
                              f"context of {self.model.max_positions} positions; lower them")
        ids = (self.pad_id, self.cls_id, self.sep_id, self.mask_id)
        if max(ids) >= self.model.vocab_size or min(ids) < 0:
            raise ConfigError(f"special ids {ids} lie outside the model's vocabulary of {self.model.vocab_size}")

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.cls_id, self.sep_id, self.mask_id)

    @property
    def model_config(self) -> ModelConfig:
        """The encoder-decoder on the shared core: MLM decoder (causal for the AR baseline) with
        cross-attention without norms over a copy of the MLM as encoder.

        Example:
            >>> # params.config.model_config.encoder.causal, params.config.model_config.cross_norm
            >>> # (False, False)
        """
        mlm = self.model
        encoder = mlm.replace(head=HeadConfig(kind="none", final_norm=False))
        attention = dataclasses.replace(mlm.attention, causal=self.autoregressive)
        return mlm.replace(attention=attention, encoder=encoder, cross_norm=False, share_embeddings=False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Seq2SeqParams:
    """Weights {"model": the encoder-decoder's, "length": the length head's} with the static `Seq2SeqConfig`.

    Example:
        >>> # params.model  -> Params of the encoder-decoder (mm.forward works on it)
    """

    config: Seq2SeqConfig = dataclasses.field(metadata={"static": True})
    weights: dict[str, Any]

    @property
    def model(self) -> Params:
        """The encoder-decoder as shared-core `Params`."""
        return Params(self.config.model_config, self.weights["model"])

    @property
    def num_parameters(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.weights))

    def logical_axes(self) -> dict:
        """Logical axes of every weight: the encoder-decoder's own, (embed, norm) for the length head.

        Example:
            >>> # sharding.logical_axes(params)["model"]["layers"]["cross_attn"]["q"]["kernel"]
            >>> # ('layers', 'embed', 'q_heads')
        """
        axes = {"model": model.weight_axes(self.config.model_config, self.weights["model"])}
        if "length" in self.weights:
            axes["length"] = {"kernel": ("embed", "norm"), "bias": ("norm",)}
        return axes


def _special_id(tokenizer, *names):
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def special_ids(params: Params, tokenizer) -> dict[str, int]:
    """pad/cls/sep/mask ids of a BERT ([PAD] ...) or RoBERTa (<pad> ...) vocabulary.

    Raises `ConfigError` when the checkpoint is not a BERT-family model or its vocabulary
    has no mask token (so it cannot be a masked LM's) or does not fit the embeddings.

    Example:
        >>> # special_ids(mm.load(minilm_dir), mm.load_tokenizer(minilm_dir))
        >>> # {'pad_id': 0, 'cls_id': 101, 'sep_id': 102, 'mask_id': 103}
    """
    cfg = params.config
    if cfg.family != "bert":
        raise ConfigError(f"a {cfg.hf_model_type or cfg.family} checkpoint is not a masked LM; the NAR model needs a "
                          "BERT-family encoder (BERT, RoBERTa, MiniLM) with an MLM vocabulary")
    ids = {"pad_id": _special_id(tokenizer, "[PAD]", "<pad>"), "cls_id": _special_id(tokenizer, "[CLS]", "<s>"),
           "sep_id": _special_id(tokenizer, "[SEP]", "</s>"), "mask_id": _special_id(tokenizer, "[MASK]", "<mask>")}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ConfigError(f"the tokenizer has no {', '.join(m[:-3] for m in missing)} token, so its vocabulary is "
                          "not an MLM's ([PAD]/[CLS]/[SEP]/[MASK] or <pad>/<s>/</s>/<mask>); use the masked LM's "
                          "own tokenizer")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's embeddings only "
                          f"{cfg.vocab_size}; the tokenizer does not belong to this checkpoint")
    return ids


def add_mlm_head(params: Params) -> Params:
    """`params` with an MLM head; a bare encoder gets one tied to its word embeddings.

    The new head: dense kernel = identity, dense bias = 0, LayerNorm scale = 1, bias = 0,
    output = the word embeddings (tied, as in BERT), output bias = 0. A checkpoint that
    has a head is returned unchanged.

    Example:
        >>> # mlm = add_mlm_head(mm.load(minilm_dir)); mlm.config.has_lm_head
        >>> # True
    """
    cfg = params.config
    if cfg.family != "bert":
        raise ConfigError(f"add_mlm_head needs a BERT-family encoder, got {cfg.family!r}")
    if cfg.has_lm_head:
        return params
    d = cfg.d_model
    dtype = params.dtype
    head = {"dense": {"kernel": jnp.eye(d, dtype=dtype), "bias": jnp.zeros((d,), dtype)},
            "norm": {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)},
            "bias": jnp.zeros((cfg.vocab_size,), dtype)}
    return Params(cfg.with_head("mlm"), {**params.weights, "mlm_head": head})


def seq2seq_config(mlm: Params, tokenizer, max_source: int, max_target: int,
                   autoregressive: bool = False) -> Seq2SeqConfig:
    """The `Seq2SeqConfig` of an MLM and its tokenizer (checks the vocabulary).

    Example:
        >>> # config = seq2seq_config(mlm, tok, max_source=48, max_target=48)
    """
    mlm = add_mlm_head(mlm) if mlm.config.family == "bert" else mlm
    return Seq2SeqConfig(mlm.config, max_source, max_target, autoregressive=autoregressive,
                         **special_ids(mlm, tokenizer))


def _copy(tree):
    # Separate buffers: encoder and decoder leaves must not alias (the train step donates them).
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def init_seq2seq(mlm: Params, config: Seq2SeqConfig, key: jax.Array | None = None,
                 random_init: bool = False) -> Seq2SeqParams:
    """Encoder and decoder initialised from `mlm` (or at random with the same recipe).

    `random_init=True` draws fresh BERT weights (`models.model.init_weights`, key `key`) for the
    encoder and for the decoder instead of copying the MLM: the baseline that measures the
    value of MLM initialisation. Cross-attention and the length head are initialised the
    same way in both cases (cross q/k/v = self-attention q/k/v, o = 0; length head = 0).

    Example:
        >>> # params = init_seq2seq(add_mlm_head(mm.load(minilm_dir)), config)
    """
    cfg = config.model
    if mlm.config.family != "bert":
        raise ConfigError(f"init_seq2seq needs a BERT-family masked LM, got {mlm.config.family!r}")
    mlm = add_mlm_head(mlm)
    if mlm.config != cfg:
        raise ConfigError("config.model differs from the MLM's config; build it with seq2seq_config(mlm, ...)")
    if random_init:
        if key is None:
            raise ConfigError("random_init=True needs a key")
        k_enc, k_dec = jax.random.split(key)
        enc, dec = model.init_weights(cfg, k_enc, mlm.dtype), model.init_weights(cfg, k_dec, mlm.dtype)
    else:
        enc, dec = _copy(mlm.weights), _copy(mlm.weights)
    attn = dec["layers"]["attn"]
    cross = {name: _copy(attn[name]) for name in ("q", "k", "v")}
    cross["o"] = jax.tree.map(jnp.zeros_like, attn["o"])
    encoder = {k: v for k, v in enc.items() if k != "mlm_head"}
    weights = {"model": {**dec, "layers": {**dec["layers"], "cross_attn": cross}, "encoder": encoder}}
    if not config.autoregressive:
        weights["length"] = {"kernel": jnp.zeros((cfg.d_model, config.max_target + 1), mlm.dtype),
                             "bias": jnp.zeros((config.max_target + 1,), mlm.dtype)}
    return Seq2SeqParams(config, weights)


def encode(params: Seq2SeqParams, source_BS, source_mask_BS):
    """Final encoder states (B, S, D) of padded sources ([CLS] ... [SEP], mask 1 on real tokens).

    Example:
        >>> # enc_BSD = encode(params, source_BS, source_mask_BS)
    """
    return model.encode(params.model, source_BS, source_mask_BS)


def length_logits(params: Seq2SeqParams, enc_BSD, source_mask_BS):
    """Logits (B, N) over target lengths 0..max_target from the masked mean of the encoder states.

    Example:
        >>> # lengths_B = length_logits(params, enc_BSD, source_mask_BS).argmax(-1)
    """
    m_BS1 = source_mask_BS.astype(enc_BSD.dtype)[..., None]
    pooled_BD = (enc_BSD * m_BS1).sum(1) / jnp.maximum(m_BS1.sum(1), 1.0)
    w = params.weights["length"]
    return (pooled_BD @ w["kernel"] + w["bias"]).astype(jnp.float32)


def cross_kv(params: Seq2SeqParams, enc_BSD, source_mask_BS) -> EncodedSource:
    """The decoder's cross-attention keys and values of every layer, computed once per source.

    Example:
        >>> # source = cross_kv(params, encode(params, source_BS, source_mask_BS), source_mask_BS)
    """
    k, v = project_source(params.config.model_config, params.weights["model"]["layers"]["cross_attn"], enc_BSD)
    return EncodedSource(k=k, v=v, mask=jnp.asarray(source_mask_BS).astype(bool))


def target_positions(config: Seq2SeqConfig, target_BT):
    """Learned-position ids 0..T-1 (RoBERTa: offset by padding_idx + 1) for decoder inputs.

    Example:
        >>> # target_positions(config, y_BT)[0].tolist() == [0, 1, ..., T - 1] for BERT
    """
    cfg = config.model
    return jnp.broadcast_to(jnp.arange(target_BT.shape[1]) + bert.position_start(cfg), target_BT.shape)


def nar_logits(params: Seq2SeqParams, target_BT, target_mask_BT, source: EncodedSource):
    """Non-autoregressive decoder: every target position reads every real target position.

    Example:
        >>> # logits_BTV = nar_logits(params, y_BT, y_mask_BT, cross_kv(params, enc_BSD, source_mask_BS))
    """
    return model.forward(params.model, target_BT, positions=target_positions(params.config, target_BT),
                         mask=target_mask_BT, source=source).logits


def check_source(config: Seq2SeqConfig, source_BS, source_mask_BS):
    """Raise `InputError` for sources that do not fit the encoder (shapes, lengths, empty rows).

    Example:
        >>> # check_source(params.config, source_BS, source_mask_BS)
    """
    if source_BS.ndim != 2 or source_BS.shape != source_mask_BS.shape:
        raise InputError(f"source {source_BS.shape} and source_mask {source_mask_BS.shape} must be equal "
                         "(batch, length) arrays")
    if source_BS.shape[1] > config.max_source:
        raise InputError(f"sources of {source_BS.shape[1]} tokens exceed max_source={config.max_source} "
                         f"(the encoder context is {config.model.max_positions}); shorten or split the input")
    if not isinstance(source_mask_BS, jax.core.Tracer) and bool((source_mask_BS.sum(1) <= 2).any()):
        raise InputError("a source row has no tokens besides [CLS]/[SEP]; remove empty source lines")
