"""Few-shot classification with k demonstrations, with and without HSO on their cache.

The prompt is k demonstrations (query text + verbaliser + separator) followed by the
test input's query text; the prediction is the label whose verbaliser has the highest
log-probability (METHODS.md section 1, few-shot). The demonstrations are read once
into a KV cache that every test input reuses, batched.

With HSO the demonstrations are read by the language-modelling protocol of
`makemost_jax.hso.lm`, one demonstration per segment: each is scored from the cache
of the ones before it, and that cache is updated by per-slot Adam to raise its
log-probability (of all its tokens, or with `labels_only` of its verbaliser tokens
only) before it is appended. Without HSO the same loop runs with the update off,
which is exactly the plain concatenated prompt.

Contextual calibration (Zhao et al. 2021) is the extra baseline: label probabilities
for content-free inputs ("N/A", "", "[MASK]") with the same demonstrations estimate
the prompt's bias, and predictions divide it out.

Example:
    >>> import makemost_jax as mm
    >>> from makemost_jax.hso import HSOConfig
    >>> train, test = load_sentiment_sample()
    >>> len(train), len(test), sorted({r["label"] for r in test})
    (400, 300, ['negative', 'positive'])
    >>> result = fewshot_classify(mm.load(), mm.load_tokenizer(), train, test[:40], k=4, draws=2,
    ...                           hso=HSOConfig(lr=1e-2))  # doctest: +SKIP
    >>> result.summary()["hso"]["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

from makemost_jax.errors import ConfigError, InputError
from makemost_jax.hso.lm import HSOConfig, HSOState, Segments, raise_if_not_finite, run_segments
from makemost_jax.models.cache import KVCache, repeat_rows
from makemost_jax.models.model import forward
from makemost_jax.models.types import Params

CONTENT_FREE = ("N/A", "", "[MASK]")
QUERY_BATCH = 32  # test inputs per model call (the last batch is padded: one compilation)
LENGTH_BUCKET = 16  # demonstration and query lengths are padded up to a multiple of this


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a demonstration and a test input are written, and each label's verbaliser.

    Example:
        >>> fmt = PromptFormat()
        >>> fmt.query.format(text="Great.") + fmt.verbalisers[1][1] + fmt.separator
        'Review: Great.\\nSentiment: positive\\n\\n'
    """

    query: str = "Review: {text}\nSentiment:"
    verbalisers: tuple[tuple[str, str], ...] = (("negative", " negative"), ("positive", " positive"))
    separator: str = "\n\n"

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _ in self.verbalisers)


def load_sentiment_sample() -> tuple[list[dict], list[dict]]:
    """The bundled review sentences: 400 for demonstrations, 300 for testing (balanced).

    Example:
        >>> train, test = load_sentiment_sample()
        >>> sum(r["label"] == "positive" for r in test)
        150
    """
    def read(name):
        path = resources.files("makemost_jax.assets").joinpath(name)
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    return read("sentiment_train.jsonl"), read("sentiment_test.jsonl")


# TFDS few-shot tasks: (builder, train split, test split, text feature, label feature, label names, format).
TFDS_TASKS = {
    "sst2": ("glue/sst2", "train", "validation", "sentence", "label", ("negative", "positive"), PromptFormat()),
    "ag_news": ("ag_news_subset", "train", "test", "description", "label",
                ("world", "sports", "business", "technology"),
                PromptFormat(query="Article: {text}\nTopic:", verbalisers=(
                    ("world", " World"), ("sports", " Sports"), ("business", " Business"),
                    ("technology", " Technology")))),
    "trec": ("trec", "train", "test", "text", "label-coarse",
             ("description", "entity", "abbreviation", "human", "number", "location"),
             PromptFormat(query="Question: {text}\nAnswer type:", verbalisers=(
                 ("description", " Description"), ("entity", " Entity"), ("abbreviation", " Abbreviation"),
                 ("human", " Person"), ("number", " Number"), ("location", " Location")))),
}


def load_tfds_task(name: str, data_dir: str | None = None, max_test: int | None = None):
    """(train records, test records, PromptFormat) of a TFDS classification task.

    Needs `tensorflow-datasets` and the dataset prepared under `data_dir` (or a network).

    Example:
        >>> train, test, fmt = load_tfds_task("sst2", data_dir="~/tensorflow_datasets")  # doctest: +SKIP
    """
    from makemost_jax.data import TfdsSource

    if name not in TFDS_TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {sorted(TFDS_TASKS)} or pass records yourself")
    builder, train_split, test_split, text, label, names, fmt = TFDS_TASKS[name]

    def records(split, limit=None):
        source = TfdsSource(builder, split, {"text": text, "label": label}, data_dir=data_dir)
        n = len(source) if limit is None else min(limit, len(source))
        return [{"text": r["text"], "label": names[int(r["label"])], "id": i}
                for i, r in enumerate(source[j] for j in range(n))]

    return records(train_split), records(test_split, max_test), fmt


def _bucket(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


def demonstration_tokens(tokenizer, demo: dict, fmt: PromptFormat, first: bool) -> tuple[list[int], list[bool]]:
    """A demonstration's token ids and which of them are its verbaliser (BOS first if `first`).

    Example:
        >>> # ids, is_label = demonstration_tokens(tok, {"text": "Great.", "label": "positive"}, fmt, True)
    """
    text = fmt.query.format(text=demo["text"])
    query = tokenizer.encode_for_model(text) if first else tokenizer.encode(text)
    label = tokenizer.encode(dict(fmt.verbalisers)[demo["label"]])
    separator = tokenizer.encode(fmt.separator)
    return query + label + separator, [False] * len(query) + [True] * len(label) + [False] * len(separator)


def demonstration_segments(tokenizer, demos: Sequence[dict], fmt: PromptFormat, labels_only: bool,
                           width: int | None = None) -> Segments:
    """One segment per demonstration (B=1), right-padded; padding is masked out of the cache.

    Targets are the next token within the demonstration; with `labels_only` only the
    verbaliser tokens are scored. The first demonstration starts with BOS when the
    tokenizer asks for it. `width` (default: the longest, bucketed) fixes the segment
    length, so that every draw of demonstrations reuses one compiled program.

    Example:
        >>> # seg = demonstration_segments(tok, train[:4], PromptFormat(), labels_only=False)
        >>> # seg.inputs.shape  -> (4, 1, 48)
    """
    rows, label_flags = zip(*(demonstration_tokens(tokenizer, d, fmt, i == 0) for i, d in enumerate(demos)))
    width = width or _bucket(max(len(r) for r in rows))
    if max(len(r) for r in rows) > width:
        raise InputError(f"a demonstration has {max(len(r) for r in rows)} tokens, more than width={width}")
    k = len(rows)
    inputs = np.zeros((k, 1, width), np.int32)
    targets = np.zeros_like(inputs)
    weights = np.zeros((k, 1, width), np.float32)
    mask = np.zeros((k, 1, width), bool)
    for i, (row, flags) in enumerate(zip(rows, label_flags)):
        n = len(row)
        inputs[i, 0, :n] = row
        mask[i, 0, :n] = True
        targets[i, 0, :n - 1] = row[1:]
        scored = np.array(flags[1:]) if labels_only else np.ones(n - 1, bool)
        weights[i, 0, :n - 1] = scored
    return Segments(inputs=inputs, targets=targets, weights=weights, mask=mask)


@jax.jit
def _label_logprobs(params: Params, cache: KVCache, inputs_QT, mask_QT, targets_JQT, weights_JQT):
    """Sum of weighted target log-probs (J, Q) for queries read after the shared cache.

    The cache (batch 1) is broadcast to the Q rows and only read.
    """
    rows = repeat_rows(cache, inputs_QT.shape[0])
    logp_QTV = jax.nn.log_softmax(forward(params, inputs_QT, cache=rows, mask=mask_QT, write_cache=False).logits,
                                  axis=-1)
    logp_JQT = jnp.take_along_axis(logp_QTV[None], targets_JQT[..., None], axis=-1)[..., 0]
    return jnp.sum(logp_JQT * weights_JQT, axis=-1)


def label_logprobs(params: Params, tokenizer, cache: KVCache, texts: Sequence[str], fmt: PromptFormat) -> np.ndarray:
    """log p(verbaliser | demonstrations, query) for every text and label: (len(texts), labels).

    Single-token verbalisers share one model call per batch (all labels read off the
    last query position); longer verbalisers get one call per label.

    Example:
        >>> # label_logprobs(params, tok, state.cache(), ["A gem."], PromptFormat())  -> array (1, 2)
    """
    label_ids = [tokenizer.encode(v) for _, v in fmt.verbalisers]
    if any(not ids for ids in label_ids):
        raise ConfigError(f"a verbaliser of {fmt.verbalisers} encodes to no tokens; give every label a word")
    queries = [tokenizer.encode(fmt.query.format(text=t)) for t in texts]
    shared = all(len(ids) == 1 for ids in label_ids)
    # Groups of (label indices, continuation tokens appended to the query before scoring).
    groups = [(list(range(len(label_ids))), [])] if shared else \
        [([j], ids[:-1]) for j, ids in enumerate(label_ids)]
    extra_tokens = max(len(ids) for ids in label_ids) - 1
    order = np.argsort([len(q) for q in queries], kind="stable")  # similar lengths share a batch: less padding
    out = np.zeros((len(texts), len(label_ids)))
    batch = min(QUERY_BATCH, len(texts))
    for first in range(0, len(texts), batch):
        rows_in_chunk = order[first:first + batch]
        chunk = [queries[i] for i in rows_in_chunk]
        width = _bucket(max(len(q) for q in chunk) + extra_tokens)
        for js, extra in groups:
            inputs = np.zeros((batch, width), np.int32)
            mask = np.zeros_like(inputs, dtype=bool)
            targets = np.zeros((len(js), batch, width), np.int32)
            weights = np.zeros(targets.shape, np.float32)
            for r, query in enumerate(chunk):
                row = query + extra
                inputs[r, :len(row)] = row
                mask[r, :len(row)] = True
                for g, j in enumerate(js):
                    # position p predicts token p+1: the label's tokens follow the query
                    for n, token in enumerate(label_ids[j]):
                        targets[g, r, len(query) - 1 + n] = token
                        weights[g, r, len(query) - 1 + n] = 1.0
            scores = _label_logprobs(params, cache, inputs, mask, targets, weights)
            out[np.ix_(rows_in_chunk, js)] = np.asarray(scores).T[:len(chunk)]
    return out


def demonstrations_cache(params: Params, tokenizer, demos: Sequence[dict], fmt: PromptFormat,
                         hso: HSOConfig | None, labels_only: bool = False, width: int | None = None) -> HSOState:
    """Read the demonstrations into a cache, with HSO (`hso` given) or without.

    Example:
        >>> # state = demonstrations_cache(params, tok, train[:4], PromptFormat(), HSOConfig(lr=1e-2))
        >>> # state.cache()  -> KVCache with the demonstrations
    """
    segments = demonstration_segments(tokenizer, demos, fmt, labels_only, width)
    config = hso or HSOConfig()
    k, _, width = segments.inputs.shape
    _, finite_K, state = run_segments(params, segments, config.hyper(), cache_size=k * width,
                                      hso_steps=config.hso_steps, recompute=config.recompute,
                                      offsets=config.offsets, update=hso is not None)
    raise_if_not_finite(finite_K, width, what="demonstration")
    return state


@dataclasses.dataclass(frozen=True)
class FewShotResult:
    """Accuracy per draw of demonstrations, for each way of classifying.

    `accuracy[name]` is a list with one accuracy per draw, for name in "plain" (no
    HSO), "hso", "calibrated" (contextual calibration, no HSO) and "calibrated_hso";
    every name was computed on the same draws (`draws` holds their example ids).

    Example:
        >>> r = FewShotResult({"plain": [0.5, 0.7], "hso": [0.6, 0.8]}, [[1], [2]], 2, 10, 0.5, 1.0)
        >>> r.summary()["hso"]["mean"]
        0.7
    """

    accuracy: dict[str, list[float]]
    draws: list[list[int]]  # ids of the demonstrations of each draw
    k: int
    n_test: int
    majority_rate: float  # accuracy of always answering the most frequent test label
    seconds: float

    def summary(self) -> dict:
        """Mean, standard deviation, min and max over draws, per way of classifying."""
        return {name: {"mean": float(np.mean(a)), "std": float(np.std(a)), "min": float(np.min(a)),
                       "max": float(np.max(a))} for name, a in self.accuracy.items()}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "summary": self.summary()}


def _check(train, test, fmt, k, draws):
    labels = set(fmt.labels)
    for name, rows in (("train", train), ("test", test)):
        if not rows:
            raise InputError(f"the {name} examples are empty; give labelled examples")
        unknown = {r["label"] for r in rows} - labels
        if unknown:
            raise InputError(f"{name} examples have labels {sorted(unknown)} that have no verbaliser in "
                             f"{fmt.labels}; add them to PromptFormat.verbalisers")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r} must be a positive number of demonstrations")
    if k > len(train):
        raise ConfigError(f"k={k} demonstrations requested but only {len(train)} training examples are available; "
                          f"use k <= {len(train)}")
    if draws < 1:
        raise ConfigError(f"draws={draws} must be at least 1")


def draw_logprobs(params: Params, tokenizer, demos: Sequence[dict], texts: Sequence[str], fmt: PromptFormat,
                  hso: HSOConfig | None, labels_only: bool = False, width: int | None = None):
    """Label log-probs (texts, labels) and those of the content-free inputs (3, labels), after one draw.

    The demonstrations are read with HSO (`hso` given) or without (`hso=None`); pass both
    arrays to `calibrate` for contextual calibration.

    Example:
        >>> # logp, free = draw_logprobs(params, tok, train[:4], ["A gem."], PromptFormat(), HSOConfig())
        >>> # (calibrate(logp, free).argmax(1), logp.argmax(1))   # calibrated and plain predictions
    """
    cache = demonstrations_cache(params, tokenizer, demos, fmt, hso, labels_only, width).cache()
    return (label_logprobs(params, tokenizer, cache, texts, fmt),
            label_logprobs(params, tokenizer, cache, list(CONTENT_FREE), fmt))


def calibrate(logp, free) -> np.ndarray:
    """Contextual calibration: label log-probs with the prompt's bias (mean content-free p) divided out.

    Example:
        >>> calibrate(np.log([[0.6, 0.4]]), np.log([[0.8, 0.2], [0.8, 0.2], [0.8, 0.2]])).argmax(1).tolist()
        [1]
    """
    bias = np.log(np.mean(np.exp(free - np.logaddexp.reduce(free, axis=1, keepdims=True)), axis=0))
    return logp - np.logaddexp.reduce(logp, axis=1, keepdims=True) - bias


def demonstration_width(tokenizer, train: Sequence[dict], fmt: PromptFormat) -> int:
    """The segment width that fits every candidate demonstration: one compiled program for every draw.

    Example:
        >>> # width = demonstration_width(tok, train, PromptFormat())   # e.g. 96
    """
    return _bucket(max(len(demonstration_tokens(tokenizer, r, fmt, True)[0]) for r in train))


def check_fits(params: Params, tokenizer, texts: Sequence[str], fmt: PromptFormat, k: int, width: int) -> None:
    """Raise `ConfigError` when k demonstrations of `width` tokens and a test input exceed the context.

    Example:
        >>> # check_fits(params, tok, texts, PromptFormat(), k=16, width=96)
    """
    longest_query = max(len(tokenizer.encode(fmt.query.format(text=t))) for t in texts)
    if k * width + _bucket(longest_query + 8) > params.config.max_positions:
        raise ConfigError(f"k={k} demonstrations ({k * width} tokens with padding) and a test input do not "
                          f"fit the model's context of {params.config.max_positions}; use a smaller k")


def fewshot_classify(params: Params, tokenizer, train: Sequence[dict], test: Sequence[dict], *, k: int = 4,
                     draws: int = 5, seed: int = 0, hso: HSOConfig | None = None, labels_only: bool = False,
                     fmt: PromptFormat = PromptFormat()) -> FewShotResult:
    """Accuracy with and without HSO (and with contextual calibration) over random draws.

    Each draw picks k demonstrations from `train` (records {"text", "label"}) with
    `seed`; the same draw serves every way of classifying. `hso` defaults to
    `HSOConfig(lr=1e-2)` (segment and cache size are set from the demonstrations).

    Example:
        >>> # r = fewshot_classify(params, tok, train, test, k=4, draws=5, hso=HSOConfig(lr=3e-2))
        >>> # r.summary()  -> {"plain": {"mean": ..., "std": ...}, "hso": {...}, ...}
    """
    params.config.require_decoder_only("few-shot classification")
    _check(train, test, fmt, k, draws)
    hso = hso or HSOConfig(lr=1e-2)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    gold = np.array([fmt.labels.index(r["label"]) for r in test])
    texts = [r["text"] for r in test]
    accuracy = {"plain": [], "hso": [], "calibrated": [], "calibrated_hso": []}
    width = demonstration_width(tokenizer, train, fmt)
    check_fits(params, tokenizer, texts, fmt, k, width)
    chosen = []
    for _ in range(draws):
        picks = rng.choice(len(train), size=k, replace=False)
        demos = [train[i] for i in picks]
        chosen.append([int(train[i].get("id", i)) for i in picks])
        for name, config in (("plain", None), ("hso", hso)):
            logp, free = draw_logprobs(params, tokenizer, demos, texts, fmt, config, labels_only, width)
            accuracy[name].append(float(np.mean(logp.argmax(1) == gold)))
            accuracy["calibrated" if name == "plain" else "calibrated_hso"].append(
                float(np.mean(calibrate(logp, free).argmax(1) == gold)))
    majority = float(np.max(np.bincount(gold)) / gold.size)
    return FewShotResult(accuracy=accuracy, draws=chosen, k=k, n_test=len(test), majority_rate=majority,
                         seconds=time.perf_counter() - t0)
