"""Decoding: sampling, beam search and conditional beam search (one loop), attributes and their classifier, exact search."""

from makemost_jax.decoding.attributes import (AllOf, Attribute, Labeller, MaxLength, MinLength, NoPromptCopy,
                                              NoRepeatNgram, label, non_degenerate, non_empty, parse_attribute)
from makemost_jax.decoding.beam import BeamResult, beam_search
from makemost_jax.decoding.classifier import (AttributeClassifier, conditional_beam_search, fit_classifier,
                                              init_classifier, load_classifier, save_classifier, search_text)
from makemost_jax.decoding.exact import ModeResult, exact_length_modes, exact_mode
from makemost_jax.decoding.sampling import (GenerationResult, decode_step, filter_logits, generate,
                                            generate_text, pad_prompts, prefill)

__all__ = ["GenerationResult", "decode_step", "filter_logits", "generate", "generate_text",
           "pad_prompts", "prefill"]
__all__ += ["BeamResult", "beam_search"]
__all__ += ["ModeResult", "exact_length_modes", "exact_mode"]
__all__ += ["AllOf", "Attribute", "Labeller", "MaxLength", "MinLength", "NoPromptCopy", "NoRepeatNgram", "label",
            "non_degenerate", "non_empty", "parse_attribute"]
__all__ += ["AttributeClassifier", "conditional_beam_search", "fit_classifier", "init_classifier", "load_classifier",
            "save_classifier", "search_text"]
