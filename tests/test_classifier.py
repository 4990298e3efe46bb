"""The per-token attribute classifier: shapes, the candidate gather, training data, learning, save/load,
conditional beam search with it, and the CLI (cbs-train, generate --search)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import makemost_jax as mm
from makemost_jax.cli import main
from makemost_jax.decoding.attributes import Labeller, MinLength
from makemost_jax.decoding.beam import beam_search
from makemost_jax.decoding.classifier import (
    AttributeClassifier,
    check_compatible,
    conditional_beam_search,
    evaluate_classifier,
    fit_classifier,
    init_classifier,
    load_classifier,
    read_classifier_metadata,
    sample_prefix_data,
    save_classifier,
    train_classifier,
)
from makemost_jax.errors import CheckpointError, ConfigError
from makemost_jax.training import TrainConfig, train

EOS, VOCAB, CONTEXT = 0, 64, 32
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": CONTEXT}
LLAMA = {"model_type": "llama", "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": CONTEXT}
# Synthetic language: prompt [1, kind]; kind 2 continues with 1-4 tokens, kind 3 with 6-11, kind 4 with 1-11;
# then EOS. So whether an output reaches 5 tokens depends on the prompt and, for kind 4, on the step.
LENGTHS = {2: (1, 5), 3: (6, 12), 4: (1, 12)}
PROMPTS = [[1, 2], [1, 3], [1, 4]]


def tiny(hf_config, seed=0):
    return mm.init_params(mm.from_hf_config(hf_config), jax.random.key(seed))


def synthetic_batch(rng, n, width=16):
    tokens = np.zeros((n, width + 1), np.int32)
    mask = np.zeros((n, width + 1), np.float32)
    for i in range(n):
        kind = int(rng.integers(2, 5))
        seq = [1, kind, *rng.integers(10, VOCAB, rng.integers(*LENGTHS[kind])).tolist(), EOS]
        tokens[i, :len(seq)] = seq
        mask[i, 2:len(seq)] = 1  # the continuation and its EOS are scored
    return {"tokens": tokens, "loss_mask": mask}


@pytest.fixture(scope="module")
def lm():
    """A tiny GPT-2 trained on the synthetic language (a few seconds)."""
    rng = np.random.default_rng(0)
    state, history = train(TrainConfig(steps=200, learning_rate=3e-3, progress=False), tiny(GPT2),
                           (synthetic_batch(rng, 32) for _ in range(200)))
    assert history["train"][-1]["loss"] < history["train"][0]["loss"] - 0.3
    return state.params


@pytest.fixture(scope="module")
def fitted(lm):
    head, report = fit_classifier(lm, PROMPTS, MinLength(5), eos_id=EOS, samples_per_prompt=64, max_new_tokens=14,
                                  mlp_width=32, progress=False,
                                  train_config=TrainConfig(steps=300, learning_rate=3e-3, warmup_steps=10,
                                                           progress=False))
    return head, report


def perturbed(head, seed=1):
    """The head with every weight moved randomly (fresh heads have zero biases and step rows)."""
    leaves, treedef = jax.tree.flatten(head)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("hf_config, own", [(GPT2, True), (LLAMA, False)], ids=["gpt2-own-table", "llama-lm-table"])
def test_shapes_and_candidate_gather_equal_full_product(hf_config, own):
    params = tiny(hf_config)
    d = params.config.d_model
    head = perturbed(init_classifier(params, attribute="min-length:3", mlp_width=8, max_steps=4,
                                     train_embeddings=own))
    assert isinstance(head, AttributeClassifier) and len(jax.tree.leaves(head)) == 8
    assert ("tokens" in head.weights) == own and (head.table is None) == own
    hidden_BD = jax.random.normal(jax.random.key(2), (3, d))
    candidates_BC = jnp.array([[0, 5, 63, 7], [1, 1, 2, 3], [9, 8, 7, 6]])
    n_B = jnp.array([0, 2, 9])  # 9 is past max_steps: it shares the last step row
    logits = jax.jit(lambda h, x, n: h.logits(x, n))
    full_BV = logits(head, hidden_BD, n_B)
    assert full_BV.shape == (3, VOCAB) and full_BV.dtype == jnp.float32
    logq_BC = jax.jit(lambda h, x, c, n: h(x, c, n))(head, hidden_BD, candidates_BC, n_B)
    expected_BC = jax.nn.log_sigmoid(np.take_along_axis(np.asarray(full_BV), np.asarray(candidates_BC), axis=1))
    np.testing.assert_allclose(logq_BC, expected_BC, rtol=1e-5, atol=1e-5)
    assert float(logq_BC.max()) < 0.0
    # The step count matters, is clipped at max_steps, and a scalar broadcasts over the batch.
    by_step = [np.asarray(logits(head, hidden_BD, jnp.int32(n))) for n in (0, 2, 3, 9)]
    assert not np.allclose(by_step[0], by_step[2])
    np.testing.assert_allclose(by_step[3], by_step[2], rtol=1e-6)
    np.testing.assert_allclose(by_step[1][1], full_BV[1], rtol=1e-5, atol=1e-6)


def test_init_copies_the_lm_embeddings_and_starts_at_the_prior():
    params = tiny(GPT2)
    head = init_classifier(params, prior=0.2)
    embed = np.asarray(params["embed"]["tokens"])
    np.testing.assert_allclose(head.weights["tokens"], embed / np.sqrt(np.mean(embed ** 2)), rtol=1e-5)
    assert float(jnp.mean(head.weights["tokens"] ** 2)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_array_equal(init_classifier(params, train_embeddings=False).table, head.weights["tokens"])
    np.testing.assert_allclose(jax.nn.sigmoid(head.weights["bias"]), 0.2, rtol=1e-5)
    with pytest.raises(ConfigError, match="hidden_layer=5"):
        init_classifier(params, hidden_layer=5)
    with pytest.raises(ConfigError, match="prior=1.0"):
        init_classifier(params, prior=1.0)


def test_prefix_data_rows_match_decoding_hidden_states_and_labels(lm):
    """Row (sample, t) holds the hidden state the search sees before token t and the sample's label;
    the added EOS row at (sample, t) has the same hidden state and the label of the first t tokens."""
    calls = []

    def long_enough(prompt, output):
        calls.append(1)
        return len(output) >= 5

    attribute = Labeller(long_enough, name="long")  # runs through pure_callback inside the jitted labelling
    data = sample_prefix_data(lm, [[1, 4], [3, 1, 2]], attribute, eos_id=EOS, samples_per_prompt=4,
                              max_new_tokens=8, hidden_layer=1, batch_size=8, progress=False)
    assert calls and data.hidden.shape == (len(data), lm.config.d_model)
    step = jax.jit(lambda params, tokens, cache: mm.forward(params, tokens, cache=cache, return_hidden=True))
    for sample in range(8):
        rows = (data.sample == sample) & data.taken
        eos_rows = (data.sample == sample) & ~data.taken
        prompt = [[1, 4], [3, 1, 2]][sample // 4]
        tokens = data.tokens[rows].tolist()
        np.testing.assert_array_equal(data.steps[rows], np.arange(len(tokens)))
        output = tokens[:-1] if tokens[-1] == EOS else tokens
        assert set(data.labels[rows]) == {float(len(output) >= 5)}
        np.testing.assert_array_equal(data.steps[eos_rows], np.arange(len(output)))
        assert set(data.tokens[eos_rows]) <= {EOS}
        np.testing.assert_array_equal(data.labels[eos_rows], np.arange(len(output)) >= 5)
        np.testing.assert_array_equal(data.hidden[eos_rows], data.hidden[rows][:len(output)])
        # Feed the prompt, then the sample token by token through a cache, as a search does.
        out = step(lm, jnp.array([prompt]), mm.init_cache(lm.config, 1, 16))
        for t, token in enumerate(tokens):
            np.testing.assert_allclose(data.hidden[rows][t], out.hidden[1][0, -1], rtol=1e-4, atol=1e-4)
            out = step(lm, jnp.array([[token]]), out.cache)


def test_pipeline_learns_the_length_attribute(fitted):
    _head, report = fitted
    held, eos = report["held_out"], report["held_out_eos"]
    assert report["samples"] == 192 and 0.3 < report["positive_samples"] < 0.7
    assert report["last_loss"] < 0.6 * report["first_loss"]
    assert held["rows"] > 150 and held["accuracy"] > held["majority"] + 0.08
    assert held["accuracy"] > 0.8 and held["loss"] < 0.7 * held["constant_loss"]
    # "EOS here" is decided by the step alone (before 5 tokens: no); the head learns it nearly exactly.
    assert eos["rows"] > 150 and eos["accuracy"] > 0.97


@pytest.fixture(scope="module")
def fresh(lm):
    """New samples (another seed) to check what the head learned."""
    return sample_prefix_data(lm, PROMPTS, MinLength(5), eos_id=EOS, samples_per_prompt=32, max_new_tokens=14,
                              seed=5, progress=False)


def test_head_learned_eos_by_step_and_length_by_prompt(fitted, fresh):
    """EOS before 5 tokens rules MinLength(5) out and after it does not; mid-output rows of
    kind-2 prompts (always short) score low, of kind-3 prompts (always long) high."""
    head, _ = fitted
    q_M = np.exp(np.asarray(head(fresh.hidden, fresh.tokens[:, None], fresh.steps)[:, 0]))
    eos_M = fresh.tokens == EOS
    assert eos_M[fresh.steps < 5].sum() > 20 and eos_M[fresh.steps >= 5].sum() > 20
    early, late = q_M[eos_M & (fresh.steps < 5)], q_M[eos_M & (fresh.steps >= 5)]
    assert early.max() < 0.5 and early.mean() < 0.05  # every one on the right side, most of them sure
    assert late.min() > 0.5 and late.mean() > 0.95
    kind_M = np.array(PROMPTS)[fresh.sample // 32, 1]
    middle_M = ~eos_M & (fresh.steps >= 1) & (fresh.steps <= 3)
    short, long = q_M[middle_M & (kind_M == 2)].mean(), q_M[middle_M & (kind_M == 3)].mean()
    assert short < 0.5 and long > 0.9 and long - short > 0.4


def test_evaluate_reports_the_majority_rate(fitted, fresh):
    scores = evaluate_classifier(fitted[0], fresh)
    positives = float(fresh.labels.mean())
    assert scores["rows"] == len(fresh) and scores["positives"] == pytest.approx(positives)
    assert scores["majority"] == pytest.approx(max(positives, 1 - positives))
    entropy = -positives * np.log(positives) - (1 - positives) * np.log(1 - positives)
    assert scores["constant_loss"] == pytest.approx(entropy, rel=1e-6)
    assert scores["accuracy"] > scores["majority"] + 0.08 and scores["loss"] < 0.6 * scores["constant_loss"]


def test_head_on_the_lm_table_learns_and_saves_small(fresh, lm, tmp_path):
    """train_embeddings=False: E stays the LM's table, only the rest trains and is saved."""
    train_rows, held = fresh.split(0.25, seed=1)
    head = init_classifier(lm, attribute="min-length:5", mlp_width=32, max_steps=14, train_embeddings=False,
                           prior=float(train_rows.labels.mean()))
    before = evaluate_classifier(head, held)
    trained, _history = train_classifier(head, train_rows, TrainConfig(steps=150, learning_rate=3e-3,
                                                                      progress=False))
    after = evaluate_classifier(trained, held)
    assert after["loss"] < 0.7 * before["loss"] and after["accuracy"] > after["majority"] + 0.05
    np.testing.assert_array_equal(trained.table, head.table)  # frozen
    assert float(jnp.abs(head.weights["w_in"]).sum()) > 0  # the input head was not consumed (donated)
    save_classifier(trained, tmp_path / "small")
    with pytest.raises(ConfigError, match="pass params="):
        load_classifier(tmp_path / "small")
    loaded = load_classifier(tmp_path / "small", params=lm)
    assert "tokens" not in loaded.weights
    np.testing.assert_allclose(loaded.logits(held.hidden[:5], held.steps[:5]),
                               trained.logits(held.hidden[:5], held.steps[:5]), rtol=1e-6)


def test_save_load_round_trip(fitted, lm, tmp_path):
    head, report = fitted
    save_classifier(head, tmp_path / "head", metadata={"model": "synthetic", "report": report})
    loaded = load_classifier(tmp_path / "head", params=lm)
    assert loaded.config == head.config and loaded.config.attribute == "min-length:5"
    for name in head.weights:
        np.testing.assert_array_equal(loaded.weights[name], head.weights[name])
    meta = read_classifier_metadata(tmp_path / "head")
    assert meta["metadata"]["model"] == "synthetic"
    assert meta["metadata"]["report"]["held_out"]["accuracy"] == pytest.approx(report["held_out"]["accuracy"])
    check_compatible(loaded, lm)
    with pytest.raises(ConfigError, match="not empty"):
        save_classifier(head, tmp_path / "head")
    save_classifier(perturbed(head), tmp_path / "head", overwrite=True)
    assert not np.allclose(load_classifier(tmp_path / "head").weights["bias"], head.weights["bias"])


def test_a_classifier_for_another_model_is_refused(tmp_path):
    head = init_classifier(tiny(GPT2), mlp_width=4, max_steps=2)
    save_classifier(head, tmp_path / "head")
    for change, field in [({"vocab_size": VOCAB + 1}, "vocab_size"), ({"n_embd": 16}, "d_model"),
                          ({"n_layer": 3}, "n_layers")]:
        other = tiny({**GPT2, **change})
        with pytest.raises(ConfigError, match=f"{field}=.*but this model has {field}="):
            load_classifier(tmp_path / "head", params=other)
        with pytest.raises(ConfigError, match=field):
            check_compatible(head, other)


def test_bad_directories_and_constant_labels(tmp_path, lm):
    with pytest.raises(CheckpointError, match="no attribute classifier"):
        load_classifier(tmp_path)
    with pytest.raises(ConfigError, match="all 6 samples were labelled False"):
        fit_classifier(lm, [[1, 2]], MinLength(9), eos_id=EOS, samples_per_prompt=6, max_new_tokens=8,
                       progress=False)


def test_conditional_beam_search_reaches_the_attribute_beam_search_misses(fitted, lm):
    """Kind-2 prompts continue with 1-4 tokens: beam search ends early, CBS for MinLength(5)
    returns the most likely output it finds with at least 5 tokens, at a lower log-likelihood."""
    head, _ = fitted
    plain = beam_search(lm, [[1, 2]], beams=4, max_new_tokens=12, eos_id=EOS)
    cbs = conditional_beam_search(lm, [[1, 2]], head, beams=4, max_new_tokens=12, eos_id=EOS)
    assert int(plain.lengths[0, 0]) < 5 and bool(plain.finished[0, 0])
    assert bool(cbs.finished[0, 0]) and int(cbs.lengths[0, 0]) >= 5
    assert MinLength(5).check([1, 2], np.asarray(cbs.tokens[0, 0, :int(cbs.lengths[0, 0])]).tolist())
    assert float(cbs.logprobs[0, 0]) < float(plain.logprobs[0, 0])
    # Every kept hypothesis satisfies the attribute (the exact labeller filters them).
    assert all(int(n) >= 5 for n, ok in zip(cbs.lengths[0], cbs.finished[0]) if ok)
    with pytest.raises(ConfigError, match="d_model"):
        conditional_beam_search(tiny({**GPT2, "n_embd": 16}), [[1, 2]], head, eos_id=EOS)
    with pytest.raises(ConfigError, match="not a built-in one"):
        conditional_beam_search(lm, [[1, 2]], AttributeClassifier(
            dataclasses.replace(head.config, attribute="my-labeller"), head.weights), eos_id=EOS)


def run_cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_cbs_train_then_generate_with_every_search(capsys, tiny_gpt2_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Sir Walter\nAnne Elliot was\n\nThe\\nend\n", encoding="utf-8")
    out_dir = tmp_path / "head"
    status, out, err = run_cli(capsys, "cbs-train", tiny_gpt2_dir, "--attribute", "min-length:6", "--prompts", prompts,
                               "--out", out_dir, "--samples-per-prompt", 16, "--max-new-tokens", 10, "--steps", 30,
                               "--mlp-width", 16, "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["prompts"] == 3 and report["report"]["samples"] == 48  # the blank line is skipped
    meta = read_classifier_metadata(out_dir)
    assert meta["config"]["attribute"] == "min-length:6" and meta["metadata"]["model"] == str(tiny_gpt2_dir)
    results = {}
    for search in ("greedy", "beam", "cbs", "exact"):
        extra = ("--classifier", out_dir) if search == "cbs" else ()
        status, out, err = run_cli(capsys, "generate", tiny_gpt2_dir, "Sir Walter", "The", "--search", search,
                                   "--max-new-tokens", 8, "--json", *extra)
        assert status == 0, err
        results[search] = json.loads(out)["generations"]
        assert [g["search"] for g in results[search]] == [search] * 2
    params, tok = mm.load(str(tiny_gpt2_dir)), mm.load_tokenizer(str(tiny_gpt2_dir))
    ids = [tok.encode_for_model(p) for p in ("Sir Walter", "The")]
    direct = beam_search(params, ids, beams=4, max_new_tokens=8, eos_id=tok.eos_id)
    for g, logp in zip(results["beam"], np.asarray(direct.logprobs[:, 0])):
        assert g["logprob"] == pytest.approx(float(logp), abs=1e-4)
    for g in results["cbs"]:  # outputs satisfy min-length:6 (EOS not counted)
        assert g["found"] and g["n_new_tokens"] - g["stopped_at_eos"] >= 6
    for g, b in zip(results["exact"], results["beam"]):  # the exact mode is at least as likely as beam's ending one
        assert g["proved_optimal"] and (not b["stopped_at_eos"] or g["logprob"] >= b["logprob"] - 1e-4)


@pytest.mark.parametrize("case", ["cbs without classifier", "classifier for beam", "bad attribute",
                                  "out exists", "no prompts", "temperature with beam", "attribute with exact"])
def test_cli_errors_are_one_line(capsys, case, tiny_gpt2_dir, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    argv, words = {
        "cbs without classifier": (("generate", tiny_gpt2_dir, "Sir", "--search", "cbs"), "--classifier DIR"),
        "classifier for beam": (("generate", tiny_gpt2_dir, "Sir", "--search", "beam", "--classifier", full),
                                "applies to --search cbs"),
        "bad attribute": (("cbs-train", tiny_gpt2_dir, "--attribute", "longer", "--out", tmp_path / "o"),
                          "unknown attribute 'longer'"),
        "out exists": (("cbs-train", tiny_gpt2_dir, "--attribute", "non-empty", "--out", full), "not empty"),
        "no prompts": (("cbs-train", tiny_gpt2_dir, "--attribute", "non-empty", "--out", tmp_path / "o"),
                       "--prompts FILE"),
        "temperature with beam": (("generate", tiny_gpt2_dir, "Sir", "--search", "beam", "--temperature", 0.5),
                                  "--temperature"),
        "attribute with exact": (("generate", tiny_gpt2_dir, "Sir", "--search", "exact", "--attribute", "non-empty"),
                                 "--attribute applies"),
    }[case]
    status, out, err = run_cli(capsys, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_cli_refuses_a_classifier_of_another_model(capsys, tiny_gpt2_dir, tmp_path):
    save_classifier(init_classifier(tiny({**GPT2, "n_embd": 16}), mlp_width=4, max_steps=2), tmp_path / "head")
    status, _out, err = run_cli(capsys, "generate", tiny_gpt2_dir, "Sir", "--search", "cbs", "--classifier",
                               tmp_path / "head")
    assert status == 2 and "vocab_size=64" in err and "cbs-train" in err
