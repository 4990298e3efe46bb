"""Perplexity of long documents window by window: recurrence, disjoint windows, sliding windows.

`evaluate_windows` scores documents of any length in windows of W tokens, carrying the
memory across every window of a document (`module=None`: disjoint windows, no memory).
Rows of a batch are documents; the windows are processed `chunk_windows` at a time by one
compiled scan, the memory handed from chunk to chunk, so a document's length is not
limited and a whole corpus costs one compilation. `evaluate_sliding` is the strided
sliding window of `makemost_jax.perplexity` summed over the same documents. Every method
scores the same targets: each document's tokens after its first.

`window_costs` reads XLA's compiled cost and memory analyses of one window's scoring
step: FLOPs per scored token and peak bytes (arguments + temporaries + outputs).

Example:
    >>> import jax, makemost_jax as mm
    >>> from makemost_jax.recurrence import RecurrenceConfig, init_memory_module
    >>> lm = mm.init_params(mm.from_hf_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 2,
    ...                     "n_head": 2, "vocab_size": 10, "n_positions": 8}), jax.random.key(0))
    >>> docs = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [3, 4, 5]]
    >>> fresh = init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(1))
    >>> r, plain = evaluate_windows(lm, docs, window=4, module=fresh), evaluate_windows(lm, docs, window=4)
    >>> r.n_tokens, abs(r.nll_sum - plain.nll_sum) < 1e-4   # a fresh module changes nothing
    (12, True)
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models.layers import unrolled_loops
from makemost_jax.models.types import Params
from makemost_jax.perplexity import NllTotals, perplexity
from makemost_jax.recurrence.model import check_window, run_windows, window_step
from makemost_jax.recurrence.module import MemoryParams, initial_memory


@dataclasses.dataclass(frozen=True)
class WindowedResult(NllTotals):
    """Perplexity of a set of documents under one windowing method.

    Example:
        >>> r = WindowedResult("disjoint", window=8, stride=8, nll_sum=6.0, n_tokens=3, n_documents=1, seconds=0.1)
        >>> round(r.ppl, 3)
        7.389
    """

    method: str  # "recurrence", "disjoint" or "sliding"
    window: int
    stride: int
    nll_sum: float  # nats, over all scored targets
    n_tokens: int
    n_documents: int
    seconds: float  # wall time, compilation included

    def to_dict(self) -> dict:
        """Fields plus `mean_nll` and `ppl`, JSON-ready."""
        return {**dataclasses.asdict(self), "mean_nll": self.mean_nll, "ppl": self.ppl}


def _documents(documents, vocab: int) -> list[np.ndarray]:
    """Documents as int32 arrays; ones with fewer than 2 tokens (nothing to score) dropped."""
    if isinstance(documents, np.ndarray) and documents.ndim == 1:
        documents = [documents]
    docs = []
    for i, doc in enumerate(documents):
        ids = np.asarray(doc)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise InputError(f"document {i} must be a 1-D sequence of token ids, got shape {ids.shape} "
                             f"and dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InputError(f"document {i} has token ids outside the vocabulary [0, {vocab}); was it tokenized "
                             "with this model's tokenizer?")
        if ids.size >= 2:
            docs.append(ids.astype(np.int32))
    if not docs:
        raise InputError("no document has 2 or more tokens, so there is nothing to score; give longer text")
    return docs


@jax.jit
def _chunk_nll(module, lm, memory_BMD, inputs_BKW, targets_BKW, weights_BKW):
    memory_BMD, nll_BKW = run_windows(module, lm, inputs_BKW, weights_BKW > 0, targets_BKW, memory_BMD)
    return memory_BMD, jnp.sum(nll_BKW * weights_BKW, axis=(1, 2))


def evaluate_windows(lm: Params, documents: Sequence[Sequence[int]], window: int,
                     module: MemoryParams | None = None, batch_size: int = 8, chunk_windows: int = 8,
                     progress: bool = False) -> WindowedResult:
    """Perplexity over `documents` (token id lists) in windows of `window` tokens, any length.

    With `module` the memory is carried across all windows of each document
    (recurrence); without, windows are independent (disjoint windows). Documents with
    fewer than 2 tokens are skipped; shorter than one window is fine (one padded window).

    Example:
        >>> # r = evaluate_windows(lm, [tok.encode_for_model(t) for t in texts], 128, module)
        >>> # r.ppl, r.n_tokens
    """
    t0 = time.perf_counter()
    window = check_window(lm, window)
    for name, value in (("batch_size", batch_size), ("chunk_windows", chunk_windows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    docs = sorted(_documents(documents, lm.config.vocab_size), key=len, reverse=True)
    # No chunk longer than the longest document needs: the padding windows would cost a full pass each.
    chunk_windows = min(chunk_windows, -(-(len(docs[0]) - 1) // window))
    span = chunk_windows * window
    nll_sum, n_tokens = 0.0, 0
    total_chunks = sum(-(-(len(docs[i]) - 1) // span) for i in range(0, len(docs), batch_size))
    show = progress and sys.stderr.isatty()
    with tqdm(total=total_chunks, unit="chunk", desc="windows", disable=not show, file=sys.stderr) as bar:
        for first in range(0, len(docs), batch_size):
            group = docs[first:first + batch_size]
            rows = len(group) if len(docs) <= batch_size else batch_size  # one shape for every group
            chunks = -(-(len(group[0]) - 1) // span)  # the longest document sets the group's length
            tokens = np.zeros((rows, chunks * span + 1), np.int32)
            weights = np.zeros((rows, chunks * span), np.float32)
            for r, doc in enumerate(group):
                tokens[r, :len(doc)] = doc
                weights[r, :len(doc) - 1] = 1.0
                n_tokens += len(doc) - 1
            memory = None if module is None else initial_memory(module, rows)
            for c in range(chunks):
                cut = slice(c * span, (c + 1) * span)
                shape = (rows, chunk_windows, window)
                inputs = tokens[:, :-1][:, cut].reshape(shape)
                targets = tokens[:, 1:][:, cut].reshape(shape)
                memory, sums = _chunk_nll(module, lm, memory, inputs, targets, weights[:, cut].reshape(shape))
                nll_sum += float(np.asarray(sums, np.float64).sum())
                bar.update(1)
    if not math.isfinite(nll_sum):
        raise InputError(f"the negative log-likelihood is {nll_sum}: the model produced non-finite logits")
    return WindowedResult("disjoint" if module is None else "recurrence", window, window, nll_sum, n_tokens,
                          len(docs), time.perf_counter() - t0)


def evaluate_sliding(lm: Params, documents: Sequence[Sequence[int]], window: int, stride: int,
                     batch_size: int = 8) -> WindowedResult:
    """The strided sliding window (`makemost_jax.perplexity.perplexity`) summed over `documents`.

    Each window reads `window` tokens and scores the last `stride` (its first window: all).

    Example:
        >>> # evaluate_sliding(lm, docs, window=128, stride=32).ppl
    """
    t0 = time.perf_counter()
    window = check_window(lm, window)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise ConfigError(f"stride={stride!r} must be an integer in 1..window={window}")
    docs = _documents(documents, lm.config.vocab_size)
    results = [perplexity(lm, doc, context=window, stride=stride, batch_size=batch_size, progress=False)
               for doc in docs]
    return WindowedResult("sliding", window, stride, sum(r.nll_sum for r in results),
                          sum(r.n_tokens for r in results), len(docs), time.perf_counter() - t0)


def compiled_stats(fn, *args, flops: bool = True, memory: bool = True) -> dict:
    """XLA's FLOPs and bytes for `jax.jit(fn)(*args)`, compiled but not run.

    The FLOPs are counted on the program traced with the model's loops unrolled, its layers and
    the output layer's vocabulary chunks (XLA counts a loop's body once, so the looped program
    would count one layer and one chunk); the bytes are those
    of the program that runs. `peak_bytes` = arguments + temporaries + outputs - outputs
    aliased to inputs (the convention of benchmarks/bench_train_memory.py). `args` may be
    `ShapeDtypeStruct`s. `flops=False` skips the unrolled compilation (slow for deep
    models) and reports only the bytes; `memory=False` skips the second compilation and
    reports only the FLOPs (the bytes are None).

    Example:
        >>> compiled_stats(lambda x: x @ x, jnp.ones((4, 4)), memory=False)
        {'flops': 128.0, 'argument_bytes': None, 'temp_bytes': None, 'output_bytes': None, 'peak_bytes': None}
    """
    cost = {}
    if flops:
        with unrolled_loops():  # a fresh function: jit's trace cache must not hand the unrolled program back later
            cost = jax.jit(lambda *a: fn(*a)).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    stats = {"flops": float(cost.get("flops", 0.0)) if flops else None}
    if not memory:
        return {**stats, **dict.fromkeys(("argument_bytes", "temp_bytes", "output_bytes", "peak_bytes"))}
    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    return {**stats, "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes,
            "peak_bytes": (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                           - mem.alias_size_in_bytes)}


def window_costs(lm: Params, window: int, module: MemoryParams | None = None, stride: int | None = None,
                 batch: int = 1) -> dict:
    """Compiled cost of scoring: FLOPs per scored token and peak bytes of one window step.

    One window of `window` tokens scores `stride` of them (sliding window; default
    `window`: disjoint windows and recurrence, which also updates the memory).

    Example:
        >>> # window_costs(lm, 128, stride=32)["flops_per_token"]
    """
    window = check_window(lm, window)
    stride = window if stride is None else stride
    tokens = jax.ShapeDtypeStruct((batch, window), jnp.int32)

    def score(module, lm, memory, tokens_BW):  # as `evaluate_windows` scores: the NLL through the chunked head
        memory, nll_BW = window_step(module, lm, memory, tokens_BW, targets_BW=tokens_BW)
        return memory, nll_BW.sum()

    memory = None if module is None else jax.eval_shape(lambda: initial_memory(module, batch))
    stats = compiled_stats(score, module, lm, memory, tokens)
    return {**stats, "window": window, "stride": stride, "flops_per_token": stats["flops"] / (batch * stride)}
