"""Subprocess entry points for tests/test_training.py, plus the tiny model and data they share.

Two commands (each writes its results to --out as .npz):

    python tests/_train_worker.py run --dir CKPT --steps 24 --every 4 --out result.npz [--sleep 0.05]
        train the tiny GPT-2 with checkpoints; resumes when CKPT has one.
    python tests/_train_worker.py dist --port 12345 --process-id 0 --out p0.npz
        one of two processes (2 CPU devices each) running sharded training steps together.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

VOCAB = 101
HF_CONFIG = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": 64}


class PatternData:
    """Deterministic, resumable batches of a learnable sequence: x[t+1] = (7 x[t] + 3) mod V.

    Batch i depends only on (seed, i); `state()` / `restore()` hold i. With `rows`, only
    those rows of each global batch are returned (one process's share).
    """

    def __init__(self, batch_size=8, length=16, seed=0, rows=None, sleep=0.0):
        self.batch_size, self.length, self.seed, self.rows, self.sleep = batch_size, length, seed, rows, sleep
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        starts = np.random.default_rng((self.seed, self.position)).integers(0, VOCAB, self.batch_size)
        tokens = np.empty((self.batch_size, self.length + 1), np.int32)
        tokens[:, 0] = starts
        for t in range(self.length):
            tokens[:, t + 1] = (7 * tokens[:, t] + 3) % VOCAB
        self.position += 1
        if self.sleep:
            time.sleep(self.sleep)  # slows the run so a test can kill it mid-way
        return {"tokens": tokens if self.rows is None else tokens[self.rows]}

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = state["position"]


def tiny_params(seed=0):
    import jax

    import makemost_jax as mm

    return mm.init_params(mm.from_hf_config(HF_CONFIG), jax.random.key(seed))


def flat_arrays(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def run(args):
    from makemost_jax.training import TrainConfig, train

    data = PatternData(sleep=args.sleep)
    config = TrainConfig(steps=args.steps, learning_rate=1e-2, checkpoint_dir=args.dir,
                         checkpoint_every=args.every, keep=args.keep, progress=False)
    state, history = train(config, tiny_params(), data)
    np.savez(args.out, start_step=history["start_step"], position=data.position,
             **{"param" + k: v for k, v in flat_arrays(state.params).items()})


def dist(args):
    import jax
    import optax

    from makemost_jax.sharding import MeshConfig, make_mesh
    from makemost_jax.training import TrainConfig, maybe_initialize_distributed, train

    assert maybe_initialize_distributed(f"127.0.0.1:{args.port}", 2, args.process_id)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = make_mesh(MeshConfig(data=-1))
    half = 4  # each process feeds its 4 of the 8 global rows
    data = PatternData(rows=slice(args.process_id * half, (args.process_id + 1) * half))
    # SGD, as in the test's single-process reference (see SGD in test_training.py).
    config = TrainConfig(steps=2, optimizer=optax.sgd(0.1), checkpoint_dir=args.dir, checkpoint_every=1,
                         progress=False)
    state, history = train(config, tiny_params(), data, mesh=mesh)
    out = {"loss": np.array([r["loss"] for r in history["train"]]), "position": data.position}
    if args.process_id == 0:
        out.update({"param" + k: v for k, v in flat_arrays(state.params).items()})
    np.savez(args.out, **out)
    jax.distributed.shutdown()


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--every", type=int, required=True)
    p.add_argument("--keep", type=int, default=10)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--out", required=True)
    p = sub.add_parser("dist")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    {"run": run, "dist": dist}[args.command](args)


if __name__ == "__main__":
    main()
