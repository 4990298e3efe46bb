"""Hidden-state optimisation for language modelling: the segment loop under one `lax.scan`.

A token stream is read in segments of `segment` tokens with a cache of at most
`cache_size` past positions (METHODS.md section 1). Each segment is first scored from
the cache (that NLL is what perplexity reports), then the gradient of its NLL with
respect to the cached keys and values updates them with per-slot Adam
(`hso_steps` times), then the segment's own keys/values are recomputed from the
updated past (`recompute`) and appended, evicting the oldest slots together with
their Adam moments and step counts.

Positions: absolute-position models (GPT-2) give a new segment positions starting at
the number of cached tokens, so positions stay below `segment + cache_size`; rotary
models (Llama family) keep counting, which keeps relative distances right.

Everything runs in one jitted `lax.scan` over segments with a fixed-size cache
buffer, so a text compiles once per (segments, batch) shape, and the learning rate
and betas are traced values: a sweep over them reuses the compiled program.

Params held per layer (`mm.per_layer`, converted once by the caller) keep the cache and its
Adam moments per layer too, and run the layers unrolled: no copy of each layer's weights
out of the stacked arrays in every pass, and the work that no gradient or later layer needs
is dropped. SmolLM2-135M, 1,025 tokens: 10-12% less time per text on this CPU, for about
8 s more compilation (`benchmarks/results/hso_cpu.md`); the loop's NLLs are the same.

Dimensions: K segments, B texts, S segment length, C cache slots, L layers,
G key/value heads, H head width (cache arrays as `KVCache` keeps them: keys (L, B, G, H, C), values (L, B, G, C, H)).

Example:
    >>> import jax, numpy as np
    >>> from makemost_jax.models import from_hf_config, init_params
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 2,
    ...                       "n_head": 2, "vocab_size": 50, "n_positions": 32})
    >>> params = init_params(cfg, jax.random.key(0))
    >>> tokens = np.random.default_rng(0).integers(0, 50, (2, 41))
    >>> result = hso_nll(params, tokens, HSOConfig(segment=8, cache_size=16, lr=1e-2))
    >>> result.nll.shape, int(result.counts.sum())      # 5 segments, 40 scored tokens per text
    ((2, 5), 80)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.hso.adam import (
    AdamHyper,
    SlotAdamState,
    append_adam_slots,
    append_slots,
    init_slot_adam,
    slot_adam_step,
)
from makemost_jax.models.cache import KV_AXES, KVCache, init_cache, into_layers, split_layers
from makemost_jax.models.layers import remat_layers
from makemost_jax.models.model import forward, head_nll, is_per_layer
from makemost_jax.models.types import Params
from makemost_jax.sharding import constrain

SLOT_AXES = (KVCache.SLOT_AXES["k"], KVCache.SLOT_AXES["v"])  # of the cache's keys and values
# The gradient w.r.t. the cache keeps each layer's matmul outputs and recomputes the
# attention's elementwise work: no (L, S, C) stacks of scores to fill and read back,
# 5% faster and less memory than keeping everything (an A/B of bench_hso's probe, CPU).
GRADIENT_REMAT = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


@dataclasses.dataclass(frozen=True)
class HSOConfig:
    """The knobs of METHODS.md section 1.

    The defaults are what `benchmarks/hso_domains.py` recommends: the lowest dev
    perplexity averaged over four domains (Austen, Wikipedia, KJV, Python) on SmolLM2-135M
    is lr 1e-2 with `sink=4`. `sink` > 0 never evicts the first `sink` cached tokens (our
    extension, after the "attention sinks" of StreamingLLM, Xiao et al. 2023): models
    trained with a BOS-like first token lose much of their accuracy once it leaves the
    cache (SmolLM2 on Austen: 51.2 perplexity without, 33.0 with; `sink=0` is METHODS.md's
    protocol). `offsets=True` optimises additive offsets to the cached states instead of
    the states themselves: the same update mathematically, kept for clarity of the API.

    Example:
        >>> HSOConfig(segment=64, cache_size=192, lr=3e-3).hyper().lr
        0.003
    """

    segment: int = 128
    cache_size: int = 384
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    hso_steps: int = 1
    recompute: bool = True
    offsets: bool = False
    sink: int = 4

    def hyper(self) -> AdamHyper:
        return AdamHyper(self.lr, self.beta1, self.beta2, self.eps)

    def validate(self, params: Params) -> None:
        """Raise `ConfigError` for settings the model or Adam cannot take.

        Example:
            >>> # HSOConfig(segment=1024, cache_size=512).validate(gpt2_params)  -> ConfigError
        """
        cfg = params.config
        cfg.require_decoder_only("HSO")
        if not cfg.causal or not cfg.has_lm_head:
            raise ConfigError(f"HSO needs a causal language model with an LM head; "
                              f"{cfg.hf_model_type or cfg.family} is not one")
        for name in ("segment", "cache_size", "hso_steps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.sink, (int, np.integer)) or not 0 <= self.sink < self.cache_size:
            raise ConfigError(f"sink={self.sink!r} must be an integer in [0, cache_size={self.cache_size}); "
                              "lower sink or raise cache_size")
        if self.segment + self.cache_size > cfg.max_positions:
            raise ConfigError(f"segment={self.segment} + cache_size={self.cache_size} exceeds the model's "
                              f"context of {cfg.max_positions} tokens; make them add up to at most that")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"lr={self.lr} must be a finite number >= 0 (0 switches the update off)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not self.eps > 0:
            raise ConfigError(f"eps={self.eps} must be > 0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Segments:
    """A batch of token streams cut into K segments of S tokens (all (K, B, S))."""

    inputs: jax.Array  # int32 input ids (0 where padding)
    targets: jax.Array  # int32 next-token ids
    weights: jax.Array  # float32: 1 where the target is scored
    mask: jax.Array  # bool: the input is a real token (padding slots are never attended)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HSOState:
    """The scan carry: the optimised states, the cache bookkeeping and per-slot Adam."""

    past: tuple  # (k, v) as the cache keeps them (stacked, or per layer with per-layer params): the states,
    #               or their offsets when `base` is set
    base: tuple | None  # (k, v) the unoptimised states in offsets mode, else None
    positions: jax.Array  # (B, C) int32: each slot's position, -1 when empty
    fill: jax.Array  # () int32
    next_position: jax.Array  # (B,) int32
    adam: SlotAdamState | None  # None when the update is off

    @property
    def valid(self) -> jax.Array:
        return self.positions >= 0

    def kv(self, past: tuple | None = None) -> tuple:
        """The effective keys and values the model attends to (for `past`, default the state's own)."""
        past = self.past if past is None else past
        return past if self.base is None else jax.tree.map(jnp.add, self.base, past)

    def slot_positions(self, absolute: bool) -> jax.Array:
        """(B, C) positions the model sees for the cached slots.

        Absolute-position models keep the cache contiguous: the slots count 0, 1, ... in
        order, so the next segment starts at the number of cached tokens (METHODS.md).
        """
        if not absolute:
            return self.positions
        return jnp.where(self.valid, jnp.cumsum(self.valid, axis=1, dtype=jnp.int32) - 1, -1)

    def cache(self, absolute: bool = False) -> KVCache:
        """The state as an ordinary `KVCache` (C slots), e.g. to continue with `forward`."""
        k, v = self.kv()
        next_position = self.valid.sum(1, dtype=jnp.int32) if absolute else self.next_position
        return KVCache(k=k, v=v, positions=self.slot_positions(absolute), fill=self.fill,
                       next_position=next_position)


def _constrain_kv(kv: tuple) -> tuple:
    return tuple(jax.tree.map(lambda a, name=name: constrain(a, KV_AXES[name]), x) for name, x in zip(("k", "v"), kv))


def _slot_axes(kv: tuple) -> tuple:
    """The slot axis of every array of `kv` (keys and values, stacked or per layer)."""
    return tuple(jax.tree.map(lambda _, axis=axis: axis, x) for x, axis in zip(kv, SLOT_AXES))


def init_state(params: Params, batch: int, cache_size: int, offsets: bool, update: bool) -> HSOState:
    """An empty HSO state for `batch` streams, its cache held per layer when `params` are (`per_layer`).

    Example:
        >>> # state = init_state(params, batch=4, cache_size=384, offsets=False, update=True)
    """
    empty = init_cache(params.config, batch, cache_size, params.dtype)
    if is_per_layer(params):  # each layer's states where its unrolled block reads them: no slicing, no stacking
        empty = split_layers(empty)
    kv = (empty.k, empty.v)
    adam = init_slot_adam(kv, _slot_axes(kv)) if update else None
    return HSOState(past=kv, base=kv if offsets else None, positions=empty.positions, fill=empty.fill,
                    next_position=empty.next_position, adam=adam)


def _absolute(params: Params) -> bool:
    return params.config.embed.positions == "learned"


def segment_positions(params: Params, state: HSOState, seg: Segments) -> jax.Array:
    """(B, S) positions of a segment's tokens after the cached ones.

    Example:
        >>> # positions_BS = segment_positions(params, state, seg)
    """
    start_B = state.valid.sum(1, dtype=jnp.int32) if _absolute(params) else state.next_position
    return jnp.maximum(start_B[:, None] + jnp.cumsum(seg.mask, 1, dtype=jnp.int32) - 1, 0)


def segment_nll(params: Params, kv: tuple, state: HSOState, seg: Segments):
    """NLL of one segment read after the cached states `kv`; returns (total, (nll_B, new_kv)).

    `kv` is the differentiable argument (the effective cached keys and values); the
    segment's own new keys/values (laid out as the cache keeps them) come back as auxiliary output.

    Example:
        >>> # (loss, (nll_B, new_kv)), grad = jax.value_and_grad(
        >>> #     lambda kv: segment_nll(params, kv, state, seg), has_aux=True)(state.kv())
    """
    cache = dataclasses.replace(state.cache(_absolute(params)), k=kv[0], v=kv[1])
    positions_BS = segment_positions(params, state, seg)
    with remat_layers(GRADIENT_REMAT):  # (no effect on a call that is not differentiated)
        out = forward(params, seg.inputs, cache=cache, positions=positions_BS, mask=seg.mask, write_cache=False,
                      states_only=True)
    nll_BS = head_nll(params.config, params.weights, out.states, seg.targets)
    nll_B = jnp.sum(nll_BS * seg.weights, axis=1)
    return nll_B.sum(), (nll_B, (out.cache.k, out.cache.v))


def hso_segment_step(params: Params, state: HSOState, seg: Segments, hyper: AdamHyper, *,
                     hso_steps: int = 1, recompute: bool = True, sink: int = 0):
    """Score one segment, update the past (when `state.adam` is set), append the segment.

    Returns (new state, nll_B, finite) where `finite` says the NLL and the updated
    states are free of NaN/inf.

    Example:
        >>> # state, nll_B, ok = hso_segment_step(params, state, seg, HSOConfig().hyper())
    """
    def loss(past):
        return segment_nll(params, state.kv(past), state, seg)

    past, adam = state.past, state.adam
    if adam is None:
        _, (nll_B, new_kv) = loss(past)
    else:
        (_, (nll_B, new_kv)), grad = jax.value_and_grad(loss, has_aux=True)(past)
        for step in range(hso_steps):
            if step:  # later steps: the gradient at the updated past
                grad = jax.grad(lambda p: loss(p)[0])(past)
            past, adam = slot_adam_step(past, grad, adam, state.fill, hyper)
        past = _constrain_kv(past)
        if recompute:
            _, (_, new_kv) = segment_nll(params, state.kv(past), state, seg)
    finite = jnp.all(jnp.isfinite(nll_B)) & jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(past)]))

    s = seg.inputs.shape[1]
    def append(olds, news):  # news: the segment's (L, ...) keys and values, into stacked or per-layer buffers
        return tuple(into_layers(lambda o, n, axis=axis: append_slots(o, n, state.fill, axis, keep_first=sink),
                                 old, new) for old, new, axis in zip(olds, news, SLOT_AXES))

    if state.base is None:
        past, base = append(past, new_kv), None
    else:  # new slots: the fresh states as base, zero offsets
        base = append(state.base, new_kv)
        past = append(past, tuple(jnp.zeros_like(n) for n in new_kv))
    new_state = HSOState(
        past=_constrain_kv(past), base=base,
        positions=append_slots(state.positions, jnp.where(seg.mask, segment_positions(params, state, seg), -1),
                               state.fill, 1, sink),
        fill=jnp.minimum(state.fill + s, state.valid.shape[1]),
        next_position=state.next_position + seg.mask.sum(1, dtype=jnp.int32),
        adam=None if adam is None else append_adam_slots(adam, s, state.fill, sink))
    return new_state, nll_B, finite


@functools.partial(jax.jit, static_argnames=("cache_size", "hso_steps", "recompute", "offsets", "update", "sink"))
def run_segments(params: Params, segments: Segments, hyper: AdamHyper, *, cache_size: int,
                 hso_steps: int = 1, recompute: bool = True, offsets: bool = False, update: bool = True,
                 sink: int = 0):
    """The whole segment loop in one `lax.scan`; returns (nll_KB, finite_K, final state).

    Example:
        >>> # nll_KB, finite_K, state = run_segments(params, lm_segments(tokens, lengths, 128),
        >>> #                                        HSOConfig().hyper(), cache_size=384)
    """
    state = init_state(params, segments.inputs.shape[1], cache_size, offsets, update)

    def body(state, seg):
        state, nll_B, finite = hso_segment_step(params, state, seg, hyper, hso_steps=hso_steps,
                                                recompute=recompute, sink=sink)
        return state, (nll_B, finite)

    state, (nll_KB, finite_K) = jax.lax.scan(body, state, segments)
    return nll_KB, finite_K, state


def lm_segments(tokens_BN: np.ndarray, lengths_B: np.ndarray, segment: int) -> Segments:
    """Cut right-padded streams into segments: inputs t[i*S:(i+1)*S], targets shifted by one.

    Targets at or beyond a row's length get weight 0; the first token is never scored.

    Example:
        >>> seg = lm_segments(np.arange(1, 8)[None], np.array([7]), segment=4)
        >>> seg.inputs[:, 0].tolist(), seg.weights[:, 0].tolist()
        ([[1, 2, 3, 4], [5, 6, 7, 0]], [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    """
    b, n = tokens_BN.shape
    k = -(-(int(lengths_B.max()) - 1) // segment)
    width = k * segment
    padded = np.zeros((b, width + 1), np.int32)
    padded[:, :min(n, width + 1)] = tokens_BN[:, :width + 1]
    weights = (np.arange(1, width + 1)[None] < lengths_B[:, None]).astype(np.float32)

    def split(x):  # (B, K*S) -> (K, B, S)
        return np.ascontiguousarray(x.reshape(b, k, segment).transpose(1, 0, 2))

    return Segments(inputs=split(padded[:, :-1]), targets=split(padded[:, 1:]), weights=split(weights),
                    mask=np.ones((k, b, segment), bool))


@dataclasses.dataclass(frozen=True)
class HSOResult:
    """Per-segment NLLs of one run of the loop, with its settings and cost.

    Example:
        >>> r = HSOResult(nll=np.array([[2.0, 4.0]]), counts=np.array([[2, 2]]), seconds=1.0,
        ...               compiles=1, config=HSOConfig(), update=True)
        >>> round(r.ppl, 4), r.n_tokens
        (4.4817, 4)
    """

    nll: np.ndarray  # (B, K) NLL sum per text and segment, nats
    counts: np.ndarray  # (B, K) scored tokens
    seconds: float  # wall time of the call, compilation included
    compiles: int  # compilations this call caused (0 when the shape was seen before)
    config: HSOConfig
    update: bool  # False: the loop with the update switched off

    @property
    def n_tokens(self) -> int:
        return int(self.counts.sum())

    @property
    def mean_nll(self) -> float:
        return float(self.nll.sum() / self.n_tokens)

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        """Settings and summary numbers, JSON-ready."""
        return {**dataclasses.asdict(self.config), "update": self.update, "ppl": self.ppl,
                "mean_nll": self.mean_nll, "n_tokens": self.n_tokens, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second, "compiles": self.compiles}


def _check_tokens(params: Params, tokens, lengths, segment: int):
    tokens_BN = np.asarray(tokens)
    if tokens_BN.ndim == 1:
        tokens_BN = tokens_BN[None]
    if tokens_BN.ndim != 2 or not np.issubdtype(tokens_BN.dtype, np.integer):
        raise InputError(f"tokens must be a (texts, length) array of integer ids, got shape {tokens_BN.shape} "
                         f"and dtype {tokens_BN.dtype}")
    lengths_B = np.full(tokens_BN.shape[0], tokens_BN.shape[1]) if lengths is None else np.asarray(lengths)
    if lengths_B.shape != tokens_BN.shape[:1] or (lengths_B > tokens_BN.shape[1]).any():
        raise InputError(f"lengths {lengths_B.tolist()} must give one length per text, each at most "
                         f"{tokens_BN.shape[1]}")
    short = np.flatnonzero(lengths_B < segment + 1)
    if short.size:
        raise InputError(f"text {int(short[0])} has {int(lengths_B[short[0]])} tokens, shorter than one "
                         f"segment ({segment} + 1); use a smaller --segment or a longer text")
    vocab = params.config.vocab_size
    within = np.arange(tokens_BN.shape[1])[None] < lengths_B[:, None]
    if ((tokens_BN < 0) | (tokens_BN >= vocab))[within].any():
        raise InputError(f"a token id is outside the model's vocabulary [0, {vocab}); was the text tokenized "
                         "with this model's tokenizer?")
    return tokens_BN, lengths_B


def raise_if_not_finite(finite_K, segment: int, what: str = "segment") -> None:
    """Stop with an error naming the first segment whose NLL or updated states went NaN/inf.

    Example:
        >>> raise_if_not_finite(np.array([True, True]), 128)
    """
    bad = np.flatnonzero(~np.asarray(finite_K))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"HSO produced NaN/inf in {what} {i} (tokens {i * segment}..{(i + 1) * segment - 1}); "
                         "lower lr, use float32 parameters, or check the input")


def hso_nll(params: Params, tokens, config: HSOConfig, lengths=None, *, update: bool = True) -> HSOResult:
    """Per-segment NLL of token streams under hidden-state optimisation.

    `tokens`: (B, N) ids of B independent texts (or one 1-D text), right-padded when
    `lengths` (B,) gives their true lengths. `update=False` runs the same loop with the
    update switched off (the lr=0 baseline, without paying for gradients). For long texts
    pass `per_layer(params)[0]`: faster per segment, slower to compile (see the module).

    Example:
        >>> # r = hso_nll(params, tok.encode_for_model(text), HSOConfig(segment=128, cache_size=384))
        >>> # r.ppl, r.tokens_per_second, r.compiles
    """
    config.validate(params)
    tokens_BN, lengths_B = _check_tokens(params, tokens, lengths, config.segment)
    segments = lm_segments(tokens_BN, lengths_B, config.segment)
    t0 = time.perf_counter()
    compiled_before = run_segments._cache_size()
    nll_KB, finite_K, _ = run_segments(params, segments, config.hyper(), cache_size=config.cache_size,
                                       hso_steps=config.hso_steps, recompute=config.recompute,
                                       offsets=config.offsets, update=update, sink=config.sink)
    nll_KB, finite_K = np.asarray(nll_KB, np.float64), np.asarray(finite_K)
    seconds = time.perf_counter() - t0
    raise_if_not_finite(finite_K, config.segment)
    counts_BK = np.asarray(segments.weights).sum(2).T.astype(np.int64)
    return HSOResult(nll=nll_KB.T, counts=counts_BK, seconds=seconds,
                     compiles=run_segments._cache_size() - compiled_before, config=config, update=update)


def compare_on_tokens(params: Params, ids, config: HSOConfig, sliding_batch_size: int = 8) -> dict:
    """HSO, the same loop with lr=0, and the strided sliding window, on the same tokens.

    The sliding window reads `segment + cache_size` tokens and moves by `segment`, so
    every token is scored with the same amount of left context as in the HSO loop,
    but from states recomputed from scratch. Returns a dict of three result dicts
    ("hso", "lr0", "sliding"), each with ppl, n_tokens and seconds.

    Example:
        >>> # compare_on_tokens(params, tok.encode_for_model(text), HSOConfig(lr=3e-2))["hso"]["ppl"]
    """
    from makemost_jax.perplexity import perplexity

    hso = hso_nll(params, ids, config)
    lr0 = hso_nll(params, ids, config, update=False)
    sliding = perplexity(params, np.asarray(ids), context=config.segment + config.cache_size,
                         stride=config.segment, batch_size=sliding_batch_size, progress=False)
    return {"hso": hso.to_dict(), "lr0": lr0.to_dict(),
            "sliding": {"ppl": sliding.ppl, "mean_nll": sliding.mean_nll, "n_tokens": sliding.n_tokens,
                        "seconds": sliding.seconds, "tokens_per_second": sliding.tokens_per_second,
                        "context": sliding.context, "stride": sliding.stride}}
