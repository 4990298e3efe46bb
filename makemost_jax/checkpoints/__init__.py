"""Checkpoint readers (Hugging Face directories / hub ids, GGUF files) and writers (Hugging Face, Orbax).

Readers return raw tensors under Hugging Face PyTorch state-dict names as numpy arrays;
the model code maps them to its own parameter tree.

Example:
    >>> from makemost_jax.checkpoints import read_gguf, default_gguf_path
    >>> config, tensors, tokenizer_meta = read_gguf(default_gguf_path())  # doctest: +SKIP
    >>> config["model_type"]  # doctest: +SKIP
    'llama'
"""

from makemost_jax.checkpoints.export import is_orbax_params, restore_orbax, save_hf, save_orbax
from makemost_jax.checkpoints.gguf import (
    DEFAULT_GGUF_NAME,
    default_gguf_path,
    read_gguf,
    read_gguf_metadata,
)
from makemost_jax.checkpoints.hf import (
    find_tokenizer_files,
    read_hf_checkpoint,
    read_safetensors,
    resolve_model_dir,
)

__all__ = [
    "DEFAULT_GGUF_NAME",
    "default_gguf_path",
    "find_tokenizer_files",
    "is_orbax_params",
    "read_gguf",
    "read_gguf_metadata",
    "read_hf_checkpoint",
    "read_safetensors",
    "resolve_model_dir",
    "restore_orbax",
    "save_hf",
    "save_orbax",
]
