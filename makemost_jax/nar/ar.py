"""The autoregressive baseline: same encoder and decoder, causal self-attention, KV-cached decoding.

Training input is [CLS] y_1 .. y_n, targets y_1 .. y_n [SEP] (next-token cross entropy).
Greedy decoding runs one token per step under `lax.while_loop` with a self-attention
KV cache of max_target + 1 slots (`init_cache`) and cross-attention keys/values computed once per
source, so every step costs one token's decoder pass, and stops when every row has
emitted [SEP] (or at max_target tokens). That makes the NAR-vs-AR speed comparison fair.

Beam search (`ar_beam`) is the same step over B x K rows: each step ranks the 2K best
continuations of a source's K live beams; a [SEP] among the top K of them finishes a
hypothesis (so K = 1 is greedy), the best K others stay live and their self-attention
cache rows follow their parents (the cross-attention keys/values are shared and never
moved). A finished hypothesis scores log p(y, [SEP]) / (|y| + 1) ** length_penalty; a
source stops once K have finished and no live beam can beat the worst of them (exact:
log-probabilities only fall, and the bound divides by the longest possible length).
Both decoders never output [PAD]/[CLS]/[MASK] (the log-probabilities are renormalised
over the other tokens) and end every output by max_target tokens.

Example:
    >>> # params = init_seq2seq(mlm, seq2seq_config(mlm, tok, 48, 48, autoregressive=True))
    >>> # tokens_BT, lengths_B = ar_greedy(params, source_BS, source_mask_BS)
    >>> # tokens_BKT, lengths_BK, scores_BK = ar_beam(params, source_BS, source_mask_BS, beams=4)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from makemost_jax.errors import ConfigError
from makemost_jax.models import bert, forward, init_cache, token_logprobs
from makemost_jax.models.cache import gather_rows, repeat_rows
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


def _step(params: Seq2SeqParams, cache, token_R, i):
    """Feed token i (position i) of every row; `(cache, log-probs (R, V) of token i + 1)`.

    [PAD]/[CLS]/[MASK] get -inf and the others are renormalised; at i == max_target only
    [SEP] stays possible (with its own log-probability), so every output ends in time.
    """
    cfg = params.config
    position = jnp.full((token_R.shape[0], 1), i + bert.position_start(cfg.model))
    out = forward(params.model, token_R[:, None], cache=cache, positions=position)
    banned = jnp.array([cfg.pad_id, cfg.cls_id, cfg.mask_id])
    logp_RV = jax.nn.log_softmax(out.logits[:, 0].at[:, banned].set(-jnp.inf).astype(jnp.float32), axis=-1)
    last = (i == cfg.max_target) & (jnp.arange(logp_RV.shape[1]) != cfg.sep_id)
    return out.cache, jnp.where(last[None], -jnp.inf, logp_RV)


def _start_cache(params: Seq2SeqParams, source_BS, source_mask_BS, rows_per_source: int):
    """An empty decoder cache of [CLS] + max_target slots, each source's encoding repeated per row."""
    cfg = params.config
    source = repeat_rows(_source(params, source_BS, source_mask_BS), rows_per_source)
    cache = init_cache(cfg.model_config, source.batch, cfg.max_target + 1, source.k.dtype)
    return dataclasses.replace(cache, source=source)


@jax.jit
def _greedy(params: Seq2SeqParams, source_BS, source_mask_BS):
    cfg = params.config
    b = source_BS.shape[0]
    cache = _start_cache(params, source_BS, source_mask_BS, 1)
    out_BT = jnp.full((b, cfg.max_target), cfg.pad_id, jnp.int32)

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < cfg.max_target + 1) & ~done_B.all()

    def body(carry):
        i, token_B, cache, out_BT, done_B, lengths_B = carry
        cache, logp_BV = _step(params, cache, token_B, i)
        next_B = logp_BV.argmax(-1).astype(jnp.int32)
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


def _follow(cache, rows_R):
    """The self-attention cache of rows `rows_R`; the shared encoded source stays where it is."""
    moved = gather_rows(dataclasses.replace(cache, source=None), rows_R)
    return dataclasses.replace(moved, source=cache.source)


def _take(x_BC, index_BK):
    """x[b, index[b, k]] for (B, C) or (B, C, T) arrays."""
    index = index_BK if x_BC.ndim == 2 else index_BK[..., None]
    return jnp.take_along_axis(x_BC, index, axis=1)


@functools.partial(jax.jit, static_argnames=("beams",))
def _beam(params: Seq2SeqParams, source_BS, source_mask_BS, length_penalty, beams: int):
    cfg = params.config
    b, k, t, v = source_BS.shape[0], beams, cfg.max_target, cfg.model.vocab_size
    cache = _start_cache(params, source_BS, source_mask_BS, k)
    # One live beam at the start: the others would only duplicate it.
    first_BK = jnp.broadcast_to(jnp.arange(k) == 0, (b, k))
    live = {"score": jnp.where(first_BK, 0.0, -jnp.inf), "tokens": jnp.full((b, k, t), cfg.pad_id, jnp.int32)}
    done = {"score": jnp.full((b, k), -jnp.inf), "tokens": jnp.full((b, k, t), cfg.pad_id, jnp.int32),
            "lengths": jnp.zeros((b, k), jnp.int32)}

    def finished_B(i, live, done):
        # Exact stop: a live beam's log-prob only falls, and dividing a negative score by the
        # longest possible length (max_target + 1 with [SEP]) is the most it could gain.
        best_live = live["score"].max(1) / (t + 1.0) ** length_penalty
        return (i > t) | (done["score"].min(1) >= best_live)

    def cond(carry):
        i, _, _, live, done = carry
        return ~finished_B(i, live, done).all()

    def body(carry):
        i, token_R, cache, live, done = carry
        cache, logp_RV = _step(params, cache, token_R, i)
        cand_BKV = live["score"][..., None] + logp_RV.reshape(b, k, v)
        value_BC, index_BC = jax.lax.top_k(cand_BKV.reshape(b, k * v), 2 * k)
        parent_BC, token_BC = index_BC // v, (index_BC % v).astype(jnp.int32)
        ends_BC = token_BC == cfg.sep_id
        # Only the top K candidates may finish (so K = 1 is greedy); a finished output is its parent's tokens.
        may_end_BC = ends_BC & (jnp.arange(2 * k)[None] < k)
        normalised_BC = value_BC / (i + 1.0) ** length_penalty
        pool = {"score": jnp.concatenate([done["score"], jnp.where(may_end_BC, normalised_BC, -jnp.inf)], 1),
                "tokens": jnp.concatenate([done["tokens"], _take(live["tokens"], parent_BC)], 1),
                "lengths": jnp.concatenate([done["lengths"], jnp.full((b, 2 * k), i, jnp.int32)], 1)}
        keep_BK = jax.lax.top_k(pool["score"], k)[1]
        new_done = {name: _take(x, keep_BK) for name, x in pool.items()}
        # The best K candidates that did not end continue; their caches follow their parents.
        score_BK, pick_BK = jax.lax.top_k(jnp.where(ends_BC, -jnp.inf, value_BC), k)
        parent_BK, next_BK = _take(parent_BC, pick_BK), _take(token_BC, pick_BK)
        tokens_BKT = _take(live["tokens"], parent_BK)
        tokens_BKT = jnp.where(jnp.arange(t)[None, None] == i, next_BK[..., None], tokens_BKT)
        cache = _follow(cache, (jnp.arange(b)[:, None] * k + parent_BK).reshape(-1))
        new_live = {"score": score_BK, "tokens": tokens_BKT}
        # Sources already finished keep their results (their rows still run: shapes are static).
        stop_B = finished_B(i, live, done)
        new_done = jax.tree.map(lambda new, old: jnp.where(stop_B.reshape(-1, *[1] * (old.ndim - 1)), old, new),
                                new_done, done)
        return i + 1, next_BK.reshape(-1), cache, new_live, new_done

    start = (jnp.int32(0), jnp.full((b * k,), cfg.cls_id, jnp.int32), cache, live, done)
    _, _, _, _, done = jax.lax.while_loop(cond, body, start)
    return done["tokens"], done["lengths"], done["score"]


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


def ar_beam(params: Seq2SeqParams, source_BS, source_mask_BS, beams: int = 4, length_penalty: float = 0.0):
    """KV-cached beam search; `(tokens (B, K, max_target), lengths (B, K), scores (B, K))`, best first.

    `scores` are log p(output + [SEP]) / (length + 1) ** `length_penalty` (0: the most likely
    outputs); see the module doc for the search. `beams=1` equals `ar_greedy`.

    Example:
        >>> # tokens_BKT, lengths_BK, scores_BK = ar_beam(params, source_BS, source_mask_BS, beams=4)
        >>> # best_BT, best_B = tokens_BKT[:, 0], lengths_BK[:, 0]
    """
    if not params.config.autoregressive:
        raise ConfigError("ar_beam needs the autoregressive baseline; use nar_decode for the NAR model")
    if beams < 1:
        raise ConfigError(f"beams={beams} must be at least 1")
    if length_penalty < 0:
        raise ConfigError(f"length_penalty={length_penalty} must be >= 0 (0 ranks by log-probability)")
    source_BS, source_mask_BS = jnp.asarray(source_BS, jnp.int32), jnp.asarray(source_mask_BS, jnp.int32)
    check_source(params.config, source_BS, source_mask_BS)
    return _beam(params, source_BS, source_mask_BS, jnp.float32(length_penalty), beams=beams)


@jax.jit
def ar_logits_full(params: Seq2SeqParams, source_BS, source_mask_BS, inputs_BT):
    """Logits (B, T, V) of the AR decoder on whole inputs without a cache (reference for tests).

    Example:
        >>> # ar_logits_full(params, src_BS, src_mask_BS, jnp.array([[cls, y1, y2]]))
    """
    return forward(params.model, inputs_BT, positions=target_positions(params.config, inputs_BT),
                   source=_source(params, source_BS, source_mask_BS)).logits
