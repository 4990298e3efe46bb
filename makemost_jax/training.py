"""One training loop for every method: optax, gradient accumulation, mixed precision,
remat, metrics, periodic evaluation and Orbax checkpoints that resume exactly.

The pieces, each usable alone:

- `TrainConfig`: frozen settings (steps, optimizer, accumulation, dtype, remat, cadence).
- `TrainState`: the pytree that is checkpointed (step, params, opt_state, rng).
- `lm_loss`: next-token cross entropy with a loss mask, the default loss.
- `train_step`: one pure optimizer step; `make_train_step` jits it with the mesh's
  shardings and donates the state.
- `train`: the loop. It resumes from the newest good checkpoint in
  `config.checkpoint_dir`, onto the current mesh (which may differ from the one that
  saved it), and restores the data iterator's position.

A loss function has the signature `loss_fn(params, batch, *, rng, frozen)` and returns
a scalar loss or `(loss, metrics)`: `params` is the trainable pytree (a `Params`, a dict
holding one, only adapters, ...), `frozen` any pytree of arrays that is an input but not
trained (e.g. the LM under adapters; None when not given), `rng` a fresh key per
microbatch. If `metrics` has a `"tokens"` entry, microbatches are weighted by it, so
accumulation gives the same update as one big batch even when loss masks differ.

Example:
    >>> import jax, numpy as np, makemost_jax as mm
    >>> from makemost_jax.training import TrainConfig, train
    >>> cfg = mm.from_hf_config({"model_type": "gpt2", "n_embd": 32, "n_layer": 2,
    ...                          "n_head": 4, "vocab_size": 101, "n_positions": 64})
    >>> params = mm.init_params(cfg, jax.random.key(0))
    >>> rows = np.random.default_rng(0).integers(0, 101, (8, 4, 17)).astype(np.int32)
    >>> state, history = train(TrainConfig(steps=8, learning_rate=1e-2, progress=False),
    ...                        params, iter([{"tokens": r} for r in rows]))
    >>> int(state.step), len(history["train"])
    (8, 8)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from makemost_jax import models, sharding
from makemost_jax.models.layers import remat_layers
from makemost_jax.errors import CheckpointError, ConfigError, InputError, MakemostError

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
COMPUTE_DTYPES = ("float32", "bfloat16")  # float16 would need loss scaling
SCHEDULES = ("cosine", "constant")
CHECKPOINT_FORMAT = 1  # bump when the saved layout changes


class NonFiniteLossError(MakemostError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (hashable, so it can be static under `jit`).

    The default optimizer is AdamW with linear warmup and then `schedule` ("cosine":
    decay to 10% of `learning_rate` at `steps`; "constant"), global-norm clipping at
    `clip_norm` (None: off) and weight decay on every kernel/embedding leaf (not on
    biases or norm scales). `optimizer` replaces all of that with your own optax
    transformation. `grad_accum` splits each batch into that many microbatches (rows
    a, a + grad_accum, ... form microbatch a) and averages their gradients.
    `compute_dtype` casts params (and `frozen`) inside the loss; the master weights and
    optimizer state stay float32. `remat` names a `jax.checkpoint` policy applied to
    every transformer layer the loss runs (`models.layers.remat_layers`): the backward
    pass recomputes each layer instead of keeping its residuals, so activation memory
    no longer grows with depth (see benchmarks/results/train_memory.md). A loss with
    modules of its own applies `jax.checkpoint` to them itself.
    `*_every = 0` turns logging / evaluation / periodic checkpoints off. With
    `eval_every` the last step is also evaluated; with a `checkpoint_dir` the last step
    is always saved.

    Example:
        >>> TrainConfig(steps=1000, learning_rate=3e-4, warmup_steps=100, grad_accum=4,
        ...             compute_dtype="bfloat16", checkpoint_dir="/tmp/run", checkpoint_every=200).keep
        3
    """

    steps: int = 100
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.95
    optimizer: optax.GradientTransformation | None = None
    grad_accum: int = 1
    compute_dtype: str = "float32"
    remat: str = "none"
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep: int = 3
    checkpoint_dir: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "grad_accum", "keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)} must be at least 1")
        for name in ("warmup_steps", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"TrainConfig.compute_dtype={self.compute_dtype!r}; use one of {COMPUTE_DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"TrainConfig.remat={self.remat!r}; use one of {tuple(REMAT_POLICIES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"TrainConfig.schedule={self.schedule!r}; use one of {SCHEDULES}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError(f"TrainConfig.checkpoint_every={self.checkpoint_every} needs a checkpoint_dir")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a run needs to continue exactly: saved whole in every checkpoint.

    `rng` is raw uint32 key data (`jax.random.key_data`), which every checkpoint
    format can store.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> tx = optax.sgd(0.1)
        >>> state = TrainState.create({"w": jnp.zeros(3)}, tx, seed=0)
        >>> int(state.step), state.rng.dtype
        (0, dtype('uint32'))
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
        """A step-0 state: `tx.init(params)` and a key from `seed` (see the class example)."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.key_data(jax.random.key(seed)))


def lm_loss(params, batch: Mapping[str, Any], *, rng=None, frozen=None):
    """Next-token cross entropy of a decoder `Params` on `batch["tokens"]` (B, T+1).

    Inputs are tokens[:, :-1], targets tokens[:, 1:]. `batch["loss_mask"]`, optional,
    is (B, T+1) aligned with `tokens` (entry t says whether token t is scored as a
    target; entry 0 is ignored) or (B, T) aligned with the targets. Returns
    `(mean loss over scored targets, {"tokens": number scored})`. `rng` and `frozen`
    are unused: they are part of the loss-function signature.

    Example:
        >>> import jax, jax.numpy as jnp, makemost_jax as mm
        >>> cfg = mm.from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 1,
        ...                          "n_head": 2, "vocab_size": 10, "n_positions": 8})
        >>> loss, m = lm_loss(mm.init_params(cfg, jax.random.key(0)), {"tokens": jnp.array([[1, 2, 3]])})
        >>> int(m["tokens"]), bool(loss > 0)
        (2, True)
    """
    tokens = jnp.asarray(batch["tokens"])
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise InputError(f'batch["tokens"] must be (batch, length + 1) with length >= 1, got {tokens.shape}')
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = batch.get("loss_mask")
    if mask is None:
        mask = jnp.ones(targets.shape, jnp.float32)
    else:
        mask = jnp.asarray(mask)
        if mask.shape == tokens.shape:
            mask = mask[:, 1:]
        if mask.shape != targets.shape:
            raise InputError(f'batch["loss_mask"] has shape {mask.shape}; it must match tokens {tokens.shape} '
                             f"or the targets {targets.shape}")
        mask = mask.astype(jnp.float32)
    logp = models.token_logprobs(models.forward(params, inputs).logits, targets)
    count = mask.sum()
    return -(logp * mask).sum() / jnp.maximum(count, 1.0), {"tokens": count}


def make_optimizer(config: TrainConfig):
    """`(tx, schedule)` for `config`; `schedule` is None when `config.optimizer` is given.

    Example:
        >>> tx, schedule = make_optimizer(TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10))
        >>> round(float(schedule(10)), 6), round(float(schedule(100)), 6)
        (0.001, 0.0001)
    """
    if config.optimizer is not None:
        return config.optimizer, None
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        decay = optax.cosine_decay_schedule(lr, max(config.steps - warmup, 1), alpha=0.1)
    schedule = decay if not warmup else optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                        mask=_decay_mask)
    tx = adamw if config.clip_norm is None else optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
    return tx, schedule


def _decay_mask(params):
    """Weight decay on matrices (kernels, embeddings), not on biases or norm scales."""
    def decays(path, leaf):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", ""))
        return leaf.ndim >= 2 and name not in ("bias", "scale")
    return jax.tree_util.tree_map_with_path(decays, params)


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _loss_and_metrics(loss_fn, params, batch, rng, frozen, compute_dtype, remat):
    """Call `loss_fn` in `compute_dtype` under the `remat` policy; normalise its output."""
    def run(params, batch, rng, frozen):
        if compute_dtype != "float32":
            dtype = jnp.dtype(compute_dtype)
            params, frozen = _cast_floats(params, dtype), _cast_floats(frozen, dtype)
        out = loss_fn(params, batch, rng=rng, frozen=frozen)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        return loss.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    if remat == "none":
        return run(params, batch, rng, frozen)
    with remat_layers(REMAT_POLICIES[remat]):  # per transformer layer, where memory is saved
        return run(params, batch, rng, frozen)


def _microbatches(batch, n: int):
    """(B, ...) leaves -> (n, B/n, ...): microbatch a holds rows a, a+n, ... so each
    keeps an equal share of every device's rows under a sharded batch axis."""
    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            raise InputError(f"a batch leaf of shape {x.shape} cannot be split into grad_accum={n} "
                             f"microbatches; make the batch size a multiple of {n}")
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, frozen=None, *, loss_fn: Callable = lm_loss,
               tx: optax.GradientTransformation, grad_accum: int = 1, compute_dtype: str = "float32",
               remat: str = "none", schedule: Callable | None = None):
    """One optimizer step; a pure function returning `(new_state, metrics)`.

    Gradients of `grad_accum` microbatches are accumulated in float32 under a
    `lax.scan` (weighted by their `"tokens"` metric when the loss reports one).
    `metrics` holds `loss`, `grad_norm` (before clipping), `lr` (when `schedule` is
    given) and the loss function's own metrics, averaged the same way (`tokens` summed).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> tx = optax.sgd(0.5)
        >>> def loss(p, batch, *, rng, frozen): return jnp.mean((p["w"] - batch["y"]) ** 2)
        >>> state = TrainState.create({"w": jnp.zeros(())}, tx)
        >>> state, m = train_step(state, {"y": jnp.ones(4)}, loss_fn=loss, tx=tx, grad_accum=2)
        >>> float(state.params["w"]), float(m["loss"])
        (1.0, 1.0)
    """
    key, next_key = jax.random.split(jax.random.wrap_key_data(state.rng))

    def objective(params, microbatch, rng):
        return _loss_and_metrics(loss_fn, params, microbatch, rng, frozen, compute_dtype, remat)

    def accumulate(carry, inputs):
        index, microbatch = inputs
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, microbatch, jax.random.fold_in(key, index))
        weight = metrics.get("tokens", jnp.float32(1.0))
        grad_sum, loss_sum, metric_sums, weight_sum = carry
        metric_sums = {k: metric_sums[k] + (v if k == "tokens" else weight * v) for k, v in metrics.items()}
        grad_sum = jax.tree.map(lambda s, g: s + weight * g.astype(jnp.float32), grad_sum, grads)
        return (grad_sum, loss_sum + weight * loss, metric_sums, weight_sum + weight), None

    # Trace one microbatch abstractly to learn the loss's metric names for the carry.
    micro = _microbatches(batch, grad_accum)
    _, metric_shapes = jax.eval_shape(objective, state.params, jax.tree.map(lambda x: x[0], micro), key)
    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params), jnp.float32(0),
             {k: jnp.float32(0) for k in metric_shapes}, jnp.float32(0))
    (grad_sum, loss_sum, metric_sums, weight_sum), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(grad_accum), micro))
    total = jnp.where(weight_sum > 0, weight_sum, 1.0)
    grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grad_sum, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {k: v if k == "tokens" else v / total for k, v in metric_sums.items()}
    metrics.update(loss=loss_sum / total, grad_norm=optax.tree.norm(grads))
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state, rng=jax.random.key_data(next_key))
    return new_state, metrics


def train_state_shardings(state: TrainState, mesh) -> TrainState:
    """`NamedSharding`s for every leaf of `state` on `mesh` (works on abstract states).

    Params follow the sharding rules, optimizer moments follow their params, step and
    rng are replicated.

    Example:
        >>> # shardings = train_state_shardings(state, make_mesh(MeshConfig(fsdp=-1)))
    """
    p_shard = sharding.param_shardings(state.params, mesh)
    return TrainState(step=sharding.replicated(mesh), params=p_shard,
                      opt_state=sharding.state_shardings(state.opt_state, p_shard), rng=sharding.replicated(mesh))


def make_train_step(config: TrainConfig, state: TrainState, loss_fn: Callable = lm_loss, mesh=None,
                    frozen=None, tx: optax.GradientTransformation | None = None):
    """`train_step` jitted for `config`: `step(state, batch, frozen) -> (state, metrics)`.

    With a mesh the state keeps its sharding (`train_state_shardings`), the batch keeps the
    sharding it arrives with (`shard_batch`), metrics come back replicated; call (or
    lower) it under `sharding.activate(mesh)` so the model's activations are sharded
    too (`train` does). The input state is donated: do not use it after the call.

    Example:
        >>> # step = make_train_step(config, state, mesh=mesh)
        >>> # with sharding.activate(mesh):
        >>> #     state, metrics = step(state, sharding.shard_batch(batch, mesh), None)
    """
    built_tx, schedule = make_optimizer(config)
    fn = functools.partial(train_step, loss_fn=loss_fn, tx=tx or built_tx, grad_accum=config.grad_accum,
                           compute_dtype=config.compute_dtype, remat=config.remat,
                           schedule=None if tx is not None else schedule)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    s_shard = train_state_shardings(state, mesh)
    f_shard = None if frozen is None else sharding.param_shardings(frozen, mesh)
    return jax.jit(fn, in_shardings=(s_shard, None, f_shard), out_shardings=(s_shard, sharding.replicated(mesh)),
                   donate_argnums=0)


def init_state(params, config: TrainConfig, mesh=None) -> TrainState:
    """A step-0 `TrainState` for `params`, placed on `mesh` by the sharding rules.

    Example:
        >>> # state = init_state(mm.load(path), TrainConfig(), mesh=make_mesh(MeshConfig(fsdp=-1)))
    """
    if isinstance(params, models.Params):
        models.model.require_stacked(params, "training (init_state)")
    tx, _ = make_optimizer(config)
    if mesh is None:
        return TrainState.create(params, tx, config.seed)
    abstract = jax.eval_shape(lambda p: TrainState.create(p, tx, config.seed), params)
    return jax.jit(lambda p: TrainState.create(p, tx, config.seed),
                   out_shardings=train_state_shardings(abstract, mesh))(params)


def evaluate(params, batches: Iterable, loss_fn: Callable = lm_loss, frozen=None, mesh=None,
             compute_dtype: str = "float32") -> dict[str, float]:
    """Mean loss (weighted by `"tokens"` when reported) and metrics over `batches`.

    Example:
        >>> # eval_fn = lambda params: evaluate(params, held_out_batches)
        >>> # train(config, params, data, eval_fn=eval_fn)
    """
    run = _jitted_eval(loss_fn, compute_dtype)
    sums: dict[str, float] = {}
    total = 0.0
    for batch in batches:
        with _on_mesh(mesh):
            loss, metrics = jax.device_get(run(params, _place_batch(batch, mesh), frozen))
        weight = float(metrics.get("tokens", 1.0))
        total += weight
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + (float(v) if k == "tokens" else weight * float(v))
    if not total:
        raise InputError("evaluate() got no batches (or only fully masked ones); pass held-out batches")
    return {k: v if k == "tokens" else v / total for k, v in sums.items()}


@functools.lru_cache(maxsize=32)
def _jitted_eval(loss_fn, compute_dtype):
    # Cached so periodic evaluation compiles once per loss function.
    return jax.jit(lambda p, b, f: _loss_and_metrics(loss_fn, p, b, jax.random.key(0), f, compute_dtype, "none"))


# --- checkpoints -------------------------------------------------------------------


def _fingerprint(tree) -> jax.Array:
    """One uint32 per leaf: sum of the leaf's bits times odd position weights, mod 2^32.

    Integer sums do not depend on the reduction order, so the value is the same on any
    mesh; any single flipped bit changes it. Orbax notices missing or truncated files
    but not flipped bytes, hence this check.
    """
    def one(x):
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        else:
            bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
        weights = (2 * jnp.arange(x.size, dtype=jnp.uint32) + 1).reshape(x.shape)
        return jnp.sum(bits * weights, dtype=jnp.uint32)
    return jnp.stack([one(x) for x in jax.tree.leaves(tree)])


def _leaf_names(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


@functools.lru_cache(maxsize=8)
def _fingerprint_fn(mesh):
    out_sharding = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(_fingerprint, out_shardings=out_sharding)


def _fingerprints(state: TrainState, mesh) -> dict[str, int]:
    values = _fingerprint_fn(mesh)(state)
    return dict(zip(_leaf_names(state), (int(v) for v in np.asarray(values))))


def _allgather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order (one process: `[obj]`)."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def checkpoint_manager(directory: str, keep: int = 3):
    """An Orbax `CheckpointManager` over `directory` as `train` uses it (keeps `keep` steps).

    Example:
        >>> # state, meta = restore_latest(checkpoint_manager("runs/a"), init_state(params, config))
    """
    import orbax.checkpoint as ocp  # imported on use: it adds ~0.7 s to `import makemost_jax`

    # Incomplete saves (a run killed mid-write) live in *.orbax-checkpoint-tmp-* folders,
    # never a finished step: cleaning them up loses nothing.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _save(manager, state: TrainState, data, mesh):
    import orbax.checkpoint as ocp

    step = int(state.step)
    data_states = _allgather_json(data.state()) if hasattr(data, "state") else None
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "data": data_states,
            "fingerprint": _fingerprints(state, mesh)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)


def _abstract_like(state: TrainState, mesh):
    shardings = (jax.tree.map(lambda x: x.sharding, state) if mesh is None else train_state_shardings(state, mesh))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _restore_step(manager, step: int, like: TrainState, mesh):
    import orbax.checkpoint as ocp

    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract_like(like, mesh)), meta=ocp.args.JsonRestore()))
    state, meta = restored.state, restored.meta
    saved = meta["fingerprint"]
    for name, value in _fingerprints(state, mesh).items():
        if saved.get(name) != value:
            raise CheckpointError(f"{name} does not match the checksum saved with it (corrupted data)")
    return state, meta


def restore_latest(manager, like: TrainState, mesh=None):
    """Restore the newest step of `manager` that loads and passes its checksums.

    Returns `(state, meta)` or None when the directory has no checkpoints. A step that
    fails is reported with a warning naming its directory; once an older step loads,
    the failed newer ones are renamed `<step>.corrupt-<time>` (kept for inspection, out
    of the way of new saves). If no step loads, nothing is renamed and a
    `CheckpointError` lists every failure. `like` supplies shapes and dtypes; the
    arrays come back with the shardings of `mesh` (or of `like` without a mesh),
    whatever mesh wrote them.

    Example:
        >>> # state, meta = restore_latest(checkpoint_manager("runs/a"), init_state(params, config, mesh), mesh)
    """
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        path = os.path.join(str(manager.directory), str(step))
        try:
            state, meta = _restore_step(manager, step, like, mesh)
        except Exception as error:  # noqa: BLE001 - any failure to read a step means "try an older one"
            reason = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            failures.append((path, reason))
            warnings.warn(f"checkpoint {path} could not be restored, it is damaged or incomplete ({reason}); "
                          "trying the previous checkpoint", stacklevel=2)
            _close_abandoned_reads(path)
        else:
            if failures:
                _move_aside([p for p, _ in failures])
                manager.reload()
            return state, meta
    if failures:
        listing = "; ".join(f"{p}: {r}" for p, r in failures)
        raise CheckpointError(f"no checkpoint in {manager.directory} could be restored ({listing}). If the model, "
                              "optimizer or TrainConfig changed since they were written, use a new checkpoint_dir; "
                              "otherwise move the damaged step folders away to start from scratch")
    return None


def _close_abandoned_reads(path: str):
    """Close what Orbax leaves behind when a restore of `path` fails.

    Its other pending array reads stay suspended, and their futures hold errors nobody
    reads; left alone, Python and asyncio print each when it is collected (often at
    exit), as noise after the clear warning above.
    """
    for obj in gc.get_objects():
        # type() rather than isinstance(): no attribute access on arbitrary objects (some
        # proxies, e.g. deprecated torch names, warn when their __class__ is read).
        kind = type(obj)
        if kind is types.CoroutineType and obj.__qualname__ == "_read_array_index_and_device_put":
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - Orbax re-raises GeneratorExit as a plain Exception
                pass
        elif kind is asyncio.Future and obj.done() and not obj.cancelled() and path in str(obj.exception()):
            pass  # calling exception() marks the error as seen


def _move_aside(paths: list[str]):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if jax.process_index() == 0:
        for path in paths:
            os.rename(path, f"{path}.corrupt-{stamp}")
            warnings.warn(f"moved the unreadable checkpoint {path} to {path}.corrupt-{stamp}; "
                          "delete it once you have looked at it", stacklevel=3)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("makemost_jax.training.move_aside")


def _seek(data, batches, meta, step: int):
    """Put the data iterator where it was at `step`: its own restore(), else skip batches."""
    saved = meta.get("data")
    if saved is not None and hasattr(data, "restore"):
        if len(saved) != jax.process_count():
            raise CheckpointError(f"the checkpoint of step {step} holds data positions of {len(saved)} processes, "
                                  f"but {jax.process_count()} are running; resume with the same process count")
        data.restore(saved[jax.process_index()])
        return
    warnings.warn(f"the data iterator has no state()/restore(); skipping {step} batches to reach step {step}",
                  stacklevel=3)
    for _ in range(step):
        next(batches)


# --- the loop ----------------------------------------------------------------------


def _place_batch(batch, mesh):
    return batch if mesh is None else sharding.shard_batch(batch, mesh)


def _on_mesh(mesh):
    return contextlib.nullcontext() if mesh is None else sharding.activate(mesh)


def _flush(pending: list, history: dict, bar, since: float) -> float:
    """Read back queued step metrics (one device sync), check them, record them."""
    if not pending:
        return since
    steps, metrics = zip(*pending)
    values = jax.device_get(list(metrics))
    for step, m in zip(steps, values):
        if not math.isfinite(float(m["loss"])):
            raise NonFiniteLossError(f"loss is {float(m['loss'])} at step {step}; lower the learning rate, "
                                     "enable clip_norm, or use float32 compute_dtype; the last good checkpoint "
                                     "is kept")
        history["train"].append({"step": step, **{k: float(v) for k, v in m.items()}})
    now = time.perf_counter()
    tokens = sum(float(m.get("tokens", 0.0)) for m in values)
    record = history["train"][-1]
    if tokens:
        record["tokens_per_s"] = tokens / max(now - since, 1e-9)
    bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "grad_norm", "tokens_per_s") if k in record},
                    refresh=False)
    pending.clear()
    return now


def train(config: TrainConfig, init, data, loss_fn: Callable = lm_loss, eval_fn: Callable | None = None,
          mesh=None, frozen=None) -> tuple[TrainState, dict]:
    """Train for `config.steps` steps; returns `(state, history)`.

    `init` is the trainable params pytree (or a `TrainState`). `data` yields batches
    (dicts of arrays with a leading batch axis; under multi-host, each process yields
    its own rows); with `state()` / `restore(state)` its position is checkpointed,
    otherwise a resume skips the batches already used. `eval_fn(params) -> dict` runs
    every `eval_every` steps (see `evaluate`). With `config.checkpoint_dir`, training
    resumes from the newest good checkpoint there and saves every `checkpoint_every`
    steps and at the end. `history["train"]` has one record per step (loss, grad_norm,
    lr, the loss's metrics; `tokens_per_s` at each log point, the first including
    compilation), `history["eval"]` one per evaluation, `history["start_step"]` the
    step it started or resumed from. A non-finite loss raises `NonFiniteLossError`
    naming the step; no checkpoint is written after it.

    Example:
        >>> # state, history = train(TrainConfig(steps=1000, checkpoint_dir="runs/a", checkpoint_every=100),
        >>> #                        mm.load(path), data, mesh=make_mesh(MeshConfig(data=-1)))
    """
    with _on_mesh(mesh):
        return _train(config, init, data, loss_fn, eval_fn, mesh, frozen)


def _train(config, init, data, loss_fn, eval_fn, mesh, frozen):
    if isinstance(init, TrainState):
        state = init if mesh is None else jax.device_put(init, train_state_shardings(init, mesh))
    else:
        state = init_state(init, config, mesh)
    if frozen is not None and mesh is not None:
        frozen = sharding.shard_params(frozen, mesh)
    batches = data if hasattr(data, "__next__") else iter(data)
    history: dict[str, Any] = {"train": [], "eval": []}
    manager = checkpoint_manager(config.checkpoint_dir, config.keep) if config.checkpoint_dir else None
    show = config.progress and jax.process_index() == 0
    bar = tqdm(total=config.steps, file=sys.stderr, disable=None if show else True, desc="train",
               dynamic_ncols=True)
    try:
        if manager is not None:
            restored = restore_latest(manager, state, mesh)
            if restored is not None:
                state, meta = restored
                _seek(data, batches, meta, int(state.step))
        start = int(state.step)
        history["start_step"] = start
        step_fn = make_train_step(config, state, loss_fn, mesh, frozen)
        bar.update(start)
        pending: list = []
        since = time.perf_counter()
        last_saved = start
        for step in range(start + 1, config.steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                warnings.warn(f"the data ran out after step {step - 1} of {config.steps}; stopping there",
                              stacklevel=2)
                break
            state, metrics = step_fn(state, _place_batch(batch, mesh), frozen)
            pending.append((step, metrics))
            bar.update(1)
            last = step == config.steps
            evaluate_now = eval_fn is not None and config.eval_every and (step % config.eval_every == 0 or last)
            save_now = manager is not None and ((config.checkpoint_every and step % config.checkpoint_every == 0)
                                                or last)
            if last or evaluate_now or save_now or (config.log_every and step % config.log_every == 0):
                since = _flush(pending, history, bar, since)
            if evaluate_now:
                history["eval"].append({"step": step, **{k: float(v) for k, v in eval_fn(state.params).items()}})
            if save_now:
                _save(manager, state, data, mesh)
                last_saved = step
        _flush(pending, history, bar, since)
        if manager is not None and int(state.step) != last_saved:
            _save(manager, state, data, mesh)  # the data ran out early: keep where we stopped
    finally:
        bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return state, history


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, auto: bool = False) -> bool:
    """Join a multi-process JAX job; returns whether more than one process runs.

    With no arguments (or `num_processes=1`) it does nothing, so single-machine runs
    need no flags, unless `auto` asks JAX to detect the job (TPU pods, SLURM). Otherwise
    it calls `jax.distributed.initialize` (once; later calls are no-ops). On CPU,
    collectives use gloo. A failure to join is a `ConfigError` naming the settings.

    Example:
        >>> maybe_initialize_distributed()
        False
        >>> # maybe_initialize_distributed("10.0.0.1:1234", num_processes=4, process_id=rank)
    """
    if coordinator is None and num_processes in (None, 1) and not auto:
        return False
    if num_processes is not None and num_processes > 1 and (coordinator is None or process_id is None):
        raise ConfigError(f"num_processes={num_processes} needs coordinator='HOST:PORT' and a process_id "
                          "(--coordinator, --process-id) unless the cluster is detected automatically")
    if not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                       process_id=process_id)
        except (RuntimeError, ValueError) as error:
            raise ConfigError(f"could not join the distributed job (coordinator={coordinator!r}, "
                              f"num_processes={num_processes}, process_id={process_id}): "
                              f"{' '.join(str(error).split())[:300]}") from error
    return jax.process_count() > 1
