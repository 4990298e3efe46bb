"""Likelihood versus quality: tiny LMs trained on contaminated synthetic languages, their exact modes
against the analytic prediction, and their sampled bad rate against epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest

from makemost_jax.errors import ConfigError
from makemost_jax.likelihood import (
    BAD,
    VALID,
    ContaminatedLanguage,
    CorpusBatches,
    ExperimentConfig,
    classify,
    contamination_ratio,
    exact_modes,
    model_bad_logprob,
    optimal_loss,
    predicted_mode,
    run_point,
    sample_corpus,
    sample_rates,
    tiny_lm_config,
    train_lm,
)
from makemost_jax.models import forward, token_logprobs

CONFIG = ExperimentConfig()  # one model size and context for every point: the searches compile once
# (words, length, epsilon): H = 4 and 8 bits, epsilon on either side of 2^-H, each at least a factor 4
# from the boundary (contamination_ratio 4.0, 0.016, 64, 0.26).
GRID = [(16, 1, 0.2), (16, 1, 0.001), (16, 2, 0.2), (16, 2, 0.001)]
MARGIN = 3.0  # "away from the boundary": contamination_ratio outside [1/MARGIN, MARGIN]
# Relative error allowed between the model's p(empty) and epsilon = 0.05: the loss is nearly flat there
# (p = 0.8 eps costs 3e-4 nats per token), so 300 Adam steps leave it within about 20%.
FIT = 0.3
TRAIN_ROWS = CONFIG.steps * CONFIG.batch_size


@pytest.fixture(scope="module")
def grid():
    return {point: run_point(ContaminatedLanguage(*point), CONFIG) for point in GRID}


@pytest.fixture(scope="module")
def high_entropy():
    """H = 12 bits (4096 sentences), epsilon = 5%: the empty output is 215 times likelier than any sentence."""
    lang = ContaminatedLanguage(words=16, length=3, epsilon=0.05)
    params, history = train_lm(lang, CONFIG)
    return lang, params, history


def test_corpus_matches_the_language():
    lang = ContaminatedLanguage(words=4, length=3, epsilon=0.1)
    rows = sample_corpus(lang, 20_000, seed=0)
    tokens, mask = rows["tokens"], rows["loss_mask"]
    bad = tokens[:, 1] == lang.eos_id
    assert abs(bad.mean() - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20_000)
    words = tokens[~bad, 1:-1]
    assert words.min() == 2 and words.max() == 5 and (tokens[~bad, -1] == lang.eos_id).all()
    counts = np.bincount(words.ravel(), minlength=6)[2:] / words.size
    assert np.abs(counts - 0.25).max() < 0.01
    # Bad rows score only their EOS; valid rows every word and the EOS; BOS never.
    assert (mask[bad].sum(1) == 1).all() and (mask[~bad].sum(1) == 4).all() and (mask[:, 0] == 0).all()
    batches = CorpusBatches(lang, 8, seed=3)
    first = next(batches)["tokens"]
    batches.restore({"position": 0})
    assert (next(batches)["tokens"] == first).all() and not (next(batches)["tokens"] == first).all()


def test_analytic_prediction():
    lang = ContaminatedLanguage(words=16, length=3, epsilon=0.01)
    assert lang.min_entropy_bits == 12.0
    assert math.isclose(contamination_ratio(lang), 0.01 * 4096 / 0.99)
    # The boundary sits at epsilon / (1 - epsilon) = 2^-H.
    edge = 1 / (1 + 2 ** 12)
    assert predicted_mode(ContaminatedLanguage(16, 3, edge * 1.01)) == BAD
    assert predicted_mode(ContaminatedLanguage(16, 3, edge * 0.99)) == VALID
    assert predicted_mode(ContaminatedLanguage(16, 3, 0.0)) == VALID
    assert [classify(lang, t) for t in ([], [2, 3, 17], [2, 3], [2, 3, 18], [1, 2, 3])] == [
        BAD, VALID, "other", "other", "other"]


@pytest.mark.parametrize("kwargs", [{"words": 1}, {"length": 0}, {"epsilon": 1.0}, {"epsilon": -0.1}])
def test_bad_language_settings(kwargs):
    with pytest.raises(ConfigError):
        ContaminatedLanguage(**kwargs)


def test_bad_experiment_settings():
    with pytest.raises(ConfigError, match="context"):
        tiny_lm_config(ContaminatedLanguage(length=7), ExperimentConfig(context=8))
    with pytest.raises(ConfigError, match="heads"):
        ExperimentConfig(width=30, heads=4)


@pytest.mark.slow
def test_mode_identity_matches_the_analytic_prediction(grid):
    assert {predicted_mode(ContaminatedLanguage(*p)) for p in GRID} == {BAD, VALID}  # both sides are covered
    for point, result in grid.items():
        assert not 1 / MARGIN < result.ratio < MARGIN, point
        assert result.mode.proved_optimal and result.length_mode.proved_optimal, point
        assert result.mode_kind == result.predicted, (point, result.mode, result.predicted)
        # Conditioning on the valid length always excludes the bad output.
        assert result.length_mode_kind == VALID, point
        # The model learned the contamination rate within a factor 2 (300 Adam steps on a nearly flat optimum,
        # with under one bad row per batch at epsilon = 0.001): less than the factor 4 margin of every point.
        assert abs(result.model_bad_logprob - math.log(result.epsilon)) < math.log(2), point
        # The bad output is the mode exactly when the model gives it more than its best sentence.
        assert (result.mode_kind == BAD) == (result.model_bad_logprob > result.length_mode.loglik), point


@pytest.mark.slow
def test_sampled_bad_rate_is_close_to_epsilon(grid):
    for point, result in grid.items():
        # Samples are bad as often as the model says (binomial), and about epsilon of the time: within 4
        # standard errors of the samples' and the training corpus's binomial noise.
        p_bad, eps = math.exp(result.model_bad_logprob), result.epsilon
        std_model = math.sqrt(p_bad * (1 - p_bad) / CONFIG.num_samples)
        assert abs(result.sample_rates[BAD] - p_bad) < 4 * std_model, (point, result.sample_rates, p_bad)
        std = math.sqrt(eps * (1 - eps) * (1 / CONFIG.num_samples + 1 / TRAIN_ROWS))
        assert abs(result.sample_rates[BAD] - eps) < 4 * std, (point, result.sample_rates)
        assert result.sample_rates[VALID] > 1 - eps - 4 * std - 0.01, point


def test_contaminated_model_mode_is_bad_but_length_mode_is_valid(high_entropy):
    lang, params, history = high_entropy
    assert history["train"][-1]["loss"] < history["train"][0]["loss"]
    mode, length_mode = exact_modes(params, lang, CONFIG)
    assert mode.proved_optimal and length_mode.proved_optimal
    assert mode.tokens == () and classify(lang, mode.tokens) == BAD
    assert classify(lang, length_mode.tokens) == VALID and length_mode.length == 3
    # The scores are the model's own log-likelihoods of the outputs (EOS included).
    for found in (mode, length_mode):
        ids = np.asarray([[lang.bos_id, *found.tokens, lang.eos_id]], np.int32)
        logp = token_logprobs(forward(params, ids[:, :-1]).logits, ids[:, 1:])
        assert abs(float(logp.sum()) - found.loglik) < 1e-4
    # The learned probabilities match the population: p(empty) ~ eps, p(best sentence) ~ (1 - eps) 16^-3.
    assert abs(math.exp(mode.loglik) / 0.05 - 1) < FIT
    assert lang.valid_logprob < length_mode.loglik < lang.valid_logprob + 0.4
    assert mode.loglik - length_mode.loglik > math.log(100)
    assert abs(history["train"][-1]["loss"] - optimal_loss(lang)) < 0.05  # one batch of 256 rows: noisy
    # Samples are bad only about eps of the time (exactly as often as the model says, up to binomial noise),
    # and almost all the rest are valid sentences.
    rates = sample_rates(params, lang, 8000, seed=1)
    p_bad = math.exp(model_bad_logprob(params, lang))
    assert abs(p_bad - math.exp(mode.loglik)) < 1e-6
    assert abs(rates[BAD] - p_bad) < 4 * math.sqrt(p_bad * (1 - p_bad) / 8000), rates
    assert rates[VALID] > 0.93, rates
