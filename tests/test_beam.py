"""Beam search and conditional beam search: transformers parity, CBS, compilation, sharding, errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from sharded import MESHES, assert_sharded_equal

import makemost_jax as mm
from makemost_jax.decoding import beam_search, pad_prompts
from makemost_jax.decoding.beam import _search
from makemost_jax.errors import ConfigError, InputError

TOKENS = np.random.RandomState(0).randint(2, 101, (8, 17))
ROWS = [TOKENS[0, :5], TOKENS[1, :9], TOKENS[2, :3]]  # different lengths: left padding
N = 10


@dataclasses.dataclass(frozen=True)
class MinLength:
    """Stand-in for the "cbs" helper's attribute: at least `length` output tokens (EOS not counted)."""

    length: int
    name: str = "min_length"

    def accepts(self, prompt_BT, prompt_mask_BT, tokens_BN, lengths_B):
        return lengths_B >= self.length


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ProbeTerm:
    """log q = scale * log_sigmoid(<hidden, probe[candidate]>), and -inf for EOS before `min_length` tokens.

    scale=0 makes it the perfect oracle of "length at least min_length".
    """

    probe_VD: jax.Array
    scale: jax.Array
    min_length: jax.Array
    eos: int = dataclasses.field(metadata={"static": True})
    hidden_layer: int = dataclasses.field(metadata={"static": True})

    def __call__(self, hidden_RD, candidates_RP, n_generated):
        logit_RP = jnp.einsum("rd,rpd->rp", hidden_RD, self.probe_VD[candidates_RP])
        forbid_RP = (candidates_RP == self.eos) & (n_generated < self.min_length)
        return jnp.where(forbid_RP, -jnp.inf, self.scale * jax.nn.log_sigmoid(logit_RP))


def probe_term(params, eos, scale, min_length, layer=1, width=None):
    width = params.config.d_model if width is None else width
    probe = 0.5 * np.random.RandomState(3).normal(size=(params.config.vocab_size, width)).astype(np.float32)
    return ProbeTerm(jnp.asarray(probe), jnp.float32(scale), jnp.int32(min_length), eos=eos, hidden_layer=layer)


def load(folder):
    return mm.load(str(folder)), transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def outputs(result, eos):
    """Each hypothesis's generated ids, EOS included when emitted (B*K lists, best first per prompt)."""
    tokens = np.asarray(result.tokens).reshape(-1, result.tokens.shape[-1])
    out = []
    for row, n in zip(tokens, np.asarray(result.lengths).reshape(-1)):
        out.append(row[:n + 1 if n < len(row) and row[n] == eos else n].tolist())
    return out


def hf_generate(model, rows, beams, eos, **kw):
    """transformers' (sequences, sequence log-likelihoods); beam scores when beams > 1."""
    tokens, mask = pad_prompts(rows, pad_id=0, bucket=1)
    with torch.no_grad():
        out = model.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask), num_beams=beams,
                             num_return_sequences=beams, do_sample=False, max_new_tokens=N, eos_token_id=eos,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kw)
    generated = out.sequences[:, tokens.shape[1]:].numpy()
    if beams > 1:
        widths = (out.beam_indices >= 0).sum(1).numpy()
        return [g[:w].tolist() for g, w in zip(generated, widths)], out.sequences_scores.numpy()
    steps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).numpy()
    seqs, logps = [], []
    for g, s in zip(generated, steps):  # greedy: a row ends at its first EOS
        width = int(np.argmax(g == eos)) + 1 if eos is not None and (g == eos).any() else len(g)
        seqs.append(g[:width].tolist())
        logps.append(s[:width].sum())
    return seqs, np.array(logps)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("beams", [1, 4])
def test_beam_search_matches_transformers(request, family, beams):
    params, model = load(request.getfixturevalue(f"tiny_{family}_dir"))
    free = beam_search(params, ROWS, beams=beams, max_new_tokens=N)
    eos = int(free.tokens[1, 0, 3])  # a token the model emits: some hypotheses end early
    ended, greedy = [], {}
    for eos_id, penalty in [(None, 0.0), (None, 1.0), (eos, 0.0), (eos, 1.0), (eos, 2.0)]:
        ours = beam_search(params, ROWS, beams=beams, max_new_tokens=N, eos_id=eos_id, length_penalty=penalty)
        if beams > 1:
            ref_seqs, ref_scores = hf_generate(model, ROWS, beams, eos_id, length_penalty=penalty)
        else:  # HF's K=1 is greedy search, which has no length penalty
            ref_seqs, ref_scores = greedy.setdefault(eos_id, hf_generate(model, ROWS, 1, eos_id))
        assert outputs(ours, eos_id) == ref_seqs
        assert bool(np.all(ours.finished))
        lengths = np.array([len(s) for s in ref_seqs])  # generated tokens incl. EOS
        if beams > 1:
            np.testing.assert_allclose(np.asarray(ours.scores).reshape(-1), ref_scores, atol=1e-4, rtol=0)
            np.testing.assert_allclose(np.asarray(ours.logprobs).reshape(-1), ref_scores * lengths ** penalty,
                                       atol=1e-4, rtol=1e-5)
        else:
            np.testing.assert_allclose(np.asarray(ours.logprobs).reshape(-1), ref_scores, atol=1e-4, rtol=0)
            np.testing.assert_allclose(np.asarray(ours.scores).reshape(-1), ref_scores / lengths ** penalty,
                                       atol=1e-4, rtol=0)
        ended += [s[-1] == eos for s in ref_seqs] if eos_id is not None else []
    assert any(ended) and not all(ended)  # EOS both ended hypotheses and did not


def test_min_length_and_no_repeat_ngram_match_transformers(tiny_llama_dir):
    params, model = load(tiny_llama_dir)
    rows = TOKENS[:3, :6]  # equal lengths: HF's n-gram ban would also see padding tokens
    eos = int(beam_search(params, rows, beams=4, max_new_tokens=N).tokens[0, 0, 1])
    ours = beam_search(params, rows, beams=4, max_new_tokens=N, eos_id=eos, length_penalty=1.0, min_length=3,
                       no_repeat_ngram_size=2)
    ref_seqs, ref_scores = hf_generate(model, rows, 4, eos, length_penalty=1.0, min_new_tokens=3,
                                       no_repeat_ngram_size=2)
    assert outputs(ours, eos) == ref_seqs
    np.testing.assert_allclose(np.asarray(ours.scores).reshape(-1), ref_scores, atol=1e-4, rtol=0)
    assert int(ours.lengths.min()) >= 3
    for seq, prompt in zip(outputs(ours, eos), np.repeat(rows, 4, axis=0)):
        bigrams = list(zip(list(prompt) + seq, seq))
        assert len(bigrams) == len(set(bigrams))


def test_same_bucket_reuses_the_compiled_search(tiny_gpt2_dir):
    params = mm.load(str(tiny_gpt2_dir))
    kw = {"beams": 4, "max_new_tokens": N}
    beam_search(params, ROWS, **kw)
    compiled = _search._cache_size()
    beam_search(params, [TOKENS[3, :12], TOKENS[4, :2], TOKENS[5, :7]], **kw)  # same bucket of 32
    assert _search._cache_size() == compiled
    beam_search(params, [TOKENS[3, :12], np.tile(TOKENS[4], 3)[:40], TOKENS[5, :7]], **kw)  # bucket 64
    assert _search._cache_size() == compiled + 1


def test_params_held_per_layer_give_the_same_searches(tiny_gpt2_dir, tmp_path):
    """Searches run in the layout of their params: held per layer (`per_layer`: weights and cache per
    layer, layers unrolled) they give the same outputs as stacked; `stacked` undoes it exactly, and
    what needs stacked weights (export, sharding, training) says so."""
    from makemost_jax.decoding.sampling import generate
    from makemost_jax.sharding import logical_axes
    from makemost_jax.training import TrainConfig, init_state

    params = mm.load(str(tiny_gpt2_dir))
    layered, _ = mm.per_layer(params)
    kw = {"beams": 4, "max_new_tokens": N}
    for scanned, held in ((beam_search(params, ROWS, **kw), beam_search(layered, ROWS, **kw)),
                          (generate(params, ROWS, max_new_tokens=N), generate(layered, ROWS, max_new_tokens=N))):
        np.testing.assert_array_equal(held.tokens, scanned.tokens)
        np.testing.assert_allclose(held.logprobs, scanned.logprobs, atol=1e-5, rtol=0)
    jax.tree.map(np.testing.assert_array_equal, mm.stacked(layered).weights, params.weights)
    for refused in (lambda: mm.save_hf(layered, tmp_path / "out"), lambda: logical_axes(layered),
                    lambda: init_state(layered, TrainConfig())):
        with pytest.raises(InputError, match=r"each layer on its own \(per_layer\): pass stacked\(params\)"):
            refused()


def reference_cbs(params, rows, term, attribute, *, beams, n, eos, weight, prefilter):
    """Conditional beam search written plainly: full forward per step, Python lists, same rules."""
    width = 40
    feed = jax.jit(lambda p, t, m: mm.forward(p, t, mask=m, return_hidden=True))
    results = []
    for prompt in rows:
        prompt = list(prompt)
        live, finished = [((), 0.0)], []  # (generated tokens, LM log-prob); finished: (score, tokens, logp)
        for step in range(n):
            batch = [prompt + list(seq) for seq, _ in live] + [prompt] * (beams - len(live))
            tokens, mask = pad_prompts(batch, bucket=width)
            out = feed(params, tokens, mask)
            logp = np.asarray(jax.nn.log_softmax(out.logits[:, -1]))
            hidden = out.hidden[term.hidden_layer][:, -1]
            cands = np.argsort(-logp, axis=1, kind="stable")[:, :prefilter]
            logq = np.asarray(term(hidden, jnp.asarray(cands), step))
            options = [(cum + logp[i, tok] + weight * logq[i, j], seq + (int(tok),), cum + logp[i, tok])
                       for i, (seq, cum) in enumerate(live) for j, tok in enumerate(cands[i])]
            options = sorted(options, key=lambda o: -o[0])[:2 * beams]
            for rank, (_, seq, cum) in enumerate(options[:beams]):
                ends = seq[-1] == eos or step == n - 1
                length = len(seq) - (seq[-1] == eos)
                padded = jnp.asarray([list(seq) + [0] * (n - len(seq))])
                if ends and bool(attribute.accepts(None, None, padded, jnp.asarray([length]))[0]):
                    finished.append((cum, seq, cum))
            finished = sorted(finished, key=lambda f: -f[0])[:beams]
            live = [(seq, cum) for _, seq, cum in options if seq[-1] != eos][:beams]
            if len(finished) == beams and max(cum for _, cum in live) <= finished[-1][0]:
                break
        results.append(finished)
    return results


def test_conditional_beam_search_matches_a_plain_reference(tiny_gpt2_dir):
    params = mm.load(str(tiny_gpt2_dir))
    eos = int(beam_search(params, ROWS, beams=4, max_new_tokens=N).tokens[0, 0, 1])
    term = probe_term(params, eos, scale=1.0, min_length=0)
    ours = beam_search(params, ROWS, beams=4, max_new_tokens=N, eos_id=eos, term=term, attribute=MinLength(4),
                       weight=2.0, prefilter=6)
    ref = reference_cbs(params, ROWS, term, MinLength(4), beams=4, n=N, eos=eos, weight=2.0, prefilter=6)
    seqs = outputs(ours, eos)
    for b, hyps in enumerate(ref):
        for k in range(4):
            if k < len(hyps):
                assert seqs[4 * b + k] == list(hyps[k][1])
                np.testing.assert_allclose(ours.logprobs[b, k], hyps[k][2], atol=1e-4)
                np.testing.assert_allclose(ours.scores[b, k], hyps[k][0], atol=1e-4)
            assert bool(ours.finished[b, k]) == (k < len(hyps))
    assert int(np.where(ours.finished, ours.lengths, 99).min()) >= 4


def test_cbs_with_a_perfect_length_oracle_satisfies_it_and_beats_min_length_search(tiny_gpt2_dir):
    params = mm.load(str(tiny_gpt2_dir))
    free = beam_search(params, ROWS, beams=4, max_new_tokens=N)
    eos = int(free.tokens[0, 0, 1])
    plain = beam_search(params, ROWS, beams=4, max_new_tokens=N, eos_id=eos)
    assert int(plain.lengths[:, 0].min()) < 4  # the unconditional mode is short for some prompt
    forced = beam_search(params, ROWS, beams=4, max_new_tokens=N, eos_id=eos, min_length=4)
    cbs = beam_search(params, ROWS, beams=4, max_new_tokens=N, eos_id=eos, attribute=MinLength(4), prefilter=6,
                      term=probe_term(params, eos, scale=0.0, min_length=4))
    assert bool(np.all(cbs.finished)) and int(cbs.lengths.min()) >= 4
    assert np.all(np.asarray(cbs.logprobs[:, 0]) >= np.asarray(forced.logprobs[:, 0]) - 1e-5)
    # With a perfect oracle CBS ranks exactly like EOS masking, so here they agree.
    assert outputs(cbs, eos) == outputs(forced, eos)
    np.testing.assert_allclose(cbs.scores, forced.scores, atol=1e-5)


def test_sharded_beam_search_and_cbs_equal_one_device(tiny_llama_dir):
    params = mm.load(str(tiny_llama_dir))
    tokens, mask = pad_prompts([TOKENS[i, :3 + 2 * i] for i in range(8)])
    eos = int(jnp.argmax(mm.forward(params, TOKENS[:1, :3]).logits[0, -1]))  # greedy's first token for row 0
    term = probe_term(params, eos, scale=1.0, min_length=2, layer=-1)

    def search(p, batch):
        kw = {"beams": 2, "max_new_tokens": 6, "eos_id": eos}
        return (beam_search(p, batch["tokens"], batch["mask"], length_penalty=0.6, length_norm="gnmt", **kw),
                beam_search(p, batch["tokens"], batch["mask"], term=term, attribute=MinLength(2), **kw))

    # data x fsdp x tensor = 2 x 2 x 2: rows split four ways, cached key/value heads two ways.
    plain, cbs = assert_sharded_equal(search, params, {"tokens": tokens, "mask": mask}, meshes=[MESHES[3]],
                                      atol=1e-4)
    emitted = np.asarray(plain.lengths) + np.array([[row[n] == eos if n < 6 else False for row, n in zip(r, ln)]
                                                     for r, ln in zip(plain.tokens, plain.lengths)])
    np.testing.assert_allclose(plain.scores, plain.logprobs / ((5 + emitted) / 6) ** 0.6, rtol=1e-5)
    assert np.all(np.diff(plain.scores, axis=1) <= 0)
    assert int(np.where(cbs.finished, cbs.lengths, 99).min()) >= 2


def test_bad_settings_raise_clear_errors(tiny_gpt2_dir):
    params = mm.load(str(tiny_gpt2_dir))
    v = params.config.vocab_size
    with pytest.raises(ConfigError, match="beams=0"):
        beam_search(params, ROWS, beams=0, max_new_tokens=N)
    with pytest.raises(ConfigError, match=f"beams={v + 1}"):
        beam_search(params, ROWS, beams=v + 1, max_new_tokens=N)
    with pytest.raises(InputError, match="max_length=7"):
        beam_search(params, ROWS, beams=2, max_length=7)  # the longest prompt has 9 tokens
    with pytest.raises(InputError, match="context"):
        beam_search(params, [TOKENS[0]], beams=2, max_new_tokens=60)
    with pytest.raises(ConfigError, match="min_length=11"):
        beam_search(params, ROWS, beams=2, max_new_tokens=N, eos_id=0, min_length=11)
    with pytest.raises(ConfigError, match="vocabulary"):
        beam_search(params, ROWS, beams=2, max_new_tokens=N, eos_id=v)
    with pytest.raises(ConfigError, match="width 32"):
        beam_search(params, ROWS, beams=2, max_new_tokens=N, term=probe_term(params, 0, 1.0, 0, width=48))
    with pytest.raises(ConfigError, match="hidden_layer"):
        beam_search(params, ROWS, beams=2, max_new_tokens=N, term=probe_term(params, 0, 1.0, 0, layer=7))
    encoder = mm.Params(mm.from_hf_config({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 50,
                                           "max_position_embeddings": 16}), {})  # rejected before any weight is read
    with pytest.raises(ConfigError, match="encoder"):
        beam_search(encoder, ROWS[:1], beams=2, max_new_tokens=N)
