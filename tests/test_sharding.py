"""Sharding as data: rules, partition specs, and sharded == single-device on 8 CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sharded import MESHES, assert_sharded_equal

import makemost_jax as mm
from makemost_jax.errors import ConfigError
from makemost_jax.sharding import (MeshConfig, activate, cache_shardings, describe_sharding, logical_axes, make_mesh,
                                   param_shardings, partition_spec, shard_batch, shard_params,
                                   state_shardings)

TOKENS = np.random.RandomState(1).randint(2, 101, (8, 12)).astype(np.int32)


def test_eight_simulated_devices_are_available():
    assert len(jax.devices()) == 8 and jax.devices()[0].platform == "cpu"


def test_mesh_config_resolves_and_rejects_bad_sizes():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == (2, 2, 2)
    assert make_mesh(MeshConfig(data=2, fsdp=-1, tensor=1)).shape == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad in (MeshConfig(data=-1, fsdp=-1), MeshConfig(data=3, fsdp=1, tensor=1), MeshConfig(data=0)):
        with pytest.raises(ConfigError):
            bad.resolve(8)


def test_every_parameter_of_every_family_has_logical_axes(hf):
    for folder in (hf.gpt2("g", tie_word_embeddings=False), hf.llama("l"), hf.bert("b"),
                   hf.bert("r", roberta=True)):
        params = mm.load(str(folder))
        axes = jax.tree.leaves(logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))
        shapes = jax.tree.leaves(params.weights)
        assert len(axes) == len(shapes)
        assert all(len(a) == x.ndim for a, x in zip(axes, shapes))
    q_axes = logical_axes(params)["layers"]["attn"]["q"]["kernel"]
    assert q_axes == ("layers", "embed", "q_heads")


def test_partition_spec_follows_rules_and_leaves_uneven_dims_whole():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert partition_spec(("vocab", "embed"), (100, 64), mesh) == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert partition_spec(("vocab", "embed"), (101, 64), mesh) == jax.sharding.PartitionSpec(None, "fsdp")
    assert partition_spec(("batch", None), (8, 3), mesh) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert partition_spec(("batch", None), (2, 3), mesh) == jax.sharding.PartitionSpec("data", None)
    custom = (("embed", "tensor"), ("q_heads", None))  # rules are data: swap what is split
    assert partition_spec(("embed", "q_heads"), (64, 64), mesh, custom) == jax.sharding.PartitionSpec(
        "tensor", None)


def test_fsdp_holds_an_eighth_of_gpt2_small_per_device():
    cfg = mm.from_hf_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                             "vocab_size": 50257, "n_positions": 1024})
    params = jax.eval_shape(lambda: mm.init_params(cfg, jax.random.key(0)))  # shapes only
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params.weights))
    whole = describe_sharding(params, make_mesh(MeshConfig(data=8)))["bytes_per_device"]
    split = describe_sharding(params, make_mesh(MeshConfig(data=1, fsdp=8)))["bytes_per_device"]
    assert whole == total
    # Only the 1-D norm and bias vectors stay whole: a fraction of a percent of GPT-2 small.
    assert total / 8 <= split < 1.01 * total / 8


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_forward_logits_are_the_same_on_every_mesh(hf, family):
    params = mm.load(str(getattr(hf, family)(tokenizer=False)))
    assert_sharded_equal(lambda p, b: mm.forward(p, b["tokens"]).logits, params, {"tokens": TOKENS})


def _lm_loss(params, batch):
    logits = mm.forward(params, batch["tokens"][:, :-1]).logits
    return -mm.token_logprobs(logits, batch["tokens"][:, 1:]).mean()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_step_loss_and_gradients_are_the_same_on_every_mesh(hf, family):
    params = mm.load(str(getattr(hf, family)(tokenizer=False)))
    tx = optax.sgd(0.1, momentum=0.9)  # linear in the gradients (Adam's first step is ~sign(g))

    def step(p, batch):
        loss, grads = jax.value_and_grad(_lm_loss)(p, batch)
        updates, _ = tx.update(grads, tx.init(p), p)
        return loss, grads, optax.apply_updates(p, updates)

    loss, _, _ = assert_sharded_equal(step, params, {"tokens": TOKENS}, atol=2e-5)
    assert 3.0 < float(loss) < 6.0  # ~ln(101) for a random model


def test_optimizer_state_takes_the_parameter_shardings(tiny_llama_dir):
    params = mm.load(str(tiny_llama_dir))
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    p_shard = param_shardings(params, mesh)
    opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
    o_shard = state_shardings(opt_state, p_shard)
    mu_q = o_shard[0].mu.weights["layers"]["attn"]["q"]["kernel"]
    assert mu_q == p_shard.weights["layers"]["attn"]["q"]["kernel"]
    assert mu_q.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert o_shard[0].count.spec == jax.sharding.PartitionSpec()


def test_decoding_with_a_sharded_cache_equals_unsharded(tiny_llama_dir):
    params = mm.load(str(tiny_llama_dir))
    batch = {"tokens": TOKENS, "cache": mm.init_cache(params.config, TOKENS.shape[0], 16)}

    def place(b, mesh):  # rows over the batch axes, cached heads over tensor
        return {"tokens": shard_batch(b["tokens"], mesh),
                "cache": jax.device_put(b["cache"], cache_shardings(b["cache"], mesh))}

    def prefill_then_step(p, b):
        out = mm.forward(p, b["tokens"][:, :-1], cache=b["cache"])
        return mm.forward(p, b["tokens"][:, -1:], cache=out.cache).logits

    assert_sharded_equal(prefill_then_step, params, batch, meshes=MESHES[::2], place_batch=place)


def test_shard_params_places_weights_as_the_rules_say(tiny_gpt2_dir):
    params = shard_params(mm.load(str(tiny_gpt2_dir)), make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    up = params.weights["layers"]["mlp"]["up"]["kernel"]  # (L, D, F) = (2, 32, 128)
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 16, 64)
    assert float(jnp.abs(up).sum()) > 0


def test_activate_adds_activation_constraints_and_keeps_results(tiny_gpt2_dir):
    params = mm.load(str(tiny_gpt2_dir))
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))

    def logits(p, t):
        return mm.forward(p, t).logits

    assert "sharding_constraint" not in str(jax.make_jaxpr(logits)(params, TOKENS))
    with activate(mesh):
        assert "sharding_constraint" in str(jax.make_jaxpr(logits)(params, TOKENS))
        got = jax.jit(logits)(shard_params(params, mesh), shard_batch(TOKENS, mesh))
    np.testing.assert_allclose(got, logits(params, TOKENS), atol=1e-5, rtol=1e-5)
