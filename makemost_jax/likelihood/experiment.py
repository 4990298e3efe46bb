"""The contamination experiment: train a tiny LM on a `ContaminatedLanguage`, find its exact modes, sample it.

- `tiny_lm_config`: a small random-init GPT-2 config sized for the language.
- `train_lm`: the shared training loop (`makemost_jax.training.train`, `lm_loss` with the corpus's
  loss mask) on freshly sampled batches.
- `exact_modes`: the exact unconditional mode and the exact mode among outputs of the valid
  length (`makemost_jax.decoding.exact_mode`), each classified as bad / valid / other.
- `sample_rates`: the fraction of bad / valid / other outputs among ancestral samples, and the
  binomial standard error of the bad rate.
- `run_point`: all of that for one (words, length, epsilon), with the analytic prediction.

Example:
    >>> from makemost_jax.likelihood import ContaminatedLanguage, ExperimentConfig, run_point
    >>> lang = ContaminatedLanguage(words=8, length=2, epsilon=0.2)
    >>> point = run_point(lang, ExperimentConfig(steps=150, num_samples=500))       # doctest: +SKIP
    >>> point.predicted, point.mode_kind, point.length_mode_kind                      # doctest: +SKIP
    ('bad', 'bad', 'valid')
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from makemost_jax.decoding.exact import ModeResult, exact_mode
from makemost_jax.decoding.sampling import generate
from makemost_jax.errors import ConfigError
from makemost_jax.likelihood.language import (
    BAD,
    OTHER,
    VALID,
    ContaminatedLanguage,
    CorpusBatches,
    classify,
    contamination_ratio,
    predicted_mode,
)
from makemost_jax.models import ModelConfig, Params, forward, from_hf_config, init_params
from makemost_jax.training import TrainConfig, lm_loss, train


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The tiny LM, its training, and the search / sampling settings of one experiment point.

    width / layers / heads: the GPT-2 model; context: its positions (>= length + 2 of every
    language it is used with; one value for a whole grid lets every point share the search's
    compilation). steps / batch_size / learning_rate: training on fresh corpus batches.
    extra_length: the unconditional search allows outputs up to length + extra_length tokens.
    node_budget: per exact search. num_samples: ancestral samples for the bad rate.

    Example:
        >>> ExperimentConfig(steps=100).batch_size
        256
    """

    width: int = 32
    layers: int = 2
    heads: int = 2
    context: int = 8
    steps: int = 300
    batch_size: int = 256
    learning_rate: float = 3e-3
    extra_length: int = 1
    node_budget: int = 20_000
    num_samples: int = 4000
    seed: int = 0

    def __post_init__(self):
        for name in ("width", "layers", "heads", "context", "steps", "batch_size", "node_budget", "num_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ExperimentConfig.{name}={getattr(self, name)} must be at least 1")
        if self.extra_length < 0:
            raise ConfigError(f"ExperimentConfig.extra_length={self.extra_length} must be >= 0")
        if self.width % self.heads:
            raise ConfigError(f"ExperimentConfig.width={self.width} must be a multiple of heads={self.heads}")


@dataclasses.dataclass(frozen=True)
class PointResult:
    """One grid point: the language, the analytic prediction, what the trained model does.

    mode / length_mode: exact unconditional mode and exact mode at the valid length, with
    their kinds ("bad", "valid", "other"). model_bad_logprob: the model's log p(empty output).
    sample_rates: {"bad", "valid", "other"} fractions of `num_samples` samples; bad_rate_std:
    the binomial standard error sqrt(eps (1 - eps) / num_samples). final_loss: the last training
    loss; train_seconds / search_seconds: wall times.

    Example:
        >>> # point = run_point(ContaminatedLanguage(words=16, length=3, epsilon=0.05))
        >>> # point.mode_kind, point.length_mode_kind, point.sample_rates["bad"]   # ('bad', 'valid', ~0.05)
    """

    words: int
    length: int
    epsilon: float
    min_entropy_bits: float
    ratio: float
    predicted: str
    mode: ModeResult
    mode_kind: str
    length_mode: ModeResult
    length_mode_kind: str
    model_bad_logprob: float
    sample_rates: dict
    bad_rate_std: float
    final_loss: float
    train_seconds: float
    search_seconds: float

    def to_dict(self) -> dict:
        """JSON-ready fields (the modes as `ModeResult.to_dict()`).

        Example:
            >>> # json.dumps(point.to_dict())
        """
        out = dataclasses.asdict(self)
        out.update(mode=self.mode.to_dict(), length_mode=self.length_mode.to_dict())
        return out


def tiny_lm_config(lang: ContaminatedLanguage, config: ExperimentConfig) -> ModelConfig:
    """A GPT-2 `ModelConfig` with the language's vocabulary (BOS 0, EOS 1) and `config`'s size.

    Example:
        >>> cfg = tiny_lm_config(ContaminatedLanguage(words=8, length=2), ExperimentConfig())
        >>> cfg.vocab_size, cfg.max_positions
        (10, 8)
    """
    # BOS + the longest searched output (length + extra_length), and BOS + a sampled sentence + EOS.
    needed = lang.length + 1 + max(config.extra_length, 1)
    if needed > config.context:
        raise ConfigError(f"ExperimentConfig.context={config.context} is too short for sentences of length "
                          f"{lang.length} (BOS, the sentence, extra_length={config.extra_length} or EOS); raise "
                          f"context to at least {needed}")
    return from_hf_config({"model_type": "gpt2", "n_embd": config.width, "n_layer": config.layers,
                           "n_head": config.heads, "vocab_size": lang.vocab_size, "n_positions": config.context,
                           "bos_token_id": lang.bos_id, "eos_token_id": lang.eos_id})


def train_lm(lang: ContaminatedLanguage, config: ExperimentConfig) -> tuple[Params, dict]:
    """A tiny GPT-2 initialised at random (`config.seed`) and trained on fresh corpus batches; (params, history).

    Example:
        >>> lang = ContaminatedLanguage(words=4, length=1, epsilon=0.3)
        >>> params, history = train_lm(lang, ExperimentConfig(width=16, steps=5, batch_size=8))
        >>> len(history["train"])
        5
    """
    params = init_params(tiny_lm_config(lang, config), jax.random.key(config.seed))
    train_config = TrainConfig(steps=config.steps, learning_rate=config.learning_rate,
                               warmup_steps=config.steps // 10, seed=config.seed, progress=False)
    state, history = train(train_config, params, CorpusBatches(lang, config.batch_size, config.seed), lm_loss)
    return state.params, history


def exact_modes(params: Params, lang: ContaminatedLanguage, config: ExperimentConfig) -> tuple[ModeResult, ModeResult]:
    """(unconditional mode over outputs of up to length + extra_length tokens, mode among outputs of
    exactly `lang.length` tokens), both by exact branch-and-bound search after BOS.

    Example:
        >>> # mode, length_mode = exact_modes(params, lang, ExperimentConfig())
        >>> # classify(lang, mode.tokens), classify(lang, length_mode.tokens), mode.proved_optimal
    """
    settings = {"eos_id": lang.eos_id, "max_length": lang.length + config.extra_length,
                    "node_budget": config.node_budget}
    mode = exact_mode(params, [lang.bos_id], **settings)
    length_mode = exact_mode(params, [lang.bos_id], length=lang.length, **settings)
    return mode, length_mode


def sample_rates(params: Params, lang: ContaminatedLanguage, num_samples: int, seed: int = 0) -> dict[str, float]:
    """Fractions of "bad", "valid" and "other" outputs among `num_samples` ancestral samples (temperature 1).

    Example:
        >>> # sample_rates(params, lang, 4000)
        >>> # {'bad': 0.0102, 'valid': 0.9898, 'other': 0.0}
    """
    result = generate(params, [[lang.bos_id]] * num_samples, max_new_tokens=lang.length + 1,
                      key=jax.random.key(seed), temperature=1.0, eos_id=lang.eos_id)
    tokens_NT, lengths_N = np.asarray(result.tokens), np.asarray(result.lengths)
    counts = {BAD: 0, VALID: 0, OTHER: 0}
    for row, n in zip(tokens_NT, lengths_N):
        out = row[:n].tolist()
        ended = bool(out) and out[-1] == lang.eos_id
        counts[classify(lang, out[:-1]) if ended else OTHER] += 1
    return {k: v / num_samples for k, v in counts.items()}


def model_bad_logprob(params: Params, lang: ContaminatedLanguage) -> float:
    """The trained model's log p(empty output) = log p(EOS | BOS).

    Example:
        >>> # math.exp(model_bad_logprob(params, lang))   # close to lang.epsilon after training
    """
    logits_V = forward(params, np.asarray([[lang.bos_id]], np.int32)).logits[0, -1]
    return float(jax.nn.log_softmax(logits_V)[lang.eos_id])


def run_point(lang: ContaminatedLanguage, config: ExperimentConfig = ExperimentConfig()) -> PointResult:
    """Train, search and sample at one grid point; see `PointResult`.

    Example:
        >>> # point = run_point(ContaminatedLanguage(words=16, length=3, epsilon=0.05))
        >>> # point.predicted, point.mode_kind, point.length_mode_kind   # ('bad', 'bad', 'valid')
    """
    t0 = time.perf_counter()
    params, history = train_lm(lang, config)
    t1 = time.perf_counter()
    mode, length_mode = exact_modes(params, lang, config)
    t2 = time.perf_counter()
    rates = sample_rates(params, lang, config.num_samples, config.seed)
    eps = lang.epsilon
    return PointResult(words=lang.words, length=lang.length, epsilon=eps, min_entropy_bits=lang.min_entropy_bits,
                       ratio=contamination_ratio(lang), predicted=predicted_mode(lang), mode=mode,
                       mode_kind=_kind(lang, mode), length_mode=length_mode,
                       length_mode_kind=_kind(lang, length_mode), model_bad_logprob=model_bad_logprob(params, lang),
                       sample_rates=rates, bad_rate_std=math.sqrt(eps * (1 - eps) / config.num_samples),
                       final_loss=history["train"][-1]["loss"], train_seconds=t1 - t0, search_seconds=t2 - t1)


def _kind(lang: ContaminatedLanguage, mode: ModeResult) -> str:
    return OTHER if mode.tokens is None else classify(lang, mode.tokens)
