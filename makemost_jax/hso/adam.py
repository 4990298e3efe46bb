"""Per-slot Adam: Adam whose moments and step counts live with the cache slots.

Hidden-state optimisation updates cached keys/values, and the cache is a sliding
buffer: when new tokens arrive the oldest slots are evicted. So each slot keeps its
own first/second moments and its own step count (for bias correction), and all of
them move with the slot: `append_slots` writes new slots (moments and counts start at
zero) after the `fill` slots already held and drops the oldest beyond the buffer size.

Dimensions: S slots on the slot axis of every state array (one axis for all, or one per
array: a cache's keys keep their slots last, its values before the head dimension); N new slots.

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 4))                       # 4 slots on axis 1, 2 of them filled
    >>> state = init_slot_adam(x, slot_axis=1)
    >>> hyper = AdamHyper(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    >>> x, state = slot_adam_step(x, jnp.ones((1, 4)), state, fill=2, hyper=hyper)
    >>> [round(float(v), 3) for v in x[0]], state.steps.tolist()
    ([0.9, 0.9, 1.0, 1.0], [1, 1, 0, 0])
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from makemost_jax.errors import InputError


class AdamHyper(NamedTuple):
    """Adam's numbers; traced (not static) so a learning-rate sweep compiles once."""

    lr: jax.Array | float
    beta1: jax.Array | float
    beta2: jax.Array | float
    eps: jax.Array | float


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotAdamState:
    m: object  # pytree like the optimised states: first moments
    v: object  # second moments
    steps: jax.Array  # (S,) int32: updates each slot has received
    slot_axes: tuple = dataclasses.field(metadata={"static": True})  # per leaf of the states


def init_slot_adam(states, slot_axis) -> SlotAdamState:
    """Zero moments and step counts for `states` (any pytree with S slots on `slot_axis`).

    `slot_axis` is one axis for every array of `states`, or a pytree of axes shaped like it.

    Example:
        >>> init_slot_adam(jnp.zeros((2, 5, 3)), slot_axis=1).steps.shape
        (5,)
        >>> init_slot_adam((jnp.zeros((2, 5)), jnp.zeros((5, 2))), slot_axis=(1, 0)).slot_axes
        (1, 0)
        >>> init_slot_adam((jnp.zeros((2, 5)), jnp.zeros((5, 2))), slot_axis=1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        makemost_jax.errors.InputError: slot_axis=1 must give one slot axis for every array of the states, ...
    """
    leaves = jax.tree.leaves(states)
    axes = (slot_axis,) * len(leaves) if isinstance(slot_axis, int) else tuple(jax.tree.leaves(slot_axis))
    if len(axes) != len(leaves) or len({x.shape[a] for x, a in zip(leaves, axes)}) != 1:
        raise InputError(f"slot_axis={slot_axis} must give one slot axis for every array of the states, all "
                         "of the same size (one int, or a pytree of ints shaped like the states)")

    def zeros(x):
        return jnp.zeros(x.shape, jnp.float32)  # moments stay float32 under bfloat16 states

    return SlotAdamState(m=jax.tree.map(zeros, states), v=jax.tree.map(zeros, states),
                         steps=jnp.zeros((leaves[0].shape[axes[0]],), jnp.int32), slot_axes=axes)


def _with_slots(shape, slot_axis: int, slots: int) -> tuple:
    return (*shape[:slot_axis], slots, *shape[slot_axis + 1:])


def _along_slots(per_slot_S, like, slot_axis: int):
    """Broadcast a (S,) vector against an array whose slot axis is `slot_axis`."""
    return per_slot_S.reshape(_with_slots((1,) * like.ndim, slot_axis, per_slot_S.shape[0]))


def slot_adam_step(states, grads, opt: SlotAdamState, fill, hyper: AdamHyper):
    """One Adam update of the filled slots [0, fill); returns (states, opt).

    Every element gets the standard Adam update, bias-corrected with its slot's own
    step count; slots at or beyond `fill` are untouched and keep a count of 0.

    Example:
        >>> x = jnp.zeros((3,)); opt = init_slot_adam(x, slot_axis=0)
        >>> x, opt = slot_adam_step(x, jnp.array([1.0, -2.0, 5.0]), opt, fill=3,
        ...                         hyper=AdamHyper(0.5, 0.9, 0.999, 1e-8))
        >>> [round(float(v), 3) for v in x]   # first step: -lr * sign(grad)
        [-0.5, 0.5, -0.5]
    """
    filled_S = jnp.arange(opt.steps.shape[0]) < fill
    steps_S = opt.steps + filled_S.astype(jnp.int32)
    t_S = jnp.maximum(steps_S, 1).astype(jnp.float32)
    correct1_S = 1.0 - hyper.beta1 ** t_S
    correct2_S = 1.0 - hyper.beta2 ** t_S

    def update(x, g, m, v, axis):
        keep = _along_slots(filled_S, x, axis)
        g = g.astype(jnp.float32)
        m_new = jnp.where(keep, hyper.beta1 * m + (1.0 - hyper.beta1) * g, m)
        v_new = jnp.where(keep, hyper.beta2 * v + (1.0 - hyper.beta2) * g * g, v)
        m_hat = m_new / _along_slots(correct1_S, x, axis)
        v_hat = v_new / _along_slots(correct2_S, x, axis)
        step = hyper.lr * m_hat / (jnp.sqrt(v_hat) + hyper.eps)
        return jnp.where(keep, x - step.astype(x.dtype), x), m_new, v_new

    leaves, treedef = jax.tree.flatten(states)
    columns = zip(*(update(*args) for args in zip(leaves, treedef.flatten_up_to(grads), treedef.flatten_up_to(opt.m),
                                                 treedef.flatten_up_to(opt.v), opt.slot_axes)))
    new_states, m, v = (treedef.unflatten(column) for column in columns)
    return new_states, dataclasses.replace(opt, m=m, v=v, steps=steps_S)


def append_slots(buffer, new, fill, slot_axis: int, keep_first: int = 0):
    """Write `new` (N slots) after the `fill` slots of `buffer` (S slots); keep the last S.

    Returns the new buffer (S slots, oldest first). The new fill is min(fill + N, S).
    `keep_first` slots at the start are never evicted (attention sinks): eviction then
    drops the oldest slots after them.

    Example:
        >>> append_slots(jnp.array([1, 2, 3, 0]), jnp.array([7, 8]), fill=3, slot_axis=0).tolist()
        [2, 3, 7, 8]
        >>> append_slots(jnp.array([1, 2, 3, 0]), jnp.array([7, 8]), fill=3, slot_axis=0, keep_first=1).tolist()
        [1, 3, 7, 8]
    """
    size, n_new = buffer.shape[slot_axis], new.shape[slot_axis]
    pad = [(0, 0)] * buffer.ndim
    pad[slot_axis] = (0, n_new)
    joined = jax.lax.dynamic_update_slice_in_dim(jnp.pad(buffer, pad), new.astype(buffer.dtype), fill,
                                                 slot_axis)
    evicted = jnp.maximum(fill + n_new - size, 0)
    rest = jax.lax.dynamic_slice_in_dim(joined, keep_first + evicted, size - keep_first, slot_axis)
    if not keep_first:
        return rest
    return jnp.concatenate([jax.lax.slice_in_dim(joined, 0, keep_first, axis=slot_axis), rest], axis=slot_axis)


def append_adam_slots(opt: SlotAdamState, n_new: int, fill, keep_first: int = 0) -> SlotAdamState:
    """Moments and counts for `n_new` fresh slots (zeros), evicted like their states.

    Example:
        >>> opt = init_slot_adam(jnp.zeros((3,)), slot_axis=0)
        >>> opt = dataclasses.replace(opt, steps=jnp.array([5, 4, 0]))
        >>> append_adam_slots(opt, 2, fill=2).steps.tolist()
        [4, 0, 0]
    """
    def fresh(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef.unflatten([append_slots(x, jnp.zeros(_with_slots(x.shape, axis, n_new), x.dtype), fill, axis,
                                               keep_first) for x, axis in zip(leaves, opt.slot_axes)])

    return dataclasses.replace(opt, m=fresh(opt.m), v=fresh(opt.v),
                               steps=append_slots(opt.steps, jnp.zeros((n_new,), jnp.int32), fill, 0, keep_first))
