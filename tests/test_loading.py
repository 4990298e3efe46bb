"""Streamed loading straight onto a mesh: each device's slice read from the files, in the checkpoint's dtype.

A bf16 Llama saved in several safetensors shards loads onto fsdp x tensor meshes of 8
simulated CPU devices; every parameter's addressable shards have the shapes the rules
ask for and equal the one-device load bit for bit, and the files are read exactly once
(not once per device). GGUF (quantised, read block-aligned per slice) and `.bin`
(memory-mapped) take the same path. Two processes each read only their share. Bad input
fails before anything is read or allocated.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf_writer import Q, write_gguf

import makemost_jax as mm
from makemost_jax.checkpoints.hf import read_hf_checkpoint
from makemost_jax.checkpoints.lazy import bytes_read
from makemost_jax.errors import CheckpointError, ConfigError
from makemost_jax.sharding import MeshConfig, make_mesh, param_shardings

WORKER = str(Path(__file__).with_name("_load_worker.py"))
MESHES = [MeshConfig(data=1, fsdp=4, tensor=2), MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=1, fsdp=8)]


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.2)
    cfg.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    """A bf16 Llama in several safetensors shards (with an index), as big checkpoints come."""
    folder = tmp_path_factory.mktemp("bf16_llama")
    _llama().to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return folder


@pytest.fixture(scope="module")
def reference(bf16_dir):
    return mm.load(bf16_dir)


def _stored_bytes(folder) -> int:
    return sum(t.nbytes for t in read_hf_checkpoint(folder)[1].values())


def test_bf16_is_kept_and_float32_widens_exactly(bf16_dir, reference):
    assert reference.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(reference))
    wide = mm.load(bf16_dir, dtype="float32")
    for a, b in zip(jax.tree.leaves(wide), jax.tree.leaves(reference)):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float32))


@pytest.mark.parametrize("config", MESHES, ids=str)
def test_load_onto_mesh_gives_the_rules_shards_bit_for_bit(bf16_dir, reference, config):
    mesh = make_mesh(config)
    before = bytes_read()
    params = mm.load(bf16_dir, mesh=mesh)
    # Every byte read once: replicas share a read and no device reads another's slice.
    assert bytes_read() - before == _stored_bytes(bf16_dir)
    wanted = param_shardings(reference, mesh)
    split_two_ways = 0
    for leaf, full, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(reference),
                                    jax.tree.leaves(wanted.weights)):
        assert leaf.dtype == jnp.bfloat16 and leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        host = np.asarray(full)
        for shard in leaf.addressable_shards:
            assert shard.data.shape == sharding.shard_shape(leaf.shape)
            np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
        split_two_ways += sum(p is not None for p in sharding.spec) == 2
    assert split_two_ways >= (4 if config.tensor > 1 else 0)
    if config.tensor > 1:  # a (D, H*K) kernel is cut between heads: 4 heads of 16 over 2 devices
        assert params["layers"]["attn"]["q"]["kernel"].sharding.shard_shape((3, 64, 64))[-1] == 32


def test_tensor_axis_never_splits_inside_a_head(tmp_path):
    # 6 heads of 8 = 48 columns: 4 divides 48 but not 6, so the q kernel stays whole on "tensor".
    folder = tmp_path / "m"
    _llama(hidden_size=48, num_attention_heads=6, num_key_value_heads=2).save_pretrained(folder)
    params = mm.load(folder)
    spec = param_shardings(params, make_mesh(MeshConfig(data=2, tensor=4))).weights["layers"]["attn"]["q"]["kernel"]
    assert spec.spec[-1] is None
    spec = param_shardings(params, make_mesh(MeshConfig(data=4, tensor=2))).weights["layers"]["attn"]["q"]["kernel"]
    assert spec.spec[-1] == "tensor"


def test_quantised_gguf_loads_onto_a_mesh_block_aligned(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, _llama(), "llama", qtype=Q.Q8_0)
    one = mm.load(path)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))  # fsdp cuts 64-wide rows into 16: half a Q8_0 block
    sharded = mm.load(path, mesh=mesh)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one)):
        assert a.dtype == jnp.float32 and len(a.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.array([[1, 5, 9, 33]])
    # Weights equal bit for bit; the sharded matmuls sum in another order.
    np.testing.assert_allclose(mm.forward(sharded, tokens).logits, mm.forward(one, tokens).logits, atol=2e-5)


def test_memory_mapped_bin_loads_onto_a_mesh(tmp_path, bf16_dir, reference):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((bf16_dir / "config.json").read_text())
    state = {k: torch.from_numpy(np.asarray(v).view(np.int16)).view(torch.bfloat16)
             for k, v in read_hf_checkpoint(bf16_dir)[1].items()}
    torch.save(state, folder / "pytorch_model.bin")
    params = mm.load(folder, mesh=make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _fails_before_reading(call, error, *names):
    before, live = bytes_read(), len(jax.live_arrays())
    with pytest.raises(error) as info:
        call()
    for name in names:
        assert name in str(info.value)
    assert bytes_read() == before and len(jax.live_arrays()) == live
    return info.value


def test_bad_checkpoints_fail_before_any_read_or_allocation(tmp_path, bf16_dir):
    import shutil

    broken = tmp_path / "missing_shard"
    shutil.copytree(bf16_dir, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    _fails_before_reading(lambda: mm.load(broken), CheckpointError, victim.name, "missing")

    wrong = tmp_path / "wrong_shape"
    shutil.copytree(bf16_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    _fails_before_reading(lambda: mm.load(wrong, mesh=make_mesh(MeshConfig(fsdp=8))), CheckpointError,
                          "mlp.up_proj.weight", "(96, 64)", "(80, 64)")

    odd = tmp_path / "odd_dtype"
    shutil.copytree(bf16_dir, odd)
    shard = sorted(odd.glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    start = raw.index(b'"BF16"')
    raw[start:start + 6] = b'"F4X4"'  # same length: only the dtype name changes
    shard.write_bytes(bytes(raw))
    _fails_before_reading(lambda: mm.load(odd), CheckpointError, shard.name, "F4X4")

    _fails_before_reading(lambda: mm.load(bf16_dir, mesh=make_mesh(MeshConfig(data=1, tensor=8))), ConfigError,
                          "'tensor'", "4 attention heads")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_each_read_only_their_share(tmp_path, bf16_dir):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, WORKER, "--port", str(port), "--process-id", str(i),
                               "--dir", str(bf16_dir), "--out", str(tmp_path / f"p{i}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    total = _stored_bytes(bf16_dir)
    for r in results:
        assert r["equal"] and r["dtype"] == "bfloat16" and r["total"] == total
        # Its own slices (replicated norms included) and nothing else: fsdp=4 x tensor=2 over two
        # processes of 4 devices gives each about half of every split weight.
        assert r["share"] <= r["read"] <= 1.1 * r["share"]
        assert r["share"] < 0.6 * total


def test_load_reads_an_orbax_params_folder_onto_another_mesh(tmp_path, bf16_dir, reference):
    saved = mm.save_orbax(mm.load(bf16_dir, mesh=make_mesh(MeshConfig(data=1, fsdp=8))), tmp_path / "orbax")
    params = mm.load(saved, mesh=make_mesh(MeshConfig(data=1, fsdp=2, tensor=4)))
    assert params.config == reference.config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        assert a.dtype == jnp.bfloat16 and len(a.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
