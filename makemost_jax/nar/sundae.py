"""The SUNDAE training loss (step-unrolled denoising; Savinov et al. 2022).

Step 1: corrupt the clean target (`corrupt`: a fraction r ~ U(0, 1) drawn per example of
the real target tokens is replaced by uniformly random tokens; option "bert": of the
replaced tokens 80% become [MASK], 10% random, 10% keep) and predict the clean target.
Step 2 ("unrolled"): sample tokens from step 1's prediction (at `sample_temperature`),
with `stop_gradient`, feed them back as the new corrupted input and predict the clean
target again. More steps repeat step 2. Loss = sum over steps of the mean cross entropy
on real target tokens, plus `length_weight` x the length head's cross entropy.

Batches are dicts of int32 arrays: "source" (B, S) = [CLS] ... [SEP] padded,
"source_mask" (B, S), "target" (B, T) without special tokens, padded, "target_mask" (B, T)
(see `makemost_jax.nar.data`).

Example:
    >>> # loss, metrics = sundae_loss(params, batch, rng=jax.random.key(0))
    >>> # train(TrainConfig(steps=300), params, batches, loss_fn=functools.partial(sundae_loss, config=cfg))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from makemost_jax.errors import ConfigError
from makemost_jax.models import token_logprobs
from makemost_jax.nar.model import Seq2SeqParams, cross_kv, encode, length_logits, nar_logits

CORRUPTIONS = ("uniform", "bert")


@dataclasses.dataclass(frozen=True)
class SundaeConfig:
    """SUNDAE loss settings (defaults: the SUNDAE recipe with two unrolled steps).

    Example:
        >>> SundaeConfig(corruption="bert", unroll_steps=3).sample_temperature
        1.0
    """

    corruption: str = "uniform"  # "uniform" | "bert" (80% [MASK] / 10% random / 10% keep)
    unroll_steps: int = 2  # 1 = plain denoising; 2 = SUNDAE
    sample_temperature: float = 1.0
    length_weight: float = 0.1

    def __post_init__(self):
        if self.corruption not in CORRUPTIONS:
            raise ConfigError(f"SundaeConfig.corruption={self.corruption!r}; use one of {CORRUPTIONS}")
        if self.unroll_steps < 1:
            raise ConfigError(f"SundaeConfig.unroll_steps={self.unroll_steps} must be at least 1")
        if self.sample_temperature <= 0:
            raise ConfigError(f"SundaeConfig.sample_temperature={self.sample_temperature} must be > 0")


def corrupt(key: jax.Array, target_BT, target_mask_BT, vocab_size: int, mask_id: int, corruption: str = "uniform"):
    """Replace a per-example random fraction of the real target tokens (see the module doc).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> y = jnp.full((2, 6), 7); m = jnp.ones((2, 6), bool)
        >>> corrupt(jax.random.key(0), y, m, vocab_size=50, mask_id=3).shape
        (2, 6)
    """
    k_rate, k_pick, k_tok, k_mix = jax.random.split(key, 4)
    b, t = target_BT.shape
    rate_B1 = jax.random.uniform(k_rate, (b, 1))
    replace_BT = (jax.random.uniform(k_pick, (b, t)) < rate_B1) & target_mask_BT.astype(bool)
    random_BT = jax.random.randint(k_tok, (b, t), 0, vocab_size, dtype=target_BT.dtype)
    if corruption == "bert":
        u_BT = jax.random.uniform(k_mix, (b, t))
        random_BT = jnp.where(u_BT < 0.8, mask_id, jnp.where(u_BT < 0.9, random_BT, target_BT))
    return jnp.where(replace_BT, random_BT, target_BT)


def _token_nll(logits_BTV, target_BT, mask_BT):
    return -(token_logprobs(logits_BTV, target_BT) * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


def sundae_loss(params: Seq2SeqParams, batch, *, rng, frozen=None, config: SundaeConfig = SundaeConfig()):
    """SUNDAE loss of a NAR `Seq2SeqParams` on one batch; `(loss, metrics)`.

    Keys: `rng` splits into one key for the corruption and one per unrolled sample.
    Metrics: "tokens" (real target tokens), "step1" .. "stepN" (each step's mean cross
    entropy), "length" (length-head cross entropy). `frozen` is unused (training-loop
    signature).

    Example:
        >>> # loss, m = sundae_loss(params, batch, rng=jax.random.key(0), config=SundaeConfig(unroll_steps=2))
    """
    cfg = params.config
    source, source_mask = batch["source"], batch["source_mask"]
    target, target_mask = batch["target"], batch["target_mask"].astype(bool)
    mask_f = target_mask.astype(jnp.float32)
    keys = jax.random.split(rng, config.unroll_steps)
    enc_BSD = encode(params, source, source_mask)
    encoded = cross_kv(params, enc_BSD, source_mask)  # shared by every unrolled step
    x_BT = corrupt(keys[0], target, target_mask, cfg.model.vocab_size, cfg.mask_id, config.corruption)
    metrics = {}
    loss = jnp.float32(0.0)
    for step in range(config.unroll_steps):
        logits_BTV = nar_logits(params, x_BT, target_mask, encoded)
        step_loss = _token_nll(logits_BTV, target, mask_f)
        metrics[f"step{step + 1}"] = step_loss
        loss = loss + step_loss
        if step + 1 < config.unroll_steps:
            # The unrolled input is a sample: no gradient flows back through it.
            logits_BTV = jax.lax.stop_gradient(logits_BTV)
            sample_BT = jax.random.categorical(keys[step + 1], logits_BTV / config.sample_temperature)
            x_BT = jnp.where(target_mask, sample_BT.astype(target.dtype), cfg.pad_id)
    lengths_B = target_mask.sum(1)
    length_nll = -jnp.take_along_axis(jax.nn.log_softmax(length_logits(params, enc_BSD, source_mask)),
                                      lengths_B[:, None], axis=1).mean()
    metrics["length"] = length_nll
    metrics["tokens"] = mask_f.sum()
    return loss + config.length_weight * length_nll, metrics
