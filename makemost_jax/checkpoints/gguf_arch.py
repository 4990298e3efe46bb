"""Per-architecture tables of the GGUF reader: tensor names, llama.cpp's transforms, configs.

Each supported `general.architecture` has an `Arch`: how llama.cpp names the tensors of
one layer (`blk.{i}.<leaf>.weight|bias`) and what the Hugging Face model calls them
(after `model.layers.{i}.`), which transforms llama.cpp's `convert_hf_to_gguf.py`
applied (and so must be undone), and a function that rebuilds the Hugging Face
`config.json` dict from the GGUF metadata:

=========  ======================  ==================================================
GGUF arch  HF model_type           converter transforms undone here
=========  ======================  ==================================================
llama      llama, mistral          Q/K rows permuted per head (weight and bias)
qwen2      qwen2                   none
qwen3      qwen3                   none
gemma      gemma                   every `*norm.weight` stored as 1 + w
gemma2     gemma2                  every `*norm.weight` stored as 1 + w
gemma3     gemma3_text             every `*norm.weight` stored as 1 + w
phi3       phi3                    none (qkv and gate/up stay fused, as in HF);
                                   LongRoPE factors are tensors, folded into config
=========  ======================  ==================================================

A llama file is a Mistral model when `general.name` (or `general.basename`) says
"mistral": llama.cpp converts `MistralForCausalLM` to the llama architecture.

Hyperparameters llama.cpp does not store are rebuilt the way llama.cpp itself fills them
in (`llama-model.cpp`), so the config describes the computation llama.cpp runs:
Gemma 2/3's `query_pre_attn_scalar` is the head size except for the 27B models (46 and 62
layers), where it is hidden_size / num_attention_heads; Gemma 2 alternates sliding and
global layers (window 4096 unless stored), Gemma 3 has five sliding layers per global
one and a local rope base of 10000 unless `gemma3.rope.freq_base_swa` says otherwise.

Example:
    >>> ARCHS["gemma2"].layers["post_ffw_norm"]
    'post_feedforward_layernorm'
    >>> sorted(ARCHS)
    ['gemma', 'gemma2', 'gemma3', 'llama', 'phi3', 'qwen2', 'qwen3']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from makemost_jax.errors import CheckpointError

__all__ = ["ARCHS", "GLOBAL_NAMES", "LLAMA_LAYERS", "Arch", "Hparams", "supported_architectures"]

# Non-layer tensors, the same in every architecture here.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# GGUF per-layer leaf -> HF name after "model.layers.{i}." (Llama, Mistral, Qwen 2).
LLAMA_LAYERS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 wrap both sublayers in pre- and post-norms; llama.cpp's ffn_norm is the pre-FFN one.
_GEMMA2_LAYERS = {
    **{k: v for k, v in LLAMA_LAYERS.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps HF's fused projections; llama.cpp's phi3 loader also accepts split q/k/v.
_PHI3_LAYERS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
_MLP = ("ffn_gate", "ffn_up", "ffn_down")
_ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")
_LLAMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's LLM_TYPE_27B


class Hparams:
    """Typed, checked access to `{arch}.*` metadata, plus the tensor shapes of the file.

    Every failure is a `CheckpointError` that names the file and the key.

    Example:
        >>> h = Hparams({"llama.block_count": 2}, "llama", Path("m.gguf"), {}, lambda n: None)
        >>> h.int("block_count"), h.int("context_length", 2048)
        (2, 2048)
    """

    _REQUIRED = object()

    def __init__(
        self,
        meta: Mapping[str, Any],
        arch: str,
        path: Path,
        shapes: Mapping[str, tuple[int, ...]],
        load: Callable[[str], np.ndarray | None],
    ):
        self.meta, self.arch, self.path, self.shapes, self.load = meta, arch, path, shapes, load

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.meta:
            return self.meta[full]
        if default is self._REQUIRED:
            raise self.error(f"metadata field {full!r} is missing; re-convert the model")
        return default

    def int(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        # llama.cpp allows per-layer arrays for some counts; a uniform one is a plain number.
        if isinstance(value, list) and value and len(set(value)) == 1:
            value = value[0]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.error(f"metadata field '{self.arch}.{key}'={value!r} is not an integer >= {minimum}")
        return value

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.error(f"metadata field '{self.arch}.{key}'={value!r} is not a finite number")
        return f32_decimal(value)

    def str(self, key: str, default: Any = None) -> Any:
        value = self.raw(key, default)
        if value is not default and not isinstance(value, str):
            raise self.error(f"metadata field '{self.arch}.{key}'={value!r} is not a string")
        return value

    def has_tensor(self, name: str) -> bool:
        return name in self.shapes


def f32_decimal(x: float) -> float:
    """The shortest decimal that rounds to the same float32: GGUF stores float32, HF configs decimals.

    A value float32 cannot hold exactly (a float64 key) is returned unchanged.

    Example:
        >>> f32_decimal(float(np.float32(1e-5))), f32_decimal(0.1 + 0.2)
        (1e-05, 0.30000000000000004)
    """
    x = float(x)
    return float(str(np.float32(x))) if float(np.float32(x)) == x else x


@dataclasses.dataclass(frozen=True)
class Arch:
    """One GGUF architecture: tensor names, the converter's transforms, the config builder.

    `required` are the leaves every layer must have (weights); `bias_groups` are sets of
    leaves whose biases the HF model has all-or-none of, so a file that stores only some
    gets zeros for the rest (the same computation); `always_bias` leaves always have a
    bias in HF (Qwen 2's q/k/v). `consumed` are global tensors folded into the config.
    """

    name: str
    layers: Mapping[str, str]
    required: tuple[str, ...]
    config: Callable[[Hparams], dict[str, Any]]
    permute_qk: bool = False
    norm_plus_one: bool = False
    bias_groups: tuple[tuple[str, ...], ...] = ()
    always_bias: tuple[str, ...] = ()
    consumed: tuple[str, ...] = ()
    split_qkv: bool = False  # phi3: blk.N.attn_q/k/v are concatenated into qkv_proj

    @property
    def biases(self) -> frozenset[str]:
        """The leaves that may have a bias in this architecture's HF model."""
        return frozenset(self.always_bias).union(*self.bias_groups)


# ------------------------------------------------------------------------- config pieces


def _attention(h: Hparams) -> dict[str, Any]:
    hidden, heads = h.int("embedding_length"), h.int("attention.head_count")
    kv_heads = h.int("attention.head_count_kv", heads)
    head_dim = h.int("attention.key_length", hidden // heads)  # llama.cpp's default n_embd_head_k
    value_dim = h.int("attention.value_length", head_dim)
    if heads % kv_heads or value_dim != head_dim or head_dim <= 0:
        raise h.error(
            f"head_count={heads}, head_count_kv={kv_heads}, key_length={head_dim}, "
            f"value_length={value_dim} do not describe a {h.arch} attention layer"
        )
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
    }


def _full_rotary(h: Hparams, head_dim: int) -> None:
    rope_dim = h.int("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise h.error(
            f"rope.dimension_count={rope_dim} differs from the head size {head_dim}; partial rotary "
            f"embeddings are not part of the Hugging Face {h.arch} model"
        )


def _rope_scaling(h: Hparams) -> dict[str, Any] | None:
    kind = h.str("rope.scaling.type")
    if kind in (None, "none"):
        linear = h.float("rope.scale_linear", None)  # the key before rope.scaling.* existed
        return None if linear in (None, 1.0) else {"rope_type": "linear", "factor": linear}
    if kind == "linear":
        return {"rope_type": "linear", "factor": h.float("rope.scaling.factor")}
    if kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": h.float("rope.scaling.factor"),
            "original_max_position_embeddings": h.int("rope.scaling.original_context_length"),
        }
        for gguf_key, hf_key in (
            ("rope.scaling.yarn_attn_factor", "attention_factor"),
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
        ):
            if (value := h.float(gguf_key, None)) is not None:
                scaling[hf_key] = value
        return scaling
    raise h.error(f"rope.scaling.type={kind!r} is not supported for {h.arch} (supported: none, linear, yarn)")


def _common(h: Hparams, model_type: str, architecture: str) -> dict[str, Any]:
    attention = _attention(h)
    meta = h.meta
    rows = h.shapes.get("token_embd.weight", (None,))[0]
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = h.int("vocab_size", rows if rows else (len(tokens) if tokens else None))
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [architecture],
        **attention,
        "num_hidden_layers": h.int("block_count"),
        "intermediate_size": h.int("feed_forward_length"),
        "vocab_size": vocab,
        "max_position_embeddings": h.int("context_length"),
        "rms_norm_eps": h.float("attention.layer_norm_rms_epsilon"),
        "rope_theta": h.float("rope.freq_base", 10000.0),  # llama.cpp's default
        "tie_word_embeddings": not h.has_tensor("output.weight"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if (scaling := _rope_scaling(h)) is not None:
        config["rope_scaling"] = scaling
    if isinstance(meta.get("general.name"), str):
        config["_name_or_path"] = meta["general.name"]
    return config


def _implicit_head_dim(config: dict[str, Any]) -> None:
    # Qwen2Config and Phi3Config have no head_dim field (the model uses hidden / heads);
    # keep the key only where a file says otherwise, as HF's getattr fallback reads it.
    if config["head_dim"] == config["hidden_size"] // config["num_attention_heads"]:
        del config["head_dim"]


def _has_bias(h: Hparams, leaves: tuple[str, ...]) -> bool:
    n = h.int("block_count")
    return any(h.has_tensor(f"blk.{i}.{leaf}.bias") for i in range(n) for leaf in leaves)


def _window(h: Hparams, default: int | None) -> int | None:
    window = h.int("attention.sliding_window", default, minimum=0)
    return window or None  # llama.cpp writes 0 for "no sliding window" (phi3)


def _layer_types(h: Hparams, n_layers: int, period: int, window: int | None) -> list[str]:
    """llama.cpp's swa pattern: with period p, layer i slides iff i % p < p - 1 (p = 0: all)."""
    if window is None:
        return ["full_attention"] * n_layers
    pattern = h.raw("attention.sliding_window_pattern", period)
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(x, bool) for x in pattern):
            raise h.error(f"attention.sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        sliding = pattern
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers)]
    else:
        raise h.error(f"attention.sliding_window_pattern={pattern!r} is not a period or a per-layer list")
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _gemma_scalar(h: Hparams, config: dict[str, Any]) -> int:
    # llama-model.cpp: 1/sqrt(n_embd / n_head) for the 27B models, 1/sqrt(head_dim) otherwise.
    if config["num_hidden_layers"] == _LLAMA_27B_LAYERS[h.arch]:
        return config["hidden_size"] // config["num_attention_heads"]
    return config["head_dim"]


# ------------------------------------------------------------------------ config builders


def _looks_mistral(meta: Mapping[str, Any]) -> bool:
    names = (meta.get("general.name"), meta.get("general.basename"))
    return any(isinstance(n, str) and "mistral" in n.lower() for n in names)


def _llama_config(h: Hparams) -> dict[str, Any]:
    attention_bias, mlp_bias = _has_bias(h, _ATTN), _has_bias(h, _MLP)
    mistral = _looks_mistral(h.meta) and not (attention_bias or mlp_bias)  # HF Mistral has no biases
    if mistral:
        config = _common(h, "mistral", "MistralForCausalLM")
        config["sliding_window"] = _window(h, None)
    else:
        config = _common(h, "llama", "LlamaForCausalLM")
        config |= {"attention_bias": attention_bias, "mlp_bias": mlp_bias}
    _full_rotary(h, config["head_dim"])
    config["hidden_act"] = "silu"
    return config


def _qwen2_config(h: Hparams) -> dict[str, Any]:
    config = _common(h, "qwen2", "Qwen2ForCausalLM")
    _full_rotary(h, config["head_dim"])
    _implicit_head_dim(config)
    # llama.cpp's qwen2 has no sliding window, so neither has the model it runs.
    return config | {"hidden_act": "silu", "use_sliding_window": False, "sliding_window": None}


def _qwen3_config(h: Hparams) -> dict[str, Any]:
    config = _common(h, "qwen3", "Qwen3ForCausalLM")
    _full_rotary(h, config["head_dim"])
    return config | {
        "hidden_act": "silu",
        "attention_bias": _has_bias(h, _ATTN),
        "use_sliding_window": False,
        "sliding_window": None,
    }


def _gemma_config(h: Hparams) -> dict[str, Any]:
    config = _common(h, "gemma", "GemmaForCausalLM")
    _full_rotary(h, config["head_dim"])
    return config | {"hidden_act": "gelu_pytorch_tanh", "attention_bias": False}


def _gemma2_config(h: Hparams) -> dict[str, Any]:
    config = _common(h, "gemma2", "Gemma2ForCausalLM")
    _full_rotary(h, config["head_dim"])
    window = _window(h, 4096)  # llama.cpp's default for Gemma 2
    return config | {
        "hidden_activation": "gelu_pytorch_tanh",  # Gemma 2/3 configs name it so (no hidden_act)
        "attention_bias": False,
        "query_pre_attn_scalar": _gemma_scalar(h, config),
        "attn_logit_softcapping": h.float("attn_logit_softcapping", 50.0),  # llama.cpp's defaults
        "final_logit_softcapping": h.float("final_logit_softcapping", 30.0),
        "sliding_window": window,
        "layer_types": _layer_types(h, config["num_hidden_layers"], 2, window),
    }


def _gemma3_config(h: Hparams) -> dict[str, Any]:
    config = _common(h, "gemma3_text", "Gemma3ForCausalLM")
    _full_rotary(h, config["head_dim"])
    window = _window(h, None)  # absent or 0: every layer is global (llama.cpp: no SWA)
    config |= {
        "hidden_activation": "gelu_pytorch_tanh",  # Gemma 2/3 configs name it so (no hidden_act)
        "attention_bias": False,
        "query_pre_attn_scalar": _gemma_scalar(h, config),
        "attn_logit_softcapping": None,
        "final_logit_softcapping": h.float("final_logit_softcapping", None),
        # The local layers' base; rope_scaling (rope_theta too) applies to the global layers only.
        "rope_local_base_freq": h.float("rope.freq_base_swa", 10000.0),
        "sliding_window": window,
        "layer_types": _layer_types(h, config["num_hidden_layers"], 6, window),
    }
    if window is not None and isinstance(h.raw("attention.sliding_window_pattern", 6), int):
        config["sliding_window_pattern"] = h.raw("attention.sliding_window_pattern", 6)
    return config


def _rotary_fraction(h: Hparams, rope_dim: int, head_dim: int) -> float:
    """A short partial_rotary_factor f with int(head_dim * f) == rope_dim (how HF gets the size back)."""
    exact = rope_dim / head_dim
    for f in (float(str(np.float32(exact))), exact, float(np.nextafter(exact, 2.0))):
        if int(head_dim * f) == rope_dim:
            return f
    raise h.error(f"no partial_rotary_factor gives {rope_dim} of {head_dim} rotary dimensions")  # unreachable


def _phi3_config(h: Hparams) -> dict[str, Any]:
    config = _common(h, "phi3", "Phi3ForCausalLM")
    config.pop("rope_scaling", None)  # phi3's converter never writes rope.scaling.type
    head_dim = config["head_dim"]
    if head_dim != config["hidden_size"] // config["num_attention_heads"]:
        raise h.error(f"attention.key_length={head_dim} differs from hidden_size / head_count, unlike any phi3")
    rope_dim = h.int("rope.dimension_count", head_dim)
    if rope_dim > head_dim or rope_dim % 2:
        raise h.error(f"rope.dimension_count={rope_dim} does not fit the head size {head_dim}")
    original = h.int("rope.scaling.original_context_length", config["max_position_embeddings"])
    _implicit_head_dim(config)
    config |= {
        "hidden_act": "silu",
        "partial_rotary_factor": _rotary_fraction(h, rope_dim, head_dim),
        "original_max_position_embeddings": original,
        "sliding_window": _window(h, None),
    }
    long, short = h.load("rope_factors_long.weight"), h.load("rope_factors_short.weight")
    if (long is None) != (short is None):
        raise h.error("the file has only one of rope_factors_long / rope_factors_short; re-convert the model")
    if long is not None:
        if long.shape != (rope_dim // 2,) or short.shape != (rope_dim // 2,):
            raise h.error(f"rope factor tensors have shapes {long.shape}, {short.shape}; expected ({rope_dim // 2},)")
        scaling: dict[str, Any] = {
            "rope_type": "longrope",
            "long_factor": [f32_decimal(x) for x in long.tolist()],
            "short_factor": [f32_decimal(x) for x in short.tolist()],
        }
        # HF derives the attention factor from the context ratio as llama.cpp's converter did;
        # keep the stored one only where it says otherwise (Phi-3 "yarn"-style factors).
        factor = config["max_position_embeddings"] / original
        default = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        stored = h.float("rope.scaling.attn_factor", None)
        if stored is not None and not math.isclose(stored, default, rel_tol=1e-6):
            scaling["attention_factor"] = stored
        config["rope_scaling"] = scaling
    return config


ARCHS: dict[str, Arch] = {
    "llama": Arch(
        "llama", LLAMA_LAYERS, tuple(LLAMA_LAYERS), _llama_config,
        permute_qk=True, bias_groups=(_ATTN, _MLP),
    ),
    "qwen2": Arch(
        "qwen2", LLAMA_LAYERS, tuple(LLAMA_LAYERS), _qwen2_config, always_bias=("attn_q", "attn_k", "attn_v"),
    ),
    "qwen3": Arch(
        "qwen3", LLAMA_LAYERS | _QK_NORMS, tuple(LLAMA_LAYERS | _QK_NORMS), _qwen3_config, bias_groups=(_ATTN,),
    ),
    "gemma": Arch("gemma", LLAMA_LAYERS, tuple(LLAMA_LAYERS), _gemma_config, norm_plus_one=True),
    "gemma2": Arch("gemma2", _GEMMA2_LAYERS, tuple(_GEMMA2_LAYERS), _gemma2_config, norm_plus_one=True),
    "gemma3": Arch(
        "gemma3", _GEMMA2_LAYERS | _QK_NORMS, tuple(_GEMMA2_LAYERS | _QK_NORMS), _gemma3_config, norm_plus_one=True,
    ),
    "phi3": Arch(
        "phi3", _PHI3_LAYERS, tuple(_PHI3_LAYERS), _phi3_config,
        consumed=("rope_factors_long.weight", "rope_factors_short.weight"), split_qkv=True,
    ),
}


def supported_architectures() -> str:
    """The supported `general.architecture` values, for error messages.

    Example:
        >>> supported_architectures()
        'gemma, gemma2, gemma3, llama (Llama and Mistral), phi3, qwen2, qwen3'
    """
    return ", ".join(f"{a} (Llama and Mistral)" if a == "llama" else a for a in sorted(ARCHS))


def expected_shape(leaf: str, kind: str, config: Mapping[str, Any], arch: Arch) -> tuple[int, ...] | None:
    """The numpy (out, in) shape a per-layer tensor must have under `config` (None: not checked).

    Example:
        >>> cfg = {"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
        ...        "head_dim": 4, "intermediate_size": 16}
        >>> expected_shape("attn_k", "weight", cfg, ARCHS["llama"])
        (4, 8)
    """
    d = config["hidden_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv, ff = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd, config["intermediate_size"]
    weights = {
        "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
        "attn_qkv": (q + 2 * kv, d),
        "ffn_gate": (ff, d), "ffn_up": (2 * ff if arch.name == "phi3" else ff, d), "ffn_down": (d, ff),
        "attn_q_norm": (hd,), "attn_k_norm": (hd,),
    }
    shape = weights.get(leaf, (d,) if leaf.endswith("norm") else None)
    if shape is None or kind == "weight":
        return shape
    return shape[:1] if len(shape) == 2 else None
