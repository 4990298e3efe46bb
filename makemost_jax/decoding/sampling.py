"""Greedy and temperature / top-k / top-p sampling in one jitted `lax.while_loop`.

The pieces are shared with beam search and exact search: `decoder_inputs` (padded
prompts, and for an encoder-decoder its padded sources), `prefill` (prompt, and source,
into a cache sized for the whole output, outside the loop) and `decode_step` (one token
per row through the cache). No search produces an encoder-decoder's pad token (as
OPUS-MT's generation config bans it): `ban_pad` takes it out of the choice, while the
reported log-probabilities stay the model's own (as transformers' beam scores do).

A model whose rotary frequencies switch at a length (longrope) is re-encoded once its
sequences pass it, so every token is scored as the full forward of its prefix would
score it (what transformers' Phi-3 generation does). Prompts are left-padded to a
bucketed length so that calls with other prompt lengths in the same bucket reuse the
compiled loop.

Dimensions: B batch, T prompt length (padded), N new tokens, V vocabulary.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from makemost_jax.models import from_hf_config, init_params
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 1,
    ...                       "n_head": 2, "vocab_size": 10, "n_positions": 64})
    >>> params = init_params(cfg, jax.random.key(0))
    >>> result = generate(params, [[1, 2, 3]], max_new_tokens=4)
    >>> result.tokens.shape
    (1, 4)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models.cache import KVCache, cache_size, extend_slots, init_cache
from makemost_jax.models.layers import rotary_switch_length
from makemost_jax.models.model import decode_layout, forward
from makemost_jax.models.types import ModelOutput, Params

PROMPT_BUCKET = 32  # prompt lengths are padded up to a multiple of this


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenerationResult:
    tokens: jax.Array  # (B, N) generated ids; after EOS filled with the pad id
    lengths: jax.Array  # (B,) generated tokens per row, EOS included
    logprobs: jax.Array  # (B, N) model log-probability of each generated token (0 after EOS)


def pad_prompts(prompts: Sequence[Sequence[int]] | np.ndarray, pad_id: int = 0,
                bucket: int = PROMPT_BUCKET, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to one bucketed length; returns (tokens_BT, mask_BT).

    Example:
        >>> tokens, mask = pad_prompts([[5, 6], [7]], bucket=4)
        >>> tokens.tolist(), mask.tolist()
        ([[0, 0, 5, 6], [0, 0, 0, 7]], [[0, 0, 1, 1], [0, 0, 0, 1]])
    """
    rows = _token_rows(prompts, mask)
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("every prompt needs at least one token; got an empty prompt")
    return _pad_rows(rows, pad_id, bucket, left=True)


def _token_rows(batch, mask) -> list[list[int]]:
    """Token lists of a batch given as lists, or as a 2-D array with an optional mask of real tokens."""
    if isinstance(batch, (np.ndarray, jax.Array)) and np.ndim(batch) == 2:
        array = np.asarray(batch)
        keep = np.ones(array.shape, bool) if mask is None else np.asarray(mask, bool)
        return [list(r[k]) for r, k in zip(array, keep)]
    return [list(r) for r in batch]


def _pad_rows(rows: list[list[int]], pad_id: int, bucket: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of `rows` padded on one side to a multiple of `bucket`."""
    length = -(-max(len(r) for r in rows) // bucket) * bucket
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask_out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if left else slice(0, len(r))
        tokens[i, span] = r
        mask_out[i, span] = 1
    return tokens, mask_out


def pad_sources(sources, pad_id: int = 0, bucket: int = PROMPT_BUCKET, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad source token lists to one bucketed length (as encoders expect); (tokens_BS, mask_BS).

    Example:
        >>> tokens, mask = pad_sources([[5, 6], [7]], bucket=4)
        >>> tokens.tolist(), mask.tolist()
        ([[5, 6, 0, 0], [7, 0, 0, 0]], [[1, 1, 0, 0], [1, 0, 0, 0]])
    """
    rows = _token_rows(sources, mask)
    if not rows:
        raise InputError("sources is empty; give at least one source")
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise InputError(f"source {empty[0] + 1} is empty; remove empty source lines")
    return _pad_rows(rows, pad_id, bucket, left=False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecoderInputs:
    """A search's padded inputs: prompts (left-padded) and, for encoder-decoders, sources (right-padded)."""

    prompts: jax.Array  # (B, T)
    prompt_mask: jax.Array  # (B, T)
    sources: jax.Array | None = None  # (B, S)
    source_mask: jax.Array | None = None  # (B, S)

    @property
    def longest_prompt(self) -> int:
        return int(np.asarray(self.prompt_mask).sum(1).max())


def decoder_inputs(params: Params, prompts, mask=None, sources=None, source_mask=None,
                   pad_id: int = 0) -> DecoderInputs:
    """Check and pad what a search starts from.

    Decoder-only models need `prompts` and take no `sources`. Encoder-decoders need
    `sources` (token-id lists, or a (B, S) array with `source_mask`); `prompts=None`
    starts every output from the model's decoder start token.

    Example:
        >>> # inputs = decoder_inputs(marian, None, sources=[tok.encode_source("Hello")])
        >>> # inputs.prompts.tolist() == [[pad] * 31 + [decoder_start]]
    """
    cfg = params.config
    name = cfg.hf_model_type or cfg.family
    if not cfg.causal:
        raise ConfigError(f"{name} is an encoder; searches need a decoder or an encoder-decoder model")
    if cfg.encoder is None:
        if sources is not None:
            raise InputError(f"{name} is a decoder-only model and takes no sources; pass prompts (sources are for "
                             "encoder-decoders such as T5, BART and Marian)")
        if prompts is None:
            raise InputError(f"{name} is a decoder-only model: pass prompts (token-id lists)")
        return DecoderInputs(*pad_prompts(prompts, pad_id, mask=mask))
    if sources is None:
        raise InputError(f"{name} is an encoder-decoder: pass sources= (token-id lists of the inputs to "
                         "translate or transform)")
    source_pad = cfg.encoder.pad_token_id if cfg.encoder.pad_token_id is not None else 0
    sources_BS, source_mask_BS = pad_sources(sources, source_pad, mask=source_mask)
    longest = int(source_mask_BS.sum(1).max())
    if cfg.encoder.embed.positions != "none" and longest > cfg.encoder.max_positions:
        raise InputError(f"a source of {longest} tokens exceeds the encoder's context of "
                         f"{cfg.encoder.max_positions} positions; shorten or split it")
    context = cfg.encoder.max_positions
    if source_mask_BS.shape[1] > context >= longest:  # the bucket overshoots: pad only to the context
        sources_BS, source_mask_BS = sources_BS[:, :context], source_mask_BS[:, :context]
    if prompts is None:
        if cfg.decoder_start_token_id is None:
            raise InputError(f"{name}'s config has no decoder_start_token_id; pass prompts= (e.g. mBART's "
                             "target language code)")
        prompts = [[cfg.decoder_start_token_id]] * len(sources_BS)
    tokens_BT, mask_BT = pad_prompts(prompts, pad_id, mask=mask)
    if len(tokens_BT) != len(sources_BS):
        raise InputError(f"{len(tokens_BT)} prompts for {len(sources_BS)} sources; give one prompt per source "
                         "(or prompts=None)")
    return DecoderInputs(tokens_BT, mask_BT, sources_BS, source_mask_BS)


def ban_pad(cfg, scores_BV):
    """Scores (logits or log-probabilities) with an encoder-decoder's pad token at -inf, so that
    no search chooses it; decoder-only models' scores pass unchanged.

    Example:
        >>> # token_B = jnp.argmax(ban_pad(params.config, logits_BV), -1)
    """
    if cfg.encoder is None or cfg.pad_token_id is None:
        return scores_BV
    return scores_BV.at[:, cfg.pad_token_id].set(-jnp.inf)


def prefill_forward(params: Params, prompts_BT, mask_BT, cache_size: int, sources_BS=None, source_mask_BS=None,
                    return_hidden: bool = False) -> ModelOutput:
    """`forward` of left-padded prompts (and, for an encoder-decoder, their sources) whose cache
    has `cache_size` slots: the prompt's, then empty ones for the tokens to come.

    The prompt attends only to itself (no empty slots are read); logits at the last position.

    Example:
        >>> # out = prefill_forward(params, tokens_BT, mask_BT, tokens_BT.shape[1] + 32, return_hidden=True)
    """
    out = forward(params, prompts_BT, mask=mask_BT, encoder_tokens=sources_BS, encoder_mask=source_mask_BS,
                  logits_at=-1, return_hidden=return_hidden)
    return dataclasses.replace(out, cache=extend_slots(out.cache, cache_size - prompts_BT.shape[1]))


def prefill(params: Params, prompts_BT, mask_BT, cache_size: int, sources_BS=None,
            source_mask_BS=None) -> tuple[KVCache, jax.Array]:
    """Run left-padded prompts (and, for an encoder-decoder, their sources) into a fresh cache of
    `cache_size` slots.

    Returns (cache, next-token logits (B, V)).

    Example:
        >>> # cache, logits_BV = prefill(params, tokens_BT, mask_BT, tokens_BT.shape[1] + 32)
    """
    out = prefill_forward(params, prompts_BT, mask_BT, cache_size, sources_BS, source_mask_BS)
    return out.cache, out.logits[:, 0]


def decode_step(params: Params, cache: KVCache, tokens_B) -> tuple[KVCache, jax.Array]:
    """Feed one token per row; returns (cache, next-token logits (B, V)).

    Example:
        >>> # cache, logits_BV = decode_step(params, cache, jnp.argmax(logits_BV, -1))
    """
    out = forward(params, tokens_B[:, None], cache=cache)
    return out.cache, out.logits[:, 0]


def filter_logits(logits_BV, top_k: int = 0, top_p: float = 1.0):
    """Keep the top-k tokens and the smallest top-p nucleus; the rest get -inf.

    Example:
        >>> filter_logits(jnp.array([[0.0, 1.0, 2.0]]), top_k=2).tolist()
        [[-inf, 1.0, 2.0]]
    """
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # The cut-off is the smallest logit whose preceding mass is still below top_p.
        keep_BV = (cum_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "greedy", "top_k", "top_p", "eos_id",
                                             "pad_id"))
def _generate(params, inputs: DecoderInputs, key, temperature, done_B, *, max_new_tokens, greedy, top_k,
              top_p, eos_id, pad_id):
    """The jitted loop; rows with `done_B` set generate nothing. Returns (result, key, done_B)."""
    b, t = inputs.prompts.shape
    size = cache_size(params.config, t, t + max_new_tokens)
    cache, logits_BV = prefill(params, inputs.prompts, inputs.prompt_mask, size, inputs.sources, inputs.source_mask)
    params, cache = decode_layout(params, cache)
    state = dict(step=jnp.zeros((), jnp.int32), cache=cache, logits=logits_BV, key=key,
                 tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                 logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
                 done=done_B)

    def cond(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):
        key, sub = jax.random.split(s["key"])
        logp_BV = jax.nn.log_softmax(s["logits"], axis=-1)
        logits_BV = ban_pad(params.config, s["logits"])
        if greedy:
            token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        else:
            scaled = filter_logits(logits_BV / temperature, top_k, top_p)
            token_B = jax.random.categorical(sub, scaled, axis=-1).astype(jnp.int32)
        token_B = jnp.where(s["done"], pad_id, token_B)
        logp_B = jnp.where(s["done"], 0.0, jnp.take_along_axis(logp_BV, token_B[:, None], 1)[:, 0])
        done_B = s["done"] if eos_id is None else s["done"] | (token_B == eos_id)
        cache, logits_BV = decode_step(params, s["cache"], token_B)
        return dict(step=s["step"] + 1, cache=cache, logits=logits_BV, key=key,
                    tokens=s["tokens"].at[:, s["step"]].set(token_B),
                    logprobs=s["logprobs"].at[:, s["step"]].set(logp_B), done=done_B)

    # Rows that finish early hold pad tokens; their lengths count up to and incl. EOS.
    final = jax.lax.while_loop(cond, body, state)
    generated_BN = jnp.arange(max_new_tokens)[None] < final["step"]
    if eos_id is None:
        lengths_B = jnp.full((b,), final["step"])
    else:
        is_eos_BN = (final["tokens"] == eos_id) & generated_BN
        first_eos_B = jnp.argmax(is_eos_BN, axis=1)
        lengths_B = jnp.where(is_eos_BN.any(1), first_eos_B + 1, final["step"])
    lengths_B = jnp.where(done_B, 0, lengths_B)
    return GenerationResult(final["tokens"], lengths_B, final["logprobs"]), final["key"], final["done"]


def generate(params: Params, prompts=None, mask=None, *, sources=None, source_mask=None, max_new_tokens: int = 32,
             key=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int | None = None) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens (greedy when temperature is 0).

    `prompts`: a list of token-id lists, or a (B, T) array (with `mask` for padding).
    Encoder-decoders take `sources` (token-id lists, or an array with `source_mask`);
    `prompts=None` starts each output from the decoder start token.
    Stops early once every row has produced `eos_id`.

    Example:
        >>> # tok = mm.load_tokenizer(); ids = [tok.encode("The capital of France is")]
        >>> # result = generate(params, ids, max_new_tokens=16, eos_id=tok.eos_id)
        >>> # tok.decode(result.tokens[0, :result.lengths[0]])
    """
    cfg = params.config
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k < 0 or top_k > cfg.vocab_size:
        raise ConfigError(f"top_k={top_k} must be in [0, {cfg.vocab_size}] (0 disables it)")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")
    pad_id = (eos_id if eos_id is not None else 0) if pad_id is None else pad_id
    inputs = decoder_inputs(params, prompts, mask, sources, source_mask, pad_id)
    longest = inputs.longest_prompt
    if longest + max_new_tokens > cfg.max_positions:
        raise InputError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {cfg.max_positions}; shorten the prompt or generate less")
    run = functools.partial(_generate, params, temperature=jnp.float32(max(temperature, 1e-6)),
                            greedy=temperature == 0.0, top_k=top_k, top_p=float(top_p), eos_id=eos_id, pad_id=pad_id)
    key = jax.random.key(0) if key is None else key
    inputs = jax.tree.map(jnp.asarray, inputs)
    done_B = jnp.zeros(inputs.prompts.shape[0], bool)
    switch = rotary_switch_length(cfg)
    before = max_new_tokens if switch is None else switch + 1 - longest  # tokens decoded before the switch
    if not 1 <= before < max_new_tokens:
        return run(inputs, key, done_B=done_B, max_new_tokens=max_new_tokens)[0]
    # Past the switch the cached keys (short factors) would not be the ones a full forward
    # computes: re-encode prompt + generated tokens once, then decode on.
    first, key, done_B = run(inputs, key, done_B=done_B, max_new_tokens=before)
    inputs = dataclasses.replace(inputs, prompts=jnp.concatenate([inputs.prompts, first.tokens], axis=1),
                                 prompt_mask=jnp.concatenate([inputs.prompt_mask, jnp.ones_like(first.tokens)], axis=1))
    rest = run(inputs, key, done_B=done_B, max_new_tokens=max_new_tokens - before)[0]
    return GenerationResult(jnp.concatenate([first.tokens, rest.tokens], axis=1),
                            jnp.where(done_B, first.lengths, before + rest.lengths),
                            jnp.concatenate([first.logprobs, rest.logprobs], axis=1))


def generate_text(params: Params, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0) -> list[dict]:
    """Continue each prompt string; greedy when temperature is 0, else sampled with `seed`.

    Returns one dict per prompt: prompt, completion (the new text only), n_new_tokens,
    logprob (sum over the new tokens), stopped_at_eos. All prompts run as one batch.

    Example:
        >>> # generate_text(mm.load(), mm.load_tokenizer(), ["The capital of France is"], 8)
        >>> # [{'prompt': 'The capital of France is', 'completion': ' Paris. ...', ...}]
    """
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode_for_model(prompt)
        if not ids:
            raise InputError(f"prompt {i + 1} is empty; give some text to continue")
        rows.append(ids)
    result = generate(params, rows, max_new_tokens=max_new_tokens, key=jax.random.key(seed),
                      temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id,
                      pad_id=tokenizer.pad_id)
    tokens = np.asarray(result.tokens)
    lengths = np.asarray(result.lengths)
    logprobs = np.asarray(result.logprobs)
    out = []
    for prompt, row, n, logp in zip(prompts, tokens, lengths, logprobs):
        new = row[:n].tolist()
        at_eos = bool(new) and tokenizer.eos_id is not None and new[-1] == tokenizer.eos_id
        out.append({"prompt": prompt, "completion": tokenizer.decode(new[:-1] if at_eos else new),
                    "n_new_tokens": int(n), "logprob": float(logp[:n].sum()),
                    "stopped_at_eos": at_eos})
    return out
