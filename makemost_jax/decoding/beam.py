"""Beam search and conditional beam search (CBS), jitted, with no host round-trips.

The search is t5x-style and batched: the prompt is prefilled once outside the loop
and its K beams share its cache slots (`models.cache.branch_rows`); each step scores
every continuation of every live beam, keeps the top 2K candidates, moves those that
end (EOS or the length limit) into a finished set of K and continues the best K that
did not end. The K beams' tokens of a step go to K slots of one buffer per prompt, and
each beam sees only the slots of its own history, so a beam that continues another's
hypothesis takes over that beam's slot positions: no keys or values are ever copied.
The steps run in up to `PHASES` `lax.while_loop`s, each over a cache that ends with
the last slot its steps fill, so attention does not read the slots of later steps.
Shapes are static, so one compilation serves every call with the same batch size,
prompt bucket and settings.

Conditional beam search is the same loop with an attribute term (METHODS.md 2): per
live beam the `prefilter` most likely tokens get `weight * term(hidden, candidates,
n_generated)` added to their cumulative LM log-probability for ranking, and a
finished hypothesis is kept only when `attribute.accepts(...)` says so. Finished
hypotheses are always scored by the pure LM log-likelihood (length-normalised when
asked), never by the term; plain beam search is the case term=None, attribute=None.

Hugging Face parity. With `length_norm="hf"` the search reproduces `transformers`
(5.x) `model.generate(num_beams=K, do_sample=False, num_return_sequences=K,
early_stopping=False, length_penalty=..., min_new_tokens=min_length, no_repeat_ngram_size=...)`
on left-padded decoder-only inputs: the top 2K candidates per step; only candidates
among the top K may finish; a finished score is `sum_logprobs / n ** length_penalty`
with n the generated tokens including EOS (prompt not counted); when the length limit
is reached the top K candidates finish as they are; a prompt stops once all K finished
slots are full and its best live beam, divided by (tokens generated so far) **
length_penalty, cannot beat the worst finished score (HF's `early_stopping=False`
heuristic). `tokens[b, k]` and `scores[b, k]` are HF's sequences and
`sequences_scores` in the same order (best first).
Note HF's default length_penalty is 1.0, here 0.0 (rank by log-likelihood: the mode).
Known differences: HF's n-gram ban also sees the left padding tokens (here only real
tokens count); HF's `early_stopping=True` / "never" are not offered; HF's K=1 is
greedy search, which this K=1 search equals.
`length_norm="gnmt"` divides by ((5 + n) / 6) ** length_penalty and stops with an
exact bound instead of HF's heuristic.

Dimensions: B batch, K beams, C = 2K candidates, P candidate tokens per beam,
R = B*K flat rows, T prompt length (padded), N new tokens, V vocabulary, D width.

Example:
    >>> import jax
    >>> from makemost_jax.models import from_hf_config, init_params
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 1,
    ...                       "n_head": 2, "vocab_size": 10, "n_positions": 64})
    >>> params = init_params(cfg, jax.random.key(0))
    >>> result = beam_search(params, [[1, 2, 3], [4]], beams=3, max_new_tokens=5, eos_id=9)
    >>> result.tokens.shape, result.scores.shape
    ((2, 3, 5), (2, 3))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from makemost_jax.decoding.sampling import DecoderInputs, ban_pad, decode_step, decoder_inputs, prefill_forward
from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models.cache import KVCache, branch_rows, extend_slots, gather_rows
from makemost_jax.models.model import decode_layout, forward
from makemost_jax.models.types import Params

LENGTH_NORMS = ("hf", "gnmt")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BeamResult:
    """Finished hypotheses per prompt, best first.

    A slot that holds no hypothesis (only possible when an attribute rejects
    outputs) has finished=False, score and logprob -inf, length 0 and pad tokens.
    """

    tokens: jax.Array  # (B, K, N) output ids; EOS (when emitted) at index `lengths`, then pad
    lengths: jax.Array  # (B, K) output tokens, EOS not counted
    scores: jax.Array  # (B, K) final ranking score: LM log-likelihood, length-normalised when asked
    logprobs: jax.Array  # (B, K) sum of log p of the output tokens, EOS included when emitted
    finished: jax.Array  # (B, K) bool: the slot holds a complete (and accepted) hypothesis


@dataclasses.dataclass(frozen=True)
class _Static:
    """Settings that shape the compiled loop (hashable, static under jit)."""

    beams: int
    max_new_tokens: int
    length_norm: str
    no_repeat_ngram_size: int
    attribute: Any
    prefilter: int  # candidate tokens per beam (the vocabulary when there is no term)
    hidden_layer: int | None  # the term's layer; None without a term


def _prefill(params: Params, inputs: DecoderInputs, size: int, layer: int | None):
    """Prompt (and source) into a fresh cache; (cache, last logits (B, V), last hidden (B, D) or None)."""
    out = prefill_forward(params, inputs.prompts, inputs.prompt_mask, size, inputs.sources, inputs.source_mask,
                          return_hidden=layer is not None)
    return out.cache, out.logits[:, 0], None if layer is None else out.hidden[layer][:, -1]


def _step(params: Params, cache: KVCache, tokens_R, layer: int | None):
    """One token per row; (cache, logits (R, V), hidden (R, D) or None)."""
    if layer is None:
        return (*decode_step(params, cache, tokens_R), None)
    out = forward(params, tokens_R[:, None], cache=cache, return_hidden=True)
    return out.cache, out.logits[:, 0], out.hidden[layer][:, 0]


PHASES = 4  # at most this many loops, each over a cache that holds only the slots filled by its end
PHASE_STEPS = 16  # and at least this many steps each (one compiled loop body per phase)


def _phase_ends(n: int) -> list[int]:
    """The step at which each phase of an n-step search ends (the last: n)."""
    width = max(PHASE_STEPS, -(-n // PHASES))
    return [min(n, end) for end in range(width, n + width, width)]


def _normalise(logp, length, length_penalty, length_norm: str):
    """Length-normalised score of hypotheses with `length` generated tokens (EOS included)."""
    length = jnp.asarray(length, jnp.float32)
    if length_norm == "hf":
        return logp / length ** length_penalty
    return logp / ((5.0 + length) / 6.0) ** length_penalty


def _ngram_ban(seq_RS, start_R, end, n: int, vocab: int):
    """(R, V) bool: tokens that would repeat an n-gram of seq[start:end] (HF's no_repeat_ngram).

    seq holds each row's tokens at [start_R, end); the last n-1 of them are the
    prefix a new token would extend.
    """
    r, s = seq_RS.shape
    starts = s - n + 1
    suffix_RM = jax.lax.dynamic_slice_in_dim(seq_RS, end - (n - 1), n - 1, axis=1)
    match_RJ = jnp.ones((r, starts), bool)
    for i in range(n - 1):
        match_RJ &= seq_RS[:, i:i + starts] == suffix_RM[:, i:i + 1]
    j_J = jnp.arange(starts)
    match_RJ &= (j_J[None] >= start_R[:, None]) & (j_J[None] + n - 1 < end)
    match_RJ &= (end - (n - 1) >= start_R)[:, None]
    banned_RJ = jnp.where(match_RJ, seq_RS[:, n - 1:], vocab)  # out of range: dropped
    rows_RJ = jnp.broadcast_to(jnp.arange(r)[:, None], banned_RJ.shape)
    return jnp.zeros((r, vocab), bool).at[rows_RJ, banned_RJ].set(True, mode="drop")


@functools.partial(jax.jit, static_argnames=("static",))
def _search(params, inputs: DecoderInputs, term, weight, length_penalty, min_length, eos, pad, *, static: _Static):
    prompts_BT, mask_BT = inputs.prompts, inputs.prompt_mask
    b, t = prompts_BT.shape
    k, n, v = static.beams, static.max_new_tokens, params.config.vocab_size
    c, p = 2 * k, static.prefilter
    r = b * k
    layer = static.hidden_layer
    f32 = jnp.float32

    # The K beams of a prompt share its slots, and step i writes their K tokens to slots
    # t + K*i ..; a beam sees only its own history, so following a parent moves positions,
    # never keys. The loop feeds N-1 tokens (the last step only selects) in phases, each
    # over a cache that ends with the slots filled by the end of the phase: attention
    # never reads the slots of later steps.
    ends = _phase_ends(n)

    def slots(end: int) -> int:
        return t + k * min(end, n - 1)

    cache, logits_BV, hidden_BD = _prefill(params, inputs, slots(ends[0]), layer)
    params, cache = decode_layout(params, branch_rows(cache, k))
    repeat = functools.partial(jnp.repeat, repeats=k, axis=0)
    prompts_RT, mask_RT = repeat(prompts_BT), repeat(mask_BT)
    start_R = t - mask_RT.sum(1)  # first real prompt slot (left padding)
    beam_K = jnp.arange(k)
    state = {
        "step": jnp.zeros((), jnp.int32), "cache": cache, "logits": repeat(logits_BV),
        "hidden": None if hidden_BD is None else repeat(hidden_BD),
        # Only beam 0 is live at first, so the first step does not pick K copies of one token.
        "live_tokens": jnp.full((b, k, n), pad, jnp.int32),
        "live_logp": jnp.broadcast_to(jnp.where(beam_K == 0, 0.0, -jnp.inf), (b, k)).astype(f32),
        "fin_tokens": jnp.full((b, k, n), pad, jnp.int32), "fin_scores": jnp.full((b, k), -jnp.inf, f32),
        "fin_logp": jnp.full((b, k), -jnp.inf, f32), "fin_lengths": jnp.zeros((b, k), jnp.int32),
        "fin_ok": jnp.zeros((b, k), bool), "done": jnp.zeros((b,), bool)}

    def take(x_BC, idx_BK):
        return jnp.take_along_axis(x_BC, idx_BK.reshape(idx_BK.shape + (1,) * (x_BC.ndim - 2)), axis=1)

    def select(s):
        """One beam step from the live beams' logits; returns the new state and the tokens to feed."""
        step = s["step"]
        logp_RV = ban_pad(params.config, jax.nn.log_softmax(s["logits"].astype(f32), axis=-1))
        logp_RV = jnp.where((jnp.arange(v) == eos) & (step < min_length), -jnp.inf, logp_RV)
        if static.no_repeat_ngram_size:
            seq_RS = jnp.concatenate([prompts_RT, s["live_tokens"].reshape(r, n)], axis=1)
            ban_RV = _ngram_ban(seq_RS, start_R, t + step, static.no_repeat_ngram_size, v)
            logp_RV = jnp.where(ban_RV, -jnp.inf, logp_RV)
        rank_RP = s["live_logp"].reshape(r, 1)
        if term is None:
            cand_lp_RP = logp_RV
            rank_RP = rank_RP + cand_lp_RP
        else:
            cand_lp_RP, cand_tok_RP = jax.lax.top_k(logp_RV, p)
            logq_RP = term(s["hidden"], cand_tok_RP, step).astype(f32)
            rank_RP = rank_RP + cand_lp_RP + weight * logq_RP

        # Top 2K over all beams: even if K of them end here, K remain to continue.
        rank_BC, idx_BC = jax.lax.top_k(rank_RP.reshape(b, k * p), c)
        parent_BC = idx_BC // p
        token_BC = idx_BC % p if term is None else jnp.take_along_axis(cand_tok_RP.reshape(b, k * p), idx_BC, 1)
        logp_BC = take(s["live_logp"], parent_BC) + jnp.take_along_axis(cand_lp_RP.reshape(b, k * p), idx_BC, 1)
        seq_BCN = take(s["live_tokens"], parent_BC).at[:, :, step].set(token_BC)
        is_eos_BC = token_BC == eos
        ends_BC = is_eos_BC | (step == n - 1)
        lengths_BC = step + 1 - is_eos_BC.astype(jnp.int32)

        # Finished set: ending candidates among the top K, unless this prompt already stopped.
        ok_BC = ends_BC & (jnp.arange(c) < k)[None] & ~s["done"][:, None]
        ok_BC &= jnp.isfinite(rank_BC) & jnp.isfinite(logp_BC)
        if static.attribute is not None:
            rep = functools.partial(jnp.repeat, repeats=2, axis=0)  # R rows -> B*C rows
            ok_BC &= static.attribute.accepts(rep(prompts_RT), rep(mask_RT), seq_BCN.reshape(b * c, n),
                                              lengths_BC.reshape(-1)).reshape(b, c)
        score_BC = jnp.where(ok_BC, _normalise(logp_BC, step + 1, length_penalty, static.length_norm), -jnp.inf)
        merged = [jnp.concatenate(pair, axis=1) for pair in (
            (s["fin_scores"], score_BC), (s["fin_tokens"], seq_BCN), (s["fin_logp"], logp_BC),
            (s["fin_lengths"], lengths_BC), (s["fin_ok"], ok_BC))]
        _, keep_BK = jax.lax.top_k(merged[0], k)
        fin_scores, fin_tokens, fin_logp, fin_lengths, fin_ok = (take(x, keep_BK) for x in merged)
        fin_logp = jnp.where(fin_ok, fin_logp, -jnp.inf)

        # Live set: the best K candidates that did not end.
        _, live_BK = jax.lax.top_k(jnp.where(ends_BC, -jnp.inf, rank_BC), k)
        live_logp = take(logp_BC, live_BK)

        # Stop a prompt once no live beam can beat its worst finished hypothesis.
        best_B = live_logp.max(axis=1)
        if static.length_norm == "hf":
            bound_B = _normalise(best_B, step + 1, length_penalty, "hf")
        else:  # exact: log p only falls, and the penalty is monotone in length (extreme at an end)
            bound_B = best_B * jnp.minimum(_normalise(1.0, step + 2, length_penalty, "gnmt"),
                                           _normalise(1.0, n, length_penalty, "gnmt"))
        worst_BK = jnp.where(fin_ok, fin_scores.min(axis=1, keepdims=True), -jnp.inf)
        done = s["done"] | ~jnp.any(bound_B[:, None] > worst_BK, axis=1)
        new = dict(s, live_tokens=take(seq_BCN, live_BK), live_logp=live_logp, fin_tokens=fin_tokens,
                   fin_scores=fin_scores, fin_logp=fin_logp, fin_lengths=fin_lengths, fin_ok=fin_ok, done=done)
        return new, take(parent_BC, live_BK), take(token_BC, live_BK)

    def feed(s, parent_BK, token_BK):
        cache = gather_rows(s["cache"], (jnp.arange(b)[:, None] * k + parent_BK).reshape(r))
        cache, logits, hidden = _step(params, cache, token_BK.reshape(r), layer)
        return dict(s, cache=cache, logits=logits, hidden=hidden)

    def body(s):
        s, parent_BK, token_BK = select(s)
        # The last step only selects: no token is fed after it.
        s = jax.lax.cond(s["step"] < n - 1, feed, lambda s, *_: s, s, parent_BK, token_BK)
        return dict(s, step=s["step"] + 1)

    final = state
    for i, end in enumerate(ends):
        if i:
            final = dict(final, cache=extend_slots(final["cache"], slots(end) - slots(ends[i - 1])))
        final = jax.lax.while_loop(lambda s, end=end: (s["step"] < end) & ~jnp.all(s["done"]), body, final)
    lengths = jnp.where(final["fin_ok"], final["fin_lengths"], 0)
    tokens = jnp.where(final["fin_ok"][..., None], final["fin_tokens"], pad)
    return BeamResult(tokens=tokens, lengths=lengths, scores=final["fin_scores"], logprobs=final["fin_logp"],
                      finished=final["fin_ok"])


def _check_term(term, params: Params, rows: int, prefilter: int) -> int:
    """The term's hidden layer, after checking its signature on abstract shapes."""
    cfg = params.config
    layer = getattr(term, "hidden_layer", None)
    if not isinstance(layer, int) or not -(cfg.n_layers + 1) <= layer <= cfg.n_layers:
        raise ConfigError(f"term.hidden_layer={layer!r} must be an int in [{-(cfg.n_layers + 1)}, {cfg.n_layers}] "
                          "(an index into the model's L+1 hidden states; -1 = last)")
    hidden = jax.ShapeDtypeStruct((rows, cfg.d_model), params.dtype)
    candidates = jax.ShapeDtypeStruct((rows, prefilter), jnp.int32)
    try:
        out = jax.eval_shape(term, hidden, candidates, jax.ShapeDtypeStruct((), jnp.int32))
    except (TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"term does not accept hidden states of width {cfg.d_model} (this model's d_model); "
                          f"was it built for another model? ({type(e).__name__}: {e})") from e
    if getattr(out, "shape", None) != (rows, prefilter):
        raise ConfigError(f"term returned shape {getattr(out, 'shape', type(out))} for {rows} rows x {prefilter} "
                          f"candidates; it must return one log q per candidate, shape {(rows, prefilter)}")
    return layer


def _check_attribute(attribute, rows: int, prompt_len: int, n: int):
    tokens = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32)
    try:
        out = jax.eval_shape(attribute.accepts, tokens, tokens, jax.ShapeDtypeStruct((rows, n), jnp.int32),
                             jax.ShapeDtypeStruct((rows,), jnp.int32))
    except AttributeError as e:
        raise ConfigError(f"attribute {attribute!r} has no jittable accepts(prompt, mask, tokens, lengths)") from e
    if getattr(out, "shape", None) != (rows,):
        raise ConfigError(f"attribute.accepts returned shape {getattr(out, 'shape', None)}; it must return one "
                          f"bool per hypothesis, shape {(rows,)}")
    try:
        hash(attribute)
    except TypeError as e:
        raise ConfigError(f"attribute {attribute!r} must be hashable (a frozen dataclass): it is static under jit")\
            from e


def beam_search(params: Params, prompts=None, mask=None, *, sources=None, source_mask=None, beams: int,
                max_new_tokens: int | None = None,
                max_length: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                length_penalty: float = 0.0, length_norm: str = "hf", min_length: int = 0,
                no_repeat_ngram_size: int = 0, attribute=None, term=None, weight: float = 1.0,
                prefilter: int | None = None) -> BeamResult:
    """Beam search (with `term`/`attribute`: conditional beam search) over a batch of prompts.

    `prompts`: token-id lists of any lengths, or a (B, T) array (with `mask` for its
    padding); they are left-padded to a bucket of 32 so other lengths in the same
    bucket reuse the compiled search. Encoder-decoders take `sources` (token-id lists,
    or an array with `source_mask`; every beam of a source shares one encoder pass) and
    start from the decoder start token when `prompts` is None. Inside `jax.jit`, pass
    already padded traced arrays with their masks (used as they are). Give `max_new_tokens`, or
    `max_length` = longest prompt + new tokens. `min_length`: EOS forbidden before
    this many output tokens. `length_penalty` 0 ranks by log-likelihood (the mode);
    `length_norm` "hf" divides by n ** length_penalty, "gnmt" by ((5+n)/6) **
    length_penalty, n = generated tokens incl. EOS. `no_repeat_ngram_size`: ban a
    token that repeats an n-gram of prompt + output. `term(hidden_RD, candidates_RP,
    n_generated) -> log q (R, P)` (with attribute `hidden_layer`) is added with
    `weight` to the ranking of the `prefilter` (default 4*beams) likeliest tokens per
    beam; `attribute.accepts(...)` filters finished hypotheses.
    Returns a `BeamResult` (B, K, ...), best first.

    Example:
        >>> # tok = mm.load_tokenizer(); ids = [tok.encode("The capital of France is")]
        >>> # out = beam_search(params, ids, beams=4, max_new_tokens=16, eos_id=tok.eos_id)
        >>> # tok.decode(out.tokens[0, 0, :out.lengths[0, 0]]), float(out.scores[0, 0])
    """
    cfg = params.config
    v = cfg.vocab_size
    if not cfg.causal:
        raise ConfigError(f"{cfg.hf_model_type} is an encoder; beam search needs a decoder model")
    if not 1 <= beams <= v:
        raise ConfigError(f"beams={beams} must be in [1, {v}] (the vocabulary size)")
    if length_norm not in LENGTH_NORMS:
        raise ConfigError(f"length_norm={length_norm!r} must be one of {LENGTH_NORMS}")
    if no_repeat_ngram_size < 0:
        raise ConfigError(f"no_repeat_ngram_size={no_repeat_ngram_size} must be >= 0 (0 disables it)")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not 0 <= value < v:
            raise ConfigError(f"{name}={value} is outside the vocabulary [0, {v})")
    pad_id = (eos_id if eos_id is not None else 0) if pad_id is None else pad_id

    if isinstance(prompts, jax.core.Tracer):
        def ones(x):
            return None if x is None else jnp.ones(x.shape, jnp.int32)

        inputs = DecoderInputs(prompts, ones(prompts) if mask is None else mask, sources,
                               ones(sources) if source_mask is None else source_mask)
        longest = prompts.shape[1]  # unknown under jit: the padded length bounds it
    else:
        inputs = decoder_inputs(params, prompts, mask, sources, source_mask, pad_id)
        longest = inputs.longest_prompt
        tokens_BT = inputs.prompts
        if tokens_BT.min() < 0 or tokens_BT.max() >= v:
            raise InputError(f"prompt token ids must be in [0, {v}); got {tokens_BT.min()}..{tokens_BT.max()}")
    tokens_BT = inputs.prompts
    if (max_new_tokens is None) == (max_length is None):
        raise ConfigError("give exactly one of max_new_tokens and max_length")
    if max_length is not None:
        if max_length <= longest:
            raise InputError(f"max_length={max_length} leaves no room after the longest prompt ({longest} tokens); "
                             "raise max_length or use max_new_tokens")
        max_new_tokens = max_length - longest
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if longest + max_new_tokens > cfg.max_positions:
        raise InputError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context "
                         f"of {cfg.max_positions}; shorten the prompt or generate less")
    if not 0 <= min_length <= max_new_tokens:
        raise ConfigError(f"min_length={min_length} must be in [0, max_new_tokens={max_new_tokens}]")

    rows = tokens_BT.shape[0] * beams
    layer = None
    if term is None:
        prefilter = v
    else:
        prefilter = min(4 * beams, v) if prefilter is None else prefilter
        if not 2 <= prefilter <= v:
            raise ConfigError(f"prefilter={prefilter} must be in [2, {v}] (candidate tokens per beam)")
        if not weight > 0:
            raise ConfigError(f"weight={weight} must be > 0; use term=None for plain beam search")
        layer = _check_term(term, params, rows, prefilter)
    if attribute is not None:
        _check_attribute(attribute, 2 * rows, tokens_BT.shape[1], max_new_tokens)
    static = _Static(beams=beams, max_new_tokens=max_new_tokens, length_norm=length_norm, no_repeat_ngram_size=no_repeat_ngram_size, attribute=attribute,
                     prefilter=prefilter, hidden_layer=layer)
    return _search(params, jax.tree.map(jnp.asarray, inputs), term, jnp.float32(weight),
                   jnp.float32(length_penalty), jnp.int32(min_length),
                   jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id), static=static)


__all__ = ["BeamResult", "beam_search"]
