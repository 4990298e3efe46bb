"""Training the memory module with the shared loop, and saving it alone with Orbax.

`train_recurrence` runs `makemost_jax.training.train` with `recurrence_loss`: the module
is the trainable pytree and the LM goes in as `frozen` (default), or both are trained
(`finetune=True`). The training state checkpointed by the loop then holds only the module
and its optimizer state. `save_module` / `load_module` write and read the module alone
(a few MB), plus the LM's weights only when they were finetuned.

Example:
    >>> import makemost_jax as mm                                                       # doctest: +SKIP
    >>> from makemost_jax.data import DocumentContiguousBatches, TextFiles
    >>> from makemost_jax.training import TrainConfig
    >>> lm, tok = mm.load(), mm.load_tokenizer()                                         # doctest: +SKIP
    >>> data = DocumentContiguousBatches(TextFiles("books/"), tok, batch_size=4, window=8 * 128)  # doctest: +SKIP
    >>> run = train_recurrence(lm, data, window=128, config=TrainConfig(steps=500, learning_rate=1e-3))  # doctest: +SKIP
    >>> save_module("runs/memory", run.module)                                           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from makemost_jax.checkpoints.bundle import read_bundle_meta, restore_bundle, save_bundle
from makemost_jax.errors import CheckpointError
from makemost_jax.models.types import Params
from makemost_jax.recurrence.model import check_window, recurrence_loss
from makemost_jax.recurrence.module import MemoryParams, RecurrenceConfig, init_memory_module
from makemost_jax.training import TrainConfig, TrainState, train

MODULE_FORMAT = 1
# The LM settings a module depends on; checked when it is loaded.
_LM_FIELDS = ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "rope_theta")


@dataclasses.dataclass
class RecurrenceRun:
    """What `train_recurrence` returns: the trained module, the LM (finetuned or as given), the loop's output."""

    module: MemoryParams
    lm: Params
    state: TrainState
    history: dict[str, Any]


def train_recurrence(lm: Params, data, window: int, config: TrainConfig, module: MemoryParams | None = None,
                     module_config: RecurrenceConfig | None = None, finetune: bool = False,
                     remat: bool = True, eval_fn=None, mesh=None) -> RecurrenceRun:
    """Train a memory module (fresh from `module_config`, default `RecurrenceConfig()`, seed `config.seed`,
    unless `module` is given).

    `data` yields batches of `tokens` (B, N*window + 1) and `loss_mask` (B, N*window),
    e.g. `DocumentContiguousBatches(..., window=N * window)`; each row is one training
    sequence of N windows, with gradients through the memory across all of them.
    `finetune=True` trains the LM too. `remat` checkpoints each window (see
    `run_windows`). `eval_fn(params)` gets the trainable dict `{"memory": ..., ["lm": ...]}`.

    Example:
        >>> # run = train_recurrence(lm, data, 128, TrainConfig(steps=200, learning_rate=1e-3))
        >>> # run.history["train"][-1]["loss"]
    """
    window = check_window(lm, window)
    if module is None:
        module = init_memory_module(module_config or RecurrenceConfig(), lm.config, jax.random.key(config.seed))
    # The loop donates the trainable arrays to its first step: train copies, keep the caller's.
    copy = functools.partial(jax.tree.map, jnp.copy)
    params = {"memory": copy(module), "lm": copy(lm)} if finetune else {"memory": copy(module)}
    state, history = train(config, params, data, recurrence_loss(window, remat), eval_fn=eval_fn, mesh=mesh,
                           frozen=None if finetune else lm)
    return RecurrenceRun(state.params["memory"], state.params.get("lm", lm), state, history)


def _lm_meta(cfg) -> dict:
    return {name: getattr(cfg, name) for name in _LM_FIELDS}


def save_module(directory: str, module: MemoryParams, lm: Params | None = None) -> str:
    """Write the module (and `lm`'s weights, when it was finetuned) to `directory` with Orbax.

    Returns the absolute path. An existing checkpoint there is replaced.

    Example:
        >>> # save_module("runs/memory", run.module)                    # frozen LM: the module alone
        >>> # save_module("runs/memory_ft", run.module, lm=run.lm)      # finetuned LM too
    """
    meta = {"format": MODULE_FORMAT, "config": dataclasses.asdict(module.config),
            "lm": _lm_meta(module.lm_config), "finetuned_lm": lm is not None}
    return save_bundle(directory, meta, weights=module.weights, **({} if lm is None else {"lm": lm.weights}))


def load_module(directory: str, lm: Params) -> tuple[MemoryParams, Params]:
    """Read a module saved by `save_module` for the LM `lm`; returns `(module, lm)`.

    The returned LM is `lm` itself, or `lm` with the finetuned weights when they were
    saved. Raises `CheckpointError` when the folder holds no module or one built for a
    different LM.

    Example:
        >>> # module, lm = load_module("runs/memory", mm.load())
    """
    meta = read_bundle_meta(directory, "recurrence module", "save_module or `makemost recurrence train --out`")
    if meta.get("format") != MODULE_FORMAT:
        raise CheckpointError(f"{directory!r} has module format {meta.get('format')}, this version reads "
                              f"{MODULE_FORMAT}; retrain the module")
    if meta["lm"] != _lm_meta(lm.config):
        raise CheckpointError(f"the module in {directory!r} was trained for the LM {meta['lm']}, not for the given "
                              f"{_lm_meta(lm.config)}; pass the model it was trained with")
    config = RecurrenceConfig(**meta["config"])
    abstract = {"weights": jax.eval_shape(lambda: init_memory_module(config, lm.config, jax.random.key(0)).weights)}
    if meta["finetuned_lm"]:
        abstract["lm"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lm.weights)
    restored = restore_bundle(directory, **abstract)
    module = MemoryParams(config.resolve(lm.config), lm.config, restored["weights"])
    return module, (Params(lm.config, restored["lm"]) if meta["finetuned_lm"] else lm)
