"""Device meshes and sharding as data: logical axis names, rules, and helpers.

Every parameter of every family gets logical axis names (`logical_axes`), and a rules
table maps logical names to mesh axes (`DEFAULT_RULES`). Changing how a model is
sharded means changing the rules, not the code. The mesh has three axes:

- ``data``: batch rows split across devices, parameters replicated;
- ``fsdp``: batch rows split *and* parameters split along their width (each device
  holds 1/fsdp of every large tensor; XLA gathers them per layer);
- ``tensor``: attention heads, MLP width and vocabulary split (Megatron-style).

A dimension that a mesh axis does not divide evenly is left unsplit (replicated), so
every model runs on every mesh; `describe_sharding` says which were left whole. Head
dimensions split only between heads: a (D, H*K) kernel goes over "tensor" only when
the axis divides H (`head_units`); `mm.load(..., mesh=)` refuses a mesh whose tensor
axis does not divide the query heads (`check_heads_fit`), while key/value heads fewer
than the axis are replicated (grouped-query attention's usual layout).

Example:
    >>> import jax
    >>> mesh = make_mesh(MeshConfig(data=-1))
    >>> mesh.axis_names
    ('data', 'fsdp', 'tensor')
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from makemost_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("positions", None),
    ("types", None),
    ("length", None),
    ("cache_slots", None),
    ("head_dim", None),
    ("embed_proj", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes; one of them may be -1 (the rest).

    Example:
        >>> MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8)
        (2, 2, 2)
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ConfigError(f"{self}: at most one mesh axis may be -1 (the rest of the devices)")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"{self}: mesh axis sizes must be positive (or -1 for the rest)")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ConfigError(f"{self}: {n_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ConfigError(f"{self}: data x fsdp x tensor = {math.prod(sizes)} but there are "
                              f"{n_devices} devices; make the product equal or use -1 for one axis")
        return tuple(sizes)


_ACTIVE_RULES: contextvars.ContextVar = contextvars.ContextVar("makemost_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """Trace and run under `mesh`: activations inside the models get sharding constraints.

    Without it XLA infers activation layouts from the weights alone, which under fsdp
    can replicate whole activations per device. Use it around the *first* call (the
    trace) of a jitted function.

    Example:
        >>> # with activate(mesh):
        >>> #     loss = jax.jit(train_step)(state, batch)
    """
    token = _ACTIVE_RULES.set(tuple(rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE_RULES.reset(token)


def is_active() -> bool:
    """Whether a trace runs under `activate` (a mesh with the library's axes is set).

    Example:
        >>> is_active()
        False
    """
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and set(MESH_AXES) <= set(mesh.axis_names)


def constrain(x, axes: Sequence[str | None]):
    """`with_sharding_constraint` by logical axes under `activate`; a no-op otherwise.

    Example:
        >>> constrain(jnp.ones((2, 3)), ("batch", None)).shape  # doctest: +SKIP
        (2, 3)
    """
    if not is_active():
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(axes, x.shape, jax.sharding.get_abstract_mesh(),
                                                              _ACTIVE_RULES.get()))


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over `devices` (default: all).

    Example:
        >>> make_mesh(MeshConfig(data=-1, tensor=1)).shape["data"] == len(jax.devices())
        True
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


# ----------------------------------------------------------------------------- logical axes

def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes(params) -> Any:
    """A pytree like `params` (or its weights) whose leaves are tuples of logical axis names.

    A model's `Params` get the axes its family declares (`models.model.weight_axes`: an
    undeclared weight is an error); anything with a `logical_axes()` method gives its own
    (the NAR seq2seq model). Other pytrees (small trained modules) are replicated, except
    for the leading "layers" axis of stacked weights.

    Example:
        >>> # logical_axes(params)["layers"]["attn"]["q"]["kernel"] == ("layers", "embed", "q_heads")
    """
    from makemost_jax.models.model import require_stacked, weight_axes
    from makemost_jax.models.types import Params

    if isinstance(params, Params):
        require_stacked(params, "sharding")
        axes_tree = weight_axes(params.config, params.weights)
    elif hasattr(params, "logical_axes"):
        axes_tree = params.logical_axes()
    else:
        axes_tree = jax.tree_util.tree_map_with_path(
            lambda path, leaf: ("layers",) * (_names(path)[:1] == ("layers",)) + ("norm",) * (
                len(leaf.shape) - (_names(path)[:1] == ("layers",))), getattr(params, "weights", params))
    weights = getattr(params, "weights", params)

    def check(path, leaf, axes):
        if len(axes) != len(leaf.shape):
            raise ConfigError(f"logical axes {axes} do not fit weight {'/'.join(_names(path))} "
                              f"of shape {tuple(leaf.shape)}")
        return axes

    return jax.tree_util.tree_map_with_path(check, weights, axes_tree)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   units: dict[str, int] | None = None) -> PartitionSpec:
    """The `PartitionSpec` for one array: rules applied, uneven splits dropped.

    A mesh axis is used at most once per array (the first dimension that claims it).
    `units` gives, for a logical axis, how many indivisible pieces its dimension holds
    (a (D, H*K) kernel's "q_heads" dimension holds H heads): a split must divide the
    pieces, so tensor parallelism never cuts inside an attention head.

    Example:
        >>> mesh = make_mesh(MeshConfig(data=-1))
        >>> spec = partition_spec(("batch", "length"), (8, 16), mesh)
        >>> spec[1] is None  # "length" is never split; "batch" goes over data x fsdp
        True
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        mesh_axes = _rule_axes(rules, name)
        pieces = (units or {}).get(name, size)
        # Axes of size 1 add nothing; axes already used or not dividing the pieces are skipped.
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        while mesh_axes and (size % math.prod(mesh.shape[a] for a in mesh_axes)
                             or pieces % math.prod(mesh.shape[a] for a in mesh_axes)):
            mesh_axes = mesh_axes[:-1]
        used.update(mesh_axes)
        spec.append(mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*spec)


def param_shardings(params, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """`NamedSharding`s for every parameter, as a pytree like `params`.

    Example:
        >>> # shardings = param_shardings(params, make_mesh(MeshConfig(fsdp=-1)))
    """
    axes_tree = logical_axes(params)
    weights = getattr(params, "weights", params)
    config = getattr(params, "config", None)

    def place(path, leaf, axes):
        # An encoder-decoder's encoder may have its own head count.
        own = config.encoder if config is not None and _names(path)[:1] == ("encoder",) else config
        units = head_units(own) if own is not None else None
        return NamedSharding(mesh, partition_spec(axes, leaf.shape, mesh, rules, units))

    # axes_tree has a tuple where weights has an array, so weights' structure leads.
    shardings = jax.tree_util.tree_map_with_path(place, weights, axes_tree)
    return dataclasses.replace(params, weights=shardings) if hasattr(params, "weights") else shardings


def load_shardings(params, mesh: Mesh | None = None, rules: Sequence[tuple[str, Any]] | None = None):
    """Where a load puts each weight of `params` (a `Params` of arrays, shapes or lazy tensors): on
    `mesh` by `rules` after `check_heads_fit`, or without a mesh on this process's first device.

    Example:
        >>> # shardings = load_shardings(Params(cfg, lazy_weights), make_mesh(MeshConfig(fsdp=4, tensor=2)))
    """
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, params.weights)
    rules = DEFAULT_RULES if rules is None else rules
    check_heads_fit(params.config, mesh, rules)
    return param_shardings(params, mesh, rules).weights


def head_units(config) -> dict[str, int]:
    """The indivisible pieces of the head-carrying logical axes of a model config (see `partition_spec`).

    Example:
        >>> # head_units(params.config) == {"q_heads": 9, "kv_heads": 3}
    """
    return {"q_heads": config.n_heads, "kv_heads": config.n_kv_heads}


def check_heads_fit(config, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> None:
    """Raise `ConfigError` when the mesh axis that splits query heads does not divide the head count.

    Key/value heads fewer than (or not divisible by) that axis are replicated instead, the
    usual layout for grouped-query attention.

    Example:
        >>> # check_heads_fit(params.config, make_mesh(MeshConfig(data=1, tensor=8)))  # 9 heads: ConfigError
    """
    mesh_axes = [a for a in _rule_axes(rules, "q_heads") if a in mesh.shape]
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    for stack in (config, config.encoder):
        if stack is not None and stack.n_heads % size:
            name = "/".join(mesh_axes)
            raise ConfigError(f"mesh axis {name!r} of size {size} does not divide the model's {stack.n_heads} "
                              f"attention heads{' (encoder)' if stack is config.encoder else ''}; tensor "
                              f"parallelism would split a head: use a {name} size that divides {stack.n_heads}")


def shard_params(params, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """`params` placed on `mesh` following `rules`.

    Example:
        >>> # params = shard_params(mm.load("gpt2"), make_mesh(MeshConfig(data=2, tensor=4)))
    """
    return jax.device_put(params, param_shardings(params, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device.

    Example:
        >>> replicated(make_mesh()).spec == PartitionSpec()
        True
    """
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(state, params_shardings):
    """Shardings for any pytree holding parameter-shaped subtrees (e.g. optax states).

    Each leaf whose tree path ends with a parameter's path (and has its shape) gets
    that parameter's sharding; every other leaf (step counts, scalars) is replicated.

    Example:
        >>> # opt_shardings = state_shardings(jax.eval_shape(tx.init, params), param_shardings(params, mesh))
    """
    by_path = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_path[_names(path)] = sharding
    some = next(iter(by_path.values()))
    fallback = replicated(some.mesh)

    def pick(path, leaf):
        names = _names(path)
        for start in range(len(names)):
            sharding = by_path.get(names[start:])
            if sharding is not None and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
                return sharding
        return fallback

    return jax.tree_util.tree_map_with_path(pick, state)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   batch_size: int | None = None) -> NamedSharding:
    """Rows split over the batch mesh axes, every other dimension whole.

    Example:
        >>> batch_sharding(make_mesh(MeshConfig(data=-1))).spec  # doctest: +SKIP
        PartitionSpec('data', None)
    """
    shape = (batch_size if batch_size is not None else _batch_devices(mesh, rules),) + (1,) * (ndim - 1)
    return NamedSharding(mesh, partition_spec(("batch",) + (None,) * (ndim - 1), shape, mesh, rules))


def _rule_axes(rules: Sequence[tuple[str, Any]], logical: str | None) -> tuple[str, ...]:
    """The mesh axes `rules` map the logical axis `logical` to (none for None or an unlisted name)."""
    target = dict(rules).get(logical) if logical is not None else None
    return (target,) if isinstance(target, str) else tuple(target or ())


def _batch_devices(mesh: Mesh, rules) -> int:
    return math.prod(mesh.shape[a] for a in _rule_axes(rules, "batch"))


def shard_batch(batch, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """Place a pytree of host arrays (leading batch axis) on `mesh`.

    Single process: `batch` holds the global rows. Several processes: each passes its
    own rows and the global array is assembled with `make_array_from_process_local_data`.

    Example:
        >>> # batch = shard_batch({"tokens": np.zeros((16, 129), np.int32)}, mesh)
    """
    n_devices = _batch_devices(mesh, rules)

    def place(x):
        x = np.asarray(x)
        if jax.process_count() == 1:
            if x.shape[0] % n_devices:
                raise ConfigError(f"batch of {x.shape[0]} rows does not split over {n_devices} batch "
                                  "devices; make the batch size a multiple of data x fsdp")
            return jax.device_put(x, batch_sharding(mesh, x.ndim, rules, x.shape[0]))
        global_rows = x.shape[0] * jax.process_count()
        sharding = batch_sharding(mesh, x.ndim, rules, global_rows)
        return jax.make_array_from_process_local_data(sharding, x, (global_rows,) + x.shape[1:])

    return jax.tree.map(place, batch)


def cache_shardings(cache, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """Shardings for a `KVCache`: rows over the batch axes, key/value heads over tensor.

    Example:
        >>> # cache = jax.device_put(cache, cache_shardings(cache, mesh))
    """
    from makemost_jax.models.cache import KV_AXES  # here: models import this module

    def spec(axes, x):
        return NamedSharding(mesh, partition_spec(axes, x.shape, mesh, rules))

    return dataclasses.replace(
        cache, k=spec(KV_AXES["k"], cache.k), v=spec(KV_AXES["v"], cache.v),
        positions=spec(("batch", "cache_slots"), cache.positions), fill=replicated(mesh),
        next_position=spec(("batch",), cache.next_position))


def process_bytes(tree) -> int:
    """Bytes of the distinct slices this process's devices hold (replicas on several local devices count once).

    What a process must read to build its part of `tree`: its share of a sharded load.

    Example:
        >>> # process_bytes(mm.load(folder, mesh=mesh))   # about 1/2 of the model with 2 processes
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        seen = set()
        for shard in leaf.addressable_shards:
            key = tuple((s.start, s.stop) for s in shard.index)
            if key not in seen:
                seen.add(key)
                total += shard.data.nbytes
    return total


def describe_sharding(params, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> dict:
    """Per-parameter partition specs and per-device bytes, for logs and docs.

    Example:
        >>> # describe_sharding(params, mesh)["bytes_per_device"]
    """
    shardings = param_shardings(params, mesh, rules)
    weights = getattr(params, "weights", params)
    flat_w = jax.tree_util.tree_flatten_with_path(weights)[0]
    flat_s = jax.tree.leaves(getattr(shardings, "weights", shardings))
    specs, per_device = {}, 0
    for (path, leaf), sharding in zip(flat_w, flat_s):
        specs["/".join(_names(path))] = str(sharding.spec)
        shard_shape = sharding.shard_shape(leaf.shape)
        per_device += math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
    return {"mesh": dict(mesh.shape), "specs": specs, "bytes_per_device": per_device}
