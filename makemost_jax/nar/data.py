"""Parallel corpora for the MLM-initialised models: tokenise and pad to fixed shapes.

Reading and batching are `makemost_jax.data.pairs`' (re-exported here). Sources are
encoded as [CLS] tokens [SEP] padded to `max_source`; targets as bare tokens padded to
`max_target`. Fixed shapes mean one compilation for every batch.

Example:
    >>> # pairs = read_pairs(asset_path("bible_kjv_web_train.jsonl"))
    >>> # data = encode_pairs(tok, pairs, config)
    >>> # batches = PairBatches(data, batch_size=16, seed=0)
"""

from __future__ import annotations

import numpy as np

from makemost_jax.data.pairs import PairBatches, asset_path, fixed_batches, read_pairs
from makemost_jax.errors import InputError
from makemost_jax.nar.model import Seq2SeqConfig

__all__ = ["PairBatches", "asset_path", "encode_pairs", "encode_sources", "fixed_batches", "read_pairs"]


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


