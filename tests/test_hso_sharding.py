"""HSO, few-shot and the model's other sharded paths on (data, fsdp, tensor) meshes: no full rematerialization.

XLA's SPMD partitioner, when it cannot turn one sharding into another, replicates the
whole array and logs "Involuntary full rematerialization" from C++ (stderr, not a
Python warning). The computations here are therefore traced and run in a subprocess on
8 simulated CPU devices, under `sharding.activate(mesh)` with the parameters sharded by
the rules; its stderr must carry no such line, and every result must equal the
one-device result (atol/rtol 1e-5, as in tests/sharded.py).

The cause this guards against: the token (and learned position / type) embedding is a
gather from a table whose width D is split over fsdp, so the looked-up rows came out
split over D, while the blocks want them split over the batch axes (data x fsdp). The
partitioner could not go from one to the other on a mesh with both data and fsdp
axes, in every forward (HSO's segment loop, few-shot, decoding, training and its
gradient alike). `models.model.embed` now gathers the table's width whole first.

Run by hand: `python tests/test_hso_sharding.py FOLDER` (a Llama folder with a tokenizer)
prints the worker's JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

MESHES = ((2, 2, 2), (1, 4, 2))  # (data, fsdp, tensor)
PATHS = ("hso", "fewshot", "forward", "train", "decode")
REMAT = "involuntary full rematerialization"


# ----------------------------------------------------------------------------- the worker (subprocess)

def _worker(folder: str) -> dict:
    """One-device and sharded results of every path: {path: {mesh: {"equal", "max_abs_diff", "finite"}}}."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import makemost_jax as mm
    from makemost_jax import training
    from makemost_jax.hso import HSOConfig, fewshot, lm_segments, run_segments
    from makemost_jax.hso.lm import Segments
    from makemost_jax.sharding import MeshConfig, activate, cache_shardings, make_mesh, shard_batch, shard_params

    params = mm.load(folder)
    tokenizer = mm.load_tokenizer(folder)
    tokens = np.random.default_rng(0).integers(2, params.config.vocab_size, (4, 17)).astype(np.int32)
    segments = dataclasses.asdict(lm_segments(tokens, np.full(4, 17), 4))
    hso = HSOConfig(segment=4, cache_size=8, lr=3e-2)

    def hso_run(p, seg):
        # NLLs, not states: Adam moves an element by ~lr * sign(grad), and a ~0 gradient may flip sign under
        # another summation order without changing any score (see test_hso.py).
        nll_KB, finite_K, _ = run_segments(p, Segments(**seg), hso.hyper(), cache_size=hso.cache_size)
        return nll_KB, finite_K

    def hso_path(p, mesh):
        seg = segments if mesh is None else jax.device_put(
            segments, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"))))
        return jax.jit(hso_run)(p, seg)

    demos = [{"text": "Good.", "label": "positive"}, {"text": "Bad!", "label": "negative"},
             {"text": "Fine", "label": "positive"}]
    queries = ["Nice.", "Awful", "ok", "Meh."]

    def fewshot_path(p, mesh):
        fmt = fewshot.PromptFormat()
        cache = fewshot.demonstrations_cache(p, tokenizer, demos, fmt, HSOConfig(lr=3e-2), width=48).cache()
        return fewshot.label_logprobs(p, tokenizer, cache, queries, fmt)

    def forward_path(p, mesh):
        t = tokens if mesh is None else shard_batch(tokens, mesh)
        return jax.jit(lambda p, t: mm.forward(p, t).logits)(p, t)

    def train_path(p, mesh):
        # SGD with momentum: linear in the gradients (Adam's first step is ~sign(g), see above).
        config = training.TrainConfig(steps=1, optimizer=optax.sgd(0.1, momentum=0.9), progress=False)
        state = training.init_state(jax.tree.map(jnp.copy, p) if mesh is None else p, config, mesh=mesh)
        batch = {"tokens": tokens if mesh is None else shard_batch(tokens, mesh)}
        state, metrics = training.make_train_step(config, state, mesh=mesh)(state, batch, None)
        return metrics["loss"], state.params.weights

    def decode_path(p, mesh):
        cache = mm.init_cache(params.config, tokens.shape[0], 20)
        t = tokens
        if mesh is not None:
            t, cache = shard_batch(tokens, mesh), jax.device_put(cache, cache_shardings(cache, mesh))

        def prefill_then_step(p, t, cache):
            out = mm.forward(p, t[:, :-1], cache=cache)
            return mm.forward(p, t[:, -1:], cache=out.cache).logits

        return jax.jit(prefill_then_step)(p, t, cache)

    paths = {"hso": hso_path, "fewshot": fewshot_path, "forward": forward_path, "train": train_path,
             "decode": decode_path}
    report = {}
    for name, path in paths.items():
        start = time.perf_counter()
        expected = jax.tree.leaves(jax.device_get(path(params, None)))
        report[name] = {}
        for sizes in MESHES:
            mesh = make_mesh(MeshConfig(*sizes))
            sys.stdout.flush()
            print(f"=== {name} {sizes}", file=sys.stderr, flush=True)  # attributes XLA's log lines to a path
            with activate(mesh):
                got = jax.tree.leaves(jax.device_get(path(shard_params(params, mesh), mesh)))
            assert len(got) == len(expected)
            worst, equal = 0.0, True
            for g, e in zip(got, expected):
                g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
                equal &= bool(np.allclose(g, e, atol=1e-5, rtol=1e-5))
                worst = max(worst, float(np.max(np.abs(g - e))) if g.size else 0.0)
            report[name][str(sizes)] = {"equal": equal, "max_abs_diff": worst,
                                        "finite": bool(all(np.isfinite(np.asarray(x, np.float64)).all()
                                                           for x in expected))}
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return report


# ----------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def sharded_run(tiny_llama_dir):
    """(report, {path: XLA log lines under it}) of one worker process over every path and mesh."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, str(tiny_llama_dir)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines_by_path, current = {name: [] for name in ("setup", *PATHS)}, "setup"
    for line in proc.stderr.splitlines():
        if line.startswith("=== "):
            current = line.split()[1]
        else:
            lines_by_path[current].append(line)
    return json.loads(proc.stdout.strip().splitlines()[-1]), lines_by_path


def _remat_lines(lines):
    return [line for line in lines if REMAT in line.lower()]


@pytest.mark.parametrize("path", PATHS)
def test_sharded_path_has_no_full_rematerialization_and_equals_one_device(sharded_run, path):
    report, lines_by_path = sharded_run
    remat = _remat_lines(lines_by_path[path])
    assert not remat, f"{path}: XLA replicated whole arrays to reshard them:\n" + "\n".join(remat)[:4000]
    for mesh, result in report[path].items():
        assert result["finite"], f"{path}: the one-device result is not finite"
        assert result["equal"], f"{path} on mesh (data, fsdp, tensor)={mesh}: max |sharded - one device| = " \
                                f"{result['max_abs_diff']:.3g}"


def test_nothing_outside_the_paths_was_rematerialized(sharded_run):
    _, lines_by_path = sharded_run
    assert not _remat_lines(lines_by_path["setup"]), "\n".join(_remat_lines(lines_by_path["setup"]))[:4000]


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))
