"""Deterministic, resumable, process-sharded batches from a `DocumentSource`.

Three iterators, all yielding numpy arrays (or records) for this process's rows:

- `PackedLMBatches`: language-model training. Documents are tokenized, joined with EOS
  and cut into rows of `seq_len` inputs and targets, with no padding except at the very
  end of a finite run.
- `DocumentContiguousBatches`: segment recurrence. Each row reads one document window by
  window across steps, with a `reset` flag on a document's first window and padding
  after its last.
- `RecordBatches`: lists of records (labelled sentences, translation pairs), for loops
  that tokenize and pad them themselves.

**Order.** The documents form one stream: epoch 0 in the order `epoch_permutation(n,
seed, 0)`, then epoch 1 in `epoch_permutation(n, seed, 1)`, and so on (forever with
`num_epochs=None`). Row `r` of a global batch of `B` rows reads stream positions
`r, r + B, r + 2B, ...`. This assignment is static, so a process reading rows
`[p*B/P, (p+1)*B/P)` tokenizes only its own documents, and the rows of all processes
together are exactly the single-process batch.

**Resumption.** `it.state()` is a small JSON-serialisable dict (the step, and per row the
stream slot and token offset it has reached); `it.restore(state)` (or `state=` in the
constructor) continues with exactly the batches an uninterrupted iterator would have
produced. On several processes, gather the states and `merge_states` them into one that
any process count can restore from.

**Finite runs.** With `num_epochs=k` each document is read exactly `k` times. Rows run
out at different steps; a row that has run out is padding (`loss_mask` 0) until every
row of this process has run out, and then iteration stops. Processes can run out at
different steps, so a multi-process loop should agree on stopping (e.g. all-reduce
`it.exhausted`) or use `num_epochs=None` and a step budget.

Example:
    >>> import makemost_jax as mm                                                    # doctest: +SKIP
    >>> from makemost_jax.data import TextFiles, PackedLMBatches
    >>> it = PackedLMBatches(TextFiles("corpus/"), mm.load_tokenizer(), batch_size=8, seq_len=512)  # doctest: +SKIP
    >>> batch = next(it); batch["tokens"].shape     # inputs tokens[:, :-1], targets tokens[:, 1:]  # doctest: +SKIP
    (8, 513)
    >>> saved = it.state()                     # JSON-serialisable; store it with the checkpoint  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from makemost_jax.data.sources import DocumentSource
from makemost_jax.data.tokens import DocumentTokenizer, TextTokenizer
from makemost_jax.errors import ConfigError, InputError

__all__ = [
    "DocumentContiguousBatches",
    "PackedLMBatches",
    "RecordBatches",
    "epoch_permutation",
    "merge_states",
]

_STATE_VERSION = 1
# Permutations kept per iterator: rows are usually within one epoch of each other.
_CACHED_EPOCHS = 3


def epoch_permutation(num_documents: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The document order of one epoch: a permutation of `range(num_documents)`.

    Drawn from `numpy.random.default_rng([seed, epoch])`, so it depends only on its
    arguments (no global random state) and differs from epoch to epoch.

    Example:
        >>> epoch_permutation(5, seed=0, epoch=0).tolist() == epoch_permutation(5, 0, 0).tolist()
        True
        >>> epoch_permutation(4, seed=0, epoch=1, shuffle=False).tolist()
        [0, 1, 2, 3]
    """
    if not shuffle:
        return np.arange(num_documents)
    return np.random.default_rng([seed, epoch]).permutation(num_documents)


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}{hint}")
    return int(value)


def _process_slice(batch_size: int, process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """This process's rows [start, stop) of the global batch."""
    if process_index is None or process_count is None:
        import jax  # only for the defaults: jax.distributed.initialize() must already have run

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    count = _check_int("process_count", process_count, 1)
    index = _check_int("process_index", process_index, 0)
    if index >= count:
        raise ConfigError(f"process_index={index} must be < process_count={count}")
    if batch_size % count:
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by process_count={count}; use a multiple of {count} "
            "(batch_size is the global batch, split evenly over processes)"
        )
    per = batch_size // count
    return index * per, (index + 1) * per


class _Stream:
    """Stream position -> document index: epoch-by-epoch permutations, concatenated."""

    def __init__(self, num_documents: int, seed: int, shuffle: bool, num_epochs: int | None):
        self.n, self.seed, self.shuffle, self.num_epochs = num_documents, seed, shuffle, num_epochs
        self.total = None if num_epochs is None else num_epochs * num_documents
        self._perms: dict[int, np.ndarray] = {}

    def document(self, position: int) -> int | None:
        if self.total is not None and position >= self.total:
            return None
        epoch, k = divmod(position, self.n)
        if not self.shuffle:
            return k
        if epoch not in self._perms:
            if len(self._perms) >= _CACHED_EPOCHS:
                del self._perms[min(self._perms)]
            self._perms[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return int(self._perms[epoch][k])


def _check_source(source: Any) -> int:
    if not isinstance(source, DocumentSource):
        raise ConfigError(
            f"{type(source).__name__} is not a document source; pass one with len() and [i] "
            "(TextFiles, JsonlSource, TfdsSource, HFDatasetSource or a list of dicts)"
        )
    n = len(source)
    if n == 0:
        raise InputError(f"the source {source!r} has no documents; point it at non-empty data")
    return n


class _StatefulIterator:
    """The state bookkeeping shared by every iterator: config fingerprint, step, restore checks."""

    kind = ""

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _check_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ConfigError(f"not a data-iterator state of version {_STATE_VERSION}: {str(state)[:200]}")
        if state.get("kind") != self.kind:
            raise ConfigError(f"the state is for a {state.get('kind')} iterator, not {self.kind}")
        for key, value in self._config().items():
            if state.get(key) != value:
                raise ConfigError(
                    f"the state was saved with {key}={state.get(key)!r} but this iterator has {key}={value!r}; "
                    "build the iterator with the settings of the run being resumed"
                )

    def __iter__(self) -> Iterator:
        return self


class _RowBatches(_StatefulIterator):
    """Rows that each read their own documents (r, r+B, r+2B, ... of the stream) forward."""

    _length_name = ""

    def __init__(self, source: DocumentSource, tokenizer: TextTokenizer | DocumentTokenizer, batch_size: int,
                 length: int, *, seed: int, shuffle: bool, num_epochs: int | None, field: str, pad_id: int,
                 process_index: int | None, process_count: int | None, state: dict[str, Any] | None):
        self.source = source
        n = _check_source(source)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.length = _check_int(self._length_name, length, 1)
        self.seed = _check_int("seed", seed, 0)
        self.num_epochs = None if num_epochs is None else _check_int("num_epochs", num_epochs, 1, " or None")
        self.shuffle, self.pad_id = bool(shuffle), int(pad_id)
        self.tokenize = tokenizer if isinstance(tokenizer, DocumentTokenizer) else DocumentTokenizer(tokenizer, field)
        self.row_start, self.row_stop = _process_slice(self.batch_size, process_index, process_count)
        self._stream = _Stream(n, self.seed, self.shuffle, self.num_epochs)
        rows = self.row_stop - self.row_start
        self.step = 0
        self._slot = [0] * rows  # the row's j-th document: stream position row + j * batch_size
        self._offset = [0] * rows  # token offset of the next read inside that document
        self._cache: list[dict[int, np.ndarray]] = [{} for _ in range(rows)]
        if state is not None:
            self.restore(state)

    def _config(self) -> dict[str, Any]:
        return {"num_documents": self._stream.n, "batch_size": self.batch_size, self._length_name: self.length,
                "seed": self.seed, "shuffle": self.shuffle, "num_epochs": self.num_epochs}

    def _tokens(self, i: int, slot: int) -> np.ndarray | None:
        """Token ids of local row i's slot-th document, or None past the end of the stream."""
        cache = self._cache[i]
        if slot not in cache:
            d = self._stream.document(self.row_start + i + slot * self.batch_size)
            if d is None:
                return None
            record = self.source[d]
            try:
                cache[slot] = self.tokenize(record)
            except InputError as e:
                raise InputError(f"{self.source!r}[{d}]: {e}") from e
        return cache[slot]

    def _move(self, i: int, slot: int, offset: int) -> None:
        self._slot[i], self._offset[i] = slot, offset
        for old in [k for k in self._cache[i] if k < slot]:
            del self._cache[i][old]

    @property
    def epoch(self) -> int:
        """The earliest epoch any of this process's rows is reading (for logging).

        Example:
            >>> it.epoch  # doctest: +SKIP
            0
        """
        first = min(self.row_start + i + s * self.batch_size for i, s in enumerate(self._slot))
        return first // self._stream.n

    @property
    def exhausted(self) -> bool:
        """True when a finite run has no token left for any of this process's rows.

        Example:
            >>> it.exhausted  # doctest: +SKIP
            False
        """
        return all(self._done(i) for i in range(len(self._slot)))

    def _done(self, i: int) -> bool:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The position after the last batch, as a small JSON-serialisable dict.

        Example:
            >>> saved = it.state(); json.dumps(saved)  # doctest: +SKIP
        """
        return {"kind": self.kind, "version": _STATE_VERSION, **self._config(), "step": self.step,
                "epoch": self.epoch,
                "rows": {"start": self.row_start, "slot": list(self._slot), "offset": list(self._offset)}}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state` (this iterator's, or `merge_states` of all processes').

        Example:
            >>> it2 = PackedLMBatches(src, tok, 8, 512); it2.restore(saved)  # doctest: +SKIP
        """
        self._check_state(state)
        rows = state["rows"]
        lo = self.row_start - rows["start"]
        hi = self.row_stop - rows["start"]
        if lo < 0 or hi > len(rows["slot"]) or len(rows["slot"]) != len(rows["offset"]):
            raise ConfigError(
                f"the state holds rows [{rows['start']}, {rows['start'] + len(rows['slot'])}) but this process "
                f"reads rows [{self.row_start}, {self.row_stop}); restore from merge_states() of every process"
            )
        self.step = int(state["step"])
        self._cache = [{} for _ in self._cache]
        for i in range(len(self._slot)):
            self._move(i, int(rows["slot"][lo + i]), int(rows["offset"][lo + i]))

    def _empty(self) -> dict[str, np.ndarray]:
        b = self.row_stop - self.row_start
        return {
            "tokens": np.full((b, self.length + 1), self.pad_id, np.int32),
            "loss_mask": np.zeros((b, self.length), np.float32),
            "positions": np.zeros((b, self.length), np.int32),
        }


class PackedLMBatches(_RowBatches):
    """Language-model batches: documents joined with EOS, packed into rows without padding.

    Each row reads its documents (tokenized by `DocumentTokenizer`: `[BOS] + ids + [EOS]`)
    back to back as one token stream and yields consecutive chunks of `seq_len + 1`
    tokens that overlap by one, so every token after a row's first is a target exactly
    once. A batch for this process's `b = batch_size / process_count` rows:

    - `tokens`: int32 [b, seq_len + 1]; the inputs are `tokens[:, :-1]`, the targets `tokens[:, 1:]`;
    - `loss_mask`: float32 [b, seq_len], aligned with the targets: 1 for real targets, 0 for
      padding (only at the end of a finite run);
    - `segment_ids`: int32 [b, seq_len], which document of the row (1, 2, ...) each input belongs to,
      0 where `loss_mask` is 0, for attention that must not cross documents;
    - `positions`: int32 [b, seq_len], each input's offset inside its document (0 where `loss_mask` is 0).

    `batch_size` is the global batch; see the module docstring for order, sharding,
    resumption and finite runs. `tokenizer` is a tokenizer (with `encode`, `bos_id`,
    `eos_id`, `add_bos`) or a ready `DocumentTokenizer` (whose own field and BOS/EOS
    settings then apply); `field` names the text field.

    Example:
        >>> import makemost_jax as mm                                                   # doctest: +SKIP
        >>> it = PackedLMBatches(TextFiles("tests/data/austen"), mm.load_tokenizer(),
        ...                      batch_size=4, seq_len=128, seed=0)                      # doctest: +SKIP
        >>> b = next(it); b["tokens"].shape, b["loss_mask"].sum()                        # doctest: +SKIP
        ((4, 129), 512.0)
    """

    kind = "packed_lm"
    _length_name = "seq_len"

    def __init__(self, source: DocumentSource, tokenizer: TextTokenizer | DocumentTokenizer, batch_size: int,
                 seq_len: int, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 field: str = "text", pad_id: int = 0, process_index: int | None = None,
                 process_count: int | None = None, state: dict[str, Any] | None = None):
        super().__init__(source, tokenizer, batch_size, seq_len, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                         field=field, pad_id=pad_id, process_index=process_index, process_count=process_count,
                         state=state)

    def _fill(self, i: int, out: dict[str, np.ndarray]) -> bool:
        """Write local row i's next chunk into `out`; False if the row has nothing left."""
        slot, offset = self._slot[i], self._offset[i]
        need = self.length + 1
        tokens, segments, positions = [], [], []
        got = 0
        while got < need:
            doc = self._tokens(i, slot)
            if doc is None:
                break
            take = min(need - got, len(doc) - offset)
            tokens.append(doc[offset:offset + take])
            segments.append(np.full(take, len(tokens), np.int32))
            positions.append(np.arange(offset, offset + take, dtype=np.int32))
            got += take
            offset += take
            if got < need:
                slot, offset = slot + 1, 0
        if got < 2:  # no (input, target) pair left
            return False
        t = np.concatenate(tokens)
        n = got - 1
        out["tokens"][i, :got] = t
        out["loss_mask"][i, :n] = 1.0
        out["segment_ids"][i, :n] = np.concatenate(segments)[:-1]
        out["positions"][i, :n] = np.concatenate(positions)[:-1]
        # The next chunk starts at this chunk's last token (its last target); at the end of
        # a finite stream `slot` already points past the last document.
        if got == need:
            self._move(i, slot, offset - 1)
        else:
            self._move(i, slot, 0)
        return True

    def _done(self, i: int) -> bool:
        slot, offset = self._slot[i], self._offset[i]
        doc = self._tokens(i, slot)
        if doc is None:
            return True
        return len(doc) - offset < 2 and self._tokens(i, slot + 1) is None

    def __next__(self) -> dict[str, np.ndarray]:
        out = self._empty()
        out["segment_ids"] = np.zeros_like(out["positions"])
        filled = [self._fill(i, out) for i in range(len(self._slot))]  # every row advances
        if not any(filled):
            raise StopIteration
        self.step += 1
        return out


class DocumentContiguousBatches(_RowBatches):
    """Segment-recurrence batches: each row follows one document, window by window.

    Row `r` reads its current document in windows of `window` inputs (with the next
    token as each input's target, so consecutive windows overlap by one token); after a
    document's last window (padded to `window`) the row starts its next document
    (stream positions `r, r + B, r + 2B, ...`). A batch for this process's
    `b = batch_size / process_count` rows:

    - `tokens`: int32 [b, window + 1]; the inputs are `tokens[:, :-1]`, the targets `tokens[:, 1:]`;
    - `loss_mask`: float32 [b, window], aligned with the targets: 1 for real targets, 0 for
      padding after a document's end;
    - `reset`: bool [b], True where the row starts a new document at this step (clear its memory first);
    - `positions`: int32 [b, window], each input's offset inside its document (0 where `loss_mask` is 0).

    Documents are tokenized as `[BOS] + ids + [EOS]`, so a document of n tokens gives
    n - 1 targets over ceil((n - 1) / window) steps. See the module docstring for order,
    sharding, resumption and finite runs.

    Example:
        >>> import makemost_jax as mm                                               # doctest: +SKIP
        >>> it = DocumentContiguousBatches(TextFiles("tests/data/austen"), mm.load_tokenizer(),
        ...                                batch_size=2, window=64, seed=0)          # doctest: +SKIP
        >>> b = next(it); b["tokens"].shape, b["reset"].tolist()                     # doctest: +SKIP
        ((2, 65), [True, True])
    """

    kind = "document_contiguous"
    _length_name = "window"

    def __init__(self, source: DocumentSource, tokenizer: TextTokenizer | DocumentTokenizer, batch_size: int,
                 window: int, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 field: str = "text", pad_id: int = 0, process_index: int | None = None,
                 process_count: int | None = None, state: dict[str, Any] | None = None):
        super().__init__(source, tokenizer, batch_size, window, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                         field=field, pad_id=pad_id, process_index=process_index, process_count=process_count,
                         state=state)

    def _fill(self, i: int, out: dict[str, np.ndarray]) -> bool:
        """Write local row i's next window into `out`; False if the row has nothing left."""
        slot, offset = self._slot[i], self._offset[i]
        doc = self._tokens(i, slot)
        if doc is None:
            return False
        chunk = doc[offset:offset + self.length + 1]
        n = len(chunk) - 1
        out["reset"][i] = offset == 0
        out["tokens"][i, :n + 1] = chunk
        out["loss_mask"][i, :n] = 1.0
        out["positions"][i, :n] = np.arange(offset, offset + n, dtype=np.int32)
        offset += self.length
        # A document is done when no target is left after the new offset.
        if offset + 1 >= len(doc):
            self._move(i, slot + 1, 0)
        else:
            self._move(i, slot, offset)
        return True

    def _done(self, i: int) -> bool:
        return self._tokens(i, self._slot[i]) is None

    def __next__(self) -> dict[str, np.ndarray]:
        out = self._empty()
        out["reset"] = np.zeros(len(self._slot), bool)
        filled = [self._fill(i, out) for i in range(len(self._slot))]  # every row advances
        if not any(filled):
            raise StopIteration
        self.step += 1
        return out


class RecordBatches(_StatefulIterator):
    """Batches of records (lists of dicts) in a deterministic shuffled order, resumable.

    For classification and translation loops that tokenize and pad themselves. Global
    batch `k` holds stream positions `[k*B, (k+1)*B)` (epochs concatenated, as in the
    module docstring); this process gets its slice `[p*B/P, (p+1)*B/P)` of it. With a
    finite `num_epochs` the last, short batch is dropped unless `drop_remainder=False`
    (then it is shorter, and on several processes unevenly so: pad before assembling).

    Example:
        >>> src = JsonlSource("tests/data/sentiment.jsonl", {"text": "text", "label": "label"})  # doctest: +SKIP
        >>> it = RecordBatches(src, batch_size=16, seed=0, num_epochs=1)                        # doctest: +SKIP
        >>> [r["label"] for r in next(it)][:3]                                                  # doctest: +SKIP
        ['negative', 'positive', 'positive']
    """

    kind = "records"

    def __init__(self, source: DocumentSource, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = True, process_index: int | None = None,
                 process_count: int | None = None, state: dict[str, Any] | None = None):
        self.source = source
        n = _check_source(source)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.num_epochs = None if num_epochs is None else _check_int("num_epochs", num_epochs, 1, " or None")
        self.shuffle, self.drop_remainder = bool(shuffle), bool(drop_remainder)
        self.row_start, self.row_stop = _process_slice(self.batch_size, process_index, process_count)
        self._stream = _Stream(n, self.seed, self.shuffle, self.num_epochs)
        self.step = 0
        if state is not None:
            self.restore(state)

    def _config(self) -> dict[str, Any]:
        return {"num_documents": self._stream.n, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "num_epochs": self.num_epochs, "drop_remainder": self.drop_remainder}

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in (for logging).

        Example:
            >>> it.epoch  # doctest: +SKIP
            0
        """
        return self.step * self.batch_size // self._stream.n

    def state(self) -> dict[str, Any]:
        """The position after the last batch, as a small JSON-serialisable dict (the same on every process).

        Example:
            >>> it.state()["step"]  # doctest: +SKIP
            3
        """
        return {"kind": self.kind, "version": _STATE_VERSION, **self._config(), "step": self.step,
                "epoch": self.epoch}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state` (any process's, since it holds only the step).

        Example:
            >>> it2 = RecordBatches(src, 16); it2.restore(saved)  # doctest: +SKIP
        """
        self._check_state(state)
        self.step = int(state["step"])

    def __next__(self) -> list[dict[str, Any]]:
        first = self.step * self.batch_size
        total = self._stream.total
        if total is not None and (first >= total or (self.drop_remainder and first + self.batch_size > total)):
            raise StopIteration
        docs = [self._stream.document(first + r) for r in range(self.row_start, self.row_stop)]
        records = [self.source[d] for d in docs if d is not None]
        self.step += 1
        return records


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state from every process's `state()`, restorable with any process count.

    The row iterators' states hold only their own rows; merging concatenates them (they
    must cover disjoint, adjacent row ranges and be at the same step). `RecordBatches`
    states are identical on every process and merge to themselves.

    Example:
        >>> from jax.experimental import multihost_utils                                   # doctest: +SKIP
        >>> states = [json.loads(s) for s in all_gathered_json_strings]                    # doctest: +SKIP
        >>> merged = merge_states(states)   # save this; each process then calls it.restore(merged)  # doctest: +SKIP
    """
    if not states:
        raise ConfigError("merge_states needs at least one state")
    ordered = sorted(states, key=lambda s: s.get("rows", {}).get("start", 0))
    first = ordered[0]
    fixed = {k: v for k, v in first.items() if k not in ("rows", "epoch")}
    for s in ordered[1:]:
        other = {k: v for k, v in s.items() if k not in ("rows", "epoch")}
        if other != fixed:
            diff = sorted(k for k in set(fixed) | set(other) if fixed.get(k) != other.get(k))
            raise ConfigError(f"states from different iterators or steps cannot be merged (they differ in {diff})")
    if "rows" not in first:
        return dict(first)
    slots, offsets = [], []
    start = first["rows"]["start"]
    for s in ordered:
        rows = s["rows"]
        if rows["start"] != start + len(slots):
            raise ConfigError(
                f"the states' rows are not adjacent: expected rows from {start + len(slots)}, got {rows['start']}; "
                "pass the state of every process exactly once"
            )
        slots += rows["slot"]
        offsets += rows["offset"]
    return {**fixed, "epoch": min(s["epoch"] for s in ordered),
            "rows": {"start": start, "slot": slots, "offset": offsets}}
