"""One of two JAX processes (4 simulated CPU devices each) loading a checkpoint onto one 8-device mesh.

    python tests/_load_worker.py --port 12345 --process-id 0 --dir CKPT --out p0.json

Writes what this process read from the files (`bytes_read`), its share (`process_bytes`
of the loaded params), the checkpoint's total bytes, and whether every addressable shard
equals the same slice of a one-device load in this process.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import makemost_jax as mm
from makemost_jax.checkpoints.lazy import bytes_read
from makemost_jax.sharding import MeshConfig, make_mesh, process_bytes
from makemost_jax.training import maybe_initialize_distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    maybe_initialize_distributed(f"127.0.0.1:{args.port}", num_processes=2, process_id=args.process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4

    before = bytes_read()
    params = mm.load(args.dir, mesh=make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
    jax.block_until_ready(params)
    read = bytes_read() - before

    reference = mm.load(args.dir)  # every tensor, on this process's first device
    equal = all(
        np.array_equal(np.asarray(shard.data), np.asarray(full)[shard.index])
        for leaf, full in zip(jax.tree.leaves(params), jax.tree.leaves(reference))
        for shard in leaf.addressable_shards)
    total = sum(x.nbytes for x in jax.tree.leaves(reference))
    with open(args.out, "w") as f:
        json.dump({"read": read, "share": process_bytes(params), "total": total, "equal": equal,
                   "dtype": str(params.dtype)}, f)


if __name__ == "__main__":
    main()
