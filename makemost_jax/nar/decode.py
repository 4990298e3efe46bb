"""Iterative refinement decoding of the NAR model, batched and jitted.

For each source: predict the target length with the length head (or take the given
lengths), try the top `length_candidates` lengths as separate rows, start from all-[MASK]
(`init="mask"`) or uniformly random tokens (`init="random"`, SUNDAE's choice) and refine
`steps` times: each step re-predicts every position from the decoder's logits (argmax
when `temperature == 0`, else sampling at that temperature). With `remask=True`
(mask-predict), after step i < steps the `len * (steps - 1 - i) / steps` least confident
tokens are replaced by [MASK] again. The [PAD]/[CLS]/[SEP]/[MASK] ids are never output.
Among the length candidates the one with the highest mean log-probability of its final
tokens wins. The encoder and the cross-attention keys/values run once per source.
`nar_decode_steps` reads the results after several step counts off one run.

Example:
    >>> # result = nar_decode(params, source_BS, source_mask_BS, DecodeConfig(steps=4))
    >>> # result.tokens[0, :result.lengths[0]]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models.cache import repeat_rows
from makemost_jax.nar.model import Seq2SeqParams, check_source, cross_kv, encode, length_logits, nar_logits

INITS = ("random", "mask")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Settings of NAR decoding (hashable; static under `jit`).

    Example:
        >>> DecodeConfig(steps=8, remask=True, init="mask").temperature
        0.0
    """

    steps: int = 10
    temperature: float = 0.0  # 0: argmax
    remask: bool = False  # mask-predict re-masking of the least confident tokens
    init: str = "random"  # "random" | "mask"
    length_candidates: int = 1

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"DecodeConfig.steps={self.steps}: decoding needs at least 1 refinement step")
        if self.temperature < 0:
            raise ConfigError(f"DecodeConfig.temperature={self.temperature} must be >= 0 (0 = argmax)")
        if self.init not in INITS:
            raise ConfigError(f"DecodeConfig.init={self.init!r}; use one of {INITS}")
        if self.length_candidates < 1:
            raise ConfigError(f"DecodeConfig.length_candidates={self.length_candidates} must be at least 1")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeResult:
    """tokens (B, max_target) padded with [PAD], lengths (B,), score (B,) = mean token log-prob."""

    tokens: jax.Array
    lengths: jax.Array
    score: jax.Array


def _ban_specials(config, logits_BTV):
    return logits_BTV.at[..., jnp.array(config.special_ids)].set(-jnp.inf)


@functools.partial(jax.jit, static_argnames=("config",))
def _decode(params: Seq2SeqParams, source_BS, source_mask_BS, lengths_BN, key, steps_M, config: DecodeConfig):
    # `steps_M` (M,) increasing step counts, traced (not config.steps) so every count shares one compilation;
    # one result per count, read off the same refinement trajectory (steps i < s do not depend on s without
    # remask), so M counts cost as much as the largest alone. Results are stacked on a leading M axis.
    cfg = params.config
    t = cfg.max_target
    enc_BSD = encode(params, source_BS, source_mask_BS)
    if lengths_BN is None:
        lengths_BN = _top_lengths(params, enc_BSD, source_mask_BS, config.length_candidates)
    b, n = lengths_BN.shape
    # One row per (source, length candidate): candidates of a source are adjacent rows.
    source_R = repeat_rows(cross_kv(params, enc_BSD, source_mask_BS), n)
    lengths_R = lengths_BN.reshape(-1)
    mask_RT = jnp.arange(t)[None] < lengths_R[:, None]
    k_init, k_steps = jax.random.split(key)
    if config.init == "mask":
        x_RT = jnp.full(mask_RT.shape, cfg.mask_id, jnp.int32)
    else:
        random_RT = jax.random.randint(k_init, mask_RT.shape, 0, cfg.model.vocab_size, jnp.int32)
        banned = jnp.isin(random_RT, jnp.array(cfg.special_ids))
        x_RT = jnp.where(banned, cfg.mask_id, random_RT)
    x_RT = jnp.where(mask_RT, x_RT, cfg.pad_id)
    steps = steps_M[-1]  # the remask schedule's length (remask allows one count only)

    def step(i, carry):
        x_RT, _ = carry
        logits = _ban_specials(cfg, nar_logits(params, x_RT, mask_RT, source_R))
        logp_RTV = jax.nn.log_softmax(logits, axis=-1)
        if config.temperature == 0:
            pred_RT = logp_RTV.argmax(-1).astype(jnp.int32)
        else:
            pred_RT = jax.random.categorical(jax.random.fold_in(k_steps, i), logits / config.temperature)
            pred_RT = pred_RT.astype(jnp.int32)
        conf_RT = jnp.take_along_axis(logp_RTV, pred_RT[..., None], axis=-1)[..., 0]
        x_RT = jnp.where(mask_RT, pred_RT, cfg.pad_id)
        if config.remask:
            # Re-mask the k least confident real tokens, k shrinking linearly to 0 at the last step.
            k_R = (lengths_R * (steps - 1 - i)) // steps
            rank_RT = jnp.argsort(jnp.argsort(jnp.where(mask_RT, conf_RT, jnp.inf), axis=1), axis=1)
            x_RT = jnp.where(mask_RT & (rank_RT < k_R[:, None]), cfg.mask_id, x_RT)
        return x_RT, conf_RT

    def best(x_RT, conf_RT):
        score_R = (conf_RT * mask_RT).sum(1) / jnp.maximum(lengths_R, 1)
        pick = jnp.arange(b) * n + score_R.reshape(b, n).argmax(1)
        return DecodeResult(tokens=x_RT[pick], lengths=lengths_R[pick], score=score_R[pick])

    carry, results = (x_RT, jnp.zeros(mask_RT.shape, jnp.float32)), []
    for m in range(steps_M.shape[0]):
        carry = jax.lax.fori_loop(steps_M[m - 1] if m else 0, steps_M[m], step, carry)
        results.append(best(*carry))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *results)


def _top_lengths(params: Seq2SeqParams, enc_BSD, source_mask_BS, top: int):
    logits_BN = length_logits(params, enc_BSD, source_mask_BS).at[:, 0].set(-jnp.inf)  # never empty
    return jax.lax.top_k(logits_BN, min(top, params.config.max_target))[1].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("top",))
def predict_lengths(params: Seq2SeqParams, source_BS, source_mask_BS, top: int = 1):
    """The `top` most likely target lengths (B, top), from 1 to max_target.

    Example:
        >>> # predict_lengths(params, source_BS, source_mask_BS, top=3)
    """
    return _top_lengths(params, encode(params, source_BS, source_mask_BS), source_mask_BS, top)


def nar_decode(params: Seq2SeqParams, source_BS, source_mask_BS, config: DecodeConfig = DecodeConfig(),
               key: jax.Array | None = None, lengths=None) -> DecodeResult:
    """Decode a batch of padded sources; `lengths` (B,) fixes the target lengths.

    Deterministic with `temperature=0` and `init="mask"` (or a fixed `key`); each row's
    result does not depend on the other rows of the batch.

    Example:
        >>> # r = nar_decode(params, src_BS, src_mask_BS, DecodeConfig(steps=4, init="mask"), lengths=jnp.array([5]))
    """
    return nar_decode_steps(params, source_BS, source_mask_BS, config, (config.steps,), key, lengths)[0]


def nar_decode_steps(params: Seq2SeqParams, source_BS, source_mask_BS, config: DecodeConfig = DecodeConfig(),
                     steps: Sequence[int] = (1, 2, 4, 8), key: jax.Array | None = None,
                     lengths=None) -> list[DecodeResult]:
    """`nar_decode` at each of several step counts (`steps` replaces `config.steps`), for the cost of the largest.

    Without remask, refinement step i does not depend on the total, so the results after
    1, 2, 4, ... steps lie on one trajectory: result j equals `nar_decode` with
    `DecodeConfig(steps=steps[j])` and the same key. Remask spreads its schedule over the
    total, so it takes one count only.

    Example:
        >>> # by_steps = nar_decode_steps(params, src_BS, src_mask_BS, DecodeConfig(init="mask"), steps=(1, 4, 8))
        >>> # by_steps[2].tokens   # as nar_decode(..., DecodeConfig(steps=8, init="mask"))
    """
    if params.config.autoregressive:
        raise ConfigError("nar_decode needs a non-autoregressive model; use ar_greedy for the AR baseline")
    steps = [int(s) for s in steps]
    if not steps or steps[0] < 1 or steps != sorted(set(steps)):
        raise ConfigError(f"steps={steps} must be increasing step counts, each at least 1")
    if config.remask and len(steps) > 1:
        raise ConfigError("remask spreads its schedule over the total number of steps; decode one step count at a "
                          "time (nar_decode) with remask=True")
    source_BS, source_mask_BS = jnp.asarray(source_BS, jnp.int32), jnp.asarray(source_mask_BS, jnp.int32)
    check_source(params.config, source_BS, source_mask_BS)
    lengths_BN = None  # predicted inside the jitted decoder, from the same encoder pass
    if lengths is not None:
        lengths_BN = jnp.asarray(lengths, jnp.int32).reshape(-1, 1)
        if lengths_BN.shape[0] != source_BS.shape[0]:
            raise InputError(f"lengths has {lengths_BN.shape[0]} entries for {source_BS.shape[0]} sources")
        if int(lengths_BN.min()) < 1 or int(lengths_BN.max()) > params.config.max_target:
            raise InputError(f"lengths must lie in [1, max_target={params.config.max_target}]")
    key = jax.random.key(0) if key is None else key
    static = dataclasses.replace(config, steps=1)
    stacked = _decode(params, source_BS, source_mask_BS, lengths_BN, key, jnp.asarray(steps, jnp.int32), static)
    return [jax.tree.map(lambda x, j=j: x[j], stacked) for j in range(len(steps))]
