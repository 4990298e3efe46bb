"""Write a Hugging Face PyTorch model to GGUF the way llama.cpp's `convert_hf_to_gguf.py` does.

A test helper: it lets the GGUF reader be checked against models built locally, without
downloading real GGUF files. For each architecture it writes the metadata keys the
converter writes (from `config.to_dict()`, as the converter reads it) and the tensor
names `gguf.get_tensor_name_map` gives, with the converter's transforms:

- llama (also Mistral): Q/K rows permuted per head (`LlamaModel.permute`), weight and bias;
  `llama.vocab_size` and `llama.rope.dimension_count`.
- qwen2, qwen3: the generic `TextModel` keys only; no tensor transform.
- gemma, gemma2: their own key lists (no rope.freq_base); gemma2 adds both softcaps and
  the sliding window; every `*norm.weight` is stored as 1 + w; lm_head is never written.
- gemma3: generic keys, rope.freq_base (global) and rope.freq_base_swa (local), rope
  scaling of the global layers, the sliding window, the final softcap when set; 1 + w norms.
- phi3: its own keys (rope.dimension_count for partial rotary, the original context,
  sliding_window 0 for none) and, for LongRoPE, `rope_factors_long/short.weight` tensors
  plus `rope.scaling.attn_factor`; qkv and gate/up stay fused.

1-D tensors and norms are F32 (as in the converter); 2-D weights use `qtype`.

Example:
    >>> write_gguf("tiny.gguf", model, "qwen2", qtype=gguf.GGMLQuantizationType.Q8_0)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import quantize

Q = gguf.GGMLQuantizationType
_ARCH = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma": gguf.MODEL_ARCH.GEMMA,
    "gemma2": gguf.MODEL_ARCH.GEMMA2,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "phi3": gguf.MODEL_ARCH.PHI3,
}


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: half-split rotary rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_keys(w: gguf.GGUFWriter, hp: dict) -> None:
    """TextModel.set_gguf_parameters' rope part: scaling of the (global) layers, both bases."""
    rope = hp.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    kind, factor = full.get("rope_type"), full.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
        if (attn := full.get("attention_factor")) is not None:
            w.add_rope_scaling_yarn_attn_factor(attn)
        if (beta := full.get("beta_fast")) is not None:
            w.add_rope_scaling_yarn_beta_fast(beta)
        if (beta := full.get("beta_slow")) is not None:
            w.add_rope_scaling_yarn_beta_slow(beta)
    if (theta := full.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local)


def _text_model_keys(w: gguf.GGUFWriter, hp: dict) -> None:
    """TextModel.set_gguf_parameters (the keys every architecture without its own list gets)."""
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    _rope_keys(w, hp)
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])


def _gemma_keys(w: gguf.GGUFWriter, hp: dict) -> None:
    """GemmaModel / Gemma2Model.set_gguf_parameters (no rope keys at all)."""
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])


def _phi3_keys(w: gguf.GGUFWriter, hp: dict) -> list[tuple[str, np.ndarray]]:
    """Phi3MiniModel.set_gguf_parameters and generate_extra_tensors (the LongRoPE factors)."""
    rope = hp.get("rope_parameters") or {}
    n_embd, n_head, ctx = hp["hidden_size"], hp["num_attention_heads"], hp["max_position_embeddings"]
    orig = rope.get("original_max_position_embeddings", hp.get("original_max_position_embeddings"))
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    w.add_context_length(ctx)
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_sliding_window(hp.get("sliding_window") or 0)  # 0 marks "none" (Phi-4)
    if not rope.get("long_factor"):
        return []
    scale = ctx / orig
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    return [
        ("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32)),
        ("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32)),
    ]


def _tokenizer(w: gguf.GGUFWriter, hp: dict) -> None:
    """A minimal byte-level BPE vocabulary of `vocab_size` tokens (what `_set_vocab_gpt2` writes)."""
    vocab = hp["vocab_size"]
    tokens = [chr(0x100 + i) for i in range(vocab)]  # distinct single characters
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    w.add_token_merges([f"{tokens[3]} {tokens[4]}"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        if isinstance(hp.get(key), int):
            add(hp[key])


def write_gguf(
    path: str | Path,
    model,
    arch: str,
    *,
    qtype: Q = Q.F32,
    name: str = "tiny",
    skip: tuple[str, ...] = (),
    split_qkv: bool = False,
    meta: dict[str, tuple[Any, gguf.GGUFValueType] | None] | None = None,
) -> None:
    """Write `model` (a transformers *ForCausalLM) as llama.cpp would convert it to `arch`.

    `name` is `general.name` (llama.cpp's converter takes it from the model card; a name
    containing "mistral" marks a Mistral model in a llama file). Weights are written in
    `qtype` (F32, F16, Q8_0, ...), norms and other 1-D tensors in F32.

    For tests of unusual files: `skip` leaves out HF tensors by name, `split_qkv` writes a
    phi3 qkv_proj as separate attn_q/k/v (which llama.cpp's phi3 loader also accepts), and
    `meta` sets (value, type) or, with None, deletes metadata keys after the converter's.

    Example:
        >>> write_gguf(tmp_path / "m.gguf", tiny_llama, "llama", name="Mistral-tiny")  # doctest: +SKIP
    """
    hp = model.config.to_dict()
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[_ARCH[arch]])
    w.add_name(name)
    extra: list[tuple[str, np.ndarray]] = []
    if arch in ("gemma", "gemma2"):
        _gemma_keys(w, hp)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
            w.add_final_logit_softcapping(hp["final_logit_softcapping"])
            w.add_sliding_window(hp["sliding_window"])
    elif arch == "phi3":
        extra = _phi3_keys(w, hp)
    else:
        _text_model_keys(w, hp)
        if arch == "llama":
            w.add_vocab_size(hp["vocab_size"])
            w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
        if arch == "gemma3":
            if hp.get("final_logit_softcapping"):
                w.add_final_logit_softcapping(hp["final_logit_softcapping"])
            if hp.get("sliding_window_pattern") != 1:
                w.add_sliding_window(hp["sliding_window"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == Q.F32 else gguf.LlamaFileType.MOSTLY_Q8_0)
    _tokenizer(w, hp)

    names = gguf.get_tensor_name_map(_ARCH[arch], hp["num_hidden_layers"])
    tied = hp.get("tie_word_embeddings", False)
    n_head, n_kv = hp["num_attention_heads"], hp["num_key_value_heads"]
    for hf_name, tensor in model.state_dict().items():
        if hf_name in skip or hf_name == "lm_head.weight" and (tied or arch in ("gemma", "gemma2")):
            continue  # tied heads are not in the checkpoint; Gemma's converters drop lm_head
        arr = tensor.detach().to("cpu").float().numpy().copy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = _llama_permute(arr, n_head)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = _llama_permute(arr, n_kv)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            arr = arr + np.float32(1.0)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name!r} in {arch}")
        if split_qkv and gguf_name.endswith("attn_qkv.weight"):
            q_rows, kv_rows = n_head * hp["hidden_size"] // n_head, n_kv * hp["hidden_size"] // n_head
            parts = np.split(arr, [q_rows, q_rows + kv_rows])
            extra += [(gguf_name.replace("attn_qkv", leaf), part)
                      for leaf, part in zip(("attn_q", "attn_k", "attn_v"), parts, strict=True)]
            continue
        extra.append((gguf_name, arr))
    for key, value in (meta or {}).items():
        if value is None:
            w.kv_data[0].pop(key, None)
        else:
            w.add_key_value(key, value[0], value[1])
    for gguf_name, arr in extra:
        if arr.ndim <= 1 or gguf_name.endswith("_norm.weight") or qtype == Q.F32:
            w.add_tensor(gguf_name, arr.astype(np.float32))
        else:
            w.add_tensor(gguf_name, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
