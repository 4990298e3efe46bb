"""Parallel corpora: read JSONL pairs, and batch fixed-shape encoded pairs (resumably).

A record is one JSON object per line; `source_key` / `target_key` name the two sides
(the bundled `bible_kjv_web_*.jsonl`: "kjv" archaic -> "web" modern English;
`bible_en_es_*.jsonl`: "en" -> "es"). Encoding is the model's business (`nar.data` for
the MLM-initialised models, `seq2seq.data` for translation models); the batches here
only shuffle rows of whatever arrays they are given.

Example:
    >>> pairs = read_pairs(asset_path("bible_en_es_valid.jsonl"), "en", "es", limit=1)
    >>> pairs[0][0][:13], pairs[0][1][:9]
    ('The beginning', 'PRINCIPIO')
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from makemost_jax.errors import InputError

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def asset_path(name: str) -> str:
    """Path of a bundled corpus split, e.g. "bible_kjv_web_valid.jsonl".

    Example:
        >>> asset_path("bible_kjv_web_valid.jsonl").endswith("assets/bible_kjv_web_valid.jsonl")
        True
    """
    return os.path.join(ASSETS, name)


def read_pairs(path: str, source_key: str = "kjv", target_key: str = "web",
               limit: int | None = None) -> list[tuple[str, str]]:
    """(source, target) strings of a JSONL file (`limit` first records).

    Example:
        >>> pairs = read_pairs(asset_path("bible_kjv_web_valid.jsonl"), limit=2)
        >>> len(pairs), pairs[0][0][:13]
        (2, 'The beginning')
    """
    if not os.path.isfile(path):
        raise InputError(f"parallel corpus {path} does not exist; give a JSONL file with {source_key!r} and "
                         f"{target_key!r} fields")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if source_key not in record or target_key not in record:
                raise InputError(f"{path} line {number} lacks {source_key!r} or {target_key!r}; pass the field "
                                 "names with source_key / target_key")
            pairs.append((record[source_key], record[target_key]))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


class PairBatches:
    """Endless shuffled fixed-shape batches of encoded pairs, with `state()` / `restore()`.

    The training loop checkpoints the position, so a resumed run sees the same batches.

    Example:
        >>> import numpy as np
        >>> data = {"source": np.zeros((5, 4), np.int32), "target": np.ones((5, 3), np.int32)}
        >>> batches = PairBatches(data, batch_size=2, seed=0)
        >>> next(batches)["target"].shape
        (2, 3)
    """

    def __init__(self, data: dict[str, np.ndarray], batch_size: int, seed: int = 0):
        self.arrays = {k: v for k, v in data.items() if k != "index"}
        self.n = len(next(iter(self.arrays.values())))
        if self.n < batch_size:
            raise InputError(f"only {self.n} training pairs fit max_source/max_target, fewer than batch_size="
                             f"{batch_size}; use more data or larger limits")
        self.batch_size, self.seed, self.position = batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        per_epoch = self.n // self.batch_size
        epoch, index = divmod(self.position, per_epoch)
        order = np.random.default_rng((self.seed, epoch)).permutation(self.n)
        rows = order[index * self.batch_size:(index + 1) * self.batch_size]
        self.position += 1
        return {k: v[rows] for k, v in self.arrays.items()}

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict):
        self.position = int(state["position"])


def fixed_batches(data: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """The pairs in order as full batches (the remainder is dropped), e.g. for validation loss.

    Example:
        >>> # evaluate(params, fixed_batches(valid, 16), loss_fn)
    """
    arrays = {k: v for k, v in data.items() if k != "index"}
    n = len(next(iter(arrays.values()))) // batch_size * batch_size
    return [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]


def bucket_by_length(data: dict[str, np.ndarray], widths: Sequence[int],
                     masks: dict[str, str] | None = None) -> list[dict[str, np.ndarray]]:
    """Split fixed-shape encoded pairs into buckets: each row goes to the narrowest width that
    holds its longest masked side, and every 2-D array is cut to that width (an array keeps
    the extra columns it has beyond its mask, e.g. a target's start token).

    `masks` maps each array to its mask (default: source -> source_mask, target ->
    target_mask). Short pairs then cost short steps; each bucket is one more compiled shape.

    Example:
        >>> data = {"source": np.ones((3, 8), np.int32), "source_mask": np.array([[1] * 2 + [0] * 6, [1] * 8,
        ...         [1] * 3 + [0] * 5]), "target": np.ones((3, 10), np.int32), "target_mask": np.ones((3, 9))}
        >>> data["target_mask"][0, 3:] = 0
        >>> [(b["source"].shape, b["target"].shape) for b in bucket_by_length(data, [4, 8])]
        [((1, 4), (1, 5)), ((2, 8), (2, 10))]
    """
    masks = masks or {"source": "source_mask", "target": "target_mask"}
    extra = {k: data[k].shape[1] - data[m].shape[1] for k, m in masks.items()}
    longest = max(data[m].shape[1] for m in masks.values())
    lengths = np.max([data[m].sum(1) for m in masks.values()], axis=0)
    buckets, lower = [], 0
    for width in sorted(w for w in widths if w < longest) + [longest]:
        rows = np.flatnonzero((lengths > lower) & (lengths <= width))
        lower = width
        if rows.size:
            buckets.append({k: v[rows][:, :width + extra.get(k, 0)] if v.ndim == 2 else v[rows]
                            for k, v in data.items()})
    return buckets


class BucketedBatches:
    """Endless batches drawn from length buckets (`bucket_by_length`), each bucket with its own
    batch size (about the same tokens per batch); a bucket is chosen at every step with
    probability proportional to its rows, from a seeded generator, so `state()` / `restore()`
    resume exactly.

    Example:
        >>> buckets = [{"x": np.zeros((6, 2))}, {"x": np.zeros((4, 4))}]
        >>> batches = BucketedBatches(buckets, [4, 2], seed=0)
        >>> sorted({next(batches)["x"].shape for _ in range(20)})
        [(2, 4), (4, 2)]
    """

    def __init__(self, buckets: list[dict[str, np.ndarray]], batch_sizes: Sequence[int], seed: int = 0):
        if len(buckets) != len(batch_sizes):
            raise InputError(f"{len(buckets)} buckets but {len(batch_sizes)} batch sizes; give one per bucket")
        self.parts = [PairBatches(b, size, seed=seed + i) for i, (b, size) in enumerate(zip(buckets, batch_sizes))]
        sizes = np.array([p.n for p in self.parts], np.float64)
        self.weights, self.seed, self.step = sizes / sizes.sum(), seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        choice = np.random.default_rng((self.seed, self.step)).choice(len(self.parts), p=self.weights)
        self.step += 1
        return next(self.parts[choice])

    def state(self) -> dict:
        return {"step": self.step, "positions": [p.position for p in self.parts]}

    def restore(self, state: dict):
        self.step = int(state["step"])
        for part, position in zip(self.parts, state["positions"]):
            part.position = int(position)
