"""Attribute labellers: hand-built cases, and the jitted labeller agrees with the host one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from makemost_jax.decoding.attributes import (
    AllOf,
    Labeller,
    MaxLength,
    MinLength,
    NoPromptCopy,
    NoRepeatNgram,
    label,
    non_degenerate,
    non_empty,
    parse_attribute,
)
from makemost_jax.decoding.sampling import pad_prompts
from makemost_jax.errors import ConfigError, InputError


def jitted_labels(attribute, prompts, outputs, n_slots=None, pad=0):
    """`attribute.accepts` under jit on left-padded prompts and right-padded outputs."""
    prompt_BT, mask_BT = pad_prompts(prompts, pad_id=pad, bucket=4)
    n_slots = n_slots or max(1, max(len(o) for o in outputs))
    tokens_BN = np.full((len(outputs), n_slots), pad, np.int32)
    for i, o in enumerate(outputs):
        tokens_BN[i, :len(o)] = o
    lengths_B = np.array([len(o) for o in outputs], np.int32)
    return np.asarray(jax.jit(attribute.accepts)(prompt_BT, mask_BT, tokens_BN, lengths_B)).tolist()


def both(attribute, prompts, outputs, n_slots=None):
    host = label(attribute, prompts, outputs).tolist()
    assert jitted_labels(attribute, prompts, outputs, n_slots) == host
    return host


def test_min_length_and_non_empty():
    assert both(MinLength(3), [[1]] * 4, [[], [5], [5, 6, 7], [5, 6, 7, 8]]) == [False, False, True, True]
    assert both(non_empty(), [[1]] * 2, [[], [9]]) == [False, True]


def test_no_repeat_ngram_cases():
    outputs = [[1, 2, 3, 1, 2], [1, 2, 3, 4, 1], [1, 1, 1], [1, 2, 1], []]
    assert both(NoRepeatNgram(2), [[0]] * 5, outputs) == [False, True, False, True, True]
    assert both(NoRepeatNgram(3), [[0]] * 5, outputs) == [True, True, True, True, True]
    assert both(NoRepeatNgram(1), [[0]] * 5, outputs) == [False, False, False, False, True]
    # Tokens beyond the length are ignored: [1, 2, 1] with a trailing 2 in the buffer.
    prompt_BT, mask_BT = pad_prompts([[0]], bucket=4)
    assert not bool(NoRepeatNgram(2).accepts(prompt_BT, mask_BT, jnp.array([[1, 2, 1, 2]]), jnp.array([4]))[0])
    assert bool(NoRepeatNgram(2).accepts(prompt_BT, mask_BT, jnp.array([[1, 2, 1, 2]]), jnp.array([3]))[0])


def test_no_prompt_copy_cases():
    attr = NoPromptCopy(3)
    prompts = [[7, 1, 2, 3, 8]] * 6 + [[4, 5]] * 3
    outputs = [[1, 2, 3, 9],   # opens with 3 prompt tokens (the middle)
               [3, 8, 5],      # [3, 8, 5] is not a prompt span
               [7, 1, 2],      # the prompt's start
               [1, 2],         # short, all prompt text: a copy
               [2, 3, 8, 8],   # the prompt's end
               [9, 1, 2],      # prompt text, but not at the start
               [4, 5, 6],      # 2-token prompt: starts with the whole prompt
               [5, 4],         # reversed: no copy
               []]             # empty: not a copy
    assert both(attr, prompts, outputs) == [False, True, False, False, False, True, False, True, True]
    assert both(NoPromptCopy(), [[1, 2, 3, 4, 5, 6, 7, 8, 9]] * 2, [[1, 2, 3, 4, 5, 6, 7, 0], [2, 3, 4]]) == \
        [True, False]  # default span 8: seven shared tokens then a new one is no copy


def test_no_prompt_copy_ignores_padding_anywhere():
    """A mask with holes (not only left padding) is compacted before matching."""
    prompt_BT = jnp.array([[1, 0, 2, 3, 0]])
    mask_BT = jnp.array([[1, 0, 1, 1, 0]])
    copy = NoPromptCopy(3).accepts(prompt_BT, mask_BT, jnp.array([[1, 2, 3]]), jnp.array([3]))
    pad_match = NoPromptCopy(2).accepts(prompt_BT, mask_BT, jnp.array([[1, 0]]), jnp.array([2]))
    # Real tokens 1, 2, 3: "1 0" matches only across the padding hole.
    assert copy.tolist() == [False] and pad_match.tolist() == [True]


@pytest.mark.parametrize("attribute", [MinLength(4), MaxLength(4), AllOf((MinLength(2), MaxLength(5))), NoRepeatNgram(2), NoRepeatNgram(3), NoPromptCopy(2),
                                       NoPromptCopy(4), non_degenerate(ngram=2, span=2)], ids=lambda a: a.name)
def test_jitted_agrees_with_host_on_random_cases(attribute):
    rng = np.random.default_rng(0)
    # A 3-token vocabulary makes repeats and copies common, so both labels occur.
    prompts = [rng.integers(0, 3, rng.integers(1, 9)).tolist() for _ in range(200)]
    outputs = [rng.integers(0, 3, rng.integers(0, 9)).tolist() for _ in range(200)]
    host = label(attribute, prompts, outputs)
    assert 0.05 < host.mean() < 0.95, host.mean()
    assert jitted_labels(attribute, prompts, outputs, n_slots=10) == host.tolist()


def test_user_labeller_runs_inside_jit_and_vmap():
    calls = []

    def mentions_seven(prompt, output):
        calls.append((prompt, output))
        return 7 in output

    attr = Labeller(mentions_seven, name="mentions-seven")
    prompts, outputs = [[3, 4], [5]], [[7, 1], [1, 2, 7]]
    assert jitted_labels(attr, prompts, outputs) == [True, True]
    assert calls[-1] == ([5], [1, 2, 7])  # padding stripped from the prompt, output cut at its length
    prompt_BT, mask_BT = pad_prompts(prompts, bucket=4)
    # A 7 past a row's length is ignored.
    short = jax.jit(attr.accepts)(prompt_BT, mask_BT, jnp.array([[7, 1, 0], [1, 2, 7]]), jnp.array([2, 2]))
    assert short.tolist() == [True, False]
    batched = jax.vmap(attr.accepts, in_axes=(None, None, 0, None))(
        prompt_BT, mask_BT, jnp.array([[[7, 1, 0], [1, 2, 7]], [[1, 1, 1], [7, 7, 7]]]), jnp.array([3, 3]))
    assert batched.tolist() == [[True, True], [False, True]]
    assert hash(attr) == hash(Labeller(mentions_seven, name="mentions-seven"))  # static under jit


def test_batched_labeller_judges_a_whole_batch_in_one_call():
    calls = []

    def short_outputs(prompts, outputs):
        calls.append(len(outputs))
        return [len(o) + len(p) < 4 for p, o in zip(prompts, outputs)]

    attr = Labeller(short_outputs, name="short", batched=True)
    prompts, outputs = [[3, 4], [5], [6]], [[7], [1, 2, 7], []]
    assert label(attr, prompts, outputs).tolist() == [True, False, True] and calls == [3]
    assert jitted_labels(attr, prompts, outputs) == [True, False, True] and calls[-1] == 3
    assert attr.check([1], [2, 3]) and not attr.check([1], [2, 3, 4])
    broken = Labeller(lambda prompts, outputs: [True], name="broken", batched=True)
    with pytest.raises(InputError, match="one bool per output"):
        label(broken, [[1]], [[2], [3]])


def test_all_of_and_specs_round_trip():
    for attribute in [MinLength(8), MaxLength(16), NoRepeatNgram(3), NoPromptCopy(5), non_degenerate(),
                      AllOf((MinLength(2), NoPromptCopy())), AllOf((MinLength(8), MaxLength(16)))]:
        assert parse_attribute(attribute.name) == attribute
    assert parse_attribute("non-empty") == MinLength(1)
    assert parse_attribute("no-prompt-copy") == NoPromptCopy(8)
    both_parts = AllOf((MinLength(2), NoRepeatNgram(2)))
    assert both(both_parts, [[0]] * 3, [[1], [1, 2], [1, 1, 1]]) == [False, True, False]


@pytest.mark.parametrize("spec, words", [("min-length", "unknown attribute"), ("min-length:x", "not an integer"),
                                         ("max-len:3", "unknown attribute"), ("max-length:0", "at least 1"), ("min-length:0", "at least 1"),
                                         ("min-length:3+bogus", "unknown attribute")])
def test_bad_specs_raise_config_error(spec, words):
    with pytest.raises(ConfigError, match=words):
        parse_attribute(spec)


def test_label_input_errors():
    assert label(MinLength(1), [[1]], [[], [2]]).tolist() == [False, True]  # one shared prompt
    with pytest.raises(InputError, match="2 prompts for 3 outputs"):
        label(MinLength(1), [[1], [2]], [[], [1], [2]])
    with pytest.raises(ConfigError, match="AllOf needs"):
        AllOf(())
