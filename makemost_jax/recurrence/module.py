"""The recurrence memory module: pool one window's hidden states into a few memory vectors.

After window i-1 the module reads the LM's hidden states at `read_layer` and its previous
memory, and pools them into `num_memory` vectors with attention from learned queries
(offset by the previous memory), followed by one small MLP; both sublayers are post-norm
residuals, so the memory stays on the LayerNorm scale however many windows it crosses.
For window i it projects the memory to per-layer keys and values for the layers
`>= inject_layer`; they enter the LM's attention as extra key/value slots, as if
prepended to the window's cache, mixed in by a per-layer, per-head gate
(`forward(..., extra_kv=(k, v, gate))`: `(1 - gate) * plain + gate * with memory`). The
gates start at 0, so a fresh module leaves the LM exactly as it was (METHODS.md section 3);
their gradient is not zero, so training moves them at the first step.

Positions. Rotary models: memory keys are rotated to position `memory_position` (default
-1) while each window's tokens take positions 0 .. W-1, so every query sees the memory as
if it stood just before the window's first token (GPT-2's learned positions need no
convention: the memory keys are learned). The pooling attention has rotary positions of
its own (base 10000): queries just after the window (position T), the window's states at
0 .. T-1, the previous memory at -1, so it can tell recent states from old ones, which
the states of a rotary LM do not say by themselves.

Dimensions: B batch, T window tokens, M memory slots, D LM width, L LM layers, I injected
layers, G key/value heads, K head width, F module MLP width.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from makemost_jax.models.config import from_hf_config
    >>> lm_cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 2,
    ...                          "n_head": 2, "vocab_size": 10, "n_positions": 8})
    >>> module = init_memory_module(RecurrenceConfig(num_memory=3), lm_cfg, jax.random.key(0))
    >>> memory = initial_memory(module, batch=2)
    >>> k, v, gate = memory_kv(module, memory)
    >>> memory.shape, k.shape, float(jnp.abs(gate).max())   # gates start at zero
    ((2, 3, 16), (2, 2, 3, 2, 8), 0.0)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from makemost_jax.errors import ConfigError
from makemost_jax.models.config import ModelConfig
from makemost_jax.models.layers import apply_norm, apply_rotary, rotary_inverse_frequencies

_to_pure_dict = getattr(nnx, "to_pure_dict", lambda state: state.to_pure_dict())
_NORM_EPS = 1e-5
_POOL_ROTARY_BASE = 10000.0


@dataclasses.dataclass(frozen=True)
class RecurrenceConfig:
    """Shape of the memory module (hashable: static under `jit`). Defaults: METHODS.md section 3.

    - `num_memory`: memory vectors carried from window to window (default 4).
    - `read_layer`: which hidden state is pooled, an index into `forward(..., return_hidden=True).hidden`
      (0 = embeddings, i = output of layer i); None = the middle layer, n_layers // 2.
    - `inject_layer`: the memory enters the attention of layers `>= inject_layer` (default 0: all).
    - `pool_heads`: heads of the pooling attention; None = the LM's query heads.
    - `mlp_width`: hidden width of the module's MLP; None = the LM's width.
    - `memory_position`: rotary position of the memory keys, windows being at 0 .. W-1 (default -1).

    Example:
        >>> RecurrenceConfig(num_memory=8, read_layer=6).inject_layer
        0
    """

    num_memory: int = 4
    read_layer: int | None = None
    inject_layer: int = 0
    pool_heads: int | None = None
    mlp_width: int | None = None
    memory_position: int = -1

    def resolve(self, lm: ModelConfig) -> RecurrenceConfig:
        """This config with its defaults filled in for `lm`; raises `ConfigError` for impossible settings.

        Example:
            >>> from makemost_jax.models.config import from_hf_config
            >>> lm = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 4,
            ...                      "n_head": 2, "vocab_size": 10, "n_positions": 8})
            >>> c = RecurrenceConfig().resolve(lm); (c.read_layer, c.pool_heads, c.mlp_width)
            (2, 2, 16)
        """
        lm.require_decoder_only("recurrence")
        if not lm.causal:
            raise ConfigError(f"recurrence needs a causal decoder; {lm.hf_model_type or lm.family} is an encoder "
                              "(use a GPT-2 or Llama-family model)")
        for name in ("num_memory", "inject_layer", "memory_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"RecurrenceConfig.{name}={value!r} must be an integer")
        if self.num_memory < 1:
            raise ConfigError(f"num_memory={self.num_memory}: the module needs at least one memory vector "
                              "(e.g. num_memory=4); for no memory at all use the disjoint-window baseline")
        read = lm.n_layers // 2 if self.read_layer is None else self.read_layer
        if isinstance(read, bool) or not isinstance(read, int) or not 0 <= read <= lm.n_layers:
            raise ConfigError(f"read_layer={self.read_layer!r} is out of range: this model has {lm.n_layers} "
                              f"layers, so read_layer must be in 0..{lm.n_layers} (0 = embeddings, "
                              f"default {lm.n_layers // 2})")
        if not 0 <= self.inject_layer < lm.n_layers:
            raise ConfigError(f"inject_layer={self.inject_layer} is out of range: this model has {lm.n_layers} "
                              f"layers, so inject_layer must be in 0..{lm.n_layers - 1} (0 = every layer)")
        heads = lm.n_heads if self.pool_heads is None else self.pool_heads
        if not isinstance(heads, int) or heads < 1 or lm.d_model % heads:
            raise ConfigError(f"pool_heads={self.pool_heads!r} must be a positive divisor of the LM's width "
                              f"{lm.d_model} (default: its {lm.n_heads} heads)")
        width = lm.d_model if self.mlp_width is None else self.mlp_width
        if not isinstance(width, int) or width < 1:
            raise ConfigError(f"mlp_width={self.mlp_width!r} must be a positive integer (default: the LM's width)")
        return dataclasses.replace(self, read_layer=read, pool_heads=heads, mlp_width=width)


class _LayerNorm(nnx.Module):
    def __init__(self, width: int):
        self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))

    def __call__(self, x):
        return apply_norm(x, self.scale[...], self.bias[...], _NORM_EPS)


class MemoryModule(nnx.Module):
    """The module's layers; used through the pure functions below (`init_memory_module`, ...)."""

    def __init__(self, config: RecurrenceConfig, lm: ModelConfig, *, rngs: nnx.Rngs):
        d, m = lm.d_model, config.num_memory
        injected = lm.n_layers - config.inject_layer
        normal = jax.nn.initializers.normal
        self.initial = nnx.Param(normal(1.0)(rngs.params(), (m, d), jnp.float32))  # memory before a document
        self.queries = nnx.Param(normal(1.0)(rngs.params(), (m, d), jnp.float32))
        self.hidden_norm = _LayerNorm(d)
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.k = nnx.Linear(d, d, rngs=rngs)
        self.v = nnx.Linear(d, d, rngs=rngs)
        self.o = nnx.Linear(d, d, rngs=rngs)
        self.pool_norm = _LayerNorm(d)
        self.up = nnx.Linear(d, config.mlp_width, rngs=rngs)
        self.down = nnx.Linear(config.mlp_width, d, rngs=rngs)
        self.mlp_norm = _LayerNorm(d)
        kv = lm.n_kv_heads * lm.head_dim
        self.key = nnx.Param(normal(1.0 / math.sqrt(d))(rngs.params(), (injected, d, kv), jnp.float32))
        self.value = nnx.Param(normal(1.0 / math.sqrt(d))(rngs.params(), (injected, d, kv), jnp.float32))
        self.gate = nnx.Param(jnp.zeros((injected, lm.n_heads), jnp.float32))  # zero: starts as the plain LM


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MemoryParams:
    """The module's weights (a nested dict of arrays) with its resolved config and the LM's config.

    Both configs are static metadata, so a `MemoryParams` passes through `jit`, `grad`
    and optax like any pytree.
    """

    config: RecurrenceConfig = dataclasses.field(metadata={"static": True})
    lm_config: ModelConfig = dataclasses.field(metadata={"static": True})
    weights: dict

    @property
    def num_parameters(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.weights))


@functools.cache
def _template(config: RecurrenceConfig, lm: ModelConfig):
    """(graphdef, abstract state) of the module; built once per config, no allocation."""
    return nnx.split(nnx.eval_shape(lambda: MemoryModule(config, lm, rngs=nnx.Rngs(0))))


def _merge(module: MemoryParams) -> MemoryModule:
    graphdef, abstract = _template(module.config, module.lm_config)
    state = jax.tree.map(lambda leaf: leaf, abstract)
    nnx.replace_by_pure_dict(state, module.weights)
    return nnx.merge(graphdef, state)


def init_memory_module(config: RecurrenceConfig, lm: ModelConfig, key: jax.Array) -> MemoryParams:
    """A fresh module for the LM of config `lm`: the wrapped LM starts exactly as the LM alone.

    Raises `ConfigError` for settings `lm` cannot take (see `RecurrenceConfig.resolve`).

    Example:
        >>> # module = init_memory_module(RecurrenceConfig(), params.config, jax.random.key(0))
    """
    config = config.resolve(lm)
    weights = _to_pure_dict(nnx.split(MemoryModule(config, lm, rngs=nnx.Rngs(key)))[1])
    return MemoryParams(config, lm, weights)


def initial_memory(module: MemoryParams, batch: int) -> jax.Array:
    """The memory (B, M, D) before a document's first window (learned).

    Example:
        >>> # memory_BMD = initial_memory(module, batch=4)
    """
    initial_MD = module.weights["initial"]
    return jnp.broadcast_to(initial_MD, (batch, *initial_MD.shape))


def update_memory(module: MemoryParams, memory_BMD, hidden_BTD, mask_BT) -> jax.Array:
    """The next memory from the previous one and one window's hidden states at `read_layer`.

    `mask_BT` marks real tokens (padding after a document's end is not pooled). Learned
    queries plus the previous memory attend over [window states, previous memory]; then
    an MLP; both post-norm residuals.

    Example:
        >>> # memory_BMD = update_memory(module, memory_BMD, out.hidden[module.config.read_layer], mask_BT)
    """
    net = _merge(module)
    b, t, d = hidden_BTD.shape
    m = module.config.num_memory
    h = module.config.pool_heads
    context_BCD = jnp.concatenate([net.hidden_norm(hidden_BTD.astype(jnp.float32)), memory_BMD], axis=1)
    attend_BC = jnp.concatenate([jnp.asarray(mask_BT, bool), jnp.ones((b, m), bool)], axis=1)
    q_BMHK = net.q(memory_BMD + net.queries[...]).reshape(b, m, h, d // h)
    k_BCHK = net.k(context_BCD).reshape(b, t + m, h, d // h)
    # Rotary positions make the pooling see how far each state is from the window's end
    # (rotary LMs carry no absolute position in their states): queries sit just after the
    # window, its states at 0 .. T-1, the previous memory just before it.
    inv_freq = 1.0 / (_POOL_ROTARY_BASE ** (jnp.arange(0, d // h, 2, dtype=jnp.float32) / (d // h)))
    q_BMHK = apply_rotary(q_BMHK, jnp.full((b, m), t, jnp.int32), inv_freq)
    key_positions_BC = jnp.broadcast_to(jnp.concatenate([jnp.arange(t), jnp.full((m,), -1)]), (b, t + m))
    k_BCHK = apply_rotary(k_BCHK, key_positions_BC, inv_freq)
    v_BCHK = net.v(context_BCD).reshape(b, t + m, h, d // h)
    scores_BHMC = jnp.einsum("bmhk,bchk->bhmc", q_BMHK, k_BCHK) / math.sqrt(d // h)
    scores_BHMC = jnp.where(attend_BC[:, None, None, :], scores_BHMC, -jnp.inf)  # memory slots keep rows finite
    pooled_BMD = jnp.einsum("bhmc,bchk->bmhk", jax.nn.softmax(scores_BHMC, axis=-1), v_BCHK).reshape(b, m, d)
    updated_BMD = net.pool_norm(memory_BMD + net.o(pooled_BMD))
    updated_BMD = net.mlp_norm(updated_BMD + net.down(jax.nn.gelu(net.up(updated_BMD))))
    return updated_BMD.astype(memory_BMD.dtype)  # the window states are pooled in float32; the memory keeps its dtype


def memory_kv(module: MemoryParams, memory_BMD) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-layer keys and values (L, B, M, G, K) of the memory and the gates (L, H), for `forward`'s `extra_kv`.

    Layers below `inject_layer` get gates of 0 (the memory does not reach them). Rotary
    keys are rotated to `memory_position`.

    Example:
        >>> # out = forward(lm, tokens_BT, extra_kv=memory_kv(module, memory_BMD))
    """
    cfg, lm = module.config, module.lm_config
    b, m, _ = memory_BMD.shape
    g, k = lm.n_kv_heads, lm.head_dim
    w = module.weights
    k_IBMGK = jnp.einsum("bmd,idn->ibmn", memory_BMD, w["key"]).reshape(-1, b, m, g, k)
    v_IBMGK = jnp.einsum("bmd,idn->ibmn", memory_BMD, w["value"]).reshape(-1, b, m, g, k)
    if lm.rope_theta is not None:
        injected = k_IBMGK.shape[0]
        positions_XM = jnp.full((injected * b, m), cfg.memory_position, jnp.int32)
        k_IBMGK = apply_rotary(k_IBMGK.reshape(injected * b, m, g, k), positions_XM,
                               rotary_inverse_frequencies(lm)).reshape(k_IBMGK.shape)
    below = ((0, cfg.inject_layer),) + ((0, 0),) * 4
    return jnp.pad(k_IBMGK, below), jnp.pad(v_IBMGK, below), jnp.pad(w["gate"], below[:2])
