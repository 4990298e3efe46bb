"""Translation models trained here: tokenizer, encoded pairs, training on the shared loop, export,
sharded training step, and `makemost translate`.

- the trained tokenizer appends </s> to sources, and its saved folder loads back through
  `mm.load_tokenizer` with the same ids;
- encoded pairs: decoder rows `<start> y </s>`, masks on exactly the predicted tokens;
  length buckets keep every row whole; bucketed batches resume exactly;
- 300 steps of `train_translation` on the verse pairs lower the teacher-forced loss on
  those pairs by more than 40% (a model that learns), and a run killed at step 20
  resumes from its Orbax checkpoint to the same parameters as an uninterrupted run;
- one training step (SGD) on 8 simulated devices (data x fsdp x tensor) equals the one-device step;
- `save_translation_model` writes a folder that transformers' MarianMTModel reads to the
  same logits (1e-4) and `mm.load` reads to the same config;
- `makemost translate --json --references` prints one JSON object with one translation
  per line and sacrebleu scores, greedy equal to `mm.generate`; an empty source line is
  a one-line error with status 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from sharded import MESHES, assert_sharded_equal

import makemost_jax as mm
from makemost_jax import seq2seq, training
from makemost_jax.data.pairs import BucketedBatches, PairBatches, asset_path, bucket_by_length, read_pairs

REPO = Path(__file__).resolve().parents[1]
PAIRS = read_pairs(asset_path("bible_en_es_train.jsonl"), "en", "es", limit=96)


@pytest.fixture(scope="module")
def tok():
    return seq2seq.train_tokenizer([side for pair in PAIRS for side in pair], vocab_size=500)


@pytest.fixture(scope="module")
def data(tok):
    return seq2seq.encode_translation_pairs(tok, PAIRS, max_source=64, max_target=64, start_id=tok.pad_id)


def _config(tok):
    return seq2seq.marian_config(tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id, d_model=32, layers=2, heads=4,
                                 ffn=64, max_positions=80)


def test_tokenizer_and_encoded_pairs(tok, data, tmp_path):
    source = tok.encode_source(PAIRS[0][0])
    assert source[-1] == tok.eos_id and tok.decode(source) == PAIRS[0][0]
    seq2seq.save_tokenizer(tok, str(tmp_path))
    again = mm.load_tokenizer(str(tmp_path))
    assert again.encode_source(PAIRS[1][1]) == tok.encode_source(PAIRS[1][1])
    assert (again.pad_id, again.eos_id, again.unk_id) == (0, 1, 2)
    assert len(data["index"]) > 80
    row = 3
    target = tok.encode(PAIRS[data["index"][row]][1])
    n = len(target)
    assert data["target"][row, :n + 2].tolist() == [tok.pad_id, *target, tok.eos_id]
    assert data["target_mask"][row].sum() == n + 1 and data["target_mask"][row, :n + 1].all()
    buckets = bucket_by_length(data, [24, 40])
    assert sum(len(b["index"]) for b in buckets) == len(data["index"])
    for b in buckets:
        assert b["target"].shape[1] == b["target_mask"].shape[1] + 1  # the start token stays
        assert b["source"].shape == b["source_mask"].shape
        kept = np.isin(data["index"], b["index"])
        assert b["source_mask"].sum() == data["source_mask"][kept].sum()  # no token lost
        assert b["target_mask"].sum() == data["target_mask"][kept].sum()
    first = BucketedBatches(buckets, [8, 4, 2], seed=1)
    seen = [next(first) for _ in range(5)]
    resumed = BucketedBatches(buckets, [8, 4, 2], seed=1)
    resumed.restore(json.loads(json.dumps(BucketedBatches(buckets, [8, 4, 2], seed=1).state())))
    for _ in range(3):
        next(resumed)
    state = resumed.state()
    again = BucketedBatches(buckets, [8, 4, 2], seed=1)
    again.restore(state)
    for expected in seen[3:]:
        np.testing.assert_array_equal(next(again)["target"], expected["target"])


def test_training_learns_and_resumes(tok, data, tmp_path):
    params = mm.init_params(_config(tok), jax.random.key(0))
    everything = {k: v for k, v in data.items() if k != "index"}

    def fresh():  # the training state takes over (donates) the buffers it is given
        return jax.tree.map(jnp.copy, params)

    def loss(p):
        return float(seq2seq.translation_loss(p, everything)[0])

    config = training.TrainConfig(steps=300, learning_rate=3e-3, warmup_steps=10, progress=False, log_every=0)
    trained, history = seq2seq.train_translation(fresh(), PairBatches(data, 16, seed=0), config)
    before, after = loss(params), loss(trained)
    print(f"\nteacher-forced loss on the training pairs: {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before

    # Killed after step 20 (the data runs dry), resumed from the checkpoint of step 20: the same
    # parameters as an uninterrupted 40-step run with the same settings.
    class Dies(PairBatches):
        def __next__(self):
            if self.position == 21:
                raise RuntimeError("killed")
            return super().__next__()

    run = training.TrainConfig(steps=40, learning_rate=3e-3, warmup_steps=5, progress=False, log_every=0,
                               checkpoint_dir=str(tmp_path / "run"), checkpoint_every=10)
    with pytest.raises(RuntimeError, match="killed"):
        seq2seq.train_translation(fresh(), Dies(data, 16, seed=0), run)
    resumed, history = seq2seq.train_translation(fresh(), PairBatches(data, 16, seed=0), run)
    assert history["start_step"] == 20
    straight, _ = seq2seq.train_translation(fresh(), PairBatches(data, 16, seed=0),
                                            training.TrainConfig(**{**run.__dict__, "checkpoint_dir": None,
                                                                    "checkpoint_every": 0}))
    for a, b in zip(jax.tree.leaves(resumed.weights), jax.tree.leaves(straight.weights)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_sharded_training_step_equals_one_device(tok, data):
    params = mm.init_params(_config(tok), jax.random.key(1))
    # SGD: Adam's first step is lr * sign(gradient), which turns rounding in near-zero gradients
    # (unused vocabulary rows) into differences of 2 * lr; SGD keeps the comparison linear.
    tx, _ = training.make_optimizer(training.TrainConfig(steps=1, optimizer=optax.sgd(0.5), progress=False))
    batch = {k: v[:8] for k, v in data.items() if k != "index"}

    def step(p, b):
        state = training.TrainState.create(p, tx)
        new, metrics = training.train_step(state, b, loss_fn=seq2seq.translation_loss, tx=tx)
        return new.params.weights, metrics["loss"]

    assert_sharded_equal(step, params, batch, meshes=[MESHES[3]], atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    params = mm.init_params(_config(tok), jax.random.key(2))
    params = mm.Params(params.config, {**params.weights, "logits_bias": jnp.linspace(-1, 1, tok.vocab_size)})
    folder = tmp_path_factory.mktemp("en-es")
    seq2seq.save_translation_model(params, tok, str(folder))
    return params, folder


def test_export_reads_back_in_transformers(saved):
    params, folder = saved
    assert mm.load(str(folder)).config == params.config
    model = transformers.MarianMTModel.from_pretrained(folder).eval()
    src, tgt = np.array([[5, 9, 14, 1]]), np.array([[0, 7, 8, 30]])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(src), decoder_input_ids=torch.tensor(tgt)).logits.numpy()
    ours = np.asarray(mm.forward(params, tgt, encoder_tokens=src).logits)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def _cli(args, stdin=None):
    return subprocess.run([sys.executable, "-m", "makemost_jax", *args], capture_output=True, text=True,
                          input=stdin, cwd=REPO, timeout=600, check=False)


def test_translate_command(saved, tok, tmp_path):
    params, folder = saved
    sources, refs = tmp_path / "src.txt", tmp_path / "ref.txt"
    sources.write_text("\n".join(p[0] for p in PAIRS[:3]) + "\n")
    refs.write_text("\n".join(p[1] for p in PAIRS[:3]) + "\n")
    proc = _cli(["translate", str(sources), "--model", str(folder), "--search", "greedy", "--max-new-tokens", "12",
                 "--references", str(refs), "--json"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1
    report = json.loads(proc.stdout)
    assert len(report["translations"]) == 3 and {"bleu", "chrf", "length_ratio"} <= set(report["scores"])
    greedy = mm.generate(params, sources=[tok.encode_source(p[0]) for p in PAIRS[:3]], max_new_tokens=12,
                         eos_id=tok.eos_id)
    for row, tokens, n in zip(report["translations"], np.asarray(greedy.tokens), np.asarray(greedy.lengths)):
        ids = [int(t) for t in tokens[:n] if t != tok.eos_id]
        assert row["translation"] == tok.decode(ids)
    proc = _cli(["translate", "-", "--model", str(folder)], stdin="In the beginning.\n\nAmen.\n")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "line 2 is empty" in proc.stderr


def test_finetuning_a_loaded_t5(tmp_path):
    """The same training function finetunes a checkpoint loaded from Hugging Face (here a tiny random T5)
    on a toy task (reverse the source): the loss falls."""
    from tiny_seq2seq import make

    params = mm.load(str(make("t5", tmp_path / "t5")))
    rng = np.random.default_rng(0)
    source = rng.integers(3, 40, (64, 6)).astype(np.int32)
    start, eos = params.config.decoder_start_token_id, params.config.eos_token_id
    target = np.concatenate([np.full((64, 1), start), source[:, ::-1], np.full((64, 1), eos)], 1).astype(np.int32)
    data = {"source": source, "source_mask": np.ones_like(source), "target": target,
            "target_mask": np.ones((64, 7), np.int32)}
    before = float(seq2seq.translation_loss(params, data)[0])
    config = training.TrainConfig(steps=60, learning_rate=3e-3, warmup_steps=5, progress=False, log_every=0)
    tuned, _ = seq2seq.train_translation(params, PairBatches(data, 16, seed=0), config)
    after = float(seq2seq.translation_loss(tuned, data)[0])
    print(f"\nT5 finetuning, reverse-the-source loss: {before:.3f} -> {after:.3f}")
    assert after < 0.7 * before
