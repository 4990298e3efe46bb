"""Static model configuration: a frozen, hashable dataclass composed of parts.

A `ModelConfig` is sizes plus parts (`AttentionConfig`, `RotaryConfig`, `MlpConfig`,
`NormConfig`, `EmbedConfig`, `HeadConfig`) and a per-layer pattern (`LayerKind`: sliding
window and rotary settings of each layer). It is hashable, so it is static under
`jax.jit`. Each family module converts a Hugging Face `config.json` into one
(`from_hf_config` picks the module through the registry) and names the field when
something is not supported.

Dimension letters used across `models/`: B batch, T query length, S cache slots,
L layers, D width, H query heads, G key/value heads, K head width, F feed-forward width,
V vocabulary.

Example:
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 64, "n_layer": 2,
    ...                       "n_head": 4, "vocab_size": 100, "n_positions": 32})
    >>> cfg.family, cfg.head_dim, cfg.d_ff, cfg.attention.n_heads
    ('gpt2', 16, 256, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from makemost_jax.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Self-attention: head counts, biases, score scaling and optional variants.

    `scale` multiplies the scores (None: 1/sqrt(head_dim)); `softcap` squashes them as
    `softcap * tanh(s / softcap)` (Gemma 2); `qk_norm` applies a per-head RMSNorm to
    queries and keys before rotary (Qwen3, Gemma 3).
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv_bias: bool = True
    out_bias: bool = True
    scale: float | None = None
    softcap: float | None = None
    qk_norm: bool = False
    scale_by_inverse_layer: bool = False  # GPT-2's scale_attn_by_inverse_layer_idx
    causal: bool = True
    # T5's relative position bias: `relative_buckets` learned per-head scalars, shared by every
    # layer of a stack, indexed by the bucketed distance (bidirectional buckets when not causal).
    relative_buckets: int = 0
    relative_max_distance: int = 128


@dataclasses.dataclass(frozen=True)
class RotaryConfig:
    """Rotary positions: base, scaling (a sorted tuple of HF `rope_parameters` items) and the
    rotated fraction of each head (`fraction` < 1: partial rotary, GPT-NeoX and Phi)."""

    theta: float
    scaling: tuple[tuple[str, Any], ...] = ()
    fraction: float = 1.0
    max_positions: int = 0  # the model's max_position_embeddings (dynamic, yarn, longrope read it)

    @property
    def kind(self) -> str:
        return dict(self.scaling).get("rope_type", "default")


@dataclasses.dataclass(frozen=True)
class MlpConfig:
    d_ff: int
    activation: str = "gelu_new"  # "gelu_new" | "gelu" | "silu" | "relu"
    gated: bool = False  # act(gate(x)) * up(x) (SwiGLU / GeGLU)
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Norm kind and where the block puts its norms.

    `placement`: "pre" (GPT-2, Llama), "post" (BERT, OPT without layer_norm_before) or
    "sandwich" (Gemma 2/3: a norm before and after each sub-layer). `parallel`: attention
    and MLP both read the block input (GPT-NeoX's use_parallel_residual).
    """

    kind: str = "layernorm"  # "layernorm" | "rmsnorm"
    eps: float = 1e-5
    placement: str = "pre"
    parallel: bool = False


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Token embeddings and what is added to them.

    `positions`: "learned" (a table indexed by position + `position_offset`), "sinusoidal"
    (Marian's fixed table: sines in the first half of the width, cosines in the second) or
    "none" (rotary and relative-bias models). `scale` multiplies the token embeddings
    (Gemma, BART/Marian with `scale_embedding`: sqrt(D)).
    `project_dim`: embeddings narrower than the model, projected in and out (OPT).
    """

    positions: str = "none"
    position_offset: int = 0
    scale: float = 1.0
    type_vocab_size: int = 0  # BERT token types
    norm: bool = False  # BERT's embedding LayerNorm
    project_dim: int | None = None


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The output: "lm" (final norm + vocabulary projection), "mlm" (BERT's head) or "none".

    `input_scale` multiplies the final states before the projection (T5's tied head:
    d_model ** -0.5); `logits_bias` adds a learned per-token bias (BART/Marian's
    `final_logits_bias`).
    """

    kind: str = "lm"
    tied: bool = True
    final_norm: bool = True
    softcap: float | None = None
    input_scale: float = 1.0
    logits_bias: bool = False


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What may differ between layers: a sliding window (keys within `window` positions of the
    query, the query's own included) and the rotary settings (Gemma 3's local layers)."""

    window: int | None = None
    rotary: RotaryConfig | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model: sizes, parts and the per-layer pattern `layers` (L kinds).

    An encoder-decoder is the decoder's config with `encoder` set to the encoder stack's
    own config (bidirectional, no head; its `head.final_norm` says whether the stack ends
    in a norm). Every decoder layer then has a cross-attention sub-layer over the encoder's
    states, with a norm of its own unless `cross_norm` is False (the NAR decoder, whose
    cross-attention starts as an exact no-op). `share_embeddings`: the encoder reads the
    decoder's token table (T5, BART, Marian's default).
    """

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    max_positions: int  # the context the model was trained with
    attention: AttentionConfig
    mlp: MlpConfig
    norm: NormConfig = NormConfig()
    embed: EmbedConfig = EmbedConfig()
    head: HeadConfig = HeadConfig()
    layers: tuple[LayerKind, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    hf_model_type: str = ""
    encoder: ModelConfig | None = None
    cross_norm: bool = True
    share_embeddings: bool = True
    decoder_start_token_id: int | None = None

    def __post_init__(self):
        a = self.attention
        if a.n_kv_heads <= 0 or a.n_heads % a.n_kv_heads:
            raise ConfigError(f"num_attention_heads={a.n_heads} is not a multiple of "
                              f"num_key_value_heads={a.n_kv_heads}")
        if not self.layers:
            object.__setattr__(self, "layers", (LayerKind(),) * self.n_layers)
        if len(self.layers) != self.n_layers:
            raise ConfigError(f"{len(self.layers)} layer kinds for {self.n_layers} layers")
        if self.norm.placement not in ("pre", "post", "sandwich"):
            raise ConfigError(f"norm placement {self.norm.placement!r} is not pre, post or sandwich")
        if self.encoder is not None and (self.norm.placement == "sandwich" or self.norm.parallel):
            raise ConfigError("a decoder with cross-attention needs pre- or post-norm sequential blocks")

    # Shorthands for the fields every method reads.
    n_heads = property(lambda self: self.attention.n_heads)
    n_kv_heads = property(lambda self: self.attention.n_kv_heads)
    head_dim = property(lambda self: self.attention.head_dim)
    causal = property(lambda self: self.attention.causal)
    d_ff = property(lambda self: self.mlp.d_ff)
    activation = property(lambda self: self.mlp.activation)
    norm_eps = property(lambda self: self.norm.eps)
    tie_embeddings = property(lambda self: self.head.tied)
    has_lm_head = property(lambda self: self.head.kind != "none")
    is_decoder = property(lambda self: self.attention.causal)
    is_encoder_decoder = property(lambda self: self.encoder is not None)

    @property
    def rotary(self) -> RotaryConfig | None:
        """The global rotary settings (None: learned or no positions)."""
        kinds = [kind.rotary for kind in self.layers if kind.rotary is not None]
        return kinds[-1] if kinds else None

    @property
    def rope_theta(self) -> float | None:
        return None if self.rotary is None else self.rotary.theta

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.layers) if kind.window is not None)

    @property
    def uniform_window(self) -> int | None:
        """The window when every layer slides with the same one (the cache can then be a ring)."""
        windows = {kind.window for kind in self.layers}
        return windows.pop() if len(windows) == 1 else None

    def require_decoder_only(self, method: str) -> None:
        """Raise `ConfigError` when `method` (which reads a single token stream) gets an encoder-decoder.

        Example:
            >>> # params.config.require_decoder_only("HSO")
        """
        if self.encoder is not None:
            raise ConfigError(f"{method} needs a decoder-only language model; {self.hf_model_type or self.family} is "
                              "an encoder-decoder (its searches take sources=: generate, beam_search, exact_mode)")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_head(self, kind: str) -> ModelConfig:
        return dataclasses.replace(self, head=dataclasses.replace(self.head, kind=kind))

    def to_dict(self) -> dict:
        """A JSON-ready dict; `ModelConfig.from_dict` rebuilds the config from it.

        Example:
            >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
            ...                       "vocab_size": 10, "n_positions": 8})
            >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
            True
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        def rotary(r):
            if r is None:
                return None
            scaling = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in r["scaling"])
            return RotaryConfig(**{**r, "scaling": scaling})

        parts = {"attention": AttentionConfig, "mlp": MlpConfig, "norm": NormConfig, "embed": EmbedConfig,
                 "head": HeadConfig}
        fields = {k: parts[k](**v) if k in parts else v for k, v in d.items()}
        fields["layers"] = tuple(LayerKind(window=k["window"], rotary=rotary(k["rotary"])) for k in d["layers"])
        if d.get("encoder") is not None:
            fields["encoder"] = cls.from_dict(d["encoder"])
        return cls(**fields)


# ----------------------------------------------------------------------------- HF config helpers

def require(hf: Mapping[str, Any], *names: str):
    """The first of `names` present in `hf` (not None), or a `ConfigError` naming them.

    Example:
        >>> require({"n_embd": 8}, "hidden_size", "n_embd")
        8
    """
    for name in names:
        if name in hf and hf[name] is not None:
            return hf[name]
    raise ConfigError(f"config.json lacks {' / '.join(names)}; it is required for {hf.get('model_type')}")


def refuse(hf: Mapping[str, Any], field: str, supported, hint: str = "") -> None:
    """Raise `ConfigError` when `hf[field]` is set to a value outside `supported`.

    Example:
        >>> refuse({"pos": "absolute"}, "pos", ("absolute",))   # fine: nothing raised
    """
    value = hf.get(field)
    if value is not None and value not in supported:
        raise ConfigError(f"{hf.get('model_type')}: config field {field}={value!r} is not supported "
                          f"(supported: {list(supported)}){'; ' + hint if hint else ''}")


_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new",
                "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


def activation_name(hf: Mapping[str, Any], *fields: str, default: str) -> str:
    """Our name of the HF activation in the first present of `fields` (refused by name if unknown).

    Example:
        >>> activation_name({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act", default="silu")
        'gelu_new'
    """
    for field in fields:
        if hf.get(field) is not None:
            act = hf[field]
            if act not in _ACTIVATIONS:
                raise ConfigError(f"{hf.get('model_type')}: {field}={act!r} is not supported "
                                  f"(supported: {sorted(_ACTIVATIONS)})")
            return _ACTIVATIONS[act]
    return default


def rope_parameters(hf: Mapping[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """The rotary settings of a HF config as one dict (`rope_theta`, `rope_type`, scaling keys).

    Reads both spellings: `rope_parameters` (transformers 5; per layer type for Gemma 3)
    and the older `rope_theta` + `rope_scaling`.

    Example:
        >>> rope_parameters({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
        {'rope_theta': 500000.0, 'factor': 2.0, 'rope_type': 'linear'}
    """
    params = dict(hf.get("rope_parameters") or {})
    if layer_type is not None and isinstance(params.get(layer_type), Mapping):
        params = dict(params[layer_type])
    elif any(isinstance(v, Mapping) for v in params.values()):
        params = dict(params.get("full_attention") or {})
    merged: dict[str, Any] = {}
    if hf.get("rope_theta") is not None:
        merged["rope_theta"] = float(hf["rope_theta"])
    merged.update({k: v for k, v in (hf.get("rope_scaling") or {}).items() if v is not None})
    merged.update({k: v for k, v in params.items() if v is not None})
    if "type" in merged:
        merged.setdefault("rope_type", merged.pop("type"))
    if merged.get("rope_type") == "su":  # Phi-3's old name for longrope
        merged["rope_type"] = "longrope"
    return merged


def rotary_config(hf: Mapping[str, Any], head_dim: int, *, default_theta: float = 10000.0,
                  fraction: float = 1.0, layer_type: str | None = None) -> RotaryConfig:
    """A `RotaryConfig` from a HF config; an unknown `rope_type` is refused by name.

    Example:
        >>> rotary_config({"rope_theta": 1e4, "max_position_embeddings": 64}, 16).kind
        'default'
    """
    params = rope_parameters(hf, layer_type)
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{hf.get('model_type')}: rope_scaling type {kind!r} is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)}); use a checkpoint without it")
    theta = float(params.get("rope_theta", default_theta))
    fraction = float(params.get("partial_rotary_factor", fraction))
    keep = {}
    if kind != "default":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"):
            if params.get(key) is not None:
                keep[key] = params[key]
        for key in ("short_factor", "long_factor"):
            if params.get(key) is not None:
                keep[key] = tuple(float(x) for x in params[key])
        keep.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
        keep["rope_type"] = kind
        needs = {"linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor", "low_freq_factor",
                 "high_freq_factor", "original_max_position_embeddings"),
                 "yarn": ("original_max_position_embeddings",),
                 "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}[kind]
        missing = [k for k in needs if keep.get(k) is None]
        if missing:
            raise ConfigError(f"{hf.get('model_type')}: rope_scaling of type {kind!r} lacks {missing}")
        if kind == "longrope":
            rotated = int(head_dim * fraction) // 2
            for key in ("short_factor", "long_factor"):
                if len(keep[key]) != rotated:
                    raise ConfigError(f"{hf.get('model_type')}: rope_scaling {key} has {len(keep[key])} "
                                      f"entries, the rotary dimension needs {rotated}")
    return RotaryConfig(theta=theta, scaling=tuple(sorted(keep.items())), fraction=fraction,
                        max_positions=int(hf.get("max_position_embeddings") or 0))


def from_hf_config(hf: Mapping[str, Any], tensors: Mapping[str, Any] | None = None) -> ModelConfig:
    """Build a `ModelConfig` from a Hugging Face config dict (the registry picks the family).

    With the checkpoint's `tensors`, the family settles what only they tell (whether a
    BERT has its MLM head, whether a T5's head is untied) through its `settle_config`.

    Example:
        >>> from_hf_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        ...   "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        ...   "vocab_size": 50, "max_position_embeddings": 64}).n_kv_heads
        2
    """
    from makemost_jax.models.registry import family_for

    family = family_for(hf.get("model_type"))
    cfg = family.config_from_hf(hf)
    settle = getattr(family, "settle_config", None)
    return cfg if tensors is None or settle is None else settle(cfg, tensors)
