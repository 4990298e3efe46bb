"""The sharded-equality harness: a computation on every mesh equals the one-device result.

Method tests (HSO, decoding, recurrence, NAR) reuse it: give a function of
(params, batch) and the unsharded inputs; it shards params by the logical-axis rules
and the batch over the batch axes, runs the function under `jax.jit` on each mesh of
8 simulated CPU devices (set in conftest.py), and compares every output leaf.

Example (in a test):
    from sharded import assert_sharded_equal
    assert_sharded_equal(lambda p, b: mm.forward(p, b["tokens"]).logits, params, {"tokens": tokens})
"""

from __future__ import annotations

import jax
import numpy as np

from makemost_jax.sharding import MeshConfig, make_mesh, shard_batch, shard_params

MESHES = (
    MeshConfig(data=8),
    MeshConfig(data=1, fsdp=8),
    MeshConfig(data=1, tensor=8),
    MeshConfig(data=2, fsdp=2, tensor=2),
    MeshConfig(data=1, fsdp=4, tensor=2),
)


def assert_sharded_equal(fn, params, batch, meshes=MESHES, atol=1e-5, rtol=1e-5, place_batch=None):
    """Assert `jit(fn)(params, batch)` is the same on every mesh as on one device.

    `place_batch(batch, mesh)` overrides how the batch is placed (default: rows split
    over data x fsdp). Returns the one-device result.
    """
    if len(jax.devices()) < 8:
        raise RuntimeError("the sharded harness needs 8 devices; run under tests/conftest.py")
    expected = jax.device_get(jax.jit(fn)(params, batch))
    for config in meshes:
        mesh = make_mesh(config)
        placed = (place_batch or shard_batch)(batch, mesh)
        got = jax.device_get(jax.jit(fn)(shard_params(params, mesh), placed))
        flat_expected, flat_got = jax.tree.leaves(expected), jax.tree.leaves(got)
        assert len(flat_expected) == len(flat_got)
        for e, g in zip(flat_expected, flat_got):
            np.testing.assert_allclose(g, e, atol=atol, rtol=rtol, err_msg=f"mesh {config}")
    return expected
