"""Exact mode search: brute-force optima on tiny models, budgets, the beam seed, the `mode` command."""

from __future__ import annotations

import itertools
import json
import math

import jax
import numpy as np
import pytest

import makemost_jax as mm
from makemost_jax.cli import main
from makemost_jax.decoding.beam import beam_search
from makemost_jax.decoding.exact import ModeResult, exact_length_modes, exact_mode
from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models import from_hf_config, init_params

EOS, PROMPT, MAX_LENGTH = 0, [1, 2, 3], 6
N_PREFIXES = sum(4 ** n for n in range(MAX_LENGTH + 1))  # every prefix of <= 6 non-EOS tokens: 5461

CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "vocab_size": 5, "n_positions": 32},
    "llama": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 5, "max_position_embeddings": 32,
              "rope_theta": 10000.0, "tie_word_embeddings": False},
}
# Random weights scaled up so each next-token distribution is peaked (pruning has work to do)
# and, for GPT-2, the unconditional mode is not the empty output.
SCALE_SEED = {"gpt2": (20.0, 7), "llama": (10.0, 2)}


def tiny_model(family: str):
    scale, seed = SCALE_SEED[family]
    params = init_params(from_hf_config(CONFIGS[family]), jax.random.key(seed))
    return jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)


def brute_force(params) -> dict[tuple[int, ...], tuple[float, float]]:
    """{output: (log p(output, EOS), log p(output))} for every output of <= MAX_LENGTH non-EOS tokens."""
    outputs = [ys for n in range(MAX_LENGTH + 1) for ys in itertools.product(range(1, 5), repeat=n)]
    seqs = np.full((len(outputs), len(PROMPT) + MAX_LENGTH + 1), EOS, np.int32)  # EOS after, padding beyond
    for row, ys in zip(seqs, outputs):
        row[:len(PROMPT) + len(ys)] = PROMPT + list(ys)
    logits = jax.jit(mm.forward)(params, seqs).logits
    logp = np.asarray(mm.token_logprobs(logits[:, :-1], seqs[:, 1:]), np.float64)[:, len(PROMPT) - 1:]
    return {ys: (logp[i, :len(ys) + 1].sum(), logp[i, :len(ys)].sum()) for i, ys in enumerate(outputs)}


def argmax(scores: dict) -> tuple[tuple[int, ...], float]:
    """The best output and its score, checking that it wins by a clear margin (else the test is ill-posed)."""
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    assert len(ranked) == 1 or ranked[0][1] - ranked[1][1] > 1e-3, ranked[:2]
    return ranked[0]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    params = tiny_model(request.param)
    table = brute_force(params)
    truth = {n: argmax({ys: s[0] for ys, s in table.items() if len(ys) == n}) for n in range(MAX_LENGTH + 1)}
    truth["any"] = argmax({ys: s[0] for ys, s in table.items()})
    truth["stop"] = argmax({ys: s[1] if len(ys) == MAX_LENGTH else s[0] for ys, s in table.items()})
    return request.param, params, table, truth


def assert_is(result: ModeResult, expected, ends_with_eos: bool = True):
    tokens, loglik = expected
    assert result.tokens == tokens and result.length == len(tokens)
    assert result.loglik == pytest.approx(loglik, abs=1e-4)
    assert result.ends_with_eos == ends_with_eos
    assert result.proved_optimal


# Settings cover both orders, several calls per search, and continuations (children=2 of 4 tokens).
SETTINGS = [{"order": "depth", "batch_size": 16, "children": 16}, {"order": "best", "batch_size": 3, "children": 2}]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s['order']}-c{s['children']}")
def test_agrees_with_brute_force(tiny, settings):
    family, params, _, truth = tiny
    common = {"eos_id": EOS, "max_length": MAX_LENGTH, **settings}

    mode = exact_mode(params, PROMPT, **common)
    assert_is(mode, truth["any"])
    assert mode.nodes_expanded < N_PREFIXES / 100  # pruning: a few nodes, not all 5461 prefixes
    assert_is(exact_mode(params, PROMPT, stop_at_max_length=True, **common), truth["stop"],
              ends_with_eos=len(truth["stop"][0]) < MAX_LENGTH)

    for n in range(MAX_LENGTH + 1):
        at_n = exact_mode(params, PROMPT, length=n, **common)
        assert_is(at_n, truth[n])
        assert at_n.nodes_expanded < sum(4 ** i for i in range(n + 1)) or n < 3

    modes = exact_length_modes(params, PROMPT, **common)
    assert [m.length for m in modes] == list(range(MAX_LENGTH + 1))
    for n, m in enumerate(modes):
        assert_is(m, truth[n])
    assert max(m.nodes_expanded for m in modes) < N_PREFIXES / 4
    if family == "gpt2":  # the model's unconditional mode is a one-token output, not empty or greedy
        assert len(truth["any"][0]) == 1


def test_no_seed_same_modes(tiny):
    """Without the beam-search seed the search finds the same optima, by its own bound."""
    _, params, _, truth = tiny
    modes = exact_length_modes(params, PROMPT, eos_id=EOS, max_length=MAX_LENGTH, seed_beams=0, batch_size=16)
    for n, m in enumerate(modes):
        assert_is(m, truth[n])


def test_budget_returns_best_found(tiny):
    _, params, table, truth = tiny
    budget = 7
    modes = exact_length_modes(params, PROMPT, eos_id=EOS, max_length=MAX_LENGTH, node_budget=budget,
                               batch_size=3, children=2, seed_beams=0)
    assert max(m.nodes_expanded for m in modes) == budget
    assert not modes[MAX_LENGTH].proved_optimal
    assert_is(modes[0], truth[0])  # settled by the root's expansion
    for n, m in enumerate(modes):
        if m.tokens is None:  # nothing of this length reached within the budget
            assert m.loglik == -math.inf and not m.proved_optimal
            continue
        assert m.loglik == pytest.approx(table[m.tokens][0], abs=1e-4)  # a real output, correctly scored
        assert m.loglik <= truth[n][1] + 1e-4
        if m.proved_optimal:
            assert m.tokens == truth[n][0]
    # A search far beyond the budget stops at the budget instead of running on.
    deep = exact_mode(params, PROMPT, eos_id=EOS, max_length=MAX_LENGTH, length=MAX_LENGTH, node_budget=1,
                      seed_beams=0)
    assert (deep.tokens, deep.loglik, deep.proved_optimal, deep.nodes_expanded) == (None, -math.inf, False, 1)


def test_never_worse_than_beam_seed(tiny):
    family, params, _, truth = tiny
    seeded = []
    for n in range(1, MAX_LENGTH + 1):
        beam = jax.device_get(beam_search(params, [PROMPT], beams=4, max_new_tokens=MAX_LENGTH + 1, eos_id=EOS,
                                          min_length=n))
        seeds = [float(lp) for lp, k, done in zip(beam.logprobs[0], beam.lengths[0], beam.finished[0])
                 if done and k == n]
        for budget in (1, 10_000):
            found = exact_mode(params, PROMPT, eos_id=EOS, max_length=MAX_LENGTH, length=n, node_budget=budget)
            if seeds:
                assert found.loglik >= max(seeds) - 1e-5
            if budget == 1 and seeds:  # one expansion cannot reach length n: the result is the seed
                assert found.tokens is not None and found.loglik == pytest.approx(max(seeds), abs=1e-6)
                seeded.append(n)
            if budget > 1:
                assert found.tokens == truth[n][0]
    # Llama's beams all run to the length limit (no seed); GPT-2's end at most lengths.
    assert len(seeded) >= (4 if family == "gpt2" else 0)


def test_settings_are_checked():
    params = tiny_model("gpt2")
    with pytest.raises(ConfigError, match=r"length=7 .*max_length=6"):
        exact_mode(params, PROMPT, eos_id=EOS, max_length=6, length=7)
    with pytest.raises(ConfigError, match="node_budget=0"):
        exact_mode(params, PROMPT, eos_id=EOS, node_budget=0)
    with pytest.raises(InputError, match="prompt is empty"):
        exact_length_modes(params, [], eos_id=EOS)
    with pytest.raises(InputError, match=r"30 tokens \+ max_length=3 exceeds .* context of 32"):
        exact_mode(params, [1] * 30, eos_id=EOS, max_length=3)
    with pytest.raises(ConfigError, match="eos_id=None"):
        exact_mode(params, PROMPT, eos_id=None)
    with pytest.raises(ConfigError, match="order="):
        exact_mode(params, PROMPT, eos_id=EOS, order="random")
    with pytest.raises(ConfigError, match="stop_at_max_length"):
        exact_mode(params, PROMPT, eos_id=EOS, length=2, stop_at_max_length=True)
    with pytest.raises(InputError, match="token id 9"):
        exact_mode(params, [1, 9], eos_id=EOS)
    bert = init_params(from_hf_config({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 5,
                                       "max_position_embeddings": 32}), jax.random.key(0))
    with pytest.raises(ConfigError, match="encoder"):
        exact_mode(bert, PROMPT, eos_id=EOS)


def test_prefix_pool_recycles_slots_within_its_memory_budget(tiny):
    """Each evaluated prefix keeps its last token's keys/values in a device pool that its children read;
    slots come back when no frontier entry needs them, so a pool far smaller than the search suffices,
    and a pool too small for the live frontier stops the search like the node budget."""
    _, params, table, truth = tiny
    cfg = params.config
    per_prefix = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4  # float32 keys and values
    common = {"eos_id": EOS, "max_length": MAX_LENGTH, "seed_beams": 0, "batch_size": 3, "children": 2}
    modes = exact_length_modes(params, PROMPT, kv_budget_bytes=40 * per_prefix, **common)
    assert max(m.nodes_expanded for m in modes) > 40  # more prefixes evaluated than the pool has slots
    for n, m in enumerate(modes):
        assert_is(m, truth[n])
    cramped = exact_length_modes(params, PROMPT, kv_budget_bytes=4 * per_prefix, **common)
    assert not all(m.proved_optimal for m in cramped)
    for m in cramped:  # what it found is real and correctly scored
        assert m.tokens is None or m.loglik == pytest.approx(table[m.tokens][0], abs=1e-4)
    with pytest.raises(ConfigError, match="kv_budget_bytes"):
        exact_mode(params, PROMPT, kv_budget_bytes=2 * per_prefix, **common)


# ---------------------------------------------------------------- the `makemost mode` command


def test_cli_mode_json(capsys, tiny_gpt2_dir):
    status = main(["mode", str(tiny_gpt2_dir), "Elizabeth", "--max-length", "2", "--all-lengths",
                   "--node-budget", "40", "--batch-size", "8", "--json"])
    out = capsys.readouterr()
    assert status == 0, out.err
    assert out.out.endswith("\n") and out.out.count("\n") == 1
    report = json.loads(out.out)
    assert report["command"] == "mode" and report["all_lengths"] and report["max_length"] == 2
    (result,) = report["results"]
    assert result["prompt"] == "Elizabeth" and [m["length"] for m in result["modes"]] == [0, 1, 2]
    for m in result["modes"]:
        assert set(m) >= {"tokens", "text", "loglik", "length", "proved_optimal", "nodes_expanded", "seconds"}
        assert m["nodes_expanded"] <= 40
        if m["tokens"] is not None:
            assert len(m["tokens"]) == m["length"] and m["loglik"] < 0
    # 100 continuations per prefix, 40 nodes: the longest length cannot be proved.
    assert not result["modes"][2]["proved_optimal"]


def test_cli_mode_table_and_errors(capsys, tiny_gpt2_dir):
    status = main(["mode", str(tiny_gpt2_dir), "Mr. Darcy", "--max-length", "2", "--node-budget", "20",
                   "--batch-size", "8"])
    out = capsys.readouterr()
    assert status == 0, out.err
    lines = out.out.splitlines()
    assert lines[0] == "Mr. Darcy" and "proved" in lines[1] and len(lines) == 4
    status = main(["mode", str(tiny_gpt2_dir), "Mr. Darcy", "--length", "5", "--max-length", "2"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "length=5" in err and "max_length=2" in err


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_real_model_modes():
    """Modes of SmolLM2-135M for two prompts: proved, correctly scored, at least as likely as beam search."""
    params, tok = mm.load(), mm.load_tokenizer()
    max_length, settings = 4, {"node_budget": 160, "batch_size": 16}
    for prompt in ["The capital of France is", "Q: What is 2+2?\nA:"]:
        ids = tok.encode_for_model(prompt)
        mode = exact_mode(params, ids, eos_id=tok.eos_id, max_length=max_length, **settings)
        best_first = exact_mode(params, ids, eos_id=tok.eos_id, max_length=max_length, order="best", **settings)
        modes = exact_length_modes(params, ids, eos_id=tok.eos_id, max_length=max_length, **settings)
        print(f"\n{prompt!r}: mode {tok.decode(mode.tokens)!r} log p {mode.loglik:.3f} "
              f"({mode.nodes_expanded} nodes, {mode.seconds:.1f} s)")
        for m in modes:
            text = None if m.tokens is None else tok.decode(m.tokens)
            print(f"  length {m.length}: {text!r} log p {m.loglik:.3f} proved {m.proved_optimal} "
                  f"({m.nodes_expanded} nodes, {m.seconds:.1f} s)")

        assert mode.proved_optimal and best_first.proved_optimal
        assert best_first.tokens == mode.tokens and best_first.loglik == pytest.approx(mode.loglik, abs=1e-3)
        seq = np.array([ids + list(mode.tokens) + [tok.eos_id]], np.int32)
        rescored = mm.token_logprobs(mm.forward(params, seq).logits[:, :-1], seq[:, 1:])[0, len(ids) - 1:].sum()
        assert mode.loglik == pytest.approx(float(rescored), abs=1e-3)
        beam = jax.device_get(beam_search(params, [ids], beams=4, max_new_tokens=max_length + 1,
                                          eos_id=tok.eos_id))
        ended = beam.finished[0] & (beam.lengths[0] <= max_length)  # the others hit the limit without EOS
        assert np.all(mode.loglik >= beam.logprobs[0][ended] - 1e-4)
        for m in modes:
            if m.tokens is not None:
                assert m.loglik <= mode.loglik + 1e-4  # no output of any length beats the mode
        assert modes[mode.length].proved_optimal or modes[mode.length].loglik <= mode.loglik + 1e-4
        if modes[mode.length].proved_optimal:
            assert modes[mode.length].tokens == mode.tokens
