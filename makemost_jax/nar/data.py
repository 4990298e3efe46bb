"""Parallel corpora: read JSONL verse pairs, tokenise, pad to fixed shapes, batch.

A record is one JSON object per line; `source_key` / `target_key` name the two sides
(the bundled `bible_kjv_web_*.jsonl`: "kjv" archaic -> "web" modern English). Sources are
encoded as [CLS] tokens [SEP] padded to `max_source`; targets as bare tokens padded to
`max_target`. Fixed shapes mean one compilation for every batch.

Example:
    >>> # pairs = read_pairs(asset_path("bible_kjv_web_train.jsonl"))
    >>> # data = encode_pairs(tok, pairs, config)
    >>> # batches = PairBatches(data, batch_size=16, seed=0)
"""

from __future__ import annotations

import json
import os

import numpy as np

from makemost_jax.errors import InputError
from makemost_jax.nar.model import Seq2SeqConfig

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


def encode_sources(tokenizer, texts: list[str], config: Seq2SeqConfig) -> tuple[np.ndarray, np.ndarray]:
    """(source (B, max_source), mask) of texts; raises `InputError` for empty or too long lines.

    Example:
        >>> # source_BS, mask_BS = encode_sources(tok, ["And God said"], params.config)
    """
    ids = tokenizer.encode_batch(list(texts))
    out = np.full((len(ids), config.max_source), config.pad_id, np.int32)
    for i, (text, row) in enumerate(zip(texts, ids)):
        if not text.strip() or not row:
            raise InputError(f"source line {i + 1} is empty; remove empty lines from the input")
        if len(row) + 2 > config.max_source:
            raise InputError(f"source line {i + 1} has {len(row)} tokens; with [CLS]/[SEP] it exceeds the "
                             f"model's max_source={config.max_source} (encoder context "
                             f"{config.model.max_positions}); shorten or split it")
        out[i, :len(row) + 2] = [config.cls_id, *row, config.sep_id]
    lengths = np.array([len(r) + 2 for r in ids])
    return out, (np.arange(config.max_source)[None] < lengths[:, None]).astype(np.int32)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], config: Seq2SeqConfig) -> dict[str, np.ndarray]:
    """Fixed-shape arrays of the pairs that fit (longer or empty pairs are dropped).

    Returns {"source", "source_mask", "target", "target_mask"} (int32) and, as
    "index", the positions in `pairs` that were kept.

    Example:
        >>> # data = encode_pairs(tok, pairs, params.config); data["target"].shape == (n, max_target)
    """
    src_ids = tokenizer.encode_batch([s for s, _ in pairs])
    tgt_ids = tokenizer.encode_batch([t for _, t in pairs])
    keep = [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids))
            if 0 < len(s) <= config.max_source - 2 and 0 < len(t) <= config.max_target]
    n = len(keep)
    data = {"source": np.full((n, config.max_source), config.pad_id, np.int32),
            "source_mask": np.zeros((n, config.max_source), np.int32),
            "target": np.full((n, config.max_target), config.pad_id, np.int32),
            "target_mask": np.zeros((n, config.max_target), np.int32), "index": np.array(keep, np.int64)}
    for row, i in enumerate(keep):
        s, t = [config.cls_id, *src_ids[i], config.sep_id], tgt_ids[i]
        data["source"][row, :len(s)] = s
        data["source_mask"][row, :len(s)] = 1
        data["target"][row, :len(t)] = t
        data["target_mask"][row, :len(t)] = 1
    return data


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
