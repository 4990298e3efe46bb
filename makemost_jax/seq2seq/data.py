"""Translation data: a joint BPE tokenizer trained with `tokenizers`, and fixed-shape encoded pairs.

`train_tokenizer` learns one SentencePiece-style BPE vocabulary (Metaspace pre-tokenizer,
byte fallback off, `<pad>` = 0, `</s>` = 1, `<unk>` = 2) over both sides of a parallel
corpus, as Marian's shared vocabularies are, and appends `</s>` to every encoded source
(`encode(..., add_special_tokens=True)`, Marian's template). `save_tokenizer` writes it
beside a model (`tokenizer.json` + `tokenizer_config.json`), where `load_tokenizer(folder)`
finds it.

Pairs are encoded to fixed shapes (one compilation for every batch): sources `x </s>`
right-padded to `max_source`; decoder rows `<start> y </s>` padded to `max_target + 2`
(the model reads `row[:-1]` and predicts `row[1:]`), with the mask of the predicted
tokens. Pairs longer than the limits are dropped.

Example:
    >>> # tok = train_tokenizer([en for en, _ in pairs] + [es for _, es in pairs], vocab_size=8000)
    >>> # data = encode_translation_pairs(tok, pairs, max_source=64, max_target=64, start_id=tok.pad_id)
    >>> # batches = PairBatches(data, batch_size=32)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.tokenizer import Tokenizer

SPECIALS = ("<pad>", "</s>", "<unk>")


def train_tokenizer(texts: Sequence[str], vocab_size: int = 8000, min_frequency: int = 2) -> Tokenizer:
    """A BPE tokenizer of at most `vocab_size` ids learned on `texts` (ids 0, 1, 2: <pad>, </s>, <unk>).

    Example:
        >>> tok = train_tokenizer(["the cat sat", "el gato"] * 10, vocab_size=60)
        >>> tok.pad_id, tok.eos_id, tok.encode_source("the cat")[-1] == tok.eos_id
        (0, 1, True)
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 3 + 10:
        raise ConfigError(f"vocab_size={vocab_size} is too small; it must hold the 3 specials and some pieces")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError("no text to train the tokenizer on; give the training pairs")
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return Tokenizer(backend, eos_id=1, pad_id=0, unk_id=2, name="trained BPE")


def save_tokenizer(tokenizer: Tokenizer, folder: str) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` (its special tokens) into `folder`.

    Example:
        >>> # save_tokenizer(tok, "runs/en-es")   # then mm.load_tokenizer("runs/en-es")
    """
    os.makedirs(folder, exist_ok=True)
    tokenizer.backend.save(os.path.join(folder, "tokenizer.json"))
    names = {"pad_token": tokenizer.pad_id, "eos_token": tokenizer.eos_id, "unk_token": tokenizer.unk_id}
    config = {name: tokenizer.id_to_token(i) for name, i in names.items() if i is not None}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def encode_translation_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], max_source: int,
                             max_target: int, start_id: int) -> dict[str, np.ndarray]:
    """Fixed-shape arrays of the pairs that fit: {"source", "source_mask", "target", "target_mask", "index"}.

    "target" rows are `<start> y </s>` (max_target + 2 wide); "target_mask" marks the
    predicted tokens `y </s>` of `target[:, 1:]`; "index" the kept positions in `pairs`.

    Example:
        >>> tok = train_tokenizer(["a b c", "x y z"] * 10, vocab_size=40)
        >>> data = encode_translation_pairs(tok, [("a b", "x y")], max_source=8, max_target=8, start_id=0)
        >>> data["target"].shape, int(data["target_mask"].sum()) == len(tok.encode("x y")) + 1
        ((1, 10), True)
    """
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    if eos is None or pad is None:
        raise ConfigError("the tokenizer needs </s> and <pad> ids for translation pairs")
    sources = [tokenizer.encode_source(s) for s, _ in pairs]
    targets = [tokenizer.encode(t) for _, t in pairs]
    keep = [i for i, (s, t) in enumerate(zip(sources, targets))
            if 1 < len(s) <= max_source and 0 < len(t) <= max_target]
    n = len(keep)
    data = {"source": np.full((n, max_source), pad, np.int32), "source_mask": np.zeros((n, max_source), np.int32),
            "target": np.full((n, max_target + 2), pad, np.int32),
            "target_mask": np.zeros((n, max_target + 1), np.int32), "index": np.array(keep, np.int64)}
    for row, i in enumerate(keep):
        s, t = sources[i], [start_id, *targets[i], eos]
        data["source"][row, :len(s)], data["source_mask"][row, :len(s)] = s, 1
        data["target"][row, :len(t)], data["target_mask"][row, :len(t) - 1] = t, 1
    return data
