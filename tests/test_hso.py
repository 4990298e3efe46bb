"""Hidden-state optimisation: gradients, per-slot Adam with eviction, the scanned loop, errors.

Parity of the whole loop with the PyTorch reference is in test_hso_torch_parity.py; the
real-model checks (perplexity and few-shot) are marked slow.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharded import assert_sharded_equal

import makemost_jax as mm
from makemost_jax.errors import ConfigError, InputError
from makemost_jax.hso import HSOConfig, hso_nll, lm_segments, run_segments
from makemost_jax.hso.lm import Segments, init_state, segment_nll
from makemost_jax.models import from_hf_config, init_params
from makemost_jax.models.cache import KVCache
from makemost_jax.sharding import MeshConfig

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 61, "n_positions": 48}
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 61, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-5}
FAMILIES = {"gpt2": GPT2, "llama": LLAMA}


def _params(family: str, dtype=jnp.float32, seed: int = 0):
    params = init_params(from_hf_config(FAMILIES[family]), jax.random.key(seed), dtype)
    # Larger-than-default weights: peaked predictions, so cache updates change the NLL visibly.
    return jax.tree.map(lambda w: w * 2.0, params)


def _tokens(batch: int, n: int, seed: int = 0, vocab: int = 61):
    return np.random.default_rng(seed).integers(0, vocab, (batch, n))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cache_gradient_matches_finite_differences(family):
    """d NLL / d cache from jax.grad equals central differences, along random directions and per element.

    In float64: a float32 NLL of ~70 carries rounding of ~1e-5, which central differences
    divide by 2h, so float32 could not tell a 1% gradient error from noise.
    """
    from makemost_jax.hso import hso_segment_step

    with jax.enable_x64(True):
        params = _params(family, jnp.float64)
        tokens = _tokens(2, 17, seed=1)
        segments = lm_segments(tokens, np.array([17, 17]), segment=8)
        state = init_state(params, 2, 8, offsets=False, update=False)
        state, _, _ = hso_segment_step(params, state, jax.tree.map(lambda x: x[0], segments), HSOConfig().hyper())
        second = jax.tree.map(lambda x: x[1], segments)
        assert state.past[0].dtype == jnp.float64

        @jax.jit
        def loss(kv):
            return segment_nll(params, kv, state, second)[0]

        grad = jax.grad(loss)(state.past)

        def central(direction, h=1e-5):  # float64: truncation O(h^2) and rounding both far below 1e-6
            plus = tuple(x + h * d for x, d in zip(state.past, direction))
            minus = tuple(x - h * d for x, d in zip(state.past, direction))
            return (float(loss(plus)) - float(loss(minus))) / (2 * h)

        rng = np.random.default_rng(0)
        for _ in range(3):  # directional derivatives <grad, u> for random u over every cached element
            u = tuple(jnp.asarray(rng.normal(size=x.shape), jnp.float64) for x in state.past)
            analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(grad, u))
            np.testing.assert_allclose(central(u), analytic, rtol=1e-6)
        for which in (0, 1):  # the largest single entries of the key and the value gradient
            index = np.unravel_index(int(jnp.argmax(jnp.abs(grad[which]))), grad[which].shape)
            one_hot = tuple(jnp.zeros_like(x).at[index].set(1.0) if i == which else jnp.zeros_like(x)
                            for i, x in enumerate(state.past))
            np.testing.assert_allclose(central(one_hot), float(grad[which][index]), rtol=1e-6)
            assert abs(float(grad[which][index])) > 1e-2  # not trivially zero


# ----------------------------------------------------------------------------- per-slot Adam


def _reference_loop(params, tokens_N, segment, cache_size, lr, beta1=0.9, beta2=0.999, eps=1e-8, hso_steps=1,
                    recompute=True):
    """The protocol with Python lists of slots: each slot holds its own k, v, moments and step count."""
    cfg = params.config
    absolute = cfg.rope_theta is None
    slots = []  # oldest first: dicts k, v (L, G, H), mk, vk, mv, vv, t
    nlls = []
    n_seg = -(-(len(tokens_N) - 1) // segment)
    padded = np.zeros(n_seg * segment + 1, np.int64)
    padded[:len(tokens_N)] = tokens_N
    consumed = 0

    def run(kv_k, kv_v, x, y, w, start):
        p = kv_k.shape[1]
        def as_cache(x_LPGH, name):  # one row with room for the segment, laid out as the cache keeps it
            axis = KVCache.SLOT_AXES[name]
            widths = [(0, 0)] * 5
            widths[axis] = (0, segment)
            return jnp.pad(jnp.moveaxis(x_LPGH[:, None], 2, axis), widths)

        cache = KVCache(k=as_cache(kv_k, "k"), v=as_cache(kv_v, "v"),
                        positions=jnp.where(jnp.arange(p + segment) < p, jnp.arange(p + segment), -1)[None],
                        fill=jnp.int32(p),
                        next_position=jnp.zeros((1,), jnp.int32))
        out = mm.forward(params, x[None], cache=cache, positions=(start + jnp.arange(segment))[None])
        logp = jax.nn.log_softmax(out.logits[0], -1)
        nll = -jnp.sum(jnp.take_along_axis(logp, y[:, None], 1)[:, 0] * w)
        return nll, tuple(jnp.moveaxis(getattr(out.cache, name)[:, 0], KVCache.SLOT_AXES[name] - 1, 1)[:, p:]
                          for name in ("k", "v"))  # (L, segment, G, H) each

    for i in range(n_seg):
        x = jnp.asarray(padded[i * segment:(i + 1) * segment])
        y = jnp.asarray(padded[i * segment + 1:(i + 1) * segment + 1])
        w = jnp.asarray((np.arange(i * segment + 1, (i + 1) * segment + 1) < len(tokens_N)).astype(np.float64))
        start = len(slots) if absolute else consumed
        k = jnp.stack([s["k"] for s in slots], 1) if slots else jnp.zeros((cfg.n_layers, 0, cfg.n_kv_heads,
                                                                          cfg.head_dim))
        v = jnp.stack([s["v"] for s in slots], 1) if slots else jnp.zeros_like(k)
        seg_loss = functools.partial(run, x=x, y=y, w=w, start=start)
        (nll, new), (gk, gv) = jax.value_and_grad(seg_loss, argnums=(0, 1), has_aux=True)(k, v)
        nlls.append(float(nll))
        for step in range(hso_steps if slots else 0):
            if step:
                gk, gv = jax.grad(lambda kk, vv: seg_loss(kk, vv)[0], argnums=(0, 1))(k, v)  # noqa: B023
            for j, s in enumerate(slots):
                s["t"] += 1
                for name, g in (("k", gk[:, j]), ("v", gv[:, j])):
                    g = np.asarray(g, np.float64)
                    s["m" + name] = beta1 * s["m" + name] + (1 - beta1) * g
                    s["v" + name] = beta2 * s["v" + name] + (1 - beta2) * g * g
                    m_hat = s["m" + name] / (1 - beta1 ** s["t"])
                    v_hat = s["v" + name] / (1 - beta2 ** s["t"])
                    s[name] = np.asarray(s[name], np.float64) - lr * m_hat / (np.sqrt(v_hat) + eps)
            k = jnp.stack([s["k"] for s in slots], 1)
            v = jnp.stack([s["v"] for s in slots], 1)
        if recompute:
            new = run(k, v, x, y, w, start)[1]
        for j in range(segment):
            zeros = np.zeros((cfg.n_layers, cfg.n_kv_heads, cfg.head_dim))
            slots.append({"k": np.asarray(new[0][:, j]), "v": np.asarray(new[1][:, j]), "mk": zeros, "vk": zeros,
                          "mv": zeros, "vv": zeros, "t": 0})
        slots = slots[-cache_size:]
        consumed += segment
    return np.array(nlls), slots


@pytest.mark.parametrize("family,recompute,hso_steps", [("gpt2", True, 1), ("llama", True, 2), ("gpt2", False, 2),
                                                        ("llama", False, 1)])
def test_scanned_loop_matches_python_reference_with_eviction(family, recompute, hso_steps):
    """Per-segment NLLs, final states, moments and step counts equal the list-of-slots reference."""
    params = _params(family)
    tokens = _tokens(1, 41, seed=2)[0]  # 5 segments of 8 through a 12-slot cache: evicts mid-segment
    config = HSOConfig(segment=8, cache_size=12, lr=3e-2, hso_steps=hso_steps, recompute=recompute)
    segments = lm_segments(tokens[None], np.array([41]), 8)
    nll_KB, finite_K, state = run_segments(params, segments, config.hyper(), cache_size=12,
                                           hso_steps=hso_steps, recompute=recompute)
    expected_nll, slots = _reference_loop(params, tokens, 8, 12, 3e-2, hso_steps=hso_steps, recompute=recompute)
    np.testing.assert_allclose(np.asarray(nll_KB[:, 0]), expected_nll, rtol=1e-4)
    assert bool(np.all(finite_K)) and int(state.fill) == 12
    for j, s in enumerate(slots):
        # float32 against float64 Adam: an element whose gradient is ~0 can move by a fraction of lr (3e-2)
        # differently; a misplaced or unevicted slot would be off by O(1)
        np.testing.assert_allclose(np.asarray(state.past[0][:, 0, :, :, j]), s["k"], rtol=1e-4, atol=5e-3)
        np.testing.assert_allclose(np.asarray(state.past[1][:, 0, :, j]), s["v"], rtol=1e-4, atol=5e-3)
        # a second step's gradient is taken at those slightly different states: moments agree to a few %
        np.testing.assert_allclose(np.asarray(state.adam.m[0][:, 0, :, :, j]), s["mk"], rtol=5e-2, atol=1e-5)
        np.testing.assert_allclose(np.asarray(state.adam.v[1][:, 0, :, j]), s["vv"], rtol=5e-2, atol=1e-8)
    # The 4 oldest survivors (segment 4) were updated while segment 5 was scored; segment 5's were not.
    assert np.asarray(state.adam.steps).tolist() == [s["t"] for s in slots] == [hso_steps] * 4 + [0] * 8
    # HSO changed the scores: the update is on.
    baseline = run_segments(params, segments, config.hyper(), cache_size=12, update=False)[0]
    assert np.abs(np.asarray(baseline) - np.asarray(nll_KB))[2:].max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lr0_equals_the_loop_without_update(family):
    params = _params(family)
    tokens = _tokens(3, 50, seed=3)
    lengths = np.array([50, 37, 26])
    config = HSOConfig(segment=8, cache_size=16, lr=0.0)
    with_update = hso_nll(params, tokens, config, lengths)
    without = hso_nll(params, tokens, config, lengths, update=False)
    np.testing.assert_allclose(with_update.nll, without.nll, rtol=1e-6, atol=1e-6)
    assert with_update.n_tokens == without.n_tokens == 49 + 36 + 25
    # The no-update loop is ordinary cached scoring: equal to the strided sliding window where they agree
    # (a token at position >= the cache size sees exactly the cache plus its segment in both).
    hso = hso_nll(params, tokens, dataclasses.replace(config, lr=3e-2), lengths)
    assert hso.ppl != pytest.approx(without.ppl, rel=1e-4)


@pytest.mark.parametrize("family,offsets,hso_steps", [("gpt2", False, 1), ("llama", True, 2)])
def test_params_held_per_layer_run_the_same_loop(family, offsets, hso_steps):
    """Per-layer params (`mm.per_layer`) keep the cache and its Adam moments per layer: same NLLs and states."""
    params = _params(family)
    layered, _ = mm.per_layer(params)
    segments = lm_segments(_tokens(2, 41, seed=11), np.array([41, 33]), 8)  # evicts, with sinks
    kwargs = {"cache_size": 12, "hso_steps": hso_steps, "offsets": offsets, "sink": 2}
    hyper = HSOConfig(lr=3e-2).hyper()
    nll, finite, state = run_segments(params, segments, hyper, **kwargs)
    nll_layered, finite_layered, state_layered = run_segments(layered, segments, hyper, **kwargs)
    assert len(state_layered.past[0]) == len(state_layered.adam.m[1]) == params.config.n_layers
    np.testing.assert_allclose(np.asarray(nll_layered), np.asarray(nll), rtol=1e-5, atol=1e-5)
    assert bool(np.all(finite_layered)) and bool(np.all(finite))
    for i in range(2):  # keys, values
        np.testing.assert_allclose(np.concatenate(state_layered.kv()[i]), np.asarray(state.kv()[i]),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.concatenate(state_layered.adam.v[i]), np.asarray(state.adam.v[i]),
                                   rtol=1e-3, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(state_layered.adam.steps), np.asarray(state.adam.steps))
    update_off = run_segments(layered, segments, hyper, update=False, **kwargs)[0]
    assert np.abs(np.asarray(update_off) - np.asarray(nll))[2:].max() > 1e-3  # the update is on


def test_params_held_per_layer_with_sliding_layers(tmp_path):
    """Gemma 2 (sliding layers with a window shorter than the cache, soft-capping): the same NLLs per layer."""
    from tiny_families import make

    params = mm.load(str(make("gemma2", tmp_path / "gemma2")))
    tokens = _tokens(2, 41, seed=12, vocab=params.config.vocab_size)
    config = HSOConfig(segment=8, cache_size=16, lr=3e-2, sink=2)
    stacked, layered = hso_nll(params, tokens, config), hso_nll(mm.per_layer(params)[0], tokens, config)
    np.testing.assert_allclose(layered.nll, stacked.nll, rtol=1e-5, atol=1e-5)
    assert np.abs(stacked.nll - hso_nll(params, tokens, config, update=False).nll).max() > 1e-3


def test_offsets_equal_direct_updates():
    params = _params("llama")
    tokens = _tokens(2, 40, seed=4)
    direct = hso_nll(params, tokens, HSOConfig(segment=8, cache_size=16, lr=3e-2, hso_steps=2))
    offsets = hso_nll(params, tokens, HSOConfig(segment=8, cache_size=16, lr=3e-2, hso_steps=2, offsets=True))
    np.testing.assert_allclose(direct.nll, offsets.nll, rtol=1e-5, atol=1e-5)


def test_sink_keeps_the_first_tokens_cached():
    """With sink=2 the first two tokens' states survive every eviction, with their Adam counts."""
    params = _params("llama")
    segments = lm_segments(_tokens(1, 41, seed=10), np.array([41]), 8)
    hyper = HSOConfig(lr=1e-2).hyper()
    _, _, state = run_segments(params, segments, hyper, cache_size=12, update=False, sink=2)
    _, _, first = run_segments(params, jax.tree.map(lambda x: x[:1], segments), hyper, cache_size=12,
                               update=False)
    np.testing.assert_array_equal(np.asarray(state.past[0][..., :2]), np.asarray(first.past[0][..., :2]))
    assert int(state.fill) == 12 and bool(state.valid.all())
    _, _, updated = run_segments(params, segments, hyper, cache_size=12, sink=2)
    assert np.asarray(updated.adam.steps).tolist() == [4, 4] + [1] * 2 + [0] * 8  # sinks: 4 updates each


def test_batched_texts_equal_single_texts():
    params = _params("gpt2")
    tokens = _tokens(3, 45, seed=5)
    lengths = np.array([45, 30, 17])
    config = HSOConfig(segment=8, cache_size=16, lr=3e-2)
    batched = hso_nll(params, tokens, config, lengths)
    for row in range(3):
        single = hso_nll(params, tokens[row, :lengths[row]], config)
        k = single.nll.shape[1]
        np.testing.assert_allclose(batched.nll[row, :k], single.nll[0], rtol=1e-5, atol=1e-5)
        assert np.all(batched.counts[row, k:] == 0)


def test_one_compilation_per_shape_and_lr_sweeps_reuse_it():
    params = _params("gpt2", seed=7)
    tokens = _tokens(2, 57, seed=6)
    first = hso_nll(params, tokens, HSOConfig(segment=8, cache_size=24, lr=1e-2))
    again = hso_nll(params, _tokens(2, 57, seed=8), HSOConfig(segment=8, cache_size=24, lr=3e-2, beta1=0.5))
    assert first.compiles == 1 and again.compiles == 0


def test_sharded_hso_equals_single_device():
    """Batch over data, cache heads over tensor: same NLLs and states on every mesh."""
    params = _params("llama")
    tokens = _tokens(8, 33, seed=9)
    segments = lm_segments(tokens, np.full(8, 33), 8)
    config = HSOConfig(segment=8, cache_size=16, lr=3e-2)

    def run(p, seg):
        # The NLLs, not the states: Adam moves every element by about lr * sign(grad), so an element whose
        # gradient is ~1e-9 may flip sign under another summation order without changing any score.
        nll, finite, _ = run_segments(p, Segments(**seg), config.hyper(), cache_size=16)
        return nll, finite

    def rows_over_data(batch, mesh):  # segments are (K, B, S): split axis 1
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
        return jax.device_put(batch, spec)

    meshes = (MeshConfig(data=8), MeshConfig(data=2, tensor=2, fsdp=2), MeshConfig(data=4, tensor=2))
    expected = assert_sharded_equal(run, params, dataclasses.asdict(segments), meshes=meshes, atol=1e-4,
                                    rtol=1e-4, place_batch=rows_over_data)
    assert np.isfinite(expected[0]).all() and expected[1].all()


# ----------------------------------------------------------------------------- bad input


def test_bad_settings_and_inputs_raise_clear_errors():
    params = _params("gpt2")
    tokens = _tokens(1, 40)
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        hso_nll(params, tokens, HSOConfig(segment=16, cache_size=40))
    with pytest.raises(ConfigError, match="lr=-0.1"):
        hso_nll(params, tokens, HSOConfig(segment=8, cache_size=16, lr=-0.1))
    with pytest.raises(ConfigError, match="segment=0"):
        hso_nll(params, tokens, HSOConfig(segment=0, cache_size=16))
    with pytest.raises(ConfigError, match="beta2"):
        hso_nll(params, tokens, HSOConfig(segment=8, cache_size=16, beta2=1.0))
    with pytest.raises(InputError, match="shorter than one segment"):
        hso_nll(params, _tokens(1, 8), HSOConfig(segment=8, cache_size=16))
    with pytest.raises(InputError, match="vocabulary"):
        hso_nll(params, tokens + 100, HSOConfig(segment=8, cache_size=16))
    bert = init_params(from_hf_config({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 61,
                                       "max_position_embeddings": 64}),
                       jax.random.key(0))
    with pytest.raises(ConfigError, match="causal language model"):
        hso_nll(bert, tokens, HSOConfig(segment=8, cache_size=16))


def test_nan_in_the_cache_names_the_segment():
    """A NaN that enters at segment 2 (a poisoned input embedding) stops the run naming segment 2."""
    params = init_params(from_hf_config({**LLAMA, "tie_word_embeddings": False}), jax.random.key(0))
    tokens = np.full((1, 33), 5)
    tokens[0, 17] = 60  # first fed in segment 2 (inputs 16..23)
    poisoned = jax.tree.map(lambda x: x, params)
    poisoned.weights["embed"]["tokens"] = params.weights["embed"]["tokens"].at[60].set(jnp.nan)
    with pytest.raises(InputError, match="segment 2 "):
        hso_nll(poisoned, tokens, HSOConfig(segment=8, cache_size=16, lr=1e-2))


# ----------------------------------------------------------------------------- command line


def test_cli_hso_json_and_errors(capsys, tiny_llama_dir, tmp_path):
    from makemost_jax.assets import read_sample
    from makemost_jax.cli import main

    text = tmp_path / "book.txt"
    text.write_text(read_sample("austen")[:3000])
    argv = ["hso", str(tiny_llama_dir), str(text), "--segment", "16", "--cache-size", "32", "--lr", "0.03",
            "--max-tokens", "161", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = __import__("json").loads(out)
    assert out.count("\n") == 1 and report["command"] == "hso"
    assert report["hso"]["n_tokens"] == report["lr0"]["n_tokens"] == report["sliding"]["n_tokens"] == 160
    assert report["hso"]["ppl"] != report["lr0"]["ppl"] and report["sliding"]["context"] == 48
    assert main(argv[:-1] + ["--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lr=-1.0") and err.count("\n") == 1


def test_cli_holds_params_per_layer_for_long_texts(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    """Over 256 segments `makemost hso` converts the params once with `per_layer`; the numbers stay the API's."""
    import makemost_jax.models
    from makemost_jax.assets import read_sample
    from makemost_jax.cli import PER_LAYER_HSO_SEGMENTS, main

    calls = []
    real = makemost_jax.models.per_layer
    monkeypatch.setattr(makemost_jax.models, "per_layer", lambda params: calls.append(1) or real(params))
    text = tmp_path / "book.txt"
    text.write_text(read_sample("austen"))
    n = 2 * PER_LAYER_HSO_SEGMENTS + 5
    reports = {}
    for tokens in (n, 41):
        assert main(["hso", str(tiny_llama_dir), str(text), "--segment", "2", "--cache-size", "8", "--max-tokens",
                     str(tokens), "--json"]) == 0
        reports[tokens] = __import__("json").loads(capsys.readouterr().out)
    assert len(calls) == 1  # the long text only
    params, tok = mm.load(str(tiny_llama_dir)), mm.load_tokenizer(str(tiny_llama_dir))
    ids = tok.encode_for_model(read_sample("austen"))[:n]
    api = hso_nll(params, ids, HSOConfig(segment=2, cache_size=8))
    assert reports[n]["hso"]["n_tokens"] == api.n_tokens == n - 1
    assert reports[n]["hso"]["ppl"] == pytest.approx(api.ppl, rel=1e-5)


def test_cli_defaults_are_the_library_defaults():
    """`makemost hso` with no knobs runs exactly `HSOConfig()`, the settings the experiments recommend."""
    from makemost_jax.cli import _hso_config, build_parser

    args = build_parser().parse_args(["hso", "MODEL", "FILE"])
    assert _hso_config(args) == HSOConfig()
    assert HSOConfig().sink == 4 and HSOConfig().lr == 1e-2  # benchmarks/results/hso_domains.md's recommendation
