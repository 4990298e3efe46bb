"""`load` and `load_tokenizer`: one entry point for every checkpoint source.

Sources: None (the embedded SmolLM2-135M-Instruct GGUF), a `.gguf` file, a Hugging
Face checkpoint directory, an Orbax params folder (`mm.save_orbax`), or a hub id (only
where a hub is reachable).

Example:
    >>> import makemost_jax as mm
    >>> params = mm.load()                         # doctest: +SKIP
    >>> params.config.n_layers, params.config.d_model   # doctest: +SKIP
    (30, 576)
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.errors import ConfigError
from makemost_jax.models.config import from_hf_config
from makemost_jax.models.model import params_from_hf
from makemost_jax.models.types import Params

DEFAULT_NAMES = (None, "", "default", "-")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def read_checkpoint(source: str | None) -> tuple[dict, dict]:
    """(HF config dict, HF-named tensors) for any source `load` accepts.

    Example:
        >>> # config, tensors = read_checkpoint(None)   # the embedded GGUF, HF names
    """
    from makemost_jax.checkpoints.gguf import default_gguf_path, read_gguf
    from makemost_jax.checkpoints.hf import read_hf_checkpoint

    if source in DEFAULT_NAMES:
        source = default_gguf_path()
    if str(source).endswith(".gguf"):
        hf_config, tensors, _ = read_gguf(str(source))
        return hf_config, tensors
    return read_hf_checkpoint(os.fspath(source))


def load(source: str | None = None, dtype=None, mesh=None, rules=None) -> Params:
    """Load a model's parameters (weights + config) from any supported source.

    Weights stream from the files straight into place: with a `mesh`, each parameter is
    created in the sharding the logical-axis `rules` give it (`sharding.DEFAULT_RULES`),
    and each device's slice is read from the checkpoint files on its own, in the
    checkpoint's dtype, then cast; in a multi-process job each process reads
    only the slices of its own devices. Without a mesh the same path fills one device.
    `dtype` None keeps the checkpoint's dtype (bf16 stays bf16; a quantised GGUF is
    dequantised to float32); "float32", "bfloat16" or "float16" ask for one.

    Raises `ModelNotFoundError` for an unknown name or path, `CheckpointError` naming the
    file or tensor for a missing shard, a corrupted or mismatched checkpoint, and
    `ConfigError` for a mesh that would split an attention head; all before any device
    memory is allocated.

    Example:
        >>> params = load("path/to/hf_gpt2_dir", dtype="bfloat16")   # doctest: +SKIP
        >>> from makemost_jax.sharding import MeshConfig, make_mesh
        >>> params = load("path/to/llama", mesh=make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))  # doctest: +SKIP
    """
    from makemost_jax.checkpoints.export import is_orbax_params, restore_orbax

    dtype = None if dtype is None else _dtype(dtype)
    if source not in DEFAULT_NAMES and is_orbax_params(source):
        return restore_orbax(source, dtype, mesh=mesh, rules=rules)
    hf_config, tensors = read_checkpoint(source)
    return params_from_hf(from_hf_config(hf_config, tensors), tensors, dtype, mesh=mesh, rules=rules)


def load_tokenizer(source: str | None = None):
    """The tokenizer that goes with `load(source)`.

    Example:
        >>> tok = load_tokenizer()                    # doctest: +SKIP
        >>> tok.decode(tok.encode("Hello world"))     # doctest: +SKIP
        'Hello world'
    """
    from makemost_jax.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(None if source in DEFAULT_NAMES else os.fspath(source))


def model_summary(params: Params) -> dict:
    """A model's architecture and size as a flat, JSON-ready dict.

    Example:
        >>> # model_summary(mm.load())["n_params"]
        >>> # 134515008
    """
    cfg = params.config
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params.weights))
    return {
        "family": cfg.family, "hf_model_type": cfg.hf_model_type, "n_params": n_params,
        "dtype": str(params.dtype), "vocab_size": cfg.vocab_size, "n_layers": cfg.n_layers,
        "d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "d_ff": cfg.d_ff, "max_positions": cfg.max_positions,
        "norm": cfg.norm.kind, "norm_placement": cfg.norm.placement, "activation": cfg.activation,
        "gated_mlp": cfg.mlp.gated, "rope_theta": cfg.rope_theta,
        "rope_type": None if cfg.rotary is None else cfg.rotary.kind,
        "sliding_layers": list(cfg.sliding_layers),
        "windows": sorted({k.window for k in cfg.layers if k.window is not None}),
        "attention_pattern": attention_pattern(cfg),
        "tie_embeddings": cfg.tie_embeddings, "causal": cfg.causal, "has_lm_head": cfg.has_lm_head,
        "encoder_decoder": cfg.is_encoder_decoder,
        "encoder_layers": None if cfg.encoder is None else cfg.encoder.n_layers,
        "decoder_start_token_id": cfg.decoder_start_token_id,
    }


def attention_pattern(cfg) -> str:
    """The layers' attention as a short string: "full", "sliding 4096", or the repeating unit.

    Example:
        >>> # attention_pattern(gemma2_cfg) == "1 sliding (4096) : 1 full, repeated"
    """
    kinds = ["full" if k.window is None else f"sliding ({k.window})" for k in cfg.layers]
    if len(set(kinds)) == 1:
        return f"all {kinds[0]}"
    for period in range(1, len(kinds)):
        if all(kinds[i] == kinds[i % period] for i in range(len(kinds))):
            unit = kinds[:period]
            runs = []
            for kind in unit:
                if runs and runs[-1][1] == kind:
                    runs[-1][0] += 1
                else:
                    runs.append([1, kind])
            return " : ".join(f"{n} {kind}" for n, kind in runs) + ", repeated"
    return ", ".join(f"{i}: {kind}" for i, kind in enumerate(kinds))
