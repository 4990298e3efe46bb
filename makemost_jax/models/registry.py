"""The family registry: Hugging Face `model_type` -> the module that converts it.

A family module provides `config_from_hf(hf_config) -> ModelConfig` and
`weights_from_hf(cfg, tensors) -> lazy weights` (`models.mapping`), and for export the
inverses `config_to_hf(cfg)` and `weights_to_hf(cfg, weights)`; encoders also
`default_positions`.
Everything else (the weights layout, forward, logical axes) is shared, in `model` and
`layers`. Adding a family adds one module and one row here; the README's table of
supported families is checked against these rows (`tests/test_families.py`).

Example:
    >>> family_for("qwen2").__name__
    'makemost_jax.models.qwen2'
    >>> "gemma3_text" in supported_model_types()
    True
"""

from __future__ import annotations

import dataclasses
import importlib

from makemost_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # Hugging Face config.json `model_type`
    module: str  # under makemost_jax.models
    gguf: str | None  # llama.cpp `general.architecture`, where GGUF files load
    notes: str


FAMILIES = (
    Family("gpt2", "gpt2", None, "learned positions, fused Conv1D qkv"),
    Family("llama", "llama", "llama", "GQA, rotary scaling (linear, dynamic, yarn, llama3, longrope)"),
    Family("mistral", "mistral", "llama", "sliding-window attention (rolling cache)"),
    Family("qwen2", "qwen2", "qwen2", "q/k/v biases; sliding layers from max_window_layers"),
    Family("qwen3", "qwen3", "qwen3", "per-head q/k RMSNorm, explicit head_dim"),
    Family("gemma", "gemma", "gemma", "sqrt(D) embedding scale, (1 + w) RMSNorm, GeGLU"),
    Family("gemma2", "gemma", "gemma2", "logit soft-capping, sandwich norms, alternating sliding/full"),
    Family("gemma3_text", "gemma", "gemma3", "q/k norms, 5:1 sliding/full, local rotary base"),
    Family("phi3", "phi3", "phi3", "fused qkv and gate_up, partial rotary, longrope"),
    Family("gpt_neox", "gpt_neox", None, "per-head fused qkv, partial rotary, parallel residual"),
    Family("opt", "opt", None, "learned positions (offset 2), pre/post LayerNorm, projections"),
    Family("t5", "t5", None, "encoder-decoder, relative position buckets, unscaled attention, tied/untied head"),
    Family("mt5", "t5", None, "encoder-decoder, T5 v1.1 layout, untied head"),
    Family("bart", "bart", None, "encoder-decoder, learned positions (offset 2), post-LN, final_logits_bias"),
    Family("mbart", "bart", None, "encoder-decoder, BART layout with pre-LN and final norms"),
    Family("marian", "marian", None, "encoder-decoder (OPUS-MT), sinusoidal positions, separate vocabularies"),
    Family("bert", "bert", None, "encoder, MLM head"),
    Family("roberta", "bert", None, "encoder, positions from padding_idx + 1"),
)
_BY_TYPE = {f.model_type: f for f in FAMILIES}


def supported_model_types() -> list[str]:
    """Every `model_type` that loads.

    Example:
        >>> supported_model_types()[:2]
        ['gpt2', 'llama']
    """
    return [f.model_type for f in FAMILIES]


def family_for(model_type: str | None):
    """The family module of a `model_type`; an unsupported one is a `ConfigError` listing the supported.

    Example:
        >>> family_for("gpt2").__name__
        'makemost_jax.models.gpt2'
    """
    entry = _BY_TYPE.get(model_type)
    if entry is None:
        raise ConfigError(f"model_type={model_type!r} is not supported; supported: "
                          f"{', '.join(supported_model_types())}")
    return importlib.import_module(f"makemost_jax.models.{entry.module}")


def family_of(model_type: str) -> Family:
    """The registry row of a supported `model_type`.

    Example:
        >>> family_of("gemma2").gguf
        'gemma2'
    """
    family_for(model_type)
    return _BY_TYPE[model_type]


def markdown_table() -> str:
    """The README's table of supported families, one row per registry entry.

    Example:
        >>> markdown_table().splitlines()[2].startswith("| `gpt2` |")
        True
    """
    rows = ["| model_type | Hugging Face | GGUF (llama.cpp arch) | notes |", "|---|---|---|---|"]
    rows += [f"| `{f.model_type}` | yes | {f'`{f.gguf}`' if f.gguf else 'no'} | {f.notes} |" for f in FAMILIES]
    return "\n".join(rows)
