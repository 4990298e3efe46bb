"""Hidden-state optimisation (HSO) in plain PyTorch: the reference for `makemost_jax.hso`.

A direct, readable transcription of the HSO language-model protocol (METHODS.md section 1)
on a Hugging Face `transformers` causal LM (GPT-2 and Llama families):

    for each segment x_i of `segment` tokens:
        nll_i = -log p(targets | x_i, past)            # reported, before any update
        repeat hso_steps times (only when something is cached):
            g = d nll / d past                          # step 1 reuses the scoring gradient
            per-slot Adam step on past                  # each slot has its own step count
        new = keys/values of x_i (recomputed from the updated past, or kept from scoring)
        past = last cache_size slots of [past, new]     # moments and steps enter as zeros

The past keys/values are leaf tensors with `requires_grad=True`, handed to the model
through a `DynamicCache` filled layer by layer with `update()`; the model appends the
segment's own keys/values to it. Positions are explicit `position_ids`: GPT-2 (absolute
positions) gives the segment `P + arange(S)` with P the number of cached tokens; rotary
models give `consumed + arange(S)` (their cached keys are stored already rotated).

Everything runs in the model's dtype except the log-softmax (float32, or float64 for a
float64 model). Batch rows are independent texts; with `lengths`, positions past a row's
end are padding (input id 0, target weight 0).

Example:
    >>> import numpy as np, torch, transformers
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    ...     vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    >>> tokens = np.random.default_rng(0).integers(0, 50, (2, 21))
    >>> nll, counts = hso_segment_nlls(model, tokens, segment=4, cache_size=8, lr=1e-2)
    >>> nll.shape, counts[0].tolist()
    ((2, 5), [4, 4, 4, 4, 4])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

ABSOLUTE_POSITION_MODELS = ("gpt2",)  # model_type values with learned absolute positions


@dataclass
class HSOState:
    """The optimised past: per-layer keys/values (B, H, P, K), their Adam moments, per-slot steps (P,)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    m_keys: list[torch.Tensor]
    m_values: list[torch.Tensor]
    v_keys: list[torch.Tensor]
    v_values: list[torch.Tensor]
    steps: torch.Tensor  # (P,) int64: Adam steps taken by each cached slot

    @property
    def n_cached(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[-2]

    def tensors(self) -> list[torch.Tensor]:
        return self.keys + self.values


def _is_absolute(model) -> bool:
    return model.config.model_type in ABSOLUTE_POSITION_MODELS


def segment_loss(model, state: HSOState, inputs_BS, targets_BS, weights_BS, positions_BS):
    """Score one segment given the past in `state`.

    Returns (loss, nll per row (B,), new keys, new values): loss is the weighted sum of
    -log p(target) over rows and tokens; the new keys/values (per layer, (B, H, S, K)) are
    the segment's own, computed from this past at these positions.

    Example:
        >>> # loss, nll_B, new_k, new_v = segment_loss(model, state, x, y, w, pos)
    """
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(zip(state.keys, state.values)):
        cache.update(k, v, layer)
    out = model(input_ids=inputs_BS, cache=cache, position_ids=positions_BS, use_cache=True)
    logits = out.logits.float() if out.logits.dtype != torch.float64 else out.logits
    logp_BS = torch.log_softmax(logits, dim=-1).gather(-1, targets_BS[..., None])[..., 0]
    nll_B = -(logp_BS * weights_BS).sum(dim=1)
    p = state.n_cached
    new_k = [cache.layers[i].keys[:, :, p:].detach() for i in range(len(cache.layers))]
    new_v = [cache.layers[i].values[:, :, p:].detach() for i in range(len(cache.layers))]
    return nll_B.sum(), nll_B.detach(), new_k, new_v


def _score(model, past: HSOState, seg: tuple, with_grad: bool):
    """`segment_loss` at `past`, with the gradient w.r.t. it when asked: (nll_B, grads or None, new_k, new_v)."""
    leaves = [t.detach().requires_grad_(with_grad) for t in past.tensors()]
    k = len(past.keys)
    leaf_state = HSOState(leaves[:k], leaves[k:], past.m_keys, past.m_values, past.v_keys, past.v_values,
                          past.steps)
    with torch.set_grad_enabled(with_grad):
        loss, nll_B, new_k, new_v = segment_loss(model, leaf_state, *seg)
    grads = list(torch.autograd.grad(loss, leaves)) if with_grad else None
    return nll_B, grads, new_k, new_v


def probe_step(model, state: HSOState, inputs_BS, targets_BS, positions_BS):
    """One value-and-gradient of a segment's NLL with respect to the cached keys/values.

    The unit of work HSO adds per step; `benchmarks/bench_hso.py` times it. Returns
    (loss, [grad of every layer's keys..., then values...]).

    Example:
        >>> # loss, grads = probe_step(model, random_state(model, 1, 384), x, y, pos)
    """
    weights_BS = torch.ones(targets_BS.shape, dtype=state.keys[0].dtype)
    nll_B, grads, _, _ = _score(model, state, (inputs_BS, targets_BS, weights_BS, positions_BS), with_grad=True)
    return nll_B.sum(), grads


def random_state(model, batch: int, n_cached: int, seed: int = 0) -> HSOState:
    """A past of `n_cached` slots filled by running the model on random tokens.

    Example:
        >>> # state = random_state(model, batch=1, n_cached=384)
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (batch, n_cached), generator=g)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=tokens, cache=cache, use_cache=True)
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    zeros = [torch.zeros_like(t) for t in keys]
    return HSOState(keys, values, zeros, zeros, zeros, zeros, torch.zeros(n_cached, dtype=torch.int64))


def adam_step(state: HSOState, grads: list[torch.Tensor], lr: float, beta1: float, beta2: float,
              eps: float) -> HSOState:
    """Per-slot Adam: every slot counts its own steps for the bias correction.

    Example:
        >>> # state = adam_step(state, grads, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    """
    steps = state.steps + 1
    n = len(state.keys)
    # (P, 1) broadcasts over the last (head_dim) axis of (B, H, P, K)
    correction1 = (1 - beta1 ** steps.double()).to(grads[0].dtype)[:, None]
    correction2 = (1 - beta2 ** steps.double()).to(grads[0].dtype)[:, None]
    new_tensors, new_m, new_v = [], [], []
    with torch.no_grad():
        for x, g, m, v in zip(state.tensors(), grads, state.m_keys + state.m_values,
                              state.v_keys + state.v_values):
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            x = x - lr * (m / correction1) / (torch.sqrt(v / correction2) + eps)
            new_tensors.append(x)
            new_m.append(m)
            new_v.append(v)
    return HSOState(new_tensors[:n], new_tensors[n:], new_m[:n], new_m[n:], new_v[:n], new_v[n:], steps)


def append_and_evict(state: HSOState, new_k, new_v, cache_size: int) -> HSOState:
    """Append the segment's keys/values (fresh moments and step counts: zeros) and keep the last slots.

    Example:
        >>> # state = append_and_evict(state, new_k, new_v, cache_size=384)
    """
    def keep(old, new):  # an empty past (first segment) has no tensors yet
        return [torch.cat([o, x], dim=-2)[..., -cache_size:, :] for o, x in zip(old, new)] if old else \
            [x[..., -cache_size:, :] for x in new]

    zeros = [torch.zeros_like(t) for t in new_k]
    steps = torch.cat([state.steps, torch.zeros(new_k[0].shape[-2], dtype=torch.int64)])[-cache_size:]
    return HSOState(keep(state.keys, new_k), keep(state.values, new_v), keep(state.m_keys, zeros),
                    keep(state.m_values, zeros), keep(state.v_keys, zeros), keep(state.v_values, zeros), steps)


def hso_segment_nlls(model, tokens, *, segment: int, cache_size: int, lr: float, beta1: float = 0.9,
                     beta2: float = 0.999, eps: float = 1e-8, hso_steps: int = 1, recompute: bool = True,
                     lengths=None):
    """Per-row, per-segment NLL sums (nats) and scored-token counts under the HSO protocol.

    `tokens` is (B, N) (LongTensor or numpy); `lengths` (B,) gives each row's real length
    (default N). Returns (nll (B, n_seg) float64 numpy, counts (B, n_seg) int numpy) with
    n_seg = ceil((N - 1) / segment). Each segment is scored before the past learns from it,
    so lr=0 is the plain cached sliding evaluation.

    Example:
        >>> # nll, counts = hso_segment_nlls(model, ids[None], segment=128, cache_size=384, lr=1e-2)
        >>> # ppl = math.exp(nll.sum() / counts.sum())
    """
    tokens_BN = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    b, n = tokens_BN.shape
    lengths_B = torch.full((b,), n) if lengths is None else torch.as_tensor(np.asarray(lengths), dtype=torch.long)
    n_seg = math.ceil((n - 1) / segment)
    # pad so every segment has `segment` inputs and targets; padding: id 0, weight 0
    padded = torch.zeros((b, n_seg * segment + 1), dtype=torch.long)
    padded[:, :n] = tokens_BN
    index = torch.arange(padded.shape[1])
    real_BN = index[None, :] < lengths_B[:, None]
    padded = torch.where(real_BN, padded, 0)
    dtype = next(model.parameters()).dtype

    state = HSOState([], [], [], [], [], [], torch.zeros(0, dtype=torch.int64))
    nll = np.zeros((b, n_seg))
    counts = np.zeros((b, n_seg), dtype=np.int64)
    for i in range(n_seg):
        start = i * segment
        inputs_BS = padded[:, start:start + segment]
        targets_BS = padded[:, start + 1:start + segment + 1]
        weights_BS = real_BN[:, start + 1:start + segment + 1].to(dtype)
        first = state.n_cached if _is_absolute(model) else start
        positions_BS = (first + torch.arange(segment)).expand(b, segment)
        seg = (inputs_BS, targets_BS, weights_BS, positions_BS)

        optimise = state.n_cached > 0 and lr != 0  # lr=0 leaves the past unchanged: skip the gradients
        nll_B, grads, new_k, new_v = _score(model, state, seg, with_grad=optimise)
        nll[:, i] = nll_B.double().numpy()
        counts[:, i] = weights_BS.sum(1).long().numpy()
        if optimise:
            for step in range(hso_steps):
                if step > 0:
                    _, grads, _, _ = _score(model, state, seg, with_grad=True)
                state = adam_step(state, grads, lr, beta1, beta2, eps)
            if recompute:
                _, _, new_k, new_v = _score(model, state, seg, with_grad=False)
        state = append_and_evict(state, new_k, new_v, cache_size)
    return nll, counts
