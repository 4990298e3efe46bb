"""The autoregressive baseline: same encoder and decoder, causal self-attention, KV-cached decoding.

Training input is [CLS] y_1 .. y_n, targets y_1 .. y_n [SEP] (next-token cross entropy).
Greedy decoding runs one token per step under `lax.while_loop` with a self-attention
KV cache (L, B, max_target + 1, H, K) and cross-attention keys/values computed once per
source, so every step costs one token's decoder pass, and stops when every row has
emitted [SEP] (or at max_target tokens). That makes the NAR-vs-AR speed comparison fair.

Example:
    >>> # params = init_seq2seq(mlm, seq2seq_config(mlm, tok, 48, 48, autoregressive=True))
    >>> # tokens_BT, lengths_B = ar_greedy(params, source_BS, source_mask_BS)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from makemost_jax.errors import ConfigError
from makemost_jax.models import bert, forward, init_cache, token_logprobs
from makemost_jax.nar.model import Seq2SeqParams, check_source, cross_kv, encode, target_positions


def _source(params: Seq2SeqParams, source_BS, source_mask_BS):
    return cross_kv(params, encode(params, source_BS, source_mask_BS), source_mask_BS)


def _shifted(config, target_BT, target_mask_BT):
    """Decoder inputs [CLS] y and outputs y [SEP] (B, T + 1), with the output mask."""
    b, t = target_BT.shape
    lengths_B1 = target_mask_BT.sum(1, keepdims=True)
    pos_BT = jnp.arange(t + 1)[None]
    padded = jnp.concatenate([target_BT, jnp.full((b, 1), config.pad_id, target_BT.dtype)], axis=1)
    inputs = jnp.concatenate([jnp.full((b, 1), config.cls_id, target_BT.dtype), target_BT], axis=1)
    outputs = jnp.where(pos_BT == lengths_B1, config.sep_id, padded)
    return inputs, outputs, pos_BT <= lengths_B1


def ar_loss(params: Seq2SeqParams, batch, *, rng=None, frozen=None):
    """Next-token cross entropy of the AR baseline on a seq2seq batch; `(loss, {"tokens"})`.

    Example:
        >>> # loss, m = ar_loss(params, batch)
    """
    cfg = params.config
    inputs, outputs, out_mask = _shifted(cfg, batch["target"], batch["target_mask"])
    logits = forward(params.model, inputs, positions=target_positions(cfg, inputs),
                     source=_source(params, batch["source"], batch["source_mask"])).logits
    mask_f = out_mask.astype(jnp.float32)
    return -(token_logprobs(logits, outputs) * mask_f).sum() / jnp.maximum(mask_f.sum(), 1.0), {"tokens": mask_f.sum()}


@jax.jit
def _greedy(params: Seq2SeqParams, source_BS, source_mask_BS):
    cfg = params.config
    mc = cfg.model
    b = source_BS.shape[0]
    c = cfg.max_target + 1  # cache slots: [CLS] + up to max_target tokens
    source = _source(params, source_BS, source_mask_BS)
    cache = dataclasses.replace(init_cache(cfg.model_config, b, c, source.k.dtype), source=source)
    banned = jnp.array([cfg.pad_id, cfg.cls_id, cfg.mask_id])
    out_BT = jnp.full((b, cfg.max_target), cfg.pad_id, jnp.int32)

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < cfg.max_target + 1) & ~done_B.all()

    def body(carry):
        i, token_B, cache, out_BT, done_B, lengths_B = carry
        position = jnp.full((b, 1), i + bert.position_start(mc))
        out = forward(params.model, token_B[:, None], cache=cache, positions=position)
        cache = out.cache
        logits_BV = out.logits[:, 0].at[:, banned].set(-jnp.inf)
        # The last slot may only end the sequence.
        logits_BV = jnp.where(i == cfg.max_target, jnp.full_like(logits_BV, -jnp.inf).at[:, cfg.sep_id].set(0),
                              logits_BV)
        next_B = logits_BV.argmax(-1).astype(jnp.int32)
        ends = next_B == cfg.sep_id
        write = ~done_B & ~ends
        out_BT = jnp.where(write[:, None] & (jnp.arange(cfg.max_target)[None] == i),
                           next_B[:, None], out_BT)
        lengths_B = lengths_B + write
        return i + 1, next_B, cache, out_BT, done_B | ends, lengths_B

    start = (jnp.int32(0), jnp.full((b,), cfg.cls_id, jnp.int32), cache, out_BT, jnp.zeros((b,), bool),
             jnp.zeros((b,), jnp.int32))
    _, _, _, out_BT, _, lengths_B = jax.lax.while_loop(cond, body, start)
    return out_BT, lengths_B


def ar_greedy(params: Seq2SeqParams, source_BS, source_mask_BS):
    """Greedy KV-cached decoding; returns `(tokens (B, max_target) padded, lengths (B,))`.

    Example:
        >>> # tokens_BT, lengths_B = ar_greedy(params, source_BS, source_mask_BS)
    """
    if not params.config.autoregressive:
        raise ConfigError("ar_greedy needs the autoregressive baseline; use nar_decode for the NAR model")
    source_BS, source_mask_BS = jnp.asarray(source_BS, jnp.int32), jnp.asarray(source_mask_BS, jnp.int32)
    check_source(params.config, source_BS, source_mask_BS)
    return _greedy(params, source_BS, source_mask_BS)


@jax.jit
def ar_logits_full(params: Seq2SeqParams, source_BS, source_mask_BS, inputs_BT):
    """Logits (B, T, V) of the AR decoder on whole inputs without a cache (reference for tests).

    Example:
        >>> # ar_logits_full(params, src_BS, src_mask_BS, jnp.array([[cls, y1, y2]]))
    """
    return forward(params.model, inputs_BT, positions=target_positions(params.config, inputs_BT),
                   source=_source(params, source_BS, source_mask_BS)).logits
