"""The windowed model: the LM runs window by window under `lax.scan`, the memory as the carry.

Window i is scored by `forward(lm, window_i, extra_kv=memory_kv(memory_i))`, a fresh
W-token pass (positions 0 .. W-1), and `memory_{i+1} = update_memory(memory_i, hidden_i)`.
With `module=None` the same loop is the disjoint-window baseline (no memory). With
`remat=True` each window step is wrapped in `jax.checkpoint`: the backward pass keeps only
each window's inputs and memory and recomputes the window, so training activation memory
grows with the window, not with the number of windows. Gradients flow through the memory
across all windows of the sequence.

Dimensions: B batch, N windows, W window length, M memory slots, D width, V vocabulary.

Example:
    >>> import jax, jax.numpy as jnp, makemost_jax as mm
    >>> from makemost_jax.recurrence import RecurrenceConfig, init_memory_module
    >>> lm = mm.init_params(mm.from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 2,
    ...                     "n_head": 2, "vocab_size": 10, "n_positions": 8}), jax.random.key(0))
    >>> module = init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(1))
    >>> tokens_BNW = jnp.arange(24).reshape(1, 3, 8) % 10
    >>> memory, logits = run_windows(module, lm, tokens_BNW)
    >>> logits.shape, memory.shape
    ((1, 3, 8, 10), (1, 4, 16))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models import forward, head_nll, token_logprobs
from makemost_jax.models.types import Params
from makemost_jax.recurrence.module import MemoryParams, initial_memory, memory_kv, update_memory


def check_window(lm: Params, window) -> int:
    """`window` as an int, or `ConfigError` when the LM cannot take windows of that size.

    Example:
        >>> # check_window(lm, 128) == 128
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"window={window!r} must be a positive integer (tokens per window, e.g. 128)")
    if window > lm.config.max_positions:
        raise ConfigError(f"window={window} is larger than the model's context of {lm.config.max_positions} "
                          f"tokens; pass window={lm.config.max_positions} or less")
    return window


def _check_module(module: MemoryParams | None, lm: Params):
    if module is not None and module.lm_config != lm.config:
        theirs, ours = module.lm_config, lm.config
        raise ConfigError(f"the memory module was built for a different LM ({theirs.family}, {theirs.n_layers} "
                          f"layers, width {theirs.d_model}) than the one given ({ours.family}, {ours.n_layers} "
                          f"layers, width {ours.d_model}); train a module for this model")


def window_step(module: MemoryParams | None, lm: Params, memory_BMD, tokens_BW, mask_BW=None, targets_BW=None,
                chunked_head: bool = True):
    """One window: `(next memory, logits (B, W, V))`, or with `targets_BW` `(next memory, NLL (B, W))`.

    With `module=None`: the plain LM, memory None. `mask_BW` marks real tokens; the padding
    after a document's end is not pooled into the memory (right padding, so the causal LM
    never reads it either). With targets the NLL comes from `head_nll`, which reads the
    vocabulary in chunks and never holds the (B, W, V) logits; `chunked_head=False` takes
    the plain head instead, whose weight gradient costs one vocabulary product less (for
    an LM whose output layer is trained too).

    Example:
        >>> # memory_BMD, logits_BWV = window_step(module, lm, memory_BMD, tokens_BW, mask_BW)
        >>> # memory_BMD, nll_BW = window_step(module, lm, memory_BMD, tokens_BW, mask_BW, targets_BW)
    """
    chunked = targets_BW is not None and chunked_head
    out = forward(lm, tokens_BW, extra_kv=None if module is None else memory_kv(module, memory_BMD),
                  return_hidden=module is not None, states_only=chunked)
    if chunked:
        outputs = head_nll(lm.config, lm.weights, out.states, targets_BW)
    else:
        outputs = out.logits if targets_BW is None else -token_logprobs(out.logits, targets_BW)
    if module is None:
        return None, outputs
    mask_BW = jnp.ones(tokens_BW.shape, bool) if mask_BW is None else mask_BW
    return update_memory(module, memory_BMD, out.hidden[module.config.read_layer], mask_BW), outputs


def run_windows(module: MemoryParams | None, lm: Params, tokens_BNW, mask_BNW=None, targets_BNW=None,
                memory_BMD=None, remat: bool = False, chunked_head: bool = True):
    """Scan `window_step` over the N windows; returns `(final memory, outputs)`.

    Outputs are the logits (B, N, W, V), or with `targets_BNW` each target's negative
    log-likelihood (B, N, W) (then no logits outlive their window, which is what
    training wants; `chunked_head` as in `window_step`). `memory_BMD` defaults to the
    module's initial memory. `remat` wraps each window in `jax.checkpoint`.

    Example:
        >>> # memory_BMD, nll_BNW = run_windows(module, lm, inputs_BNW, mask_BNW, targets_BNW, remat=True)
    """
    tokens_BNW = jnp.asarray(tokens_BNW)
    if tokens_BNW.ndim != 3:
        raise InputError(f"tokens must be (batch, windows, window) token ids, got shape {tokens_BNW.shape}")
    _check_module(module, lm)
    check_window(lm, tokens_BNW.shape[2])
    b = tokens_BNW.shape[0]
    mask_BNW = jnp.ones(tokens_BNW.shape, bool) if mask_BNW is None else jnp.asarray(mask_BNW)
    if module is not None and memory_BMD is None:
        memory_BMD = initial_memory(module, b)

    def step(memory_BMD, window):
        tokens_BW, mask_BW, targets_BW = window
        return window_step(module, lm, memory_BMD, tokens_BW, mask_BW, targets_BW, chunked_head)

    if remat:
        step = jax.checkpoint(step, prevent_cse=False)  # prevent_cse is not needed under scan
    swap = (lambda x: None if x is None else jnp.swapaxes(x, 0, 1))  # scan runs over the leading axis
    memory_BMD, out = jax.lax.scan(step, memory_BMD, (swap(tokens_BNW), swap(mask_BNW), swap(targets_BNW)))
    return memory_BMD, jnp.swapaxes(out, 0, 1)


def split_sequence(batch, window: int):
    """A `DocumentContiguousBatches` batch of N*W inputs as windows: (inputs, targets, mask), each (B, N, W).

    Example:
        >>> import numpy as np
        >>> x, y, m = split_sequence({"tokens": np.arange(9)[None], "loss_mask": np.ones((1, 8))}, 4)
        >>> x.shape, y[0, 1].tolist()
        ((1, 2, 4), [5, 6, 7, 8])
    """
    tokens = jnp.asarray(batch["tokens"])
    if tokens.ndim != 2 or (tokens.shape[1] - 1) % window or tokens.shape[1] < 2:
        raise InputError(f'batch["tokens"] has shape {tokens.shape}; recurrence needs (batch, N * window + 1) '
                         f"with window={window}: build the batches with DocumentContiguousBatches(..., "
                         f"window=N * {window})")
    b, n = tokens.shape[0], (tokens.shape[1] - 1) // window
    mask = batch.get("loss_mask")
    mask = jnp.ones((b, n * window), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    if mask.shape != (b, n * window):
        raise InputError(f'batch["loss_mask"] has shape {mask.shape}; it must be {(b, n * window)}, aligned with '
                         "the targets tokens[:, 1:]")
    return (tokens[:, :-1].reshape(b, n, window), tokens[:, 1:].reshape(b, n, window),
            mask.reshape(b, n, window))


def recurrence_loss(window: int, remat: bool = True):
    """A loss function for `makemost_jax.training.train` over sequences of N windows of `window` tokens.

    Trainable `params` is `{"memory": MemoryParams}` with the LM passed as `frozen`
    (the default), or `{"memory": ..., "lm": Params}` to finetune everything
    (`frozen=None`), or `{"lm": Params}` alone: the LM finetuned on the same disjoint
    windows without memory (the control that separates recurrence from domain
    adaptation). Each batch row (`tokens` (B, N*W + 1), `loss_mask` (B, N*W), as
    `DocumentContiguousBatches(window=N*W)` yields) starts from the initial memory;
    gradients flow through the memory across its N windows. Returns
    `(mean NLL over scored targets, {"tokens": count})`.

    Example:
        >>> # loss_fn = recurrence_loss(window=128)
        >>> # train(TrainConfig(...), {"memory": module}, batches, loss_fn, frozen=lm)
    """
    def loss_fn(params, batch, *, rng=None, frozen=None):
        module = params.get("memory")
        lm = params.get("lm") if frozen is None else frozen
        if not isinstance(lm, Params):
            raise ConfigError("recurrence_loss needs the LM: pass it as frozen=lm, or put it in the trainable "
                              'params as {"memory": module, "lm": lm} (or {"lm": lm} alone) to finetune it')
        inputs, targets, mask = split_sequence(batch, window)
        # A trained LM (frozen None) needs the output layer's gradient: the plain head costs one product less.
        _, nll_BNW = run_windows(module, lm, inputs, mask > 0, targets, remat=remat, chunked_head=frozen is not None)
        count = mask.sum()
        return (nll_BNW * mask).sum() / jnp.maximum(count, 1.0), {"tokens": count}

    return loss_fn
