"""The shared training loop: optimisation, accumulation, mixed precision, checkpoints that
resume exactly (after a real SIGKILL, after corruption, onto another mesh), two processes.

The tiny model and the resumable data iterator live in `_train_worker.py`, which is also
the subprocess entry point for the kill and two-process tests.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_worker import PatternData, flat_arrays, tiny_params

import makemost_jax as mm
from makemost_jax.errors import CheckpointError
from makemost_jax.training import (NonFiniteLossError, TrainConfig, checkpoint_manager, evaluate, init_state,
                                   lm_loss, make_train_step, restore_latest, train)

WORKER = str(Path(__file__).with_name("_train_worker.py"))

# When one array read of a damaged checkpoint fails, Orbax abandons its other pending
# reads; Python reports each ("Exception ignored in: <coroutine ...>", or a callback into
# the closed event loop) whenever it is collected, often during a later test. Harmless.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put"
                               ":pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:Exception ignored in. None:pytest.PytestUnraisableExceptionWarning"),
]
needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "learning_rate": 1e-2, "progress": False, **changes})


# Equality tests across accumulation, remat and sharding use plain SGD: Adam divides by
# the gradient's scale, so on parameters whose true gradient is zero (GPT-2's key bias:
# softmax ignores it) it would turn float32 rounding noise into full-size updates.
SGD = optax.sgd(0.1)


def assert_trees_equal(a, b):
    fa, fb = flat_arrays(a), flat_arrays(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.array_equal(fa[k], fb[k]), k


def step_dirs(directory) -> list[int]:
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


# --- optimisation --------------------------------------------------------------------


def test_loss_decreases_on_a_learnable_pattern():
    state, history = train(config(steps=40, learning_rate=3e-2, warmup_steps=4, log_every=5), tiny_params(),
                           PatternData())
    losses = [r["loss"] for r in history["train"]]
    assert int(state.step) == 40 and len(losses) == 40
    assert losses[0] > 4.4  # about ln(101): an untrained model
    assert np.mean(losses[-5:]) < 1.6  # measured 1.22 (ln(101) = 4.62 before training)
    assert all("tokens_per_s" in history["train"][i] for i in (4, 9, 39))
    lr = [r["lr"] for r in history["train"][:5]]  # linear warmup over 4 steps, then the peak
    np.testing.assert_allclose(lr, [0.0, 7.5e-3, 1.5e-2, 2.25e-2, 3e-2], rtol=1e-6)


def test_grad_accumulation_equals_one_big_batch():
    """Token-weighted microbatches give the big batch's update, even with uneven masks."""
    batch = next(PatternData(batch_size=8))
    batch["loss_mask"] = (np.random.default_rng(0).random(batch["tokens"].shape) < 0.6).astype(np.float32)
    results = []
    for accum in (1, 2):
        cfg = config(grad_accum=accum, optimizer=SGD)
        state = init_state(tiny_params(), cfg)
        state, metrics = make_train_step(cfg, state)(state, batch, None)
        results.append((state, metrics))
    (one, m1), (two, m2) = results
    assert float(m1["tokens"]) == float(m2["tokens"]) == batch["loss_mask"][:, 1:].sum()
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    for k, v in flat_arrays(one.params).items():
        np.testing.assert_allclose(v, flat_arrays(two.params)[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_bfloat16_compute_keeps_float32_master_weights():
    batch = next(PatternData())
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config(compute_dtype=dtype)
        state = init_state(tiny_params(), cfg)
        out[dtype] = make_train_step(cfg, state)(state, batch, None)
    state, metrics = out["bfloat16"]
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype("float32")}
    assert abs(float(metrics["loss"]) - float(out["float32"][1]["loss"])) < 0.02
    assert float(metrics["loss"]) != float(out["float32"][1]["loss"])  # bf16 really ran


def test_remat_gives_the_same_update():
    batch = next(PatternData())
    params = {}
    for remat in ("none", "full", "dots_saveable"):
        cfg = config(remat=remat, optimizer=SGD)
        state = init_state(tiny_params(), cfg)
        params[remat] = make_train_step(cfg, state)(state, batch, None)[0].params
    for remat in ("full", "dots_saveable"):
        for k, v in flat_arrays(params[remat]).items():
            np.testing.assert_allclose(v, flat_arrays(params["none"])[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_trainable_adapter_with_a_frozen_model():
    """Only the adapter (a bigram logit table) is trained; the LM is a frozen input."""
    def adapter_loss(adapter, batch, *, rng, frozen):
        tokens = jnp.asarray(batch["tokens"])
        logits = mm.forward(frozen, tokens[:, :-1]).logits + adapter["bigram"][tokens[:, :-1]]
        return -mm.token_logprobs(logits, tokens[:, 1:]).mean()

    model = tiny_params()
    adapter = {"bigram": jnp.zeros((model.config.vocab_size, model.config.vocab_size))}
    state, history = train(config(steps=15, learning_rate=0.1), adapter, PatternData(), loss_fn=adapter_loss,
                           frozen=model)
    assert set(flat_arrays(state.params)) == {"['bigram']"}
    assert history["train"][-1]["loss"] < history["train"][0]["loss"] - 0.3
    assert_trees_equal(model, tiny_params())  # the frozen model is untouched


def test_periodic_evaluation():
    held_out = [next(PatternData(seed=1)) for _ in range(2)]
    state, history = train(config(steps=8, eval_every=4), tiny_params(), PatternData(),
                           eval_fn=lambda params: evaluate(params, held_out))
    assert [r["step"] for r in history["eval"]] == [4, 8]
    assert history["eval"][1]["loss"] < history["eval"][0]["loss"]
    assert history["eval"][0]["tokens"] == 2 * 8 * 16
    assert evaluate(state.params, held_out)["loss"] == pytest.approx(history["eval"][1]["loss"], rel=1e-6)


def test_nan_loss_names_the_step_and_is_never_checkpointed(tmp_path):
    class Poisoned(PatternData):
        def __next__(self):
            batch = super().__next__()
            batch["scale"] = np.full(len(batch["tokens"]), np.nan if self.position == 3 else 1.0, np.float32)
            return batch

    def loss_fn(params, batch, *, rng, frozen):
        loss, metrics = lm_loss(params, batch)
        return loss * batch["scale"][0], metrics

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3"):
        train(config(checkpoint_dir=str(tmp_path), checkpoint_every=1), tiny_params(), Poisoned(), loss_fn=loss_fn)
    assert step_dirs(tmp_path) == [1, 2]


def test_bad_settings_are_named():
    from makemost_jax.errors import ConfigError, InputError

    with pytest.raises(ConfigError, match="remat='everything'"):
        TrainConfig(remat="everything")
    with pytest.raises(ConfigError, match="checkpoint_every=5 needs a checkpoint_dir"):
        TrainConfig(checkpoint_every=5)
    cfg = config(grad_accum=3)
    state = init_state(tiny_params(), cfg)
    with pytest.raises(InputError, match="grad_accum=3"):
        make_train_step(cfg, state)(state, next(PatternData(batch_size=8)), None)


# --- checkpoints ----------------------------------------------------------------------


def run_worker(*args, **popen):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_kill_and_resume_reaches_the_uninterrupted_result(tmp_path):
    """A run SIGKILLed mid-way and restarted ends bit-identical to one never stopped."""
    steps, every = 24, 4
    reference = run_worker("run", "--dir", tmp_path / "ref", "--steps", steps, "--every", every,
                           "--out", tmp_path / "ref.npz")
    resumed_out = tmp_path / "resumed.npz"
    command = ("run", "--dir", tmp_path / "ck", "--steps", steps, "--every", every, "--out", resumed_out,
               "--sleep", 0.15)
    victim = run_worker(*command)
    deadline = time.monotonic() + 240
    while not (tmp_path / "ck").is_dir() or len(step_dirs(tmp_path / "ck")) < 2:
        assert victim.poll() is None, "the run ended before it could be killed: " + victim.stdout.read()[-2000:]
        assert time.monotonic() < deadline, "no second checkpoint appeared"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    saved = step_dirs(tmp_path / "ck")
    assert not resumed_out.exists() and max(saved) < steps

    finish(run_worker(*command[:-2]))
    finish(reference)
    ref, got = np.load(tmp_path / "ref.npz"), np.load(resumed_out)
    assert every * 2 <= int(got["start_step"]) < steps and int(got["start_step"]) % every == 0
    assert int(ref["start_step"]) == 0
    assert int(got["position"]) == int(ref["position"]) == steps
    params = [k for k in ref.files if k.startswith("param")]
    assert params and set(params) == {k for k in got.files if k.startswith("param")}
    for k in params:
        assert np.array_equal(ref[k], got[k]), k


def damage(step_dir: Path, how: str):
    files = [Path(f) for f in glob.glob(f"{step_dir}/**", recursive=True) if os.path.isfile(f)]
    biggest = max(files, key=lambda f: f.stat().st_size)
    if how == "truncate":
        os.truncate(biggest, biggest.stat().st_size // 2)
    elif how == "delete":
        biggest.unlink()
    else:  # flip one byte that Orbax reads back as a changed value without complaint: only the checksums see it
        import orbax.checkpoint as ocp

        def read():
            return jax.tree.leaves(ocp.StandardCheckpointer().restore(step_dir / "state"))

        # The arrays are stored compressed, so a fixed byte (once the middle of the biggest file) can land where
        # Orbax reports the damage itself (seen once, in a parallel run), which is not what this case tests.
        intact = read()
        for path in sorted((f for f in files if f.parent.name == "d"), key=lambda f: -f.stat().st_size):
            original = path.read_bytes()
            for offset in range(len(original) // 2, len(original), 4099):
                data = bytearray(original)
                data[offset] ^= 0xFF
                path.write_bytes(bytes(data))
                try:
                    changed = any(not np.array_equal(a, b) for a, b in zip(read(), intact))
                except Exception:  # noqa: BLE001 - a read error: try the next byte
                    changed = False
                if changed:
                    return
                path.write_bytes(original)
        raise AssertionError(f"no flipped byte in {step_dir} was read back as a changed value without an error")


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_corrupted_latest_checkpoint_falls_back_to_the_previous(tmp_path, how):
    cfg = config(steps=6, checkpoint_dir=str(tmp_path), checkpoint_every=2, keep=5)
    reference, _ = train(cfg, tiny_params(), PatternData())
    assert step_dirs(tmp_path) == [2, 4, 6]
    damage(tmp_path / "6", how)

    data = PatternData()
    with pytest.warns(UserWarning) as caught:
        state, history = train(cfg, tiny_params(), data)
    messages = [str(w.message) for w in caught if "checkpoint" in str(w.message)]  # ours, not libraries'
    assert messages[0].startswith(f"checkpoint {tmp_path / '6'} could not be restored"), messages
    if how == "flip":  # Orbax reads the flipped bytes without complaint; the saved checksums catch them
        assert "does not match the checksum saved with it" in messages[0]
    assert messages[1].startswith(f"moved the unreadable checkpoint {tmp_path / '6'} to {tmp_path / '6'}.corrupt-")
    assert history["start_step"] == 4 and data.position == 6
    assert_trees_equal(state.params, reference.params)
    assert step_dirs(tmp_path) == [2, 4, 6]  # nothing good was lost; 6 was written again
    assert len(glob.glob(f"{tmp_path}/6.corrupt-*")) == 1  # the damaged one is kept aside


def test_all_checkpoints_unreadable_is_an_error_that_touches_nothing(tmp_path):
    cfg = config(steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    train(cfg, tiny_params(), PatternData())
    for step in (2, 4):
        damage(tmp_path / str(step), "delete")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no checkpoint in .* could be restored"):
        train(cfg, tiny_params(), PatternData())
    assert sorted(os.listdir(tmp_path)) == ["2", "4"]


@needs_8_devices
def test_restore_onto_a_different_mesh(tmp_path):
    from makemost_jax.sharding import MeshConfig, make_mesh

    cfg = config(steps=3, checkpoint_dir=str(tmp_path), checkpoint_every=3, optimizer=SGD)
    saved, _ = train(cfg, tiny_params(), PatternData(), mesh=make_mesh(MeshConfig(data=-1)))
    saved_params = flat_arrays(saved.params)

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    like = init_state(tiny_params(), cfg, mesh)
    state, meta = restore_latest(checkpoint_manager(str(tmp_path)), like, mesh)
    assert meta["data"] == [{"position": 3}]
    for k, v in flat_arrays(state.params).items():
        assert np.array_equal(v, saved_params[k]), k
    kernel = state.params["layers"]["mlp"]["up"]["kernel"]
    assert kernel.sharding.spec == like.params["layers"]["mlp"]["up"]["kernel"].sharding.spec
    assert kernel.sharding.shard_shape(kernel.shape) == (2, 32 // 4, 128 // 2)

    # Continue to step 5 on the new mesh; compare with one device doing all 5 steps.
    continued, history = train(config(steps=5, checkpoint_dir=str(tmp_path), checkpoint_every=3, optimizer=SGD),
                               tiny_params(), PatternData(), mesh=mesh)
    assert history["start_step"] == 3
    single, single_history = train(config(steps=5, optimizer=SGD), tiny_params(), PatternData())
    np.testing.assert_allclose([r["loss"] for r in history["train"]],
                               [r["loss"] for r in single_history["train"][3:]], rtol=1e-5)
    for k, v in flat_arrays(continued.params).items():
        np.testing.assert_allclose(v, flat_arrays(single.params)[k], rtol=1e-4, atol=1e-5, err_msg=k)


# --- two processes --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_together_like_one(tmp_path):
    """Two real JAX processes (2 CPU devices each) on a data-parallel mesh, each feeding
    its own half of every batch, match one process on one device; they also checkpoint
    together (step 1 and 2) with both data positions."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, WORKER, "dist", "--port", str(port), "--process-id", str(i),
                               "--dir", str(tmp_path / "ck"), "--out", str(tmp_path / f"p{i}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        for p in procs:
            finish(p, timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    p0, p1 = np.load(tmp_path / "p0.npz"), np.load(tmp_path / "p1.npz")

    single, history = train(config(steps=2, optimizer=SGD), tiny_params(), PatternData())
    expected = [r["loss"] for r in history["train"]]
    np.testing.assert_allclose(p0["loss"], expected, rtol=1e-5)
    np.testing.assert_array_equal(p0["loss"], p1["loss"])
    assert int(p0["position"]) == int(p1["position"]) == 2
    for k, v in flat_arrays(single.params).items():
        np.testing.assert_allclose(p0["param" + k], v, rtol=1e-4, atol=1e-6, err_msg=k)

    assert step_dirs(tmp_path / "ck") == [1, 2]
    like = init_state(tiny_params(), config(optimizer=SGD))
    _, meta = restore_latest(checkpoint_manager(str(tmp_path / "ck")), like)
    assert meta["data"] == [{"position": 2}, {"position": 2}]
