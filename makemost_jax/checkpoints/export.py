"""Write parameters back out: Hugging Face folders (streamed, sharded safetensors) and Orbax checkpoints.

`save_hf` writes what `transformers` and `mm.load` read back to the same computation:
`config.json` from the family's `config_to_hf` (checked to read back to the same config),
and the weights from its `weights_to_hf`, HF-named lazy views of the weights with every
load-time transform undone (fused projections fused again, kernels transposed back,
Gemma's 1 + w norms, tied tables written once). Each tensor is written in the params' own
dtype (bfloat16 stays "BF16") into `model.safetensors`, or, when the weights exceed
`max_shard_bytes`, into `model-00001-of-0000N.safetensors` files with
`model.safetensors.index.json`, Hugging Face's own layout.

The writer streams: each file's header is computed from the shapes first, then the
tensors are fetched from the devices and written one block of rows at a time (at most
`READ_BYTES`), so the host never holds more than about one such block, whatever the
model's size and however its parameters are sharded. In a multi-process job every
process must call `save_hf` (each block is gathered with
`multihost_utils.process_allgather`, a collective) and process 0 alone writes the files.

`save_orbax` writes the params as an Orbax checkpoint (each process writes its own
shards); `restore_orbax` reads one back onto any mesh, each device reading its own shard.

Example:
    >>> import jax, tempfile, makemost_jax as mm
    >>> cfg = mm.from_hf_config({"model_type": "gpt2", "n_embd": 8, "n_layer": 2, "n_head": 2,
    ...                          "vocab_size": 10, "n_positions": 8})
    >>> folder = save_hf(mm.init_params(cfg, jax.random.key(0)), tempfile.mkdtemp(), max_shard_bytes=4000)
    >>> sorted(p.name for p in folder.iterdir())  # doctest: +NORMALIZE_WHITESPACE
    ['config.json', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
     'model.safetensors.index.json']
    >>> mm.load(str(folder)).config == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from makemost_jax.checkpoints.bundle import read_bundle_meta, restore_bundle, save_bundle
from makemost_jax.checkpoints.hf import _ST_DTYPES, SAFETENSORS, SAFETENSORS_INDEX
from makemost_jax.checkpoints.lazy import LazyTensor
from makemost_jax.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from makemost_jax.models.types import Params

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "is_orbax_params", "restore_orbax", "save_hf", "save_orbax", "to_hf",
           "write_safetensors"]

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the Hugging Face Hub's long-standing default, "5GB"
READ_BYTES = 64 * 2**20  # the most bytes of one tensor fetched to the host at once
PARAMS_FORMAT = "makemost_jax.params.v1"  # the format tag in an Orbax params checkpoint's meta

_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _check_round_trip(family, cfg, hf_config: dict) -> None:
    """`ConfigError` unless the family reads `hf_config` back to `cfg` (the head's tying and kind
    are settled from the weights written beside it, so they are left out here)."""
    back = family.config_from_hf(hf_config)
    back = back.replace(head=dataclasses.replace(back.head, kind=cfg.head.kind, tied=cfg.head.tied))
    if back != cfg:
        fields = [f.name for f in dataclasses.fields(cfg) if getattr(back, f.name) != getattr(cfg, f.name)]
        raise ConfigError(f"this {cfg.hf_model_type or cfg.family} config cannot be written as a Hugging Face "
                          f"config.json: its {', '.join(fields)} would read back differently; export a model whose "
                          "config came from a Hugging Face or GGUF checkpoint")


def to_hf(params: Params) -> tuple[dict, dict[str, LazyTensor]]:
    """(`config.json` dict, HF-named lazy tensors) of `params`, in the family's Hugging Face layout.

    Nothing is fetched from the devices: the tensors are views (`LazyTensor`) that read a
    slice on demand.

    Example:
        >>> # config, tensors = to_hf(mm.load()); tensors["model.embed_tokens.weight"].shape == (49152, 576)
    """
    from makemost_jax.models.model import require_stacked
    from makemost_jax.models.registry import family_for

    require_stacked(params, "save_hf / to_hf")
    cfg = params.config
    family = family_for(cfg.hf_model_type or cfg.family)
    hf_config = family.config_to_hf(cfg)
    _check_round_trip(family, cfg, hf_config)
    return {**hf_config, "dtype": np.dtype(params.dtype).name}, family.weights_to_hf(cfg, params.weights)


def _blocks(tensor: LazyTensor) -> Iterator[np.ndarray]:
    """`tensor`'s values in C order, a block of leading rows at a time (at most `READ_BYTES`, or one row)."""
    if not tensor.shape or tensor.nbytes <= READ_BYTES:
        yield tensor.read()
        return
    rows = max(1, READ_BYTES * tensor.shape[0] // tensor.nbytes)
    for start in range(0, tensor.shape[0], rows):
        yield tensor.read((slice(start, min(start + rows, tensor.shape[0])),))


def _st_dtype(name: str, tensor: LazyTensor) -> str:
    dtype = np.dtype(tensor.dtype)
    if dtype not in _ST_NAMES:
        raise ConfigError(f"tensor {name!r} is {dtype.name}, which safetensors cannot store; convert the params "
                          "to float32, bfloat16 or float16")
    return _ST_NAMES[dtype]


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, LazyTensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` as one `.safetensors` file, streaming; returns the file's size in bytes.

    The header (8-byte little-endian length, then JSON with each tensor's dtype, shape and
    data offsets, padded with spaces to a multiple of 8) is computed from the shapes alone;
    then each tensor is read and written a block of rows at a time.

    Example:
        >>> import tempfile
        >>> from makemost_jax.checkpoints.hf import read_safetensors
        >>> from makemost_jax.checkpoints.lazy import ArrayTensor
        >>> path = tempfile.mkdtemp() + "/t.safetensors"
        >>> write_safetensors(path, {"w": ArrayTensor(np.arange(6, dtype=np.float32).reshape(2, 3))})
        120
        >>> np.asarray(read_safetensors(path)["w"]).tolist()
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        header[name] = {"dtype": _st_dtype(name, tensor), "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, tensor in tensors.items():
            written = 0
            for block in _blocks(tensor):
                if block.dtype != tensor.dtype or block.shape[1:] != tensor.shape[1:]:
                    raise CheckpointError(f"export of {name!r} produced a {block.dtype} block of shape {block.shape} "
                                          f"for a {np.dtype(tensor.dtype)} tensor of shape {tensor.shape}; "
                                          "this is a bug in the family's weights_to_hf")
                written += f.write(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
                del block  # before the next block is fetched: one block on the host at a time
            if written != tensor.nbytes:
                raise CheckpointError(f"export of {name!r} wrote {written} bytes, its shape {tensor.shape} needs "
                                      f"{tensor.nbytes}; this is a bug in the family's weights_to_hf")
    return 8 + len(raw) + offset


def _plan_shards(tensors: Mapping[str, LazyTensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per file, in order, a new file whenever the next tensor would pass the limit
    (a tensor larger than the limit gets a file of its own), as huggingface_hub splits."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
    return shards


def save_hf(params: Params, folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `params` as a Hugging Face folder that `transformers` and `mm.load` read back to the
    same logits; returns the folder.

    `config.json` plus `model.safetensors`, or, past `max_shard_bytes`, numbered shards and
    `model.safetensors.index.json`; weight files of an earlier export in `folder` are
    removed first, other files (a tokenizer) are kept. Every family of the registry exports;
    params on a mesh write the same bytes as on one device. In a multi-process job every
    process calls it and process 0 writes.

    Example:
        >>> # save_hf(mm.load("runs/llama"), "runs/llama-hf", max_shard_bytes=2 * 10**9)
        >>> # transformers.AutoModelForCausalLM.from_pretrained("runs/llama-hf")
    """
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes={max_shard_bytes} must be positive")
    hf_config, tensors = to_hf(params)
    shards = _plan_shards(tensors, max_shard_bytes)
    names = [SAFETENSORS] if len(shards) == 1 else [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                                                    for k in range(1, len(shards) + 1)]
    folder = Path(folder)
    writer = jax.process_index() == 0
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.name in (SAFETENSORS, SAFETENSORS_INDEX) or _SHARD_FILE.fullmatch(old.name):
                old.unlink()
        (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for name, shard in zip(names, shards):
        if writer:
            write_safetensors(folder / name, {n: tensors[n] for n in shard})
        else:  # take part in every block's gather, in the writer's order
            for n in shard:
                for _ in _blocks(tensors[n]):
                    pass
    if writer and len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {n: name for name, shard in zip(names, shards) for n in shard}}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("makemost_jax save_hf")
    return folder


def save_orbax(params: Params, folder: str | os.PathLike) -> str:
    """Write `params` as an Orbax checkpoint (each process writes its own shards); returns the absolute path.

    The folder's JSON `meta` holds the format tag, the config (`cfg.to_dict()`) and the
    dtype, so `restore_orbax` builds every shape before reading a byte. An existing
    `folder` is replaced.

    Example:
        >>> # save_orbax(params, "runs/llama-orbax"); restore_orbax("runs/llama-orbax", mesh=mesh)
    """
    from makemost_jax.models.model import require_stacked

    require_stacked(params, "save_orbax")
    meta = {"format": PARAMS_FORMAT, "config": params.config.to_dict(), "dtype": np.dtype(params.dtype).name}
    return save_bundle(os.fspath(folder), meta, weights=params.weights)


def _params_meta(folder: str | os.PathLike) -> dict:
    """The meta of a `save_orbax` folder; `CheckpointError` naming `folder` for anything else."""
    try:
        meta = read_bundle_meta(os.fspath(folder), "params checkpoint", "mm.save_orbax")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(folder)!r} has a meta/ folder Orbax cannot read ({e}); give a folder written "
                              "by mm.save_orbax") from e
    if not isinstance(meta, dict) or meta.get("format") != PARAMS_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{str(folder)!r} is an Orbax folder but not a params checkpoint (format {found!r}, "
                              f"expected {PARAMS_FORMAT!r}); give a folder written by mm.save_orbax")
    return meta


def is_orbax_params(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a params checkpoint written by `save_orbax` (cheap for other folders:
    Orbax is only imported when there is a meta/ folder).

    Example:
        >>> is_orbax_params("/nonexistent")
        False
    """
    if not os.path.isdir(os.path.join(os.fspath(folder), "meta")):
        return False
    try:
        _params_meta(folder)
    except CheckpointError:
        return False
    return True


def restore_orbax(folder: str | os.PathLike, dtype=None, mesh=None, rules=None) -> Params:
    """The params of a `save_orbax` folder, on `mesh` (sharded by the logical-axis `rules`,
    `sharding.DEFAULT_RULES` by default) or on the default device.

    Each device reads its own shard from the files (the abstract tree carries each leaf's
    sharding), whatever mesh the checkpoint was saved from; nothing is gathered on the
    host. `dtype` None keeps the saved dtype. A folder that is not such a checkpoint, or
    whose weights do not fit its config, is a `CheckpointError` naming it.

    Example:
        >>> # params = restore_orbax("runs/llama-orbax", mesh=make_mesh(MeshConfig(data=1, fsdp=2, tensor=4)))
    """
    import jax.numpy as jnp

    from makemost_jax.models.config import ModelConfig
    from makemost_jax.models.mapping import expected_shapes
    from makemost_jax.models.types import Params
    from makemost_jax.sharding import load_shardings

    meta = _params_meta(folder)
    cfg = ModelConfig.from_dict(meta["config"])
    asked = meta["dtype"] if dtype is None else dtype
    try:
        dtype = jnp.dtype(asked)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(f"dtype={asked!r} is not a floating-point type; use float32, bfloat16 or float16")
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), expected_shapes(cfg))
    shardings = load_shardings(Params(cfg, shapes), mesh, rules)
    abstract = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            shapes, shardings)
    try:
        weights = restore_bundle(os.fspath(folder), weights=abstract)["weights"]
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{str(folder)!r}: the saved weights do not fit the config in its meta ({e}); the "
                              "checkpoint is incomplete or corrupted, write it again with mm.save_orbax") from e
    return Params(cfg, weights)
