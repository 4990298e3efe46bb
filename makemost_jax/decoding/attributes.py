"""Attributes of whole outputs: exact labellers for conditional search and classifier training.

An attribute `a` is a yes/no property of an output `y` given its prompt `x` ("at least 8
tokens long", "no repeated 4-gram"). Conditional beam search looks for the mode of
p(y | x, a); its finished hypotheses are kept only when the attribute's own labeller
accepts them, and the per-token classifier (`classifier.py`) is trained on these labels.

Every attribute is a frozen (hashable) dataclass, so it can be a static argument of a
jitted search, with

- `name`: a string; for the built-ins it is also the spec `parse_attribute` reads back;
- `accepts(prompt_BT, prompt_mask_BT, tokens_BN, lengths_B) -> (B,) bool`: the jittable
  labeller. `tokens_BN` are the generated tokens, `lengths_B` how many of them belong to
  the output, EOS not counted (tokens at index >= length are ignored);
- `check(prompt, output) -> bool`: the same labeller on plain token lists (the prompt's
  real tokens, the output without EOS), for host-side labelling (`label`).

Built-ins: `MinLength(L)` (`non_empty()` is `MinLength(1)`), `MaxLength(L)`, `NoRepeatNgram(n)`,
`NoPromptCopy(span)`, their conjunction `AllOf(...)` (`non_degenerate()`), and `Labeller`,
which wraps a Python function on token lists (it runs on the host through
`jax.pure_callback`, so it also works inside the jitted search).

Dimensions: B batch, T prompt length (padded), N generated tokens.

Example:
    >>> attr = parse_attribute("min-length:2+no-repeat-ngram:2")
    >>> label(attr, [[5, 6]], [[1, 2, 3], [1], [1, 2, 1, 2]]).tolist()
    [True, False, False]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.errors import ConfigError, InputError


@runtime_checkable
class Attribute(Protocol):
    """What conditional search and classifier training need from an attribute (see the module doc)."""

    name: str

    def accepts(self, prompt_BT, prompt_mask_BT, tokens_BN, lengths_B) -> jax.Array:
        """(B,) bool: whether each output has the attribute (jittable)."""

    def check(self, prompt: Sequence[int], output: Sequence[int]) -> bool:
        """Whether one output (token list, no EOS) of one prompt (real tokens) has the attribute."""


class _CountSetting:
    """Shared by the built-ins set by one positive integer (their only field): its check and the spec name."""

    kind: ClassVar[str]  # the spec keyword `parse_attribute` reads

    def _setting(self) -> tuple[str, int]:
        field = dataclasses.fields(self)[0].name
        return field, getattr(self, field)

    def __post_init__(self):
        field, value = self._setting()
        if value < 1:
            raise ConfigError(f"{type(self).__name__}({field}={value}) must be at least 1")

    @property
    def name(self) -> str:
        return f"{self.kind}:{self._setting()[1]}"


@dataclasses.dataclass(frozen=True)
class MinLength(_CountSetting):
    """The output has at least `length` tokens (EOS not counted); `MinLength(1)` = non-empty.

    Example:
        >>> import jax.numpy as jnp
        >>> MinLength(2).accepts(None, None, jnp.zeros((3, 4), int), jnp.array([0, 2, 4])).tolist()
        [False, True, True]
    """

    length: int
    kind: ClassVar[str] = "min-length"

    def accepts(self, prompt_BT, prompt_mask_BT, tokens_BN, lengths_B):
        return jnp.asarray(lengths_B) >= self.length

    def check(self, prompt, output) -> bool:
        return len(output) >= self.length


@dataclasses.dataclass(frozen=True)
class MaxLength(_CountSetting):
    """The output has at most `length` tokens (EOS not counted).

    An output cut at the search's or sampler's limit without EOS counts its full
    `max_new_tokens`, so with `max_new_tokens > length` this means "ends (EOS) within
    `length` tokens", and "min-length:M+max-length:L" means "ends after M to L tokens":
    an attribute that no prefix shorter than M decides.

    Example:
        >>> import jax.numpy as jnp
        >>> MaxLength(2).accepts(None, None, jnp.zeros((3, 4), int), jnp.array([0, 2, 4])).tolist()
        [True, True, False]
    """

    length: int
    kind: ClassVar[str] = "max-length"

    def accepts(self, prompt_BT, prompt_mask_BT, tokens_BN, lengths_B):
        return jnp.asarray(lengths_B) <= self.length

    def check(self, prompt, output) -> bool:
        return len(output) <= self.length


@dataclasses.dataclass(frozen=True)
class NoRepeatNgram(_CountSetting):
    """No n-gram occurs twice in the output (overlapping occurrences count; the prompt is not looked at).

    Example:
        >>> NoRepeatNgram(2).check([], [1, 2, 3, 1, 2]), NoRepeatNgram(2).check([], [1, 1, 2, 2])
        (False, True)
    """

    n: int
    kind: ClassVar[str] = "no-repeat-ngram"

    def accepts(self, prompt_BT, prompt_mask_BT, tokens_BN, lengths_B):
        tokens_BN = jnp.asarray(tokens_BN)
        lengths_B = jnp.asarray(lengths_B)
        b, n_tokens = tokens_BN.shape
        starts = n_tokens - self.n + 1
        if starts < 2:  # no room for two n-grams
            return jnp.ones((b,), bool)
        # same_BSS[b, i, j]: the n-grams starting at i and j are equal (checked one offset at a time).
        same_BSS = jnp.ones((b, starts, starts), bool)
        for k in range(self.n):
            window_BS = tokens_BN[:, k:k + starts]
            same_BSS &= window_BS[:, :, None] == window_BS[:, None, :]
        index_S = jnp.arange(starts)
        inside_BS = index_S[None] + self.n <= lengths_B[:, None]
        later_SS = index_S[:, None] < index_S[None, :]
        repeated_B = jnp.any(same_BSS & later_SS[None] & inside_BS[:, :, None] & inside_BS[:, None, :], axis=(1, 2))
        return ~repeated_B

    def check(self, prompt, output) -> bool:
        grams = [tuple(output[i:i + self.n]) for i in range(len(output) - self.n + 1)]
        return len(set(grams)) == len(grams)


@dataclasses.dataclass(frozen=True)
class NoPromptCopy(_CountSetting):
    """The output does not start by copying the prompt.

    "Copy": the output's first m tokens occur as m consecutive tokens anywhere in the
    prompt, with m = min(span, output length, prompt length). So an output that opens
    with `span` tokens of prompt text is a copy (echoing the question or the prompt's
    ending), and so is a shorter output made only of prompt text (a repeated question),
    or one that starts with the whole prompt. The empty output is not a copy (use
    `MinLength`). Padding (mask 0) is skipped.

    Example:
        >>> copy = NoPromptCopy(3)
        >>> copy.check([7, 1, 2, 3, 8], [1, 2, 3, 9]), copy.check([7, 1, 2], [1, 2]), copy.check([7, 1], [1, 9])
        (False, False, True)
    """

    span: int = 8
    kind: ClassVar[str] = "no-prompt-copy"

    def accepts(self, prompt_BT, prompt_mask_BT, tokens_BN, lengths_B):
        prompt_BT = jnp.asarray(prompt_BT)
        mask_BT = jnp.asarray(prompt_mask_BT).astype(bool)
        tokens_BN = jnp.asarray(tokens_BN)
        b, t = prompt_BT.shape
        # Real prompt tokens first, in order, whatever the padding.
        order_BT = jnp.argsort(~mask_BT, axis=1, stable=True)
        real_BT = jnp.take_along_axis(prompt_BT, order_BT, axis=1)
        count_B = mask_BT.sum(1)
        m_B = jnp.minimum(jnp.minimum(self.span, count_B), jnp.asarray(lengths_B))
        head_BM = tokens_BN[:, :self.span]
        if head_BM.shape[1] < self.span:  # fewer generated slots than span: those are beyond every length
            head_BM = jnp.pad(head_BM, ((0, 0), (0, self.span - head_BM.shape[1])))
        real_BP = jnp.pad(real_BT, ((0, 0), (0, self.span)))
        start_S = jnp.arange(t)
        match_BS = jnp.ones((b, t), bool)
        for k in range(self.span):
            ok_BS = (real_BP[:, k:k + t] == head_BM[:, k:k + 1]) & (start_S[None] + k < count_B[:, None])
            match_BS &= ok_BS | (k >= m_B[:, None])
        return ~((m_B > 0) & jnp.any(match_BS, axis=1))

    def check(self, prompt, output) -> bool:
        prompt, output = list(prompt), list(output)
        m = min(self.span, len(prompt), len(output))
        return m == 0 or not any(prompt[s:s + m] == output[:m] for s in range(len(prompt) - m + 1))


@dataclasses.dataclass(frozen=True)
class AllOf:
    """Every one of `parts` holds; its name joins theirs with "+".

    Example:
        >>> AllOf((MinLength(1), NoRepeatNgram(3))).name
        'min-length:1+no-repeat-ngram:3'
    """

    parts: tuple

    def __post_init__(self):
        if not self.parts or not all(isinstance(p, Attribute) for p in self.parts):
            raise ConfigError("AllOf needs a non-empty tuple of attributes (objects with name, accepts, check)")

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    def accepts(self, prompt_BT, prompt_mask_BT, tokens_BN, lengths_B):
        result = jnp.ones(jnp.shape(lengths_B), bool)
        for part in self.parts:
            result &= part.accepts(prompt_BT, prompt_mask_BT, tokens_BN, lengths_B)
        return result

    def check(self, prompt, output) -> bool:
        return all(p.check(prompt, output) for p in self.parts)


@dataclasses.dataclass(frozen=True)
class Labeller:
    """A user attribute: `fn(prompt_ids: list[int], output_ids: list[int]) -> bool`.

    `fn` sees the prompt's real tokens and the output without EOS. Inside jit it runs on
    the host through `jax.pure_callback`, one call per batch of rows (so it costs a
    device-host round trip per use: keep it for labelling, not for hot loops on
    accelerators). With `batched=True`, `fn(prompts, outputs)` takes lists of token lists
    and returns one bool per row: for a judge that is itself a model, which then runs
    once per batch instead of once per row.

    Example:
        >>> no_seven = Labeller(lambda prompt, output: 7 not in output, name="no-seven")
        >>> import jax.numpy as jnp
        >>> jax.jit(no_seven.accepts)(jnp.ones((2, 1), int), jnp.ones((2, 1), int),
        ...                           jnp.array([[7, 1], [1, 7]]), jnp.array([2, 1])).tolist()
        [False, True]
        >>> short = Labeller(lambda prompts, outputs: [len(o) < 2 for o in outputs], name="short", batched=True)
        >>> label(short, [[1]], [[4], [4, 5]]).tolist()
        [True, False]
    """

    fn: Callable[[list, list], bool] | Callable[[list[list], list[list]], Sequence[bool]]
    name: str = "labeller"
    batched: bool = False

    def accepts(self, prompt_BT, prompt_mask_BT, tokens_BN, lengths_B):
        lengths_B = jnp.asarray(lengths_B)

        def host(*arrays):
            # NumPy at once: a JAX op dispatched from inside a callback can deadlock a busy CPU backend.
            prompt_BT, mask_BT, tokens_BN, lengths_B = (np.asarray(a) for a in arrays)
            prompts = [row[m.astype(bool)].tolist() for row, m in zip(prompt_BT, mask_BT)]
            outputs = [row[:n].tolist() for row, n in zip(tokens_BN, lengths_B)]
            return label(self, prompts, outputs)

        shape = jax.ShapeDtypeStruct(lengths_B.shape, jnp.bool_)
        return jax.pure_callback(host, shape, prompt_BT, prompt_mask_BT, tokens_BN, lengths_B,
                                 vmap_method="sequential")

    def check(self, prompt, output) -> bool:
        return bool(self.check_many([prompt], [output])[0])

    def check_many(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> np.ndarray:
        """One bool per (prompt, output) pair."""
        prompts, outputs = [list(p) for p in prompts], [list(o) for o in outputs]
        if self.batched:
            verdicts = np.asarray(self.fn(prompts, outputs), bool)
            if verdicts.shape != (len(outputs),):
                raise InputError(f"labeller {self.name!r} returned shape {verdicts.shape} for {len(outputs)} "
                                 "outputs; a batched fn must return one bool per output")
            return verdicts
        return np.array([bool(self.fn(p, o)) for p, o in zip(prompts, outputs)], bool)


def non_empty() -> MinLength:
    """The attribute "the output is not empty".

    Example:
        >>> non_empty().name
        'min-length:1'
    """
    return MinLength(1)


def non_degenerate(ngram: int = 4, span: int = 8) -> AllOf:
    """Not empty, no repeated `ngram`-gram and no copy of the prompt (see `NoPromptCopy`).

    Example:
        >>> non_degenerate().name
        'min-length:1+no-repeat-ngram:4+no-prompt-copy:8'
    """
    return AllOf((MinLength(1), NoRepeatNgram(ngram), NoPromptCopy(span)))


_SPECS = "min-length:L, max-length:L, non-empty, no-repeat-ngram:N, no-prompt-copy[:SPAN], non-degenerate, joined by '+'"


def _parse_one(spec: str) -> Attribute:
    kind, _, arg = spec.strip().partition(":")
    try:
        if kind == "non-empty" and not arg:
            return non_empty()
        if kind == "non-degenerate" and not arg:
            return non_degenerate()
        if kind == "min-length" and arg:
            return MinLength(int(arg))
        if kind == "max-length" and arg:
            return MaxLength(int(arg))
        if kind == "no-repeat-ngram" and arg:
            return NoRepeatNgram(int(arg))
        if kind == "no-prompt-copy":
            return NoPromptCopy(int(arg)) if arg else NoPromptCopy()
    except ValueError:
        raise ConfigError(f"attribute {spec!r}: {arg!r} is not an integer; use one of: {_SPECS}") from None
    raise ConfigError(f"unknown attribute {spec!r}; use one of: {_SPECS}")


def parse_attribute(spec: str) -> Attribute:
    """The built-in attribute named by `spec` (the inverse of `.name`).

    Example:
        >>> parse_attribute("min-length:8")
        MinLength(length=8)
        >>> parse_attribute("non-degenerate") == non_degenerate()
        True
    """
    parts = [_parse_one(s) for s in spec.split("+")]
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def label(attribute: Attribute, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> np.ndarray:
    """Host-side labels: `attribute.check` on each output (token list, no EOS).

    `prompts` holds one token list per output, or a single one shared by all outputs.

    Example:
        >>> label(MinLength(2), [[1]], [[4], [4, 5]]).tolist()
        [False, True]
    """
    prompts, outputs = list(prompts), list(outputs)
    if len(prompts) == 1:
        prompts = prompts * len(outputs)
    if len(prompts) != len(outputs):
        raise InputError(f"label() got {len(prompts)} prompts for {len(outputs)} outputs; pass one prompt "
                         "per output or a single shared one")
    if isinstance(attribute, Labeller):
        return attribute.check_many(prompts, outputs)
    return np.array([attribute.check(p, o) for p, o in zip(prompts, outputs)], bool)
