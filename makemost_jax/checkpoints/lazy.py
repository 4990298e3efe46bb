"""Lazy checkpoint tensors: shape and dtype up front, values one slice at a time.

Every reader (safetensors, `.bin`, GGUF) returns `LazyTensor`s, and every load-time
transform (transposing a Linear weight, splitting a fused q/k/v, undoing a permutation,
adding 1 to a norm, stacking layers) is a lazy view over them. Nothing is read until a
slice is asked for: `read(index)` reads just the bytes that slice needs, in the
checkpoint's own dtype, so a loader can build each device's shard of each parameter
straight from the files (`to_device`) and never holds the whole model on the host.

Files are read with `os.preadv` into the output buffer, not memory-mapped: the page
cache then does not count in the process's RSS, and `bytes_read()` is what was read.

Example:
    >>> import numpy as np
    >>> t = ArrayTensor(np.arange(12, dtype=np.float32).reshape(3, 4))
    >>> Transposed(t).read((slice(1, 3), slice(0, 2))).tolist()
    [[1.0, 5.0], [2.0, 6.0]]
    >>> Stacked([t, t]).shape
    (2, 3, 4)
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Index = tuple[slice, ...]

_SHORT_RUN = 64 * 1024  # bytes: shorter contiguous runs are gathered from a memory map
_TILE = 256
_UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

_counter_lock = threading.Lock()
_bytes_read = 0


def bytes_read() -> int:
    """Bytes this process has read from checkpoint files so far (safetensors, GGUF, `.bin` slices).

    Example:
        >>> before = bytes_read()
        >>> # mm.load(folder, mesh=mesh); bytes_read() - before   -> this process's share
    """
    return _bytes_read


def _count(n: int) -> None:
    global _bytes_read
    with _counter_lock:
        _bytes_read += n


def full_index(shape: Sequence[int]) -> Index:
    """The index that selects everything of `shape`.

    Example:
        >>> full_index((2, 3))
        (slice(0, 2, None), slice(0, 3, None))
    """
    return tuple(slice(0, n) for n in shape)


def normalise(index, shape: Sequence[int]) -> Index:
    """Explicit (start, stop) slices for every dimension, from a `jax` shard index (or None).

    Example:
        >>> normalise((slice(None), slice(2, None)), (4, 6))
        (slice(0, 4, None), slice(2, 6, None))
    """
    if index is None:
        return full_index(shape)
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided slice {s} is not supported")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def empty(shape: Sequence[int], dtype) -> np.ndarray:
    """`np.empty`, 64-byte aligned: JAX's CPU client then adopts the buffer without a copy.

    Example:
        >>> empty((3, 5), np.float32).ctypes.data % 64
        0
    """
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n].view(dtype).reshape(shape)


def _sizes(index: Index) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in index)


class LazyTensor:
    """A tensor whose values are read on demand; `np.asarray(t)` reads all of it.

    Subclasses set `shape` and `dtype` and implement `_read(index)` for a normalised index.

    Example:
        >>> t = ArrayTensor(np.ones((2, 2)))
        >>> t.shape, float(np.asarray(t).sum())
        ((2, 2), 4.0)
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def read(self, index=None) -> np.ndarray:
        """The values at `index` (a tuple of slices; None = everything), as a numpy array."""
        return self._read(normalise(index, self.shape))

    def _read(self, index: Index) -> np.ndarray:
        raise NotImplementedError

    def _read_into(self, index: Index, out: np.ndarray) -> None:
        """Write the values at `index` into `out` (subclasses that can skip a temporary do)."""
        out[...] = self._read(index)

    def __array__(self, dtype=None, copy=None):
        array = self.read()
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={np.dtype(self.dtype).name})"


def as_lazy(x) -> LazyTensor:
    """`x` itself if lazy, else an in-memory `ArrayTensor` of it (numpy, torch, jax arrays).

    Example:
        >>> as_lazy(np.zeros(3)).shape
        (3,)
    """
    return x if isinstance(x, LazyTensor) else ArrayTensor(np.asarray(x))


class ArrayTensor(LazyTensor):
    """An in-memory array seen as a lazy tensor (tests, computed tensors, zero biases).

    Reads are copies: a device buffer must never alias an array its owner may still change.
    """

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape, self.dtype = tuple(array.shape), array.dtype

    def _read(self, index):
        out = empty(_sizes(index), self.dtype)
        out[...] = self.array[index]
        return out


def _truncated(path, needed: int):
    from makemost_jax.errors import CheckpointError

    return CheckpointError(f"{path}: file ends before byte {needed}; it was truncated after its header was "
                           "read, re-download it")


def _preadv_exact(fd: int, buffer: memoryview, offset: int, path) -> None:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise _truncated(path, offset + len(buffer))
        done += n
    _count(len(buffer))


class FileTensor(LazyTensor):
    """A C-ordered tensor stored at `offset` in a file (safetensors data, raw GGUF F32/F16).

    A slice is read as its contiguous runs: one read when only the leading dimension is
    cut (a row range), one per row when a trailing dimension is cut as well. Many short
    runs (a column slice of a wide matrix) are gathered by numpy from a memory map of just
    their rows instead, which is dropped at once, so its pages leave the RSS with it.
    """

    def __init__(self, path, offset: int, shape: Sequence[int], dtype):
        self.path, self.offset = path, offset
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def _read(self, index):
        out = empty(_sizes(index), self.dtype)
        self._read_into(index, out)
        return out

    def _read_into(self, index, out):
        if not out.flags.c_contiguous or out.dtype != self.dtype:
            out[...] = self._read(index)
            return
        if out.size == 0:
            return
        sizes = out.shape
        # The last dimension not taken whole: below it every run is contiguous in the file.
        cut = max((d for d, (s, n) in enumerate(zip(sizes, self.shape)) if s != n), default=0)
        strides = [math.prod(self.shape[d + 1:]) * self.dtype.itemsize for d in range(self.ndim)]
        run = sizes[cut] * strides[cut] if self.ndim else self.dtype.itemsize
        if run < _SHORT_RUN and out.nbytes > run:
            self._gather(index, out)
            return
        flat = memoryview(out.reshape(-1).view(np.uint8))
        first = self.offset + (index[cut].start * strides[cut] if self.ndim else 0)
        with open(self.path, "rb") as f:
            for k, prefix in enumerate(itertools.product(*(range(s.start, s.stop) for s in index[:cut]))):
                start = first + sum(i * stride for i, stride in zip(prefix, strides))
                _preadv_exact(f.fileno(), flat[k * run:(k + 1) * run], start, self.path)

    def _gather(self, index, out):
        rows = index[0]
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        if self.offset + rows.stop * row_bytes > os.path.getsize(self.path):
            raise _truncated(self.path, self.offset + rows.stop * row_bytes)
        bits = _UINTS[self.dtype.itemsize]
        mapped = np.memmap(self.path, bits, "r", offset=self.offset + rows.start * row_bytes,
                           shape=(rows.stop - rows.start, *self.shape[1:]))
        out.view(bits)[...] = mapped[(slice(None),) + index[1:]]
        del mapped
        _count(out.nbytes)


def transpose_copy(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`x.T` as a C-contiguous copy, tile by tile (2-D): numpy's one-shot strided copy of a large
    matrix thrashes the cache and runs ~2x slower. Bits are moved as unsigned ints, so bfloat16
    and float8 copy as fast as the standard dtypes.

    Example:
        >>> transpose_copy(np.arange(6).reshape(2, 3)).tolist()
        [[0, 3], [1, 4], [2, 5]]
    """
    if out is None:
        out = empty(x.shape[::-1], x.dtype)
    if x.ndim != 2 or x.size <= _TILE * _TILE:
        out[...] = x.T
        return out
    bits = _UINTS[x.dtype.itemsize]
    src, dst = x.view(bits), out.view(bits)
    for i in range(0, x.shape[0], _TILE):
        for j in range(0, x.shape[1], _TILE):
            dst[j:j + _TILE, i:i + _TILE] = src[i:i + _TILE, j:j + _TILE].T
    return out


class Transposed(LazyTensor):
    """All axes reversed (a PyTorch (out, in) Linear weight seen as (in, out)); slices come back C-ordered."""

    def __init__(self, base: LazyTensor):
        self.base = base = as_lazy(base)
        self.shape, self.dtype = tuple(reversed(base.shape)), base.dtype

    def _read(self, index):
        return transpose_copy(self.base._read(tuple(reversed(index))))

    def _read_into(self, index, out):
        transpose_copy(self.base._read(tuple(reversed(index))), out)


class Taken(LazyTensor):
    """`base` indexed by `indices` along `axis` (a slice of a fused tensor, a row permutation).

    Consecutive indices are read as one range, so a plain split reads one block.
    """

    def __init__(self, base: LazyTensor, axis: int, indices):
        self.base = base = as_lazy(base)
        self.axis = axis % base.ndim
        self.indices = np.asarray(indices, np.int64)
        self.shape = base.shape[:self.axis] + (len(self.indices),) + base.shape[self.axis + 1:]
        self.dtype = base.dtype

    def _read(self, index):
        wanted = self.indices[index[self.axis]]
        if wanted.size == 0:
            return np.empty(_sizes(index), self.dtype)
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        pieces = []
        for run in np.split(wanted, breaks):
            sub = index[:self.axis] + (slice(int(run[0]), int(run[-1]) + 1),) + index[self.axis + 1:]
            pieces.append(self.base._read(sub))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=self.axis)


def split(base: LazyTensor, axis: int, start: int, stop: int) -> Taken:
    """Rows (or columns, ...) `start:stop` of `base` along `axis`.

    Example:
        >>> split(ArrayTensor(np.arange(6)), 0, 2, 4).read().tolist()
        [2, 3]
    """
    return Taken(base, axis, np.arange(start, stop))


class Mapped(LazyTensor):
    """An elementwise function of `base` (Gemma's 1 + w norms), applied per slice."""

    def __init__(self, base: LazyTensor, fn: Callable[[np.ndarray], np.ndarray], dtype):
        self.base = base = as_lazy(base)
        self.fn, self.shape, self.dtype = fn, base.shape, np.dtype(dtype)

    def _read(self, index):
        return np.asarray(self.fn(self.base._read(index)), self.dtype)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="makemost-read")


class Stacked(LazyTensor):
    """Equal-shaped tensors stacked on a new leading axis (one per layer), read per slice."""

    def __init__(self, parts: Sequence[LazyTensor]):
        self.parts = [as_lazy(p) for p in parts]
        self.shape = (len(self.parts),) + self.parts[0].shape
        self.dtype = np.result_type(*{np.dtype(p.dtype) for p in self.parts})

    def _read(self, index):
        out = empty(_sizes(index), self.dtype)
        layers = range(index[0].start, index[0].stop)
        # Reads and copies release the GIL: layers are filled in parallel.
        list(_pool().map(lambda j: self.parts[layers[j]]._read_into(index[1:], out[j]), range(len(layers))))
        return out


class Concatenated(LazyTensor):
    """Tensors joined along `axis` (GGUF's separate q/k/v as the fused HF tensor)."""

    def __init__(self, parts: Sequence[LazyTensor], axis: int = 0):
        self.parts, self.axis = [as_lazy(p) for p in parts], axis
        first = self.parts[0].shape
        self.shape = first[:axis] + (sum(p.shape[axis] for p in self.parts),) + first[axis + 1:]
        self.dtype = np.result_type(*{np.dtype(p.dtype) for p in self.parts})

    def _read(self, index):
        pieces, start = [], 0
        want = index[self.axis]
        for part in self.parts:
            stop = start + part.shape[self.axis]
            lo, hi = max(want.start, start), min(want.stop, stop)
            if lo < hi:
                sub = index[:self.axis] + (slice(lo - start, hi - start),) + index[self.axis + 1:]
                pieces.append(part._read(sub).astype(self.dtype, copy=False))
            start = stop
        if not pieces:
            return np.empty(_sizes(index), self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=self.axis)


def to_device(tensor: LazyTensor, sharding, dtype) -> "jax.Array":  # noqa: F821
    """`tensor` as a `jax.Array` with `sharding`, each device's shard read, cast and placed on its own.

    Only the shards of this process's devices are read; devices holding the same slice
    (replicas) share one read. Each shard goes to its device as soon as it is read, so
    the host holds one shard at a time, not the whole parameter; on CPU devices the
    aligned host buffer becomes the device buffer without a copy.

    Example:
        >>> import jax
        >>> to_device(ArrayTensor(np.ones((2, 2))), jax.sharding.SingleDeviceSharding(jax.devices()[0]),
        ...           np.float32).sum().item()
        4.0
    """
    import jax

    placed: dict[tuple, "jax.Array"] = {}  # noqa: F821
    shards = []
    for device, index in sharding.addressable_devices_indices_map(tensor.shape).items():
        index = normalise(index, tensor.shape)
        key = tuple((s.start, s.stop) for s in index)
        if key not in placed:
            host = tensor.read(index)
            if host.dtype != dtype or host.ctypes.data % 64 or not host.flags.c_contiguous:
                aligned = empty(host.shape, dtype)
                aligned[...] = host  # the cast, into a buffer the CPU client can adopt
                host = aligned
            placed[key] = jax.device_put(host, device)
            shards.append(placed[key])
        else:
            shards.append(jax.device_put(placed[key], device))
    return jax.make_array_from_single_device_arrays(tensor.shape, sharding, shards)
