"""Tiny random-weight Hugging Face encoder-decoders of every registered seq2seq family, built offline.

`make(name, folder)` builds the `transformers` model of variant `name` with
`torch.manual_seed(0)` in float32, perturbs its weights (LayerNorm scales and biases,
`final_logits_bias` and the relative-position tables start at constants that would hide
bugs), saves it with safetensors and returns the folder. The configs are deliberately
not the library defaults: encoder and decoder of different depths (and for BART-layout
models different heads and MLP widths), T5 head widths that are not d_model / heads, few
relative-position buckets with a short max distance, embeddings scaled by sqrt(d_model).

Variants beyond one per model_type: `t5-gated-untied` (T5 v1.1 / flan layout: gated-GELU
and a separate `lm_head.weight`, no output scaling), `marian-separate` (separate source
and target vocabularies).

Example (in a test):
    folder = make("marian", tmp_path / "m")
    params = mm.load(str(folder))
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE_VOCAB = 61
TARGET_VOCAB = 47  # marian-separate's decoder vocabulary

_BART = dict(vocab_size=SOURCE_VOCAB, d_model=24, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=36, max_position_embeddings=40,
             scale_embedding=True, forced_eos_token_id=None, dtype="float32", attn_implementation="eager")
_T5 = dict(vocab_size=SOURCE_VOCAB, d_model=24, d_kv=5, d_ff=40, num_layers=3, num_decoder_layers=2, num_heads=3,
           relative_attention_num_buckets=8, relative_attention_max_distance=12, decoder_start_token_id=0,
           dtype="float32", attn_implementation="eager")

# name -> (config class, model class, config kwargs); pad ids are the decoders' start tokens where HF says so.
VARIANTS = {
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(_T5)),
    "t5-gated-untied": ("T5Config", "T5ForConditionalGeneration", dict(_T5, feed_forward_proj="gated-gelu")),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(_T5, num_heads=4, d_kv=7)),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(_BART, pad_token_id=1, eos_token_id=2,
                                                                decoder_start_token_id=2)),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", dict(_BART, pad_token_id=1, eos_token_id=2,
                                                                   decoder_start_token_id=2)),
    "marian": ("MarianConfig", "MarianMTModel", dict(_BART, pad_token_id=SOURCE_VOCAB - 1, eos_token_id=0,
                                                     decoder_start_token_id=SOURCE_VOCAB - 1)),
    "marian-separate": ("MarianConfig", "MarianMTModel", dict(
        _BART, decoder_vocab_size=TARGET_VOCAB, share_encoder_decoder_embeddings=False,
        pad_token_id=TARGET_VOCAB - 1, eos_token_id=0, decoder_start_token_id=TARGET_VOCAB - 1)),
}


def make(name: str, folder, **overrides) -> Path:
    """A random-weight HF encoder-decoder of variant `name` saved (safetensors) in `folder`.

    Example:
        >>> # make("t5", tmp_path / "t5", num_decoder_layers=1)
    """
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    config_name, model_name, kwargs = VARIANTS[name]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "embed_positions" in param_name and model_name == "MarianMTModel":
                continue  # fixed sinusoids, recomputed (not saved) by transformers
            p.add_((0.3 if p.ndim == 1 else 0.1) * torch.randn_like(p))
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if name == "t5-gated-untied":  # T5 v1.1: its own head, no output scaling (as such checkpoints are saved)
        path = folder / "model.safetensors"
        tensors = load_file(path)
        tensors["lm_head.weight"] = np.random.RandomState(1).normal(0, 0.3, tensors["shared.weight"].shape
                                                                    ).astype(np.float32)
        save_file(tensors, path, metadata={"format": "pt"})
        config_path = folder / "config.json"
        saved = json.loads(config_path.read_text())
        saved.update(tie_word_embeddings=False, scale_decoder_outputs=False)
        config_path.write_text(json.dumps(saved))
    return folder


def hf_model(folder):
    """The transformers model saved in `folder` (the reference), in eval mode.

    Example:
        >>> # reference = hf_model(make("bart", tmp_path / "b"))
    """
    import transformers

    return transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
