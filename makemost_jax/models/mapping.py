"""Turn Hugging Face state-dict tensors into our weights pytree, loudly and lazily.

Each family lists `(our path, HF name, transpose)` entries; names containing `{i}`
are per-layer and get stacked on a leading L axis. Every tensor must be used exactly
once and have the expected shape: a missing, unused or misshapen tensor is a
`CheckpointError` that names it. The result is a tree of `LazyTensor` views (transposed,
split, stacked): every check runs before a single weight is read, and the loader then
reads each device's slice of each leaf on its own (`checkpoints.lazy.to_device`).

Example:
    >>> import numpy as np
    >>> expected = {"embed": {"tokens": jax.ShapeDtypeStruct((3, 2), np.float32)}}
    >>> w = assemble({"wte": np.ones((3, 2))}, [("embed/tokens", "wte", False)],
    ...              expected, n_layers=1)
    >>> w["embed"]["tokens"].shape
    (3, 2)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import jax
import numpy as np

from makemost_jax.checkpoints.lazy import Concatenated, LazyTensor, Stacked, Transposed, as_lazy, split
from makemost_jax.errors import CheckpointError

Entry = tuple[str, str, bool]  # (our "a/b/c" path, HF name, transpose to (in, out))


def _lookup(tree: Mapping, path: str):
    node = tree
    for part in path.split("/"):
        node = node[part]
    return node


def _insert(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _take(tensors: Mapping[str, np.ndarray], used: set, name: str, transpose: bool) -> LazyTensor:
    if name not in tensors:
        raise CheckpointError(f"checkpoint is missing tensor {name!r}; is it the right model "
                              "type and a complete (all shards present) checkpoint?")
    used.add(name)
    tensor = as_lazy(tensors[name])
    return Transposed(tensor) if transpose else tensor


def assemble(tensors: Mapping[str, np.ndarray | LazyTensor], entries: Iterable[Entry], expected,
             n_layers: int | Mapping[str, int], ignored: Iterable[str] = ()) -> dict:
    """Build the (lazy) weights pytree from HF tensors following `entries`.

    `expected` is the abstract weights tree (`expected_shapes(cfg)`); entries whose path
    it lacks are skipped (an optional weight this config does not have). `ignored` lists
    HF names (or `{i}` templates) that may be present and are dropped on purpose (e.g.
    GPT-2's causal-mask buffers). `n_layers` is the layer count, or for stacks of
    different depths (an encoder-decoder) a map from our path prefix to the count of
    the stack below it (`{"encoder/": 6, "": 3}`: the longest matching prefix wins).

    Example:
        >>> # weights = assemble(tensors, _ENTRIES, expected_shapes(cfg), cfg.n_layers)
    """
    counts = {"": n_layers} if isinstance(n_layers, int) else dict(n_layers)

    def layers_of(path: str) -> int:
        return counts[max((p for p in counts if path.startswith(p)), key=len)]

    used: set[str] = set()
    weights: dict = {}
    for path, name, transpose in entries:
        try:
            want = _lookup(expected, path)
        except KeyError:
            continue  # optional leaf this config does not have (e.g. biases switched off)
        layered = "{i}" in name
        per_tensor = tuple(want.shape[1:] if layered else want.shape)
        names = [name.format(i=i) for i in range(layers_of(path))] if layered else [name]
        arrays = [_take(tensors, used, n, transpose) for n in names]
        for n, a in zip(names, arrays):
            if a.shape != per_tensor:
                stored = a.shape[::-1] if transpose else a.shape
                implied = per_tensor[::-1] if transpose else per_tensor
                raise CheckpointError(
                    f"tensor {n!r} has shape {stored}, but the config implies {implied}; "
                    "the checkpoint and its config.json do not match")
        _insert(weights, path, Stacked(arrays) if layered else arrays[0])

    missing = [p for p, _ in _leaf_paths(expected) if _missing(weights, p)]
    if missing:
        raise CheckpointError(f"no tensor in the checkpoint provides {missing[0]!r} "
                              f"({len(missing)} weights missing)")
    patterns = [n.format(i=i) for n in ignored for i in range(max(counts.values()))] if ignored else []
    unused = sorted(set(tensors) - used - set(patterns))
    if unused:
        raise CheckpointError(
            f"checkpoint tensor {unused[0]!r} is not used by this model "
            f"({len(unused)} unused); the config.json does not describe this checkpoint")
    return weights


def _leaf_paths(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, path + "/")
        else:
            yield path, value


def _missing(tree, path):
    try:
        _lookup(tree, path)
        return False
    except KeyError:
        return True


def expected_shapes(cfg):
    """The abstract weights tree of `cfg` without allocating it.

    Example:
        >>> # expected_shapes(cfg)["embed"]["tokens"].shape == (V, D)
    """
    from makemost_jax.models.model import init_weights

    return jax.eval_shape(lambda: init_weights(cfg, jax.random.key(0)))


def split_rows(tensors: dict, name: str, parts: dict[str, int], axis: int = 0) -> None:
    """Replace the fused tensor `name` by lazy views of its consecutive pieces along `axis`, in place.

    `parts` maps each new name to its size; a fused tensor of the wrong size is an error
    naming it. Absent tensors are left alone (the assembly reports what is missing).

    Example:
        >>> t = {"qkv": np.arange(6)}
        >>> split_rows(t, "qkv", {"q": 2, "k": 2, "v": 2}); np.asarray(t["k"]).tolist()
        [2, 3]
    """
    if name not in tensors:
        return
    fused = as_lazy(tensors.pop(name))
    if fused.shape[axis] != sum(parts.values()):
        raise CheckpointError(f"tensor {name!r} has {fused.shape[axis]} rows along axis {axis}, but the config "
                              f"implies {sum(parts.values())}; the checkpoint and its config.json do not match")
    start = 0
    for new, size in parts.items():
        tensors[new] = split(fused, axis, start, start + size)
        start += size


def distinct_copy(tensors: Mapping[str, np.ndarray], name: str, original: str) -> bool:
    """Whether `tensors` has `name` with values other than `original`'s (an untied copy).

    Example:
        >>> distinct_copy({"a": np.ones(2), "b": np.ones(2)}, "b", "a"), distinct_copy({"a": np.ones(2)}, "b", "a")
        (False, False)
    """
    if name not in tensors:
        return False
    return original not in tensors or not np.array_equal(np.asarray(tensors[name]), np.asarray(tensors[original]))


def drop_tied_copies(tensors: dict, original: str, copies: Iterable[str]) -> None:
    """Remove the tied copies of `original` that older checkpoints save beside it, in place.

    A copy with other values than the original is an error naming it: the model ties
    these weights, so loading one of them would silently drop the other.

    Example:
        >>> t = {"shared": np.ones(2), "encoder.embed": np.ones(2)}
        >>> drop_tied_copies(t, "shared", ["encoder.embed"]); sorted(t)
        ['shared']
    """
    for name in copies:
        if distinct_copy(tensors, name, original):
            raise CheckpointError(f"tensor {name!r} differs from {original!r}, which this model ties it to; "
                                  "the checkpoint and its config.json do not match")
        tensors.pop(name, None)


class DeviceTensor(LazyTensor):
    """A weight in device memory (any sharding, any number of processes), or its layer `layer`,
    transposed or not, seen as a lazy tensor: a read fetches just the slice asked for to the host.

    The slice is cut (and transposed) on the devices, one compiled program per shape and
    sharding, then gathered: `jax.device_get` where this process holds every shard, else
    `multihost_utils.process_allgather`, a collective every process must join in the same
    order. numpy leaves are sliced in place.

    Example:
        >>> w = DeviceTensor(jax.numpy.arange(12.0).reshape(2, 3, 2), layer=1, transpose=True)
        >>> w.shape, w.read((slice(0, 2), slice(1, 3))).tolist()
        ((2, 3), [[8.0, 10.0], [9.0, 11.0]])
    """

    def __init__(self, array, layer: int | None = None, transpose: bool = False):
        self.array, self.layer, self.transpose = array, layer, transpose
        shape = tuple(array.shape[1:] if layer is not None else array.shape)
        self.shape = shape[::-1] if transpose else shape
        self.dtype = np.dtype(array.dtype)

    def _read(self, index):
        own = index[::-1] if self.transpose else index  # the index in the array's own axis order
        full = own if self.layer is None else (slice(self.layer, self.layer + 1),) + own
        own_sizes = tuple(s.stop - s.start for s in own)
        if not isinstance(self.array, jax.Array):
            block = np.asarray(self.array)[full].reshape(own_sizes)
            return block.T if self.transpose else block
        block = _device_block(self.array, tuple(s.start for s in full), tuple(s.stop - s.start for s in full),
                              own_sizes, self.transpose)
        if block.is_fully_addressable:
            return np.asarray(jax.device_get(block))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(block, tiled=True))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _device_block(array, starts, sizes, shape, transpose):
    block = jax.lax.dynamic_slice(array, starts, sizes).reshape(shape)
    return block.T if transpose else block


def disassemble(weights: dict, entries: Iterable[Entry], n_layers: int | Mapping[str, int]) -> dict[str, LazyTensor]:
    """The inverse of `assemble`: HF-named lazy tensors of a weights pytree (export).

    Entries whose path the weights lack are skipped; stacked layers are split again and
    kernels transposed back, as views (`DeviceTensor`): nothing is fetched from the
    devices until a slice is read.

    Example:
        >>> t = disassemble({"layers": {"w": np.ones((2, 3, 4))}}, [("layers/w", "h.{i}.w", True)], 2)
        >>> sorted(t), t["h.1.w"].shape
        (['h.0.w', 'h.1.w'], (4, 3))
    """
    counts = {"": n_layers} if isinstance(n_layers, int) else dict(n_layers)
    tensors: dict[str, LazyTensor] = {}
    for path, name, transpose in entries:
        try:
            array = _lookup(weights, path)
        except KeyError:
            continue
        if "{i}" in name:
            layers = counts[max((p for p in counts if path.startswith(p)), key=len)]
            tensors.update({name.format(i=i): DeviceTensor(array, i, transpose) for i in range(layers)})
        else:
            tensors[name] = DeviceTensor(array, transpose=transpose)
    return tensors


def fuse(tensors: dict, name: str, parts: list[str], axis: int) -> None:
    """Replace the tensors `parts` by one lazy tensor `name` joining them along `axis`, in
    place (the inverse of `split_rows`); nothing happens when a part is absent (no biases).

    Example:
        >>> t = {"q": np.zeros((2, 3)), "k": np.ones((2, 3))}
        >>> fuse(t, "qk", ["q", "k"], axis=1); t["qk"].shape
        (2, 6)
    """
    if all(p in tensors for p in parts):
        tensors[name] = Concatenated([tensors.pop(p) for p in parts], axis=axis)
