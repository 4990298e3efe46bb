"""Exact strided-window perplexity of a causal language model on a token sequence.

A model with a fixed context cannot score a long text in one call, so the text is cut
into windows of `context` input tokens that start every `stride` tokens (the recipe of
Hugging Face's "Perplexity of fixed-length models", made exact). Window k reads tokens
[k*stride, k*stride + context) and predicts each of them's successor; it scores only the
targets that no earlier window scored. So every token after the first is scored exactly
once, and a token scored in window k >= 1 sees at least `context - stride + 1` tokens of
left context (stride == context: disjoint windows, the cheapest; stride == 1: every token
gets the full context, the most expensive). The last window may be shorter.

All windows are padded to one (batch, length) shape and scored by one jitted function,
so a whole text costs one compilation.

Definitions (natural logarithms; n = number of scored tokens, w = number of words):
    mean_nll  = nll_sum / n                     nats per token
    ppl       = exp(mean_nll)                   per-token perplexity
    bits_per_token = mean_nll / ln 2
    word_ppl  = exp(nll_sum / w)                per-word perplexity (whitespace words),
                                                comparable across tokenizers

Example:
    >>> import makemost_jax as mm
    >>> params, tok = mm.load(), mm.load_tokenizer()  # doctest: +SKIP
    >>> r = perplexity_of_text(params, tok, "It is a truth universally acknowledged that a single "
    ...                        "man in possession of a good fortune must be in want of a wife.",
    ...                        context=128, progress=False)  # doctest: +SKIP
    >>> r.n_tokens, r.n_words, round(r.ppl, 1), round(r.word_ppl, 1)  # doctest: +SKIP
    (23, 23, 19.3, 19.3)
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models import forward, head_nll
from makemost_jax.models.types import Params

DEFAULT_MAX_CONTEXT = 1024


class NllTotals:
    """`mean_nll` and `ppl` of a result with `nll_sum` (nats) over `n_tokens` scored tokens.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Scored(NllTotals):
        ...     nll_sum: float
        ...     n_tokens: int
        >>> round(Scored(6.0, 3).ppl, 3)
        7.389
    """

    @property
    def mean_nll(self) -> float:
        """Nats per scored token."""
        return self.nll_sum / self.n_tokens

    @property
    def ppl(self) -> float:
        """Per-token perplexity, exp(mean NLL)."""
        return math.exp(self.mean_nll)


@dataclasses.dataclass(frozen=True)
class PerplexityResult(NllTotals):
    """Perplexity of one token sequence and the settings that produced it.

    Example:
        >>> r = PerplexityResult(nll_sum=6.0, n_tokens=3, n_words=2, n_windows=1,
        ...                      context=8, stride=8, batch_size=1, seconds=0.1)
        >>> round(r.ppl, 3), round(r.word_ppl, 3)
        (7.389, 20.086)
    """

    nll_sum: float  # total negative log-likelihood of the scored tokens, in nats
    n_tokens: int  # scored tokens: every token after the first
    n_words: int | None  # whitespace words of the text, when known
    n_windows: int
    context: int
    stride: int
    batch_size: int
    seconds: float  # wall time, compilation included

    @property
    def bits_per_token(self) -> float:
        return self.mean_nll / math.log(2)

    @property
    def word_ppl(self) -> float | None:
        """Per-word perplexity exp(nll_sum / n_words); None when n_words is unknown."""
        return math.exp(self.nll_sum / self.n_words) if self.n_words else None

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        """Every field and derived number, JSON-ready.

        Example:
            >>> PerplexityResult(1.0, 1, None, 1, 2, 2, 1, 0.5).to_dict()["ppl"]  # doctest: +ELLIPSIS
            2.718...
        """
        out = dataclasses.asdict(self)
        for name in ("mean_nll", "ppl", "bits_per_token", "word_ppl", "tokens_per_second"):
            out[name] = getattr(self, name)
        return out


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Where each window starts, how many tokens it reads and which targets it scores.

    Window k reads inputs tokens[start[k] : start[k] + length[k]] and predicts
    tokens[start[k] + 1 : start[k] + length[k] + 1]; of these it scores the last
    n_scored[k]. Over all windows the scored targets are tokens 1 .. N-1, each once.
    """

    starts: np.ndarray  # (K,)
    lengths: np.ndarray  # (K,)
    n_scored: np.ndarray  # (K,)


def plan_windows(n_tokens: int, context: int, stride: int) -> WindowPlan:
    """The exact strided windows over a sequence of `n_tokens` tokens.

    Example:
        >>> p = plan_windows(10, context=4, stride=2)
        >>> p.starts.tolist(), p.lengths.tolist(), p.n_scored.tolist()
        ([0, 2, 4, 6], [4, 4, 4, 3], [4, 2, 2, 1])
    """
    n_targets = n_tokens - 1
    starts, lengths, n_scored = [], [], []
    scored_up_to = 0  # targets 1 .. scored_up_to are done
    start = 0
    while scored_up_to < n_targets:
        length = min(context, n_targets - start)
        starts.append(start)
        lengths.append(length)
        n_scored.append(start + length - scored_up_to)
        scored_up_to = start + length
        start += stride
    return WindowPlan(np.array(starts), np.array(lengths), np.array(n_scored))


def _window_nll_sums(params: Params, inputs_BT, targets_BT, weights_BT):
    """Sum over each row of -log p(target) * weight, in float32 (float64 for float64 models).

    The head is read in vocabulary chunks (`head_nll`): no (B, T, V) logits are held.
    """
    states_BTD = forward(params, inputs_BT, states_only=True).states
    return jnp.sum(head_nll(params.config, params.weights, states_BTD, targets_BT) * weights_BT, axis=1)


# One compiled program per (params structure, batch, length); reused across texts.
window_nll_sums = jax.jit(_window_nll_sums)


def _batch(tokens_N: np.ndarray, plan: WindowPlan, windows: range, rows: int, length: int):
    """(inputs, targets, weights), each (rows, length), for the given windows.

    Right padding: causal attention never lets a real position see the padding, and the
    padded targets (and the rows past the last window) get weight 0, so every batch has
    the same shape and the whole text costs one compilation.
    """
    inputs = np.zeros((rows, length), np.int32)
    targets = np.zeros_like(inputs)
    weights = np.zeros(inputs.shape, np.float32)
    for row, k in enumerate(windows):
        start, n, scored = plan.starts[k], plan.lengths[k], plan.n_scored[k]
        inputs[row, :n] = tokens_N[start:start + n]
        targets[row, :n] = tokens_N[start + 1:start + n + 1]
        weights[row, n - scored:n] = 1.0
    return inputs, targets, weights


def _check_settings(params: Params, n_tokens: int, context, stride, batch_size, n_words):
    cfg = params.config
    cfg.require_decoder_only("perplexity over a text")
    if not cfg.causal:
        raise ConfigError(f"perplexity needs a causal language model; {cfg.hf_model_type or cfg.family} "
                          "is a bidirectional encoder (use a GPT-2 or Llama-family model)")
    if not cfg.has_lm_head:
        raise ConfigError("the model has no language-model head, so it cannot score tokens; "
                          "load a checkpoint that includes one")
    if n_tokens < 2:
        raise InputError(f"text is shorter than 2 tokens ({n_tokens}); perplexity needs at least "
                         "one token to predict from another")
    if context is None:
        context = min(cfg.max_positions, DEFAULT_MAX_CONTEXT)
    if stride is None:
        stride = context
    for name, value in (("context", context), ("stride", stride), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be an integer")
    if context < 2:
        raise ConfigError(f"context={context} is too small; use at least 2 (e.g. --context 512)")
    if context > cfg.max_positions:
        raise ConfigError(f"context={context} exceeds the model's max_positions={cfg.max_positions}; "
                          f"pass --context {min(cfg.max_positions, DEFAULT_MAX_CONTEXT)} or less")
    if stride < 1:
        raise ConfigError(f"stride={stride} must be at least 1 (stride == context gives disjoint windows)")
    if stride > context:
        raise ConfigError(f"stride={stride} is larger than context={context}, which would skip tokens; "
                          f"pass --stride {context} or less")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if n_words is not None and n_words < 1:
        raise InputError(f"n_words={n_words}: per-word perplexity needs at least one word")
    return int(context), int(stride), int(batch_size)


def perplexity(params: Params, tokens: Sequence[int] | np.ndarray, context: int | None = None,
               stride: int | None = None, batch_size: int = 8, progress: bool = True,
               n_words: int | None = None) -> PerplexityResult:
    """Exact strided-window perplexity of `params` on one token sequence.

    `context` (default: the model's max_positions, at most 1024) is the number of
    input tokens per window and `stride` (default: `context`, disjoint windows) the step
    between windows; see the module docstring. Pass `n_words` to get `word_ppl`.
    Raises `ConfigError` for impossible settings and `InputError` for fewer than 2
    tokens or ids outside the vocabulary.

    Example:
        >>> # r = perplexity(params, tok.encode(text), context=512, stride=256)
        >>> # print(f"{r.ppl:.2f} over {r.n_tokens} tokens in {r.n_windows} windows")
    """
    t0 = time.perf_counter()
    tokens_N = np.asarray(tokens)
    if tokens_N.ndim != 1 or not (tokens_N.size == 0 or np.issubdtype(tokens_N.dtype, np.integer)):
        raise InputError(f"tokens must be a 1-D sequence of integer ids, got shape {tokens_N.shape} "
                         f"and dtype {tokens_N.dtype}")
    context, stride, batch_size = _check_settings(params, tokens_N.size, context, stride,
                                                  batch_size, n_words)
    vocab = params.config.vocab_size
    bad = tokens_N[(tokens_N < 0) | (tokens_N >= vocab)]
    if bad.size:
        raise InputError(f"token id {int(bad[0])} is outside the model's vocabulary [0, {vocab}); "
                         "was the text tokenized with this model's tokenizer?")

    plan = plan_windows(tokens_N.size, context, stride)
    n_windows = len(plan.starts)
    length = int(plan.lengths.max())
    rows = min(batch_size, n_windows)  # a short text need not pay for empty rows

    nll_sum = 0.0  # float64 on the host: thousands of float32 row sums add up exactly enough
    show = progress and sys.stderr.isatty()
    with tqdm(total=n_windows, unit="window", desc="perplexity", disable=not show,
              file=sys.stderr) as bar:
        for first in range(0, n_windows, rows):
            batch = _batch(tokens_N, plan, range(first, min(first + rows, n_windows)), rows, length)
            nll_sum += float(np.asarray(window_nll_sums(params, *batch), np.float64).sum())
            bar.update(min(rows, n_windows - first))
    if not math.isfinite(nll_sum):
        raise InputError(f"the negative log-likelihood is {nll_sum}; the model produced non-finite "
                         "logits (try --dtype float32)")
    return PerplexityResult(nll_sum=nll_sum, n_tokens=int(plan.n_scored.sum()), n_words=n_words,
                            n_windows=n_windows, context=context, stride=stride, batch_size=rows,
                            seconds=time.perf_counter() - t0)


def perplexity_of_text(params: Params, tokenizer, text: str, context: int | None = None,
                       stride: int | None = None, batch_size: int = 8,
                       progress: bool = True) -> PerplexityResult:
    """Tokenize `text` (BOS first when the tokenizer asks for it) and score it.

    With a BOS token the first text token is scored too (predicted from BOS alone);
    without one it only serves as context, so `word_ppl` (all whitespace words of the
    text in the denominator) is a hair optimistic for very short texts.

    Example:
        >>> # r = perplexity_of_text(mm.load(), mm.load_tokenizer(), open("book.txt").read())
        >>> # r.ppl, r.word_ppl
    """
    ids = tokenizer.encode_for_model(text)
    n_words = len(text.split())
    if n_words == 0:
        raise InputError(f"text is shorter than 2 tokens: it has no words ({len(text)} characters, "
                         "all whitespace); give a file with some text")
    return perplexity(params, ids, context=context, stride=stride, batch_size=batch_size,
                      progress=progress, n_words=n_words)
