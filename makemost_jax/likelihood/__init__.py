"""Likelihood versus quality (METHODS.md section 5): a perfect model of slightly contaminated data has a
degenerate mode, while its length-conditional mode is fine and its samples are bad only about epsilon of the time.

Example:
    >>> from makemost_jax.likelihood import ContaminatedLanguage, predicted_mode
    >>> predicted_mode(ContaminatedLanguage(words=2, length=100, epsilon=1e-9))   # 2^100 sentences
    'bad'
"""

from makemost_jax.likelihood.experiment import (
    ExperimentConfig,
    PointResult,
    exact_modes,
    model_bad_logprob,
    run_point,
    sample_rates,
    tiny_lm_config,
    train_lm,
)
from makemost_jax.likelihood.language import (
    BAD,
    OTHER,
    VALID,
    ContaminatedLanguage,
    CorpusBatches,
    classify,
    contamination_ratio,
    optimal_loss,
    predicted_mode,
    sample_corpus,
)

__all__ = ["BAD", "OTHER", "VALID", "ContaminatedLanguage", "CorpusBatches", "ExperimentConfig", "PointResult",
           "classify", "contamination_ratio", "exact_modes", "model_bad_logprob", "optimal_loss", "predicted_mode",
           "run_point", "sample_corpus", "sample_rates", "tiny_lm_config", "train_lm"]
