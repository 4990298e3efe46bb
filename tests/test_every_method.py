"""Every method of the library runs on every decoder family (the tiny models of `tiny_families`).

For each model_type of `tiny_families.CONFIGS` (one HF model and its params per family,
shared by the family's tests):

- HSO: one update step over the cache (`hso.lm.run_segments`, two segments): the NLL is
  finite, the updated cache differs from the lr=0 one, and the lr=0 path scores each
  segment exactly like a plain `forward` over the whole text (within 1e-4);
- beam search (3 beams, 8 new tokens, length_penalty 1, an EOS the model emits) equals
  transformers' `generate(num_beams=3, do_sample=False, length_penalty=1.0)` with its
  default stopping rule (early_stopping=False, the library's rule): same sequences, same
  scores; against `early_stopping=True` (which stops at the first 3 finished hypotheses)
  the library's best hypothesis scores at least as high;
- conditional beam search (`conditional_beam_search` with a fresh classifier head and
  `MinLength(4)`) runs and every hypothesis it returns satisfies the attribute;
- exact search (`exact_mode`, 3-token prompt, max_length 2) proves its mode optimal, and
  the mode's log-probability is the one `forward` gives the prompt + mode + EOS;
- a recurrence training step (`recurrence_loss` and its gradient over two windows, what
  `train_recurrence` steps on) has a finite loss and gradients, the zero gates included;
- the forward on 8 simulated CPU devices (data x fsdp x tensor = 2 x 2 x 2) equals the one-device forward,
  and every parameter has logical axes that the sharding rules know.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from sharded import MESHES, assert_sharded_equal
from tiny_families import CONFIGS, VOCAB, make

import makemost_jax as mm
from makemost_jax.decoding import MinLength, beam_search, conditional_beam_search, init_classifier
from makemost_jax.decoding.exact import exact_mode
from makemost_jax.hso.lm import HSOConfig, lm_segments, run_segments
from makemost_jax.recurrence import RecurrenceConfig, init_memory_module, recurrence_loss
from makemost_jax.sharding import DEFAULT_RULES, logical_axes

TOKENS = np.random.RandomState(1).randint(2, VOCAB, (4, 17))
PROMPTS = TOKENS[:3, :5]  # equal lengths: no padding for transformers to treat differently
NEW = 8
BEAMS = 3


class Family:
    def __init__(self, model_type, folder):
        self.model_type = model_type
        self.folder = make(model_type, folder)
        self.params = mm.load(str(self.folder))
        self.model = transformers.AutoModelForCausalLM.from_pretrained(self.folder).eval()
        self._eos = None

    @property
    def eos(self) -> int:
        """A token the model emits early in beam search, chosen so that some hypotheses end at it and others not."""
        if self._eos is None:
            free = np.asarray(beam_search(self.params, PROMPTS, beams=BEAMS, max_new_tokens=NEW).tokens)
            candidates = list(dict.fromkeys(free[:, :, 1:].reshape(-1).tolist()))
            self._eos = candidates[0]  # if no candidate ends some hypotheses but not all: the first
            for eos in candidates[:8]:
                out = beam_search(self.params, PROMPTS, beams=BEAMS, max_new_tokens=NEW, eos_id=eos, length_penalty=1.0)
                ended = [s[-1] == eos for s in _outputs(out, eos)]
                if any(ended) and not all(ended):
                    self._eos = eos
                    break
        return self._eos


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def _logits(params, batch):
    """The forward's logits (one function, so its compilation is shared by the tests that jit it)."""
    return mm.forward(params, batch["tokens"]).logits


def _outputs(result, eos):
    """Each hypothesis's generated ids, EOS included when emitted (B*K lists, best first per prompt)."""
    tokens = np.asarray(result.tokens).reshape(-1, result.tokens.shape[-1])
    out = []
    for row, n in zip(tokens, np.asarray(result.lengths).reshape(-1)):
        out.append(row[:n + 1 if n < len(row) and row[n] == eos else n].tolist())
    return out


# ------------------------------------------------------------------------ HSO


def test_hso_step_updates_the_cache_and_lr0_is_plain_scoring(family):
    params = family.params
    segment, n_segments = 4, 2
    stream = TOKENS[:2, :segment * n_segments + 1]
    segments = lm_segments(stream, np.full(2, stream.shape[1]), segment)
    kw = {"cache_size": 2 * segment, "hso_steps": 1, "recompute": True, "offsets": False, "update": True}
    nll0, finite0, state0 = run_segments(params, segments, HSOConfig(lr=0.0).hyper(), **kw)
    nll1, finite1, state1 = run_segments(params, segments, HSOConfig(lr=3e-2).hyper(), **kw)
    assert bool(np.all(finite0)) and bool(np.all(finite1))
    assert np.all(np.isfinite(nll1)) and np.all(np.isfinite(nll0))
    # Segment 1 is scored before its update, so the NLLs agree; the update then moves segment 0's states.
    np.testing.assert_allclose(nll1, nll0, atol=1e-5)
    moved = float(jnp.abs(state1.past[1][:, :, :, :segment] - state0.past[1][:, :, :, :segment]).max())
    assert moved > 1e-4, "the HSO update left the cached values unchanged"
    # lr=0 leaves the cache exact: each segment's NLL is the plain forward's over the whole text.
    logits = jax.jit(_logits)(params, {"tokens": TOKENS})[:2, :stream.shape[1] - 1]  # causal: a prefix's logits
    nll_BN = -np.asarray(mm.token_logprobs(logits, stream[:, 1:]))
    expected_KB = nll_BN.reshape(2, n_segments, segment).sum(2).T
    np.testing.assert_allclose(np.asarray(nll0), expected_KB, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------ beam search


def _hf_beams(model, eos, early_stopping):
    """transformers' beam search: (generated sequences with EOS when emitted, sequence scores)."""
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=BEAMS, num_return_sequences=BEAMS,
                             do_sample=False, max_new_tokens=NEW, early_stopping=early_stopping, length_penalty=1.0,
                             eos_token_id=eos, pad_token_id=eos, output_scores=True, return_dict_in_generate=True)
    generated = ref.sequences[:, PROMPTS.shape[1]:].numpy()
    widths = (ref.beam_indices >= 0).sum(1).numpy()
    return [g[:w].tolist() for g, w in zip(generated, widths)], ref.sequences_scores.numpy()


def test_beam_search_matches_transformers(family):
    eos = family.eos
    ours = beam_search(family.params, PROMPTS, beams=BEAMS, max_new_tokens=NEW, eos_id=eos, length_penalty=1.0)
    seqs, scores = _outputs(ours, eos), np.asarray(ours.scores)
    assert bool(np.all(ours.finished))
    # The library's stopping rule is transformers' default (early_stopping=False): stop once no live
    # beam can beat the worst finished one. Same sequences, same length-normalised scores.
    ref_seqs, ref_scores = _hf_beams(family.model, eos, early_stopping=False)
    assert seqs == ref_seqs
    np.testing.assert_allclose(scores.reshape(-1), ref_scores, atol=1e-4, rtol=0)
    # early_stopping=True stops at the first BEAMS finished hypotheses: never better than searching on.
    _, early_scores = _hf_beams(family.model, eos, early_stopping=True)
    assert np.all(scores[:, 0] >= early_scores.reshape(-1, BEAMS)[:, 0] - 1e-4)


def test_conditional_beam_search_satisfies_its_attribute(family):
    head = init_classifier(family.params, attribute="min-length:4", mlp_width=16, max_steps=NEW,
                           key=jax.random.key(3))
    attribute = MinLength(4)
    out = conditional_beam_search(family.params, PROMPTS, head, attribute, beams=BEAMS, max_new_tokens=NEW,
                                  eos_id=family.eos, prefilter=6)
    finished = np.asarray(out.finished)
    assert finished[:, 0].all(), "every prompt should have an accepted hypothesis within 8 tokens"
    lengths = np.asarray(out.lengths)
    assert lengths[finished].min() >= 4
    assert np.all(np.isfinite(np.asarray(out.logprobs)[finished]))
    tokens = np.asarray(out.tokens).reshape(-1, NEW)
    accepted = np.asarray(attribute.accepts(np.repeat(PROMPTS, BEAMS, 0), np.ones((PROMPTS.shape[0] * BEAMS, 5)),
                                            tokens, lengths.reshape(-1)))
    assert np.all(accepted[finished.reshape(-1)])


# ------------------------------------------------------------------------ exact search


def test_exact_mode_is_proved_and_scored_like_forward(family):
    params, eos, prompt = family.params, 0, [int(t) for t in TOKENS[3, :3]]
    mode = exact_mode(params, prompt, eos_id=eos, max_length=2, node_budget=2000, batch_size=64, seed_beams=0)
    assert mode.proved_optimal and mode.tokens is not None and mode.length <= 2
    seq = np.array([prompt + list(mode.tokens) + [eos]], np.int32)
    logp = mm.token_logprobs(mm.forward(params, seq).logits[:, :-1], seq[:, 1:])[0, len(prompt) - 1:]
    assert mode.loglik == pytest.approx(float(logp.sum()), abs=1e-4)
    # Optimal for real: no output of at most 2 tokens (each followed by EOS) is more likely.
    others = [t for t in range(VOCAB) if t != eos]
    outputs = [ys for n in range(3) for ys in itertools.product(others, repeat=n)]
    seqs = np.full((len(outputs), len(prompt) + 3), eos, np.int32)
    for row, ys in zip(seqs, outputs):
        row[:len(prompt) + len(ys)] = prompt + list(ys)
    logp_all = np.asarray(mm.token_logprobs(jax.jit(mm.forward)(params, seqs).logits[:, :-1], seqs[:, 1:]))
    scores = np.array([logp_all[i, len(prompt) - 1:len(prompt) + len(ys)].sum() for i, ys in enumerate(outputs)])
    best = int(np.argmax(scores))
    assert outputs[best] == mode.tokens and scores[best] == pytest.approx(mode.loglik, abs=1e-4)


# ------------------------------------------------------------------------ recurrence


def test_recurrence_training_step_has_finite_loss(family):
    lm, window = family.params, 8
    batch = {"tokens": jnp.asarray(np.random.RandomState(2).randint(0, VOCAB, (2, 2 * window + 1)), jnp.int32),
             "loss_mask": jnp.ones((2, 2 * window), jnp.float32)}
    module = init_memory_module(RecurrenceConfig(num_memory=2), lm.config, jax.random.key(1))
    loss_fn = recurrence_loss(window)  # what train_recurrence trains, two windows with the memory between
    loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, frozen=lm)[0]))({"memory": module})
    assert math.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    # The memory's gates start at 0 (the LM unchanged) and get a gradient: the step can learn.
    assert float(jnp.abs(grads["memory"].weights["gate"]).max()) > 0


# ------------------------------------------------------------------------ sharding


def test_sharded_forward_equals_one_device_and_every_weight_has_axes(family):
    params = family.params
    axes = jax.tree.leaves(logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))
    leaves = jax.tree.leaves(params.weights)
    assert len(axes) == len(leaves)
    known = {name for name, _ in DEFAULT_RULES}
    for a, x in zip(axes, leaves):
        assert len(a) == x.ndim and all(n is None or n in known for n in a), (a, x.shape)
    # data x fsdp x tensor = 2 x 2 x 2: rows, widths and heads split at once (uneven dims stay whole).
    assert_sharded_equal(_logits, params, {"tokens": TOKENS}, meshes=[MESHES[3]], atol=1e-4)
