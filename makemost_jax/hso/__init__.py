"""Hidden-state optimisation (HSO): gradient steps on the KV cache at inference time.

`hso_nll` evaluates a language model on token streams with HSO (METHODS.md section 1);
`evaluate_text` puts it beside the lr=0 loop and the strided sliding window;
`fewshot` classifies with k demonstrations whose cache HSO has optimised.

Example:
    >>> import makemost_jax as mm
    >>> from makemost_jax.hso import HSOConfig, hso_nll
    >>> params, tok = mm.load(), mm.load_tokenizer()  # doctest: +SKIP
    >>> r = hso_nll(params, tok.encode_for_model(text), HSOConfig(segment=128, cache_size=384))  # doctest: +SKIP
"""

from makemost_jax.hso.adam import AdamHyper, SlotAdamState, append_slots, init_slot_adam, slot_adam_step
from makemost_jax.hso.lm import (
                                 HSOConfig,
                                 HSOResult,
                                 HSOState,
                                 Segments,
                                 compare_on_tokens,
                                 hso_nll,
                                 hso_segment_step,
                                 lm_segments,
                                 run_segments,
                                 segment_nll,
)

__all__ = ["AdamHyper", "HSOConfig", "HSOResult", "HSOState", "Segments", "SlotAdamState", "append_slots",
           "compare_on_tokens", "hso_nll", "hso_segment_step", "init_slot_adam", "lm_segments", "run_segments",
           "segment_nll", "slot_adam_step"]
