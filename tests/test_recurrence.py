"""Recurrence for pretrained decoders: zero-init exactness, scan = loop, gradients through the
memory, sub-linear training memory under remat, a real training run, checkpoints, CLI, bad input."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharded import MESHES, assert_sharded_equal

import makemost_jax as mm
from makemost_jax.assets import read_sample
from makemost_jax.cli import main
from makemost_jax.data import DocumentContiguousBatches
from makemost_jax.errors import CheckpointError, ConfigError, InputError
from makemost_jax.models import vocab_nll
from makemost_jax.perplexity import perplexity
from makemost_jax.recurrence import (
    RecurrenceConfig,
    compiled_stats,
    evaluate_sliding,
    evaluate_windows,
    init_memory_module,
    initial_memory,
    load_module,
    memory_kv,
    recurrence_loss,
    run_windows,
    save_module,
    split_sequence,
    train_recurrence,
    window_step,
)
from makemost_jax.training import TrainConfig, lm_loss, train

VOCAB = 101
DATA = Path(__file__).with_name("data")
FAMILIES = {
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 4, "vocab_size": VOCAB, "n_positions": 16},
    "llama": {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16,
              "vocab_size": VOCAB, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
}


def tiny_lm(family: str, seed: int = 0):
    return mm.init_params(mm.from_hf_config(FAMILIES[family]), jax.random.key(seed))


def perturbed(module, seed: int = 0, scale: float = 0.3):
    """The module with noise on every weight, the zero-initialised gates included."""
    leaves, tree = jax.tree.flatten(module.weights)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return type(module)(module.config, module.lm_config, jax.tree.unflatten(tree, noisy))


def tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


# --- the zero-init guarantee and the scan ------------------------------------------------
# The checks run through a few jitted functions (one compilation per model shape, shared by the tests).


@jax.jit
def scanned_and_plain_logits(module, lm, x_BNW):
    """The windowed model's logits (B, N, W, V) and the plain LM's on each window alone."""
    plain = jnp.stack([mm.forward(lm, x_BNW[:, i]).logits for i in range(x_BNW.shape[1])], axis=1)
    return run_windows(module, lm, x_BNW)[1], plain


def loop_windows(module, lm, x_BNW, y_BNW):
    """The reference: a Python loop over `window_step`; (logits, nll), each (B, N, W, ...)."""
    memory = initial_memory(module, x_BNW.shape[0])
    logits, nll = [], []
    for i in range(x_BNW.shape[1]):
        memory, out = window_step(module, lm, memory, x_BNW[:, i])
        logits.append(out)
        nll.append(-mm.token_logprobs(out, y_BNW[:, i]))
    return jnp.stack(logits, 1), jnp.stack(nll, 1)


def scan_nll(module, lm, x_BNW, y_BNW, weights_BNW, remat=True):
    """Weighted mean NLL of the scanned windows."""
    nll_BNW = run_windows(module, lm, x_BNW, targets_BNW=y_BNW, remat=remat)[1]
    return (nll_BNW * weights_BNW).sum() / weights_BNW.sum()


scan_nll_and_grad = jax.jit(jax.value_and_grad(scan_nll), static_argnames="remat")


@pytest.mark.parametrize("family, config", [("llama", RecurrenceConfig()),
                                            ("gpt2", RecurrenceConfig(num_memory=2, read_layer=3, inject_layer=1))])
def test_fresh_module_leaves_every_window_unchanged(family, config):
    lm = tiny_lm(family)
    module = init_memory_module(config, lm.config, jax.random.key(1))
    x_BNW = tokens((2, 3, 16))
    logits, plain = scanned_and_plain_logits(module, lm, x_BNW)
    np.testing.assert_allclose(logits, plain, atol=1e-5, rtol=0)
    # The test can fail: a trained (here: perturbed) module does change every window.
    changed, _ = scanned_and_plain_logits(perturbed(module), lm, x_BNW)
    assert float(jnp.abs(changed - logits).max(axis=(0, 2, 3)).min()) > 1e-3


def test_scan_equals_python_loop_logits_and_gradients():
    # The scan machinery is family-independent; Llama (rotary, grouped heads) is the richer case.
    lm = tiny_lm("llama")
    module = perturbed(init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(1)))
    x_BNW, y_BNW = tokens((2, 3, 16)), tokens((2, 3, 16), seed=1)
    ones = jnp.ones(x_BNW.shape)

    @jax.jit
    def loop_logits_and_grad(module):
        def loss(module):
            logits, nll = loop_windows(module, lm, x_BNW, y_BNW)
            return nll.mean(), logits
        return jax.grad(loss, has_aux=True)(module)

    expected, loop_logits = loop_logits_and_grad(module)
    np.testing.assert_allclose(scanned_and_plain_logits(module, lm, x_BNW)[0], loop_logits, atol=1e-5, rtol=1e-5)
    for remat in (False, True):
        _, got = scan_nll_and_grad(module, lm, x_BNW, y_BNW, ones, remat=remat)
        for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected.weights), jax.tree.leaves(got.weights)):
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5, err_msg=f"remat={remat} {path}")


def test_bfloat16_module_and_model_keep_their_dtype_through_the_scan():
    # The window states are pooled in float32; the memory carried by the scan stays in the module's dtype.
    bf16 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.bfloat16))
    lm = bf16(tiny_lm("llama"))
    module = bf16(perturbed(init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(1))))
    memory, logits = jax.jit(run_windows)(module, lm, tokens((2, 3, 16)))
    assert memory.dtype == jnp.bfloat16 and logits.shape == (2, 3, 16, VOCAB)
    full, _ = jax.jit(run_windows)(jax.tree.map(lambda x: x.astype(jnp.float32), module),
                                   jax.tree.map(lambda x: x.astype(jnp.float32), lm), tokens((2, 3, 16)))
    error = np.linalg.norm(np.asarray(memory, np.float32) - full) / np.linalg.norm(full)
    assert error < 0.1, error  # bfloat16 rounding through three windows, not a different computation


def test_gradient_reaches_the_memory_from_a_later_window():
    lm = tiny_lm("llama")
    fresh = init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(1))
    module = perturbed(fresh)
    x_BNW, y_BNW = tokens((2, 3, 16)), tokens((2, 3, 16), seed=1)
    last_only = jnp.zeros((2, 3, 16)).at[:, 2].set(1.0)  # only the third window's loss

    def loss(weights):
        return scan_nll_and_grad(type(module)(module.config, module.lm_config, weights), lm, x_BNW, y_BNW,
                                 last_only)

    grads = loss(module.weights)[1].weights
    # The pooling weights act only when the memory is updated after windows 1 and 2.
    pooling = {k: grads[k] for k in ("q", "k", "v", "o", "up", "down", "queries", "initial")}
    norms = {k: float(optax_norm(v)) for k, v in pooling.items()}
    print(f"\ngradient norms from window 3's loss: {norms}")
    assert min(norms.values()) > 1e-4
    # ... and they are the true gradient: central differences along the (unit) pooling gradient,
    # a direction that moves only the weights that reach window 3 through the memory.
    scale = 1.0 / float(optax_norm(pooling))
    direction = {k: jax.tree.map(lambda g, on=k in pooling: g * scale if on else jnp.zeros_like(g), v)
                 for k, v in grads.items()}
    eps = 1e-3
    shifted = [float(loss(jax.tree.map(lambda w, d, s=s: w + s * eps * d, module.weights, direction))[0])
               for s in (1, -1)]
    numeric = (shifted[0] - shifted[1]) / (2 * eps)
    analytic = float(optax_norm(pooling))  # the gradient's component along that direction
    print(f"directional derivative: analytic {analytic:.6f}, finite differences {numeric:.6f}")
    assert numeric == pytest.approx(analytic, rel=1e-2)
    # A fresh module learns from step one: its zero gates get a gradient (the rest starts at zero).
    fresh_grads = scan_nll_and_grad(fresh, lm, x_BNW, y_BNW, jnp.ones(x_BNW.shape))[1].weights
    assert float(optax_norm(fresh_grads["gate"])) > 1e-4


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))


def test_training_memory_is_sublinear_in_windows_with_remat():
    lm = tiny_lm("gpt2")
    module = init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(1))
    peaks = {}
    for remat, n in ((True, 2), (True, 8), (False, 8)):
        fn = recurrence_loss(window=16, remat=remat)
        batch = {"tokens": jax.ShapeDtypeStruct((16, n * 16 + 1), jnp.int32),
                 "loss_mask": jax.ShapeDtypeStruct((16, n * 16), jnp.float32)}
        grad = jax.grad(lambda p, b, f=fn: f(p, b, frozen=lm)[0])
        peaks[remat, n] = compiled_stats(grad, {"memory": module}, batch)["peak_bytes"]
    print("\npeak training bytes (XLA compiled memory analysis), batch 16, window 16: "
          + ", ".join(f"remat={r} {n} windows: {p / 2**20:.2f} MiB" for (r, n), p in peaks.items()))
    assert peaks[True, 8] < 2 * peaks[True, 2]
    # Without remat every window's activations are kept: 8 windows would break the bound.
    assert peaks[False, 8] > 2 * peaks[True, 2]


def test_compiled_flops_count_every_layer():
    """XLA counts a loop's body once; `compiled_stats` must count the scanned layers one by one."""
    def forward_flops(layers):
        cfg = mm.from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_layer": layers, "n_head": 4,
                                 "vocab_size": 100, "n_positions": 32})
        params = mm.init_params(cfg, jax.random.key(0))
        return compiled_stats(lambda p, t: mm.forward(p, t).logits.sum(), params, jnp.zeros((1, 16), jnp.int32))

    one, two, four = (forward_flops(n)["flops"] for n in (1, 2, 4))
    per_layer = two - one
    assert per_layer > 0.3 * one  # a layer is a large share of this tiny model
    np.testing.assert_allclose(four - two, 2 * per_layer, rtol=1e-3)


def test_loss_without_memory_is_the_lm_on_disjoint_windows():
    """`{"lm": lm}` alone (the finetuning control) scores each window on its own, and its gradient reaches the LM."""
    lm = tiny_lm("llama")
    batch = {"tokens": tokens((2, 3 * 16 + 1)), "loss_mask": jnp.ones((2, 48)).at[1, 40:].set(0.0)}
    loss, metrics = recurrence_loss(window=16)({"lm": lm}, batch)
    inputs, targets, mask = (np.asarray(x) for x in split_sequence(batch, 16))
    nll = [-mm.token_logprobs(mm.forward(lm, jnp.asarray(inputs[b, n][None])).logits, jnp.asarray(targets[b, n][None]))
           for b in range(2) for n in range(3)]
    expected = float((np.concatenate([np.asarray(x)[0] for x in nll]) * mask.reshape(-1)).sum() / mask.sum())
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["tokens"]) == 88.0
    grads = jax.grad(lambda p: recurrence_loss(window=16)(p, batch)[0])({"lm": lm})
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads))) > 0.0


def test_chunked_head_equals_the_plain_head_in_value_and_gradients(monkeypatch):
    """run_windows' NLL through `head_nll` (six chunks of 16 and a rest here) equals the plain head's, and so
    do the gradients w.r.t. the module and every LM weight (the output layer's too, for finetuning)."""
    monkeypatch.setattr(vocab_nll, "CHUNK", 16)
    lm = tiny_lm("gpt2")
    module = perturbed(init_memory_module(RecurrenceConfig(num_memory=2, read_layer=3, inject_layer=1), lm.config,
                                          jax.random.key(2)))
    x, y = tokens((2, 3, 16)), tokens((2, 3, 16), seed=1)

    def loss(p, chunked_head):
        return run_windows(p["memory"], p["lm"], x, targets_BNW=y, chunked_head=chunked_head)[1].mean()

    params = {"memory": module, "lm": lm}
    (chunked, g_chunked), (plain, g_plain) = (jax.value_and_grad(loss)(params, c) for c in (True, False))
    np.testing.assert_allclose(float(chunked), float(plain), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_sharded_training_step_equals_one_device():
    lm = tiny_lm("llama")
    module = perturbed(init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(1)))
    batch = {"tokens": tokens((8, 2 * 16 + 1)), "loss_mask": jnp.ones((8, 32))}
    loss_fn = recurrence_loss(window=16)

    def step(lm, batch):
        return jax.value_and_grad(lambda p: loss_fn(p, batch, frozen=lm)[0])({"memory": module})

    assert_sharded_equal(step, lm, batch, meshes=[MESHES[3]], atol=2e-5)  # data x fsdp x tensor = 2 x 2 x 2


# --- evaluation on documents -------------------------------------------------------------


def test_evaluation_carries_memory_across_chunks_and_matches_baselines():
    lm = tiny_lm("llama")
    module = perturbed(init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(1)))
    rng = np.random.default_rng(0)
    long_doc = rng.integers(0, VOCAB, 7 * 16 + 1)  # 7 windows: chunks of 3 split it 3 + 3 + 1
    docs = [long_doc, rng.integers(0, VOCAB, 5), rng.integers(0, VOCAB, 1)]  # short, and nothing to score
    r = evaluate_windows(lm, docs, 16, module, batch_size=2, chunk_windows=3)
    assert (r.n_tokens, r.n_documents) == (7 * 16 + 4, 2)
    # Both documents with all their windows in one scan, the memory never handed over:
    padded = np.zeros((2, 7 * 16 + 1), np.int32)
    padded[0], padded[1, :5] = long_doc, docs[1]
    weights = np.zeros((2, 7 * 16), np.float32)
    weights[0], weights[1, :4] = 1.0, 1.0
    x, y = jnp.asarray(padded[:, :-1].reshape(2, 7, 16)), jnp.asarray(padded[:, 1:].reshape(2, 7, 16))
    whole = float((run_windows(module, lm, x, targets_BNW=y)[1] * weights.reshape(2, 7, 16)).sum())
    assert r.nll_sum == pytest.approx(whole, rel=1e-5)
    # Without a module: exactly the disjoint windows of makemost_jax.perplexity.
    plain = evaluate_windows(lm, docs, 16, batch_size=2, chunk_windows=3)
    reference = sum(perplexity(lm, d, context=16, stride=16, progress=False).nll_sum for d in docs[:2])
    assert plain.nll_sum == pytest.approx(reference, rel=1e-5)
    sliding = evaluate_sliding(lm, docs, 16, 4)
    assert sliding.n_tokens == r.n_tokens and sliding.stride == 4


# --- a real training run -----------------------------------------------------------------


class RandomCrops:
    """Batches of `length + 1` tokens cut at random offsets of one token stream (LM pretraining)."""

    def __init__(self, stream, length: int, batch_size: int, seed: int):
        self.stream, self.length, self.batch_size = stream, length, batch_size
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        return self

    def __next__(self):
        starts = self.rng.integers(0, len(self.stream) - self.length, self.batch_size)
        return {"tokens": np.stack([self.stream[i:i + self.length + 1] for i in starts])}


@pytest.fixture(scope="module")
def real_text(tiny_gpt2_dir):
    """Austen (the bundled Persuasion opening and tests/data/austen, 25 kB) in the conftest tokenizer
    (101-token BPE): the first 85% of each text to train on (cut into pieces of ~300 words), the rest held out."""
    tok = mm.load_tokenizer(str(tiny_gpt2_dir))
    texts = [read_sample("austen")] + [p.read_text() for p in sorted((DATA / "austen").glob("*.txt"))]
    train_texts, valid_docs = [], []
    for text in texts:
        words = text.split()
        cut = int(len(words) * 0.85)
        train_texts += [" ".join(words[i:min(i + 300, cut)]) for i in range(0, cut, 300)]
        valid_docs.append(tok.encode_for_model(" ".join(words[cut:])))
    return tok, train_texts, valid_docs


def test_real_training_run_beats_disjoint_windows(real_text):
    """A tiny Llama pretrained here on 16-token contexts, used with windows of 4; the module trained, LM frozen."""
    tok, train_texts, valid_docs = real_text
    stream = np.concatenate([tok.encode_for_model(t) for t in train_texts]).astype(np.int32)
    config = {**FAMILIES["llama"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    lm = mm.init_params(mm.from_hf_config(config), jax.random.key(0))
    state, _ = train(TrainConfig(steps=300, learning_rate=1e-2, warmup_steps=20, progress=False, seed=0),
                     lm, RandomCrops(stream, 16, 32, seed=0), lm_loss)
    lm, window = state.params, 4
    data = DocumentContiguousBatches([{"text": t} for t in train_texts], tok, batch_size=16, window=8 * window,
                                     seed=1)
    run = train_recurrence(lm, data, window, TrainConfig(steps=200, learning_rate=1e-2, warmup_steps=10,
                                                          progress=False, seed=0))
    disjoint = evaluate_windows(lm, valid_docs, window)
    recurrence = evaluate_windows(lm, valid_docs, window, run.module)
    sliding = evaluate_sliding(lm, valid_docs, window, window // 2)
    full = evaluate_windows(lm, valid_docs, 16)
    print(f"\nheld-out {recurrence.n_tokens} tokens, window {window}: disjoint ppl {disjoint.ppl:.3f}, "
          f"recurrence ppl {recurrence.ppl:.3f}, sliding (stride {window // 2}) ppl {sliding.ppl:.3f}; "
          f"the LM's own 16-token windows: {full.ppl:.3f}")
    assert recurrence.n_tokens == disjoint.n_tokens == sliding.n_tokens
    assert recurrence.ppl < disjoint.ppl * 0.97  # at least 3% lower


# --- checkpoints, finetuning, CLI ---------------------------------------------------------


class Chars:
    """A toy tokenizer inside the tiny vocabulary: one id per character."""

    bos_id = eos_id = 0
    add_bos = True

    def encode(self, text):
        return [ord(c) % (VOCAB - 1) + 1 for c in text]


def test_short_documents_and_module_checkpoints(tmp_path):
    lm = tiny_lm("gpt2")
    # Documents of a few tokens, far below one training sequence of 2 windows of 16: padded, not a crash.
    docs = [{"text": "a b"}, {"text": "c d e f"}, {"text": "g"}]
    config = TrainConfig(steps=2, learning_rate=1e-2, progress=False)
    frozen = train_recurrence(lm, DocumentContiguousBatches(docs, Chars(), 2, 2 * 16, seed=0), 16, config)
    assert all(np.isfinite(r["loss"]) for r in frozen.history["train"])
    assert frozen.lm is lm and set(frozen.state.params) == {"memory"}  # the LM is not trained (nor donated)
    tuned_lm = tiny_lm("gpt2", seed=5)  # stands in for a finetuned LM (finetuning itself: the CLI test)

    path = save_module(str(tmp_path / "frozen"), frozen.module)
    size = sum(f.stat().st_size for f in (tmp_path / "frozen").rglob("*") if f.is_file())
    lm_bytes = sum(x.nbytes for x in jax.tree.leaves(lm.weights))
    print(f"\nmodule checkpoint {size} bytes ({frozen.module.num_parameters} parameters); the LM is {lm_bytes} bytes")
    module, same_lm = load_module(path, lm)
    assert same_lm is lm and module.config == frozen.module.config
    for a, b in zip(jax.tree.leaves(module.weights), jax.tree.leaves(frozen.module.weights)):
        np.testing.assert_array_equal(a, b)
    save_module(str(tmp_path / "tuned"), frozen.module, lm=tuned_lm)
    tuned_size = sum(f.stat().st_size for f in (tmp_path / "tuned").rglob("*") if f.is_file())
    assert size < tuned_size - lm_bytes / 2  # the frozen LM's weights are not in the module checkpoint
    _, loaded_lm = load_module(str(tmp_path / "tuned"), lm)
    np.testing.assert_array_equal(loaded_lm["embed"]["tokens"], tuned_lm["embed"]["tokens"])
    with pytest.raises(CheckpointError, match="trained for the LM"):
        load_module(path, tiny_lm("llama"))
    with pytest.raises(CheckpointError, match="no recurrence module"):
        load_module(str(tmp_path), lm)


def test_cli_train_with_finetuning_then_eval(capsys, tmp_path, tiny_gpt2_dir):
    text = tmp_path / "text.txt"
    text.write_text(read_sample("austen")[:3000])
    out = tmp_path / "module"
    assert main(["recurrence", "train", str(tiny_gpt2_dir), str(text), "--out", str(out), "--window", "16",
                 "--windows", "2", "--batch-size", "2", "--steps", "3", "--finetune", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 3 and trained["module"] == str(out) and trained["module_parameters"] > 0
    base = mm.load(str(tiny_gpt2_dir))
    _, lm = load_module(str(out), base)  # --finetune saved the trained LM with the module
    assert float(jnp.abs(lm["embed"]["tokens"] - base["embed"]["tokens"]).max()) > 0
    assert main(["recurrence", "eval", str(tiny_gpt2_dir), str(text), "--module", str(out), "--window", "16",
                 "--stride", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ids = mm.load_tokenizer(str(tiny_gpt2_dir)).encode_for_model(text.read_text())
    assert report["disjoint"]["nll_sum"] == pytest.approx(perplexity(lm, ids, 16, 16, progress=False).nll_sum,
                                                          rel=1e-5)
    assert report["recurrence"]["n_tokens"] == report["sliding"]["n_tokens"] == len(ids) - 1
    assert main(["recurrence", "eval", str(tiny_gpt2_dir), str(text), "--module", str(out),
                 "--window", "999"]) == 2
    assert "larger than the model's context" in capsys.readouterr().err


# --- bad input ----------------------------------------------------------------------------


def test_bad_settings_raise_clear_errors():
    lm = tiny_lm("gpt2")
    cfg = lm.config
    for bad, match in [(RecurrenceConfig(num_memory=0), "at least one memory vector"),
                       (RecurrenceConfig(read_layer=4), "read_layer=4 is out of range"),
                       (RecurrenceConfig(read_layer=-1), "read_layer=-1 is out of range"),
                       (RecurrenceConfig(inject_layer=3), "inject_layer=3 is out of range"),
                       (RecurrenceConfig(pool_heads=5), "pool_heads=5")]:
        with pytest.raises(ConfigError, match=match):
            init_memory_module(bad, cfg, jax.random.key(0))
    module = init_memory_module(RecurrenceConfig(), cfg, jax.random.key(0))
    with pytest.raises(ConfigError, match="larger than the model's context of 16"):
        run_windows(module, lm, tokens((1, 2, 32)))
    with pytest.raises(ConfigError, match="larger than the model's context"):
        evaluate_windows(lm, [[1, 2, 3]], 17, module)
    with pytest.raises(ConfigError, match="larger than the model's context"):
        train_recurrence(lm, iter([]), 32, TrainConfig(steps=1, progress=False))
    with pytest.raises(ConfigError, match="different LM"):
        run_windows(module, tiny_lm("llama"), tokens((1, 2, 16)))
    with pytest.raises(InputError, match="window=16"):
        recurrence_loss(16)({"memory": module}, {"tokens": tokens((2, 20))}, frozen=lm)
    with pytest.raises(InputError, match="nothing to score"):
        evaluate_windows(lm, [[1], []], 16, module)
    with pytest.raises(InputError, match="extra_kv has shapes"):
        mm.forward(lm, tokens((1, 4)), extra_kv=memory_kv(module, initial_memory(module, 2)))
    with pytest.raises(ConfigError, match="encoder"):
        bert = mm.from_hf_config({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": VOCAB,
                                  "max_position_embeddings": 16})
        init_memory_module(RecurrenceConfig(), bert, jax.random.key(0))


# --- the real default model (slow) -------------------------------------------------------


@pytest.mark.slow
def test_fresh_module_on_the_real_model_changes_nothing():
    """SmolLM2-135M (Llama family, 30 layers, grouped heads): the zero-init guarantee on real weights.

    The logits are compared in float64: in float32 the same plain forward, run eagerly
    and under jit, already differs by ~1.5e-4 on logits up to ~37 (XLA's fusion order),
    so a float32 bound could not tell a leaking gate from rounding.
    """
    tok = mm.load_tokenizer()
    ids = np.asarray(tok.encode_for_model(read_sample("austen")), np.int32)
    with jax.enable_x64(True):
        lm = mm.load(dtype=jnp.float64)
        module = init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(0))
        x_BNW = jnp.asarray(ids[:3 * 64].reshape(1, 3, 64))
        logits, plain = scanned_and_plain_logits(module, lm, x_BNW)
        assert logits.dtype == jnp.float64
        diff = float(jnp.abs(logits - plain).max())
        print(f"\nSmolLM2-135M float64, 3 windows of 64: max |logit difference| with a fresh module {diff:.2e}")
        assert diff < 1e-9
    lm = mm.load()
    module = init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(0))
    docs = [ids[:600]]
    r, plain_r = evaluate_windows(lm, docs, 64, module), evaluate_windows(lm, docs, 64)
    assert r.nll_sum == pytest.approx(plain_r.nll_sum, rel=1e-6)
