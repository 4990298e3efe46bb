"""Decoding: sampling now; beam search, conditional beam search and exact search build on its pieces."""

from makemost_jax.decoding.sampling import (GenerationResult, decode_step, filter_logits, generate,
                                            generate_text, pad_prompts, prefill)

__all__ = ["GenerationResult", "decode_step", "filter_logits", "generate", "generate_text",
           "pad_prompts", "prefill"]
