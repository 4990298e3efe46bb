"""Translate lines of text with any encoder-decoder and any search, and score them (sacrebleu).

Searches: "greedy", "beam" (`beams`, `length_penalty`, and `attribute` as an exact filter
of finished outputs), "cbs" (conditional beam search with a trained `classifier` head),
"exact" (the proved unconditional mode within `node_budget` expansions per sentence) and
"length-modes" (the exact mode at every length up to `max_new_tokens`: the best one is
the translation, all are reported). Lines run in batches of `batch_size` sources (the
last batch padded by repeating a line, so every batch has one compiled shape); exact
searches batch their expansions across the sentences of a batch.

Example:
    >>> # rows = translate(mm.load("runs/en-es/model"), mm.load_tokenizer("runs/en-es/model"),
    >>> #                  ["In the beginning was the Word."], search="beam", beams=5)
    >>> # rows[0]["translation"], score_translations([r["translation"] for r in rows], refs)["bleu"]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from makemost_jax.decoding.beam import beam_search
from makemost_jax.decoding.classifier import conditional_beam_search
from makemost_jax.decoding.exact import exact_length_modes, exact_mode
from makemost_jax.decoding.sampling import generate
from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models.types import Params

SEARCHES = ("greedy", "beam", "cbs", "exact", "length-modes")


def _output(tokenizer, tokens, eos_id: int) -> tuple[list[int], bool]:
    """Output ids without the EOS, and whether it ended with EOS."""
    tokens = [int(t) for t in tokens]
    if eos_id in tokens:
        return tokens[:tokens.index(eos_id)], True
    return tokens, False


def _search_batch(params: Params, tokenizer, sources: list[list[int]], search: str, options: dict) -> list[dict]:
    eos = tokenizer.eos_id
    n = options["max_new_tokens"]
    if search == "greedy":
        out = generate(params, sources=sources, max_new_tokens=n, eos_id=eos, pad_id=params.config.pad_token_id)
        rows = []
        for tokens, length, logp in zip(np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.logprobs)):
            ids, ended = _output(tokenizer, tokens[:length], eos)
            rows.append({"tokens": ids, "logprob": float(logp[:length].sum()), "ended": ended, "found": True})
        return rows
    if search in ("beam", "cbs"):
        common = dict(sources=sources, beams=options["beams"], max_new_tokens=n, eos_id=eos,
                      length_penalty=options["length_penalty"], pad_id=params.config.pad_token_id)
        if search == "beam":
            out = beam_search(params, attribute=options.get("attribute"), **common)
        else:
            out = conditional_beam_search(params, None, options["classifier"], options.get("attribute"),
                                          weight=options["weight"], prefilter=options.get("prefilter"), **common)
        rows = []
        for tokens, length, logp, found in zip(np.asarray(out.tokens[:, 0]), np.asarray(out.lengths[:, 0]),
                                               np.asarray(out.logprobs[:, 0]), np.asarray(out.finished[:, 0])):
            ended = bool(found and length < n and tokens[length] == eos)
            rows.append({"tokens": tokens[:length].tolist() if found else None,
                         "logprob": float(logp) if found else None, "ended": ended, "found": bool(found)})
        return rows
    settings = dict(sources=sources, eos_id=eos, max_length=n, node_budget=options["node_budget"],
                    batch_size=options["exact_batch"])
    if search == "exact":
        return [{"tokens": None if m.tokens is None else list(m.tokens), "logprob": m.loglik if m.tokens else None,
                 "ended": True, "found": m.tokens is not None, "proved_optimal": m.proved_optimal,
                 "nodes": m.nodes_expanded} for m in exact_mode(params, **settings)]
    rows = []
    for modes in exact_length_modes(params, **settings):
        best = max((m for m in modes if m.tokens is not None), key=lambda m: m.loglik, default=None)
        rows.append({"tokens": None if best is None else list(best.tokens),
                     "logprob": None if best is None else best.loglik, "ended": True, "found": best is not None,
                     "proved_optimal": all(m.proved_optimal for m in modes),
                     "modes": [{"length": m.length, "tokens": None if m.tokens is None else list(m.tokens),
                                "logprob": None if m.tokens is None else m.loglik,
                                "proved_optimal": m.proved_optimal} for m in modes]})
    return rows


def translate(params: Params, tokenizer, lines: Sequence[str], *, search: str = "beam", beams: int = 5,
              max_new_tokens: int = 128, length_penalty: float = 0.0, attribute=None, classifier=None,
              weight: float = 1.0, prefilter: int | None = None, node_budget: int = 2000, exact_batch: int = 64,
              batch_size: int = 16, progress: bool = True) -> list[dict]:
    """Translate each line; one dict per line: source, translation (None when the search found
    none), n_tokens, logprob (log p of the output incl. its EOS), ended (with EOS), found,
    and for the exact searches proved_optimal (and per-length modes for "length-modes").

    Example:
        >>> # translate(params, tok, ["Jesus wept."], search="exact", node_budget=5000)[0]["proved_optimal"]
    """
    cfg = params.config
    if cfg.encoder is None:
        raise ConfigError(f"translate needs an encoder-decoder (T5, BART, Marian); {cfg.hf_model_type} is not one")
    if search not in SEARCHES:
        raise ConfigError(f"search={search!r}; use one of {', '.join(SEARCHES)}")
    if (classifier is not None) != (search == "cbs"):
        raise ConfigError("search 'cbs' needs a classifier head and the other searches take none")
    if tokenizer.eos_id is None:
        raise ConfigError("the tokenizer has no EOS token; a translation ends with one")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    sources = []
    for i, line in enumerate(lines):
        if not line.strip():
            raise InputError(f"source line {i + 1} is empty; remove empty lines from the input")
        sources.append(tokenizer.encode_source(line))
    if not sources:
        raise InputError("no source lines to translate")
    max_new_tokens = min(max_new_tokens, cfg.max_positions - 1)
    options = dict(max_new_tokens=max_new_tokens, beams=beams, length_penalty=length_penalty, attribute=attribute,
                   classifier=classifier, weight=weight, prefilter=prefilter, node_budget=node_budget,
                   exact_batch=exact_batch)
    rows = []
    for start in tqdm(range(0, len(sources), batch_size), desc=f"translate ({search})",
                      disable=None if progress else True):
        chunk = sources[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk)) if search in ("greedy", "beam", "cbs") else chunk
        rows += _search_batch(params, tokenizer, padded, search, options)[:len(chunk)]
    out = []
    for line, row in zip(lines, rows):
        found = row["tokens"] is not None
        record = {"source": line, "translation": tokenizer.decode(row["tokens"]) if found else None,
                  "n_tokens": len(row["tokens"]) if found else None, **{k: v for k, v in row.items() if k != "tokens"}}
        if "modes" in row:
            record["modes"] = [{**m, "translation": None if m["tokens"] is None else tokenizer.decode(m["tokens"])}
                               for m in row["modes"]]
        out.append(record)
    return out


def score_translations(hypotheses: Sequence[str | None], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu, default settings) and the length ratio; a missing
    translation (None) counts as the empty string.

    Example:
        >>> s = score_translations(["the cat sat on the mat"], ["the cat sat on the mat"])
        >>> round(s["bleu"], 1), round(s["length_ratio"], 2)
        (100.0, 1.0)
    """
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise InputError(f"{len(hypotheses)} translations but {len(references)} references; give one per line")
    hyps, refs = [h or "" for h in hypotheses], [list(references)]
    bleu_metric, chrf_metric = BLEU(), CHRF()
    bleu = bleu_metric.corpus_score(hyps, refs)
    return {"bleu": bleu.score, "chrf": chrf_metric.corpus_score(hyps, refs).score,
            "length_ratio": bleu.sys_len / max(bleu.ref_len, 1), "signature": str(bleu_metric.get_signature())}
