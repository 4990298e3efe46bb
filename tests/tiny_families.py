"""Tiny random-weight Hugging Face decoders of every registered family, built offline.

`make(model_type, folder, **overrides)` builds the `transformers` model with
`torch.manual_seed(0)`, eager attention and float32, perturbs its 1-D parameters (norm
scales and biases start at exactly 1 and 0 and would hide bugs), saves it with
safetensors and returns the folder. The default configs are deliberately not the
library defaults: odd widths, grouped-query attention, untied heads where the family
allows it, sliding windows shorter than the test sequences, soft-capping, partial rotary.

Example (in a test):
    folder = make("gemma2", tmp_path / "g", sliding_window=4)
    params = mm.load(str(folder))
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 101

# model_type -> (config class, model class, config kwargs)
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=None, initializer_range=0.1,
            attn_implementation="eager", dtype="float32")

CONFIGS = {
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(BASE, sliding_window=5, head_dim=16, tie_word_embeddings=False, rope_theta=500.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(BASE, num_hidden_layers=4, use_sliding_window=True, sliding_window=5, max_window_layers=2,
                   tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(BASE, head_dim=20, num_attention_heads=6, num_key_value_heads=3, attention_bias=True,
                   tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(BASE, head_dim=20, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(BASE, num_hidden_layers=4, head_dim=16, sliding_window=5, query_pre_attn_scalar=20,
                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(BASE, num_hidden_layers=7, head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 20000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(BASE, partial_rotary_factor=0.5, sliding_window=None, tie_word_embeddings=False,
                  pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5, rotary_emb_base=500,
                      use_parallel_residual=True, bos_token_id=0, eos_token_id=0, initializer_range=0.1,
                      attn_implementation="eager", dtype="float32")),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=VOCAB, hidden_size=48, ffn_dim=72, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0,
                 pad_token_id=1, init_std=0.1, attn_implementation="eager", dtype="float32")),
}


def make(model_type: str, folder, **overrides) -> Path:
    """A random-weight HF decoder of `model_type` saved (safetensors) in `folder`.

    Example:
        >>> # make("qwen2", tmp_path / "q", max_window_layers=1)
    """
    import torch
    import transformers

    config_name, model_name, kwargs = CONFIGS[model_type]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
