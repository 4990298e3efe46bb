"""A synthetic high-entropy language contaminated by one fixed bad output, and its analytic mode.

A clean sentence is `length` word tokens drawn independently and uniformly from `words`
word types, then EOS: each of the `words ** length` sentences has probability
2^-H, H = length * log2(words) bits (the min-entropy, here equal to the entropy). A
fraction `epsilon` of the corpus is replaced by one fixed bad output, the empty string
(EOS right after BOS). In the population the bad output has probability epsilon and
each valid sentence (1 - epsilon) * 2^-H, so the bad output is the unconditional mode
iff epsilon > (1 - epsilon) * 2^-H, i.e. `contamination_ratio` > 1 (about epsilon * 2^H
for small epsilon), however good the model. Conditioning on the length `length` excludes
the bad output: every length-`length` mode is a valid sentence.

Token ids: 0 BOS, 1 EOS, 2..words+1 the words.

Example:
    >>> lang = ContaminatedLanguage(words=16, length=3, epsilon=0.01)
    >>> lang.min_entropy_bits, lang.vocab_size, predicted_mode(lang)
    (12.0, 18, 'bad')
    >>> rows = sample_corpus(lang, 4, seed=0)
    >>> rows["tokens"].shape, classify(lang, rows["tokens"][0, 1:-1].tolist())
    ((4, 5), 'valid')
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from makemost_jax.errors import ConfigError

BOS_ID, EOS_ID, FIRST_WORD = 0, 1, 2
BAD, VALID, OTHER = "bad", "valid", "other"


@dataclasses.dataclass(frozen=True)
class ContaminatedLanguage:
    """Sentences of `length` uniform words out of `words` types, with a fraction `epsilon` of empty outputs.

    Example:
        >>> ContaminatedLanguage(words=4, length=2, epsilon=0.1).valid_logprob == math.log(0.9 / 16)
        True
    """

    words: int = 16
    length: int = 3
    epsilon: float = 0.01

    def __post_init__(self):
        if self.words < 2:
            raise ConfigError(f"words={self.words} must be at least 2 (one word type has no entropy)")
        if self.length < 1:
            raise ConfigError(f"length={self.length} must be at least 1 (length 0 is the bad output itself)")
        if not 0.0 <= self.epsilon < 1.0:
            raise ConfigError(f"epsilon={self.epsilon} must be in [0, 1): the fraction of bad outputs")

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def vocab_size(self) -> int:
        return FIRST_WORD + self.words

    @property
    def min_entropy_bits(self) -> float:
        """H = -log2 of the most likely clean sentence's probability."""
        return self.length * math.log2(self.words)

    @property
    def valid_logprob(self) -> float:
        """log p(one valid sentence) in the contaminated population: log((1 - epsilon) 2^-H)."""
        return math.log1p(-self.epsilon) - self.length * math.log(self.words)

    @property
    def bad_logprob(self) -> float:
        """log p(the bad output) = log epsilon (-inf when epsilon is 0)."""
        return math.log(self.epsilon) if self.epsilon > 0 else -math.inf


def contamination_ratio(lang: ContaminatedLanguage) -> float:
    """p(bad) / p(best valid sentence) = epsilon 2^H / (1 - epsilon): the bad output is the mode iff it is > 1.

    Example:
        >>> round(contamination_ratio(ContaminatedLanguage(words=2, length=10, epsilon=0.01)), 2)
        10.34
    """
    return math.exp(lang.bad_logprob - lang.valid_logprob)


def predicted_mode(lang: ContaminatedLanguage) -> str:
    """"bad" when the bad output is the population's unconditional mode, else "valid" (ties go to "valid").

    Example:
        >>> predicted_mode(ContaminatedLanguage(words=16, length=1, epsilon=0.01))
        'valid'
    """
    return BAD if lang.bad_logprob > lang.valid_logprob else VALID


def optimal_loss(lang: ContaminatedLanguage) -> float:
    """The lowest possible `lm_loss` on the corpus (nats per scored token): the population's own entropy.

    Expected negative log-likelihood of a row over its expected number of scored tokens (a bad row
    scores its EOS, a valid row its words and EOS).

    Example:
        >>> round(optimal_loss(ContaminatedLanguage(words=16, length=3, epsilon=0.0)), 4) == round(math.log(16) * 3 / 4, 4)
        True
    """
    eps = lang.epsilon
    nll = -(1 - eps) * lang.valid_logprob - (eps * lang.bad_logprob if eps > 0 else 0.0)
    return nll / (eps + (1 - eps) * (lang.length + 1))


def classify(lang: ContaminatedLanguage, tokens) -> str:
    """"bad" (the empty output), "valid" (a sentence of the language) or "other"; `tokens` exclude BOS and EOS.

    Example:
        >>> lang = ContaminatedLanguage(words=4, length=2)
        >>> classify(lang, []), classify(lang, [2, 5]), classify(lang, [2]), classify(lang, [2, 1])
        ('bad', 'valid', 'other', 'other')
    """
    tokens = list(tokens)
    if not tokens:
        return BAD
    ok = len(tokens) == lang.length and all(FIRST_WORD <= t < lang.vocab_size for t in tokens)
    return VALID if ok else OTHER


def sample_corpus(lang: ContaminatedLanguage, num: int, seed: int | tuple[int, ...] = 0) -> dict[str, np.ndarray]:
    """`num` training rows: `tokens` (num, length + 2) = BOS, sentence, EOS (bad rows: BOS, EOS, then EOS
    padding) and `loss_mask` of the same shape (0 on the padding after a bad row's EOS, and on BOS).

    Each row is bad with probability epsilon, independently.

    Example:
        >>> rows = sample_corpus(ContaminatedLanguage(words=4, length=2, epsilon=0.5), 3, seed=1)
        >>> rows["tokens"].tolist(), rows["loss_mask"].astype(int).tolist()
        ([[0, 5, 5, 1], [0, 2, 3, 1], [0, 1, 1, 1]], [[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 0, 0]])
    """
    if num < 1:
        raise ConfigError(f"num={num} must be at least 1 (the number of rows to sample)")
    rng = np.random.default_rng(seed)
    bad_N = rng.random(num) < lang.epsilon
    words_NL = rng.integers(FIRST_WORD, lang.vocab_size, (num, lang.length))
    tokens_NT = np.full((num, lang.length + 2), EOS_ID, np.int32)
    tokens_NT[:, 0] = BOS_ID
    tokens_NT[:, 1:-1] = np.where(bad_N[:, None], EOS_ID, words_NL)
    mask_NT = np.ones(tokens_NT.shape, np.float32)
    mask_NT[:, 0] = 0.0
    mask_NT[bad_N, 2:] = 0.0  # nothing after the bad output's EOS is data
    return {"tokens": tokens_NT, "loss_mask": mask_NT}


class CorpusBatches:
    """An endless stream of `sample_corpus` batches; batch i depends only on (seed, i), so training resumes
    exactly (`state` / `restore`).

    Example:
        >>> batches = CorpusBatches(ContaminatedLanguage(words=4, length=2), batch_size=8, seed=0)
        >>> next(batches)["tokens"].shape, batches.state()
        ((8, 4), {'position': 1})
    """

    def __init__(self, lang: ContaminatedLanguage, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        self.lang, self.batch_size, self.seed, self.position = lang, batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = sample_corpus(self.lang, self.batch_size, seed=(self.seed, self.position))
        self.position += 1
        return batch

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict):
        self.position = int(state["position"])
