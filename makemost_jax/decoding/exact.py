"""Exact mode search: branch and bound over output prefixes (after Stahlberg & Byrne 2019).

A prefix's log-probability only falls as it grows, so a prefix whose score is not above
the best complete score found so far can be dropped without losing the optimum, in any
expansion order. Three searches share one loop:

- `exact_mode(..., length=None)`: the unconditional mode, argmax over y (at most
  `max_length` tokens) of log p(y, EOS | prompt);
- `exact_mode(..., length=L)`: the mode among outputs of exactly L tokens;
- `exact_length_modes(...)`: the modes at every length 0..max_length at once, with one
  bound per length; a prefix of length l is pruned against the smallest bound over the
  lengths >= l it can still reach.

Several questions (prompts, or an encoder-decoder's sources) are searched at once: each
keeps its own frontier on the host (one heap per prefix length), and every model call
evaluates up to `batch_size` prefixes drawn from all unfinished questions in turn (padded
to a power of two, so the narrow frontier at a search's start makes cheap calls). The
prompts (and sources) are prefilled once into a KV cache, one row per question, cut to
the longest prompt. A prefix is evaluated by running its last token only: the keys and
values of every evaluated prefix's last token are kept in a device pool, and each
prefix's ancestors are gathered from it, so children share their parent's prefix and
nothing is recomputed or copied per node. The host keeps the pool's free list and
reference counts (a slot is freed when no frontier entry needs it), so the pool holds the
live prefixes only, within `kv_budget_bytes`. The shapes depend only on (call bucket,
max_length, questions, longest prompt, pool size), so a few compilations serve a whole
search and every exact length. A call returns log p(EOS) and the `children` most likely
other tokens of each prefix; when all of them survive pruning the prefix goes back into
the frontier as a continuation that yields the next `children` tokens later, in the
order (log-prob desc, token id asc) of its recomputed distribution (a row recomputed from
the same inputs gives the same numbers wherever it sits in the batch). The bounds start
from beam search (`seed_beams` wide; for a given length, with EOS forbidden before it). A
node budget stops the search, and so does a full pool; results then carry
`proved_optimal=False`.

Dimensions: Q questions, E prefixes per call, A ancestors per prefix (max_length - 1), N pool slots,
L layers, G key/value heads, K head width, V vocabulary, C children per prefix.

Example:
    >>> import jax
    >>> from makemost_jax.models import from_hf_config, init_params
    >>> cfg = from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 1,
    ...                       "n_head": 2, "vocab_size": 6, "n_positions": 32})
    >>> params = init_params(cfg, jax.random.key(0))
    >>> mode = exact_mode(params, [1, 2], eos_id=0, max_length=3)
    >>> mode.proved_optimal, mode.length == len(mode.tokens)
    (True, True)
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.decoding.beam import beam_search
from makemost_jax.decoding.sampling import DecoderInputs, ban_pad, decoder_inputs, prefill
from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models.cache import KVCache, gather_rows
from makemost_jax.models.layers import write_slots
from makemost_jax.models.model import forward
from makemost_jax.models.types import Params

ORDERS = ("depth", "best")
DEFAULT_KV_BUDGET = 1 << 30  # bytes of device memory for the searched prefixes' keys/values
_SMALLEST_CALL = 8  # prefixes per model call when the frontier is narrower


@dataclasses.dataclass(frozen=True)
class ModeResult:
    """The best output found for one question (the unconditional mode or one length).

    tokens: output ids without EOS, None when no complete output was found in the budget.
    loglik: log p(tokens, EOS | prompt) (without the EOS term when `ends_with_eos` is
    False, i.e. `stop_at_max_length`); -inf when nothing was found.
    length: len(tokens) (the asked length when nothing was found).
    proved_optimal: no unexplored prefix can beat it.
    nodes_expanded, seconds: prefix evaluations (continuations included) and wall time
    (compilation and the beam-search seed included) when this result was settled, or when
    the search stopped.
    """

    tokens: tuple[int, ...] | None
    loglik: float
    length: int
    proved_optimal: bool
    nodes_expanded: int
    seconds: float
    ends_with_eos: bool = True

    def to_dict(self) -> dict:
        """JSON-ready fields (loglik None when nothing was found).

        Example:
            >>> ModeResult((4, 2), -1.5, 2, True, 7, 0.1).to_dict()["tokens"]
            [4, 2]
        """
        found = self.tokens is not None
        return {"tokens": list(self.tokens) if found else None, "loglik": self.loglik if found else None,
                "length": self.length, "proved_optimal": self.proved_optimal,
                "nodes_expanded": self.nodes_expanded, "seconds": self.seconds,
                "ends_with_eos": self.ends_with_eos}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which complete outputs count and how a prefix is pruned.

    max_length: the longest output allowed. depth: the longest prefix ever evaluated (the asked
    length in the exact-length mode). targets: lengths whose EOS completions count.
    shared_bound: True for the unconditional mode (one bound: the best over all lengths),
    False for per-length bounds (a prefix of length d is cut against min over targets >= d).
    """

    max_length: int
    depth: int
    targets: tuple[int, ...]
    shared_bound: bool
    stop_at_max_length: bool = False


@functools.partial(jax.jit, static_argnames=("children", "eos_id"), donate_argnames=("pool",))
def _expand(params: Params, cache: KVCache, pool, rows_E, tokens_E, chain_EA, lengths_E, slots_E,
            after_logp_E, after_id_E, *, children: int, eos_id: int):
    """Next-token log-probs of E prefixes, each after the prompt (and source) of its question `rows_E`.

    A prefix of length d >= 1 runs only its last token `tokens_E`, after its d - 1 ancestors,
    whose keys/values are gathered from `pool` ((k, v), each (L, N, G, K)) at the slots
    `chain_EA` (right-aligned, -1 padding); its own key/value is written to `pool` at `slots_E`.
    Rows of length 0 are padding (the empty prefix is expanded on the host).

    Returns (the pool, log p(EOS) (E,), the next `children` non-EOS tokens in (log-prob desc,
    id asc) order after the key (after_logp, after_id): values (E, C), ids (E, C)).
    """
    pool_k, pool_v = pool
    a = chain_EA.shape[1]
    start = cache.size - a - 1  # the first slot after the prompt
    rows = gather_rows(cache, rows_E)
    have_EA = chain_EA >= 0
    slot_EA = jnp.maximum(chain_EA, 0)

    def place(name, buffer, pool_x):  # the ancestors' (L, E, A, G, K) on the cache's slot axis
        axis = KVCache.SLOT_AXES[name]
        ancestors = jnp.moveaxis(jnp.where(have_EA[None, :, :, None, None], pool_x[:, slot_EA], 0), 2, axis)
        return write_slots(buffer, ancestors, start, axis)

    # Ancestor i (0-based) of a prefix of length d sits in column a - (d - 1) + i, at position prompt + i.
    prompt_E = rows.next_position
    index_EA = jnp.arange(a)[None] - (a - (lengths_E[:, None] - 1))
    positions = rows.positions.at[:, start:start + a].set(jnp.where(have_EA, prompt_E[:, None] + index_EA, -1))
    rows = dataclasses.replace(rows, k=place("k", rows.k, pool_k), v=place("v", rows.v, pool_v), positions=positions,
                               fill=jnp.asarray(start + a, jnp.int32))
    out = forward(params, tokens_E[:, None], cache=rows, positions=(prompt_E + jnp.maximum(lengths_E - 1, 0))[:, None],
                  logits_at=0)
    # Padding rows write nowhere (an out-of-range slot is dropped).
    target_E = jnp.where(lengths_E > 0, slots_E, pool_k.shape[1])
    pool = tuple(p.at[:, target_E].set(jnp.take(new, start + a, axis=KVCache.SLOT_AXES[name]), mode="drop")
                 for name, p, new in (("k", pool_k, out.cache.k), ("v", pool_v, out.cache.v)))
    logp_EV = jax.nn.log_softmax(out.logits[:, 0], axis=-1)
    ids_V = jnp.arange(logp_EV.shape[1])
    after_EV = (logp_EV < after_logp_E[:, None]) | (
        (logp_EV == after_logp_E[:, None]) & (ids_V[None] > after_id_E[:, None]))
    # top_k puts the lower id first among equal values: the same order as the key above.
    choices_EV = ban_pad(params.config, jnp.where(after_EV & (ids_V[None] != eos_id), logp_EV, -jnp.inf))
    values_EC, ids_EC = jax.lax.top_k(choices_EV, children)
    return pool, logp_EV[:, eos_id], values_EC, ids_EC


class _RootChildren:
    """The empty prefix's expansion on the host: the prompt's next-token distribution is known after
    the prefill, so its children (in chunks, as a continuation asks) need no model call."""

    def __init__(self, params: Params, root_logits_QV, eos_id: int, n_children: int):
        logp_QV = np.asarray(jax.device_get(jax.jit(jax.nn.log_softmax)(root_logits_QV)))
        self.eos_Q = logp_QV[:, eos_id].tolist()
        choices_QV = np.array(ban_pad(params.config, jnp.asarray(logp_QV)))
        choices_QV[:, eos_id] = -np.inf
        # (log-prob desc, id asc): the order `_expand`'s top_k gives (a stable sort keeps ids ascending).
        self.order_QV = np.argsort(-choices_QV, axis=-1, kind="stable")
        self.choices_QV, self.n = choices_QV, n_children

    def children(self, question: int, emitted: int) -> tuple[float, list[float], list[int]]:
        """(log p(EOS), the next n children's log-probs and ids) after `emitted` children were passed on."""
        ids = self.order_QV[question, emitted:emitted + self.n]
        return self.eos_Q[question], self.choices_QV[question, ids].tolist(), ids.tolist()


class _Pool:
    """The host's book of the device pool: free slots and, per slot, how many frontier entries need it."""

    def __init__(self, size: int):
        self.free = list(range(size - 1, -1, -1))
        self.refs = np.zeros(size, np.int64)

    def alloc(self) -> int | None:
        return self.free.pop() if self.free else None

    def ref(self, chain: tuple[int, ...]) -> None:
        for slot in chain:
            self.refs[slot] += 1

    def unref(self, chain: tuple[int, ...]) -> None:
        for slot in chain:
            self.refs[slot] -= 1
            if self.refs[slot] == 0:
                self.free.append(slot)


_prefill = jax.jit(prefill, static_argnames=("cache_size",))


def _beam_seeds(params: Params, inputs: DecoderInputs, plan: _Plan, eos_id: int, beams: int) -> list[dict]:
    """Complete outputs found by beam search, per question: {length: (loglik, tokens, ends_with_eos)},
    the starting bounds.

    One batched search per asked length with EOS forbidden before it (min_length is not
    static, so they share one compilation); the unconditional mode needs only min_length 0.
    """
    # Room for the EOS after max_length tokens, unless the context ends first; then an output
    # that hits the limit has no EOS and counts only with stop_at_max_length.
    steps = min(plan.max_length + 1, params.config.max_positions - inputs.longest_prompt)
    seeds: list[dict] = [{} for _ in range(inputs.prompts.shape[0])]
    if steps < 1:  # the prompt fills the context: only the empty output, found by the search itself
        return seeds
    for floor in (0,) if plan.shared_bound else plan.targets:
        out = jax.device_get(beam_search(params, inputs.prompts, inputs.prompt_mask, sources=inputs.sources,
                                         source_mask=inputs.source_mask, beams=min(beams, params.config.vocab_size),
                                         max_new_tokens=steps, eos_id=eos_id, min_length=floor))
        for q, found in enumerate(seeds):
            for tokens, n, logp, finished in zip(out.tokens[q], out.lengths[q], out.logprobs[q], out.finished[q]):
                n, ends = int(n), bool(n < steps)  # a hypothesis that hit the limit has no EOS
                if (finished and n in plan.targets and (ends or plan.stop_at_max_length)
                        and logp > found.get(n, (-math.inf,))[0]):
                    found[n] = (float(logp), tuple(tokens[:n].tolist()), ends)
    return seeds


def _validate(params: Params, prompt, prompts, sources, source_mask, eos_id, max_length: int, node_budget: int,
              batch_size: int, children: int, order: str, seed_beams: int) -> tuple[DecoderInputs, int, bool]:
    """Checked settings; returns (padded inputs, eos_id, whether one question was asked by `prompt`)."""
    cfg = params.config
    if not cfg.causal:
        raise ConfigError(f"{cfg.hf_model_type} is an encoder; exact search needs a decoder model")
    eos_id = cfg.eos_token_id if eos_id is None and cfg.encoder is not None else eos_id
    if eos_id is None or not 0 <= eos_id < cfg.vocab_size:
        raise ConfigError(f"eos_id={eos_id} must be a token id in [0, {cfg.vocab_size}); exact search "
                          "scores outputs that end with EOS (pass tokenizer.eos_id)")
    if max_length < 0:
        raise ConfigError(f"max_length={max_length} must be >= 0")
    if node_budget < 1:
        raise ConfigError(f"node_budget={node_budget} must be at least 1 (the number of prefixes to expand)")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if children < 1:
        raise ConfigError(f"children={children} must be at least 1")
    if seed_beams < 0:
        raise ConfigError(f"seed_beams={seed_beams} must be >= 0 (0: no beam-search seed)")
    if order not in ORDERS:
        raise ConfigError(f"order={order!r} must be one of {ORDERS}")
    if prompt is not None and prompts is not None:
        raise InputError("give prompt (one question) or prompts (several), not both")
    single = prompt is not None and sources is None
    if prompt is not None:
        prompt = [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not prompt:
            raise InputError("the prompt is empty; exact search needs at least one prompt token (e.g. BOS)")
        prompts = [prompt] if sources is None else [prompt] * len(sources)
    elif prompts is not None:
        prompts = [[int(t) for t in np.asarray(p).reshape(-1)] for p in prompts]
    inputs = decoder_inputs(params, prompts, None, sources, source_mask, pad_id=eos_id)
    real = inputs.prompts[inputs.prompt_mask.astype(bool)]
    if real.min() < 0 or real.max() >= cfg.vocab_size:
        bad = real.min() if real.min() < 0 else real.max()
        raise InputError(f"prompt token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    if inputs.longest_prompt + max_length > cfg.max_positions:
        raise InputError(f"prompt of {inputs.longest_prompt} tokens + max_length={max_length} exceeds the model's "
                         f"context of {cfg.max_positions}; shorten the prompt or lower max_length")
    return inputs, eos_id, single


class _Question:
    """One question's branch and bound: its frontier, bounds and settled results."""

    def __init__(self, plan: _Plan, seeds: dict, pool: _Pool):
        self.plan, self.last, self.pool = plan, plan.depth, pool  # last: deepest prefix length
        self.keys = [-1] if plan.shared_bound else list(plan.targets)
        # best[l] = (loglik, tokens, ends_with_eos) of the best complete output of length l so far.
        self.best = {l: (-math.inf, None, True) for l in range(self.last + 1)}
        self.best.update(seeds)
        # heaps[d]: entries whose outputs have length >= d, as (-bound, tiebreak, prefix, score, after_logp,
        # after_id, emitted, chain). A fresh prefix has after_logp=inf and bound=score; a continuation of a
        # prefix of length d-1 sits at d with bound = score + log p of its last emitted child. chain: the
        # pool slots of the prefix's evaluated tokens (its ancestors; and itself once evaluated), each
        # referenced by the entry while it waits.
        self.heaps: list[list] = [[] for _ in range(self.last + 1)]
        self.counter = itertools.count()
        self.heaps[0].append((-0.0, next(self.counter), (), 0.0, math.inf, -1, 0, ()))
        self.expanded = 0
        self.settled: dict[int, tuple[int, float]] = {}

    def thresholds(self) -> list[float]:
        """thresholds()[d]: what a prefix whose outputs have length >= d must beat to be expanded."""
        if self.plan.shared_bound:
            return [max(b[0] for b in self.best.values())] * (self.last + 1)
        cuts, running = [], math.inf
        for d in range(self.last, -1, -1):
            running = min(running, self.best[d][0]) if d in self.plan.targets else running
            cuts.append(running)
        return cuts[::-1]

    def alive_tops(self) -> list[float]:
        """Best bound left at each depth, dropping depths whose best cannot beat their threshold."""
        tops = []
        for d, cut in enumerate(self.thresholds()):
            if self.heaps[d] and -self.heaps[d][0][0] <= cut:
                for entry in self.heaps[d]:  # the rest of this heap is lower still
                    self.pool.unref(entry[-1])
                self.heaps[d].clear()
            tops.append(-self.heaps[d][0][0] if self.heaps[d] else -math.inf)
        return tops

    def pop(self, order: str):
        """The next live entry, deepest first ("depth") or highest bound first ("best"); None when none is left."""
        tops = self.alive_tops()
        live = [d for d in range(self.last + 1) if tops[d] > -math.inf]
        if not live:
            return None
        d = live[-1] if order == "depth" else max(live, key=tops.__getitem__)
        return heapq.heappop(self.heaps[d])

    def settle(self, now: float):
        """A result is settled once no frontier entry that can reach its length beats it."""
        tops = self.alive_tops()
        for key in self.keys:
            bar = self.thresholds()[0] if key == -1 else self.best[key][0]
            reach = tops if key == -1 else tops[:key + 1]
            if key not in self.settled and not any(top > bar for top in reach):
                self.settled[key] = (self.expanded, now)

    @property
    def done(self) -> bool:
        return len(self.settled) == len(self.keys)

    def push(self, depth: int, entry: tuple) -> None:
        self.pool.ref(entry[-1])
        heapq.heappush(self.heaps[depth], entry)

    def take(self, entry, node_chain: tuple[int, ...], eos_logp: float, values: list[float], ids: list[int],
             n_children: int, vocab: int):
        """Record a prefix's expansion (`node_chain`: its tokens' pool slots): its EOS completion, and
        its children that beat the bound."""
        _, _, prefix, score, after_logp, _, emitted, _ = entry
        d, plan = len(prefix), self.plan
        if after_logp == math.inf and d in plan.targets and score + eos_logp > self.best[d][0]:
            self.best[d] = (score + eos_logp, prefix, True)
        if d == self.last:
            return
        cut = self.thresholds()[d + 1]
        for value, token in zip(values, ids):
            child_score = score + value
            if not child_score > cut:
                break
            if plan.stop_at_max_length and d + 1 == self.last:
                self.best[self.last] = max(self.best[self.last], (child_score, prefix + (token,), False),
                                           key=lambda b: b[0])
            else:
                self.push(d + 1, (-child_score, next(self.counter), prefix + (token,), child_score, math.inf, -1, 0,
                                  node_chain))
        else:  # every child passed: the next ones may too
            if emitted + n_children < vocab - 1:
                self.push(d + 1, (-(score + values[-1]), next(self.counter), prefix, score, values[-1], ids[-1],
                                  emitted + n_children, node_chain))

    def results(self, total: float) -> dict[int, ModeResult]:
        out = {}
        for key in self.keys:
            length = max(self.best, key=lambda l: self.best[l][0]) if key == -1 else key
            loglik, tokens, ends_with_eos = self.best[length]
            nodes, seconds = self.settled.get(key, (self.expanded, total))
            out[key] = ModeResult(tokens=None if tokens is None else tuple(tokens), loglik=loglik, length=length,
                                  proved_optimal=key in self.settled, nodes_expanded=nodes, seconds=seconds,
                                  ends_with_eos=ends_with_eos)
        return out


def _pool_size(params: Params, n_questions: int, node_budget: int, batch_size: int, kv_budget_bytes: int) -> int:
    """Pool slots: enough for every node the budget allows (rounded up to a power of two, so nearby
    budgets share one compilation), within `kv_budget_bytes`."""
    cfg = params.config
    per_node = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * np.dtype(params.dtype).itemsize
    fits = kv_budget_bytes // per_node
    if fits < batch_size:
        raise ConfigError(f"kv_budget_bytes={kv_budget_bytes} holds {fits} prefixes' keys/values ({per_node} bytes "
                          f"each), fewer than batch_size={batch_size}; raise it to at least {per_node * batch_size}")
    return int(min(fits, 1 << (n_questions * node_budget + batch_size - 1).bit_length()))


def _search(params: Params, inputs: DecoderInputs, plan: _Plan, *, eos_id: int, node_budget: int, batch_size: int,
            children: int, order: str, seed_beams: int, kv_budget_bytes: int) -> list[dict[int, ModeResult]]:
    """Branch and bound for every question at once; per question a ModeResult per target length
    (one, keyed -1, when shared_bound). `node_budget` is per question."""
    t0 = time.perf_counter()
    cfg = params.config
    vocab = cfg.vocab_size
    n_children = min(children, vocab - 1)
    n_questions = inputs.prompts.shape[0]
    seeds = _beam_seeds(params, inputs, plan, eos_id, seed_beams) if seed_beams else [{}] * n_questions
    slots = _pool_size(params, n_questions, node_budget, batch_size, kv_budget_bytes)
    book = _Pool(slots)
    pool_shape = (cfg.n_layers, slots, cfg.n_kv_heads, cfg.head_dim)
    pool = (jnp.zeros(pool_shape, params.dtype), jnp.zeros(pool_shape, params.dtype))
    questions = [_Question(plan, seeds[q], book) for q in range(n_questions)]

    width = max(plan.max_length, 1)  # one prefix width for every call and length: one compilation
    # Every row's left padding beyond the longest prompt is dropped: each call gathers the prompt's
    # keys/values per prefix, so empty slots would cost memory traffic on every expansion.
    trim = inputs.prompts.shape[1] - inputs.longest_prompt
    prompts_QP, prompt_mask_QP = inputs.prompts[:, trim:], inputs.prompt_mask[:, trim:]
    cache, root_logits_QV = _prefill(params, jnp.asarray(prompts_QP), jnp.asarray(prompt_mask_QP),
                                     cache_size=prompts_QP.shape[1] + width,
                                     sources_BS=None if inputs.sources is None else jnp.asarray(inputs.sources),
                                     source_mask_BS=None if inputs.source_mask is None else jnp.asarray(
                                         inputs.source_mask))
    for q in questions:  # the seed alone may already prove a result
        q.settle(time.perf_counter() - t0)
    root = _RootChildren(params, root_logits_QV, eos_id, n_children)

    ancestors = width - 1
    while True:
        # Fill one batch from the unfinished questions in turn, within each one's budget and the pool.
        batch: list[tuple[int, tuple, tuple]] = []
        on_host = set()
        active = [i for i, q in enumerate(questions) if not q.done and q.expanded < node_budget]
        while active and len(batch) < batch_size and book.free:
            for i in list(active):
                entry = questions[i].pop(order) if questions[i].expanded < node_budget else None
                if entry is None:
                    active.remove(i)
                    continue
                prefix, chain = entry[2], entry[-1]
                if not prefix:  # its children come from the prompt's distribution, already known
                    questions[i].expanded += 1
                    questions[i].take(entry, (), *root.children(i, entry[6]), n_children, vocab)
                    if any(j == i for j, _, _ in batch):  # settled only once its entries in flight are back
                        on_host.add(i)
                    else:
                        questions[i].settle(time.perf_counter() - t0)
                    continue
                # Its own slot: kept from its first evaluation (a continuation), else a fresh one.
                node_chain = chain if len(chain) == len(prefix) else chain + (book.alloc(),)
                questions[i].expanded += 1
                batch.append((i, entry, node_chain))
                if len(batch) == batch_size or not book.free:
                    break
        if not batch:
            break
        # A narrow frontier (the search's start) fills a smaller bucket: a power of two up to batch_size.
        rows = min(batch_size, max(_SMALLEST_CALL, 1 << (len(batch) - 1).bit_length()))
        rows_E = np.zeros(rows, np.int32)
        tokens_E = np.full(rows, eos_id, np.int32)
        chain_EA = np.full((rows, ancestors), -1, np.int32)
        lengths_E = np.zeros(rows, np.int32)
        slots_E = np.zeros(rows, np.int32)
        after_logp_E = np.full(rows, np.inf, np.float32)
        after_id_E = np.full(rows, -1, np.int32)
        for e, (i, (_, _, prefix, _, after_logp, after_id, _, _), node_chain) in enumerate(batch):
            rows_E[e], lengths_E[e], after_logp_E[e], after_id_E[e] = i, len(prefix), after_logp, after_id
            if prefix:
                tokens_E[e], slots_E[e] = prefix[-1], node_chain[-1]
                if len(prefix) > 1:
                    chain_EA[e, ancestors - len(prefix) + 1:] = node_chain[:-1]
        pool, eos_E, values_EC, ids_EC = _expand(
            params, cache, pool, rows_E, tokens_E, chain_EA, lengths_E, slots_E, after_logp_E,
            after_id_E, children=n_children, eos_id=eos_id)
        eos_E, values_EC, ids_EC = jax.device_get((eos_E, values_EC, ids_EC))
        for e, (i, entry, node_chain) in enumerate(batch):
            book.ref(node_chain)  # held while its children are pushed
            questions[i].take(entry, node_chain, float(eos_E[e]), values_EC[e].tolist(), ids_EC[e].tolist(),
                              n_children, vocab)
            book.unref(entry[-1])
            book.unref(node_chain)
        now = time.perf_counter() - t0
        for i in {i for i, _, _ in batch} | on_host:
            questions[i].settle(now)

    total = time.perf_counter() - t0
    for q in questions:
        q.settle(total)
    return [q.results(total) for q in questions]


def exact_mode(params: Params, prompt: Sequence[int] | None = None, *, prompts=None, sources=None,
               source_mask=None, eos_id: int | None = None, max_length: int = 16, length: int | None = None,
               node_budget: int = 10_000, batch_size: int = 64, children: int = 64, order: str = "depth",
               stop_at_max_length: bool = False, seed_beams: int = 4,
               kv_budget_bytes: int = DEFAULT_KV_BUDGET) -> ModeResult | list[ModeResult]:
    """The most likely continuation of `prompt` (optionally among outputs of exactly `length` tokens).

    One question: `prompt` (token ids) gives one `ModeResult`. Several at once: `prompts`
    (token-id lists), or for an encoder-decoder `sources` (token-id lists, or an array
    with `source_mask`; `prompt`/`prompts` optional, default the decoder start token)
    give a list, one result per question, searched together (expansions of all questions
    share each model call; `node_budget` is per question). `eos_id` defaults to an
    encoder-decoder's own.

    Outputs are y_1..y_n followed by `eos_id`, n <= `max_length` (n == `length` when
    given); with `stop_at_max_length`, an output that reaches `max_length` tokens without
    EOS also counts (scored without an EOS term). The search expands at most
    `node_budget` prefixes, `batch_size` per model call, `order` "depth" (deepest first,
    as in Stahlberg & Byrne) or "best" (highest log-probability first); each expansion
    passes on at most `children` tokens at a time (more follow when needed). The bound
    starts from beam search with `seed_beams` beams (0: no seed). The keys/values of the
    live prefixes take at most `kv_budget_bytes` of device memory (a full pool stops the
    search like the node budget). `proved_optimal` is False when the budget ran out first.

    Example:
        >>> # mode = exact_mode(params, tok.encode_for_model("Q: 2+2?\\nA:"), eos_id=tok.eos_id,
        >>> #                   max_length=8, node_budget=5000)
        >>> # tok.decode(mode.tokens), mode.loglik, mode.proved_optimal
    """
    inputs, eos_id, single = _validate(params, prompt, prompts, sources, source_mask, eos_id, max_length,
                                       node_budget, batch_size, children, order, seed_beams)
    if length is not None:
        if length < 0:
            raise ConfigError(f"length={length} must be >= 0")
        if length > max_length:
            raise ConfigError(f"length={length} is larger than max_length={max_length}; raise max_length "
                              "or ask for a shorter length")
        if stop_at_max_length:
            raise ConfigError("stop_at_max_length applies to the unconditional mode only; drop it or length")
        plan = _Plan(max_length=max_length, depth=length, targets=(length,), shared_bound=False)
    else:
        if stop_at_max_length and max_length < 1:
            raise ConfigError("stop_at_max_length needs max_length >= 1 (else the empty output wins with log p 0)")
        plan = _Plan(max_length=max_length, depth=max_length, targets=tuple(range(max_length + 1)), shared_bound=True,
                     stop_at_max_length=stop_at_max_length)
    results = [next(iter(r.values())) for r in _search(
        params, inputs, plan, eos_id=eos_id, node_budget=node_budget, batch_size=batch_size, children=children,
        order=order, seed_beams=seed_beams, kv_budget_bytes=kv_budget_bytes)]
    return results[0] if single else results


def exact_length_modes(params: Params, prompt: Sequence[int] | None = None, *, prompts=None, sources=None,
                       source_mask=None, eos_id: int | None = None, max_length: int = 16, node_budget: int = 10_000,
                       batch_size: int = 64, children: int = 64, order: str = "depth",
                       seed_beams: int = 4, kv_budget_bytes: int = DEFAULT_KV_BUDGET
                       ) -> list[ModeResult] | list[list[ModeResult]]:
    """The mode at every output length 0..max_length, in one search (element l: length l).

    With `prompts` or `sources` (as in `exact_mode`): one such list per question.

    One bound per length; a prefix of length l is expanded only while its log-probability
    beats the smallest bound over lengths >= l. Each result has its own `proved_optimal`,
    and `nodes_expanded` / `seconds` at the moment that length was settled. Settings as in
    `exact_mode`.

    Example:
        >>> # modes = exact_length_modes(params, prompt_ids, eos_id=tok.eos_id, max_length=6)
        >>> # [(m.length, tok.decode(m.tokens), round(m.loglik, 2)) for m in modes]
    """
    inputs, eos_id, single = _validate(params, prompt, prompts, sources, source_mask, eos_id, max_length,
                                       node_budget, batch_size, children, order, seed_beams)
    plan = _Plan(max_length=max_length, depth=max_length, targets=tuple(range(max_length + 1)),
                 shared_bound=False)
    results = [[r[length] for length in range(max_length + 1)] for r in _search(
        params, inputs, plan, eos_id=eos_id, node_budget=node_budget, batch_size=batch_size, children=children,
        order=order, seed_beams=seed_beams, kv_budget_bytes=kv_budget_bytes)]
    return results[0] if single else results
