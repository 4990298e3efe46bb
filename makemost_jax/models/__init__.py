"""Pure-functional model families behind one interface (see `model.forward`)."""

from makemost_jax.models.cache import EncodedSource, KVCache, init_cache
from makemost_jax.models.config import ModelConfig, from_hf_config
from makemost_jax.models.model import (
    encode,
    encode_source,
    forward,
    head_nll,
    init_params,
    params_from_hf,
    per_layer,
    stacked,
    token_logprobs,
)
from makemost_jax.models.types import ModelOutput, Params

__all__ = ["EncodedSource", "KVCache", "ModelConfig", "ModelOutput", "Params", "encode", "encode_source", "forward",
           "from_hf_config", "head_nll", "init_cache", "init_params", "params_from_hf", "per_layer", "stacked",
           "token_logprobs"]
