"""Decoding: sampling now; beam search, conditional beam search and exact search build on its pieces."""

from makemost_jax.decoding.beam import BeamResult, beam_search
from makemost_jax.decoding.exact import ModeResult, exact_length_modes, exact_mode
from makemost_jax.decoding.sampling import (GenerationResult, decode_step, filter_logits, generate,
                                            generate_text, pad_prompts, prefill)

__all__ = ["GenerationResult", "decode_step", "filter_logits", "generate", "generate_text",
           "pad_prompts", "prefill"]
__all__ += ["BeamResult", "beam_search"]
__all__ += ["ModeResult", "exact_length_modes", "exact_mode"]
