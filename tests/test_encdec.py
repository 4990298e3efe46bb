"""Encoder-decoder families (T5, mT5, BART, mBART, Marian) against Hugging Face PyTorch, and the
searches on them.

For each variant of `tiny_seq2seq.VARIANTS` (unequal encoder/decoder depths, unusual widths,
right-padded sources of three lengths):

(a) `mm.encode` equals the HF encoder's states, and teacher-forced logits equal HF's, within 1e-4;
(b) cached decoding (a 3-token prefill that also encodes the source, then one token per
    call reading the source from the cache) equals the teacher-forced logits;
(c) greedy `mm.generate(sources=...)` is token-identical to HF `generate` (pad banned, as
    OPUS-MT's generation config does);
(d) beam search equals HF `generate(num_beams=3)`: same hypotheses, same scores.

Then exact search on a tiny Marian (vocabulary 6) equals brute-force enumeration, for
three sources in one batched search; the sharded forward equals the one-device one; bad
inputs give one clear error.
"""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest
import torch
from sharded import MESHES, assert_sharded_equal
from tiny_seq2seq import TARGET_VOCAB, VARIANTS, hf_model, make

import makemost_jax as mm
from makemost_jax.decoding import beam_search
from makemost_jax.decoding.exact import exact_length_modes, exact_mode
from makemost_jax.errors import CheckpointError, InputError

RNG = np.random.RandomState(0)
LENGTHS = (9, 6, 4)
SOURCES = [RNG.randint(2, TARGET_VOCAB - 2, n).tolist() for n in LENGTHS]
TARGETS = RNG.randint(2, TARGET_VOCAB - 2, (3, 7))
NEW = 10
BEAMS = 3


def _padded(pad: int):
    """SOURCES right-padded as HF tokenizers pad them: (ids, mask)."""
    ids = np.full((len(SOURCES), max(LENGTHS)), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(SOURCES):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


class Case:
    def __init__(self, name, folder):
        self.name = name
        self.folder = make(name, folder)
        self.model = hf_model(self.folder)
        self.params = mm.load(str(self.folder))
        self.pad = self.params.config.pad_token_id
        self.src, self.src_mask = _padded(self.params.config.encoder.pad_token_id)
        self._teacher = None

    def hf_teacher_forced(self):
        if self._teacher is None:
            with torch.no_grad():
                self._teacher = self.model(input_ids=torch.tensor(self.src), attention_mask=torch.tensor(self.src_mask),
                                           decoder_input_ids=torch.tensor(TARGETS)).logits.numpy()
        return self._teacher

    def hf_generate(self, **options):
        with torch.no_grad():
            return self.model.generate(input_ids=torch.tensor(self.src), attention_mask=torch.tensor(self.src_mask),
                                       do_sample=False, bad_words_ids=[[self.pad]], forced_eos_token_id=None,
                                       forced_bos_token_id=None, **options)


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(request.param))


_forward = jax.jit(lambda params, tokens, cache, src, mask: mm.forward(params, tokens, cache=cache, encoder_tokens=src,
                                                                       encoder_mask=mask))
_step = jax.jit(lambda params, tokens, cache: mm.forward(params, tokens, cache=cache))


def test_teacher_forced_logits_and_encoder_match(case):
    with torch.no_grad():
        states = case.model.get_encoder()(input_ids=torch.tensor(case.src),
                                          attention_mask=torch.tensor(case.src_mask)).last_hidden_state.numpy()
    ours_states = np.asarray(mm.encode(case.params, case.src, case.src_mask))
    real = case.src_mask.astype(bool)  # padded slots carry no meaning
    np.testing.assert_allclose(ours_states[real], states[real], atol=1e-4, rtol=0)
    logits = np.asarray(_forward(case.params, TARGETS, None, case.src, case.src_mask).logits)
    np.testing.assert_allclose(logits, case.hf_teacher_forced(), atol=1e-4, rtol=0, err_msg=case.name)


def test_cached_decoding_equals_teacher_forced(case):
    reference = case.hf_teacher_forced()
    cache = mm.init_cache(case.params.config, len(SOURCES), TARGETS.shape[1])
    out = _forward(case.params, TARGETS[:, :3], cache, case.src, case.src_mask)
    assert out.cache.source is not None  # the source is encoded once and carried
    np.testing.assert_allclose(np.asarray(out.logits), reference[:, :3], atol=1e-4, rtol=0)
    cache = out.cache
    for t in range(3, TARGETS.shape[1]):
        out = _step(case.params, TARGETS[:, t:t + 1], cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), reference[:, t], atol=1e-4, rtol=0,
                                   err_msg=f"{case.name}: step {t}")


def test_greedy_equals_transformers(case):
    ours = mm.generate(case.params, sources=SOURCES, max_new_tokens=NEW)
    reference = case.hf_generate(max_new_tokens=NEW, min_new_tokens=NEW, num_beams=1, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(ours.tokens), reference[:, 1:].numpy(), err_msg=case.name)
    assert not np.any(np.asarray(ours.tokens) == case.pad)
    held = mm.generate(mm.per_layer(case.params)[0], sources=SOURCES, max_new_tokens=NEW)  # layers unrolled
    np.testing.assert_array_equal(np.asarray(held.tokens), reference[:, 1:].numpy(), err_msg=case.name)


def _ending_token(case) -> int:
    """A token that ends some of beam search's hypotheses but not all (so EOS handling is exercised)."""
    free = np.asarray(beam_search(case.params, sources=SOURCES, beams=BEAMS, max_new_tokens=8).tokens)
    candidates = [t for t in dict.fromkeys(free[:, :, 1:].reshape(-1).tolist()) if t != case.pad]
    for eos in candidates[:8]:
        out = beam_search(case.params, sources=SOURCES, beams=BEAMS, max_new_tokens=8, eos_id=eos, length_penalty=1.0)
        ended = np.asarray(out.lengths) < 8
        if ended.any() and not ended.all():
            return eos
    return candidates[0]


@pytest.mark.parametrize("name", ["t5", "mt5", "bart", "mbart", "marian"])
def test_beam_search_equals_transformers(name, tmp_path):
    case = Case(name, tmp_path / name)
    eos = _ending_token(case)
    ours = beam_search(case.params, sources=SOURCES, beams=BEAMS, max_new_tokens=8, eos_id=eos, length_penalty=1.0)
    ref = case.hf_generate(max_new_tokens=8, num_beams=BEAMS, num_return_sequences=BEAMS, eos_token_id=eos,
                           pad_token_id=case.pad, length_penalty=1.0, early_stopping=False, output_scores=True,
                           return_dict_in_generate=True)
    widths = (ref.beam_indices >= 0).sum(1).numpy()
    expected = [row[1:1 + w].tolist() for row, w in zip(ref.sequences.numpy(), widths)]
    tokens, lengths = np.asarray(ours.tokens).reshape(-1, 8), np.asarray(ours.lengths).reshape(-1)
    got = [row[:n + 1 if n < 8 and row[n] == eos else n].tolist() for row, n in zip(tokens, lengths)]
    assert got == expected
    np.testing.assert_allclose(np.asarray(ours.scores).reshape(-1), ref.sequences_scores.numpy(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------ exact search


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory):
    folder = make("marian", tmp_path_factory.mktemp("tiny-marian"), vocab_size=6, pad_token_id=5,
                  decoder_start_token_id=5, eos_token_id=0)
    return mm.load(str(folder))


def test_exact_modes_equal_brute_force_across_sources(tiny_marian):
    params, eos, start, max_length = tiny_marian, 0, 5, 3
    sources = [[1, 2, 3, 4], [4, 4, 1], [2]]
    outputs = [ys for n in range(max_length + 1) for ys in itertools.product((1, 2, 3, 4), repeat=n)]
    truth = []  # per source: {length: (loglik, tokens)} and the overall best
    for source in sources:
        # Decoder input [start, y...] and targets [y..., EOS], padded with EOS (scored only up to the EOS).
        decoder_in = np.array([[start, *ys] + [eos] * (max_length - len(ys)) for ys in outputs])
        targets = np.array([[*ys, eos] + [eos] * (max_length - len(ys)) for ys in outputs])
        src = np.array([source] * len(outputs))
        logp = np.asarray(mm.token_logprobs(mm.forward(params, decoder_in, encoder_tokens=src).logits, targets))
        scores = [float(logp[i, :len(ys) + 1].sum()) for i, ys in enumerate(outputs)]
        by_length = {n: max((s, ys) for s, ys in zip(scores, outputs) if len(ys) == n) for n in range(max_length + 1)}
        truth.append(by_length)
    modes = exact_mode(params, sources=sources, max_length=max_length, batch_size=16, seed_beams=0)
    length_modes = exact_length_modes(params, sources=sources, max_length=max_length, batch_size=16)
    assert len(modes) == len(length_modes) == len(sources)
    for mode, per_length, by_length in zip(modes, length_modes, truth):
        best = max(by_length.values())
        assert mode.proved_optimal and mode.tokens == best[1] and mode.loglik == pytest.approx(best[0], abs=1e-4)
        for n, m in enumerate(per_length):
            assert m.proved_optimal and m.tokens == by_length[n][1], (n, m)
            assert m.loglik == pytest.approx(by_length[n][0], abs=1e-4)
    # One source alone gives the same answer as within the batch.
    alone = exact_mode(params, sources=[sources[1]], max_length=max_length, batch_size=16, seed_beams=0)[0]
    assert alone.tokens == modes[1].tokens and alone.loglik == pytest.approx(modes[1].loglik, abs=1e-5)


def test_cbs_head_trained_on_sources_and_searched(tiny_marian):
    """A CBS head is trained on the model's own samples of sources, and CBS with it returns only
    hypotheses its attribute accepts (the same loop as plain beam search, with the head's term)."""
    from makemost_jax.decoding import MinLength, conditional_beam_search, fit_classifier
    from makemost_jax.training import TrainConfig

    params = tiny_marian
    sources = [list(np.random.RandomState(i).randint(1, 5, 3 + i % 4)) for i in range(12)]
    head, report = fit_classifier(params, None, MinLength(2), sources=sources, eos_id=0, pad_id=5,
                                  samples_per_prompt=8, max_new_tokens=4, mlp_width=8, held_out=0.25,
                                  train_config=TrainConfig(steps=30, learning_rate=3e-3, progress=False),
                                  progress=False)
    assert 0 < report["positive_samples"] < 1  # both labels occur among the samples
    out = conditional_beam_search(params, None, head, MinLength(2), sources=sources[:3], beams=3, max_new_tokens=4,
                                  eos_id=0)
    finished = np.asarray(out.finished)
    assert finished[:, 0].all() and np.asarray(out.lengths)[finished].min() >= 2
    # A finished hypothesis is scored by the model's own log-likelihood (EOS included when emitted), not the head's.
    for b in range(3):
        n = int(out.lengths[b, 0])
        tokens = np.asarray(out.tokens[b, 0])
        output = tokens[:n + 1] if n < 4 and tokens[n] == 0 else tokens[:n]
        decoder_in = np.array([[5, *output[:-1]]]) if len(output) else np.array([[5]])
        logp = mm.token_logprobs(mm.forward(params, decoder_in, encoder_tokens=np.array([sources[b]])).logits,
                                 np.array([output]))
        assert float(out.logprobs[b, 0]) == pytest.approx(float(logp.sum()), abs=1e-4)


# ------------------------------------------------------------------------ sharding


def test_sharded_forward_equals_one_device(tiny_marian):
    src = np.array([[1, 2, 3, 4], [4, 4, 1, 5], [2, 5, 5, 5], [3, 1, 5, 5]])
    batch = {"src": src, "mask": (src != 5).astype(np.int32), "tgt": np.array([[5, 1, 2], [5, 3, 3], [5, 4, 1],
                                                                               [5, 2, 2]])}

    def logits(params, b):
        return mm.forward(params, b["tgt"], encoder_tokens=b["src"], encoder_mask=b["mask"]).logits

    assert_sharded_equal(logits, tiny_marian, batch, meshes=[MESHES[3]], atol=1e-5)


# ------------------------------------------------------------------------ bad input


def test_bad_inputs_give_clear_errors(tiny_marian):
    params = tiny_marian
    with pytest.raises(InputError, match="source of 41 tokens exceeds"):
        mm.generate(params, sources=[[1] * 41], max_new_tokens=2)
    with pytest.raises(InputError, match="source 2 is empty"):
        beam_search(params, sources=[[1, 2], []], beams=2, max_new_tokens=2)
    with pytest.raises(InputError, match="encoder-decoder: pass sources"):
        mm.generate(params, [[5]], max_new_tokens=2)
    with pytest.raises(InputError, match="encoder_tokens"):
        mm.forward(params, np.array([[5, 1]]))
    with pytest.raises(InputError, match="given twice"):
        out = mm.forward(params, np.array([[5]]), cache=mm.init_cache(params.config, 1, 4),
                         encoder_tokens=np.array([[1, 2]]))
        mm.forward(params, np.array([[1]]), cache=out.cache, encoder_tokens=np.array([[1, 2]]))
    decoder_only = mm.init_params(mm.from_hf_config({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
                                                     "vocab_size": 10, "n_positions": 16}), jax.random.key(0))
    with pytest.raises(InputError, match="decoder-only model and takes no sources"):
        mm.generate(decoder_only, [[1, 2]], sources=[[3]], max_new_tokens=2)
    with pytest.raises(InputError, match="not an encoder-decoder"):
        mm.encode(decoder_only, np.array([[1, 2]]))


def test_a_tied_copy_that_differs_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = make("t5", tmp_path / "t5")
    tensors = load_file(folder / "model.safetensors")
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"] + 1.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="encoder.embed_tokens.weight"):
        mm.load(str(folder))


def test_info_describes_both_stacks(tmp_path, capsys):
    from makemost_jax.cli import main

    folder = make("bart", tmp_path / "bart")
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["encoder_decoder"] is True and (info["encoder_layers"], info["n_layers"]) == (3, 2)
    assert info["family"] == "bart" and info["decoder_start_token_id"] == 2
    # Every weight once (the shared table once, not per stack); HF's final_logits_bias is a buffer.
    assert info["n_params"] == sum(p.numel() for p in hf_model(folder).parameters()) + 61
