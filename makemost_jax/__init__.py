"""makemost_jax: make pretrained transformers do more, in JAX.

Example:
    >>> import makemost_jax as mm
    >>> params = mm.load()                      # the embedded SmolLM2-135M-Instruct  # doctest: +SKIP
    >>> tok = mm.load_tokenizer()               # doctest: +SKIP
    >>> out = mm.forward(params, [tok.encode("Hello")])  # doctest: +SKIP
"""

from makemost_jax.checkpoints.export import save_hf, save_orbax
from makemost_jax.decoding import GenerationResult, generate
from makemost_jax.loading import load, load_tokenizer
from makemost_jax.models import (EncodedSource, KVCache, ModelConfig, ModelOutput, Params, encode, encode_source,
                                 forward, from_hf_config, init_cache, init_params, per_layer, stacked, token_logprobs)

__all__ = ["EncodedSource", "GenerationResult", "KVCache", "ModelConfig", "ModelOutput", "Params", "encode",
           "encode_source", "forward", "from_hf_config", "generate", "init_cache", "init_params", "load",
           "load_tokenizer", "per_layer", "save_hf", "save_orbax", "stacked", "token_logprobs"]
