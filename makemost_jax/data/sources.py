"""Document sources: random-access collections of text records.

A source is anything with `len(source)` and `source[i] -> dict` (the `DocumentSource`
protocol). Random access, not streaming, is what makes shuffling exact and resumption
cheap: an iterator's position is a few integers, and restoring it re-reads only the
documents it is in the middle of.

Records are plain dicts of Python values. Language-model sources give `{"text": str}`;
translation and classification sources give the fields you name, e.g.
`{"source": str, "target": str}` or `{"text": str, "label": "positive"}`.

`fields` (every adapter but `TextFiles`) chooses and renames the record's fields:
- a string `"f"` -> `{"text": record["f"]}` (the usual LM case);
- a list `["a", "b"]` -> `{"a": record["a"], "b": record["b"]}`;
- a dict `{"out": "in", ...}` -> `{"out": record["in"], ...}`.

Example:
    >>> docs = TextFiles("tests/data/austen")              # doctest: +SKIP
    >>> len(docs), docs[0]["text"][:10]                     # doctest: +SKIP
    (3, 'Persuasion')
    >>> pairs = JsonlSource("tests/data/bible_en_es.jsonl", {"source": "en", "target": "es"})  # doctest: +SKIP
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from makemost_jax.errors import ConfigError, InputError

__all__ = ["DocumentSource", "Fields", "JsonlSource", "TextFiles", "select_fields"]

Fields = str | Sequence[str] | Mapping[str, str]

# A paragraph break: a newline followed by one or more blank (whitespace-only) lines.
_PARAGRAPH_BREAK = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")


@runtime_checkable
class DocumentSource(Protocol):
    """Random-access documents: `len(source)` and `source[i] -> dict` for 0 <= i < len.

    Any object with these two methods works (a list of dicts too), so the batch
    iterators can shuffle exactly and resume from a few integers.

    Example:
        >>> docs = [{"text": "First document."}, {"text": "Second one."}]
        >>> isinstance(docs, DocumentSource)
        True
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def _plain(value: Any) -> Any:
    """Python values from what TFDS/HF/numpy hand back: bytes -> str, 0-d arrays -> scalars."""
    if isinstance(value, np.ndarray) and value.ndim == 0 or isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return value


def select_fields(record: Mapping[str, Any], fields: Fields, where: str) -> dict[str, Any]:
    """Pick and rename `fields` of `record` (see the module docstring); `where` names it in errors.

    Example:
        >>> select_fields({"sentence": b"Fine.", "label": 1}, {"text": "sentence", "label": "label"}, "row 0")
        {'text': 'Fine.', 'label': 1}
        >>> select_fields({"en": "Hi", "es": "Hola"}, "en", "row 0")
        {'text': 'Hi'}
    """
    if isinstance(fields, str):
        pairs = {"text": fields}
    elif isinstance(fields, Mapping):
        pairs = dict(fields)
    else:
        pairs = {f: f for f in fields}
    out = {}
    for name, key in pairs.items():
        if key not in record:
            raise InputError(
                f"{where} has no field {key!r} (it has {sorted(record)}); pass fields= with one of those"
            )
        out[name] = _plain(record[key])
    return out


def _check_fields(fields: Fields, where: str) -> None:
    ok = isinstance(fields, str) or (
        isinstance(fields, (Mapping, Sequence))
        and len(fields) > 0
        and all(isinstance(k, str) for k in fields)
        and (not isinstance(fields, Mapping) or all(isinstance(v, str) for v in fields.values()))
    )
    if not ok:
        raise ConfigError(
            f"{where}: fields={fields!r} must be a field name, a list of names or a dict "
            "{output_name: field_name}, e.g. fields='text' or fields={'source': 'en', 'target': 'es'}"
        )


def _check_index(index: Any, n: int, where: str) -> int:
    i = int(index)
    if not 0 <= i < n:
        raise IndexError(f"{where}: index {i} is out of range [0, {n})")
    return i


class RecordsSource:
    """Base of the adapters over a random-access record store (`self._data`), whose
    records pass through `select_fields(record, self.fields)`."""

    _data: Any
    fields: Fields

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = _check_index(index, len(self), repr(self))
        return select_fields(self._data[i], self.fields, f"{self!r}[{i}]")


class TextFiles:
    """Plain-text documents: a file is one document, a folder is its `*.txt` files (sorted).

    `path` is a file, a folder (its `*.txt` files, sorted by name, not recursive) or a
    glob pattern (`"corpus/**/*.txt"`, matches sorted). With `split_paragraphs=True`
    each blank-line-separated block of each file is a document instead (a paragraph of
    an Austen novel, an article of the `wiki/` files), stripped of surrounding
    whitespace; whole files are kept verbatim. Files are read lazily; paragraph offsets
    are indexed once at construction. Records are `{"text": str}`.

    Example:
        >>> docs = TextFiles("tests/data/austen")                          # doctest: +SKIP
        >>> [len(d["text"]) > 0 for d in docs]                              # doctest: +SKIP
        [True, True, True]
        >>> len(TextFiles("tests/data/wiki/articles.txt", split_paragraphs=True))  # doctest: +SKIP
        3
    """

    def __init__(self, path: str | Path, split_paragraphs: bool = False, encoding: str = "utf-8"):
        self.path = str(path)
        self.split_paragraphs = bool(split_paragraphs)
        self.encoding = encoding
        self.files = self._find(self.path)
        empty = [str(f) for f in self.files if f.stat().st_size == 0]
        if empty:
            raise InputError(f"TextFiles({self.path!r}): {empty[0]} is empty; delete it or point at other files")
        self._spans = self._index_paragraphs() if self.split_paragraphs else None

    @staticmethod
    def _find(path: str) -> list[Path]:
        if glob.has_magic(path):
            files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
            if not files:
                raise InputError(f"TextFiles: the pattern {path!r} matches no files; check the pattern")
            return files
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.glob("*.txt") if f.is_file())
            if not files:
                raise InputError(
                    f"TextFiles: the folder {path} has no .txt files; add some, or pass a glob such as "
                    f"'{path}/**/*.md' for other names"
                )
            return files
        if p.is_file():
            return [p]
        raise InputError(f"TextFiles: {path} does not exist; pass a text file, a folder of .txt files or a glob")

    def _index_paragraphs(self) -> np.ndarray:
        """(file, start byte, end byte) of every non-blank paragraph, in file order."""
        spans = []
        for k, f in enumerate(self.files):
            data = f.read_bytes()
            start = 0
            for m in [*_PARAGRAPH_BREAK.finditer(data), None]:
                end = len(data) if m is None else m.start()
                if data[start:end].strip():
                    spans.append((k, start, end))
                start = len(data) if m is None else m.end()
        if not spans:
            raise InputError(f"TextFiles({self.path!r}): no paragraph has any text; check the files")
        return np.asarray(spans, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files) if self._spans is None else len(self._spans)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = _check_index(index, len(self), repr(self))
        if self._spans is None:
            f = self.files[i]
            text = f.read_text(encoding=self.encoding)
        else:
            k, start, end = (int(x) for x in self._spans[i])
            f = self.files[k]
            with open(f, "rb") as fh:
                fh.seek(start)
                text = fh.read(end - start).decode(self.encoding)
        if not text.strip():
            raise InputError(f"{self!r}: {f} has no text (only whitespace); delete it or point at other files")
        return {"text": text.strip() if self._spans is not None else text}

    def __repr__(self) -> str:
        return f"TextFiles({self.path!r}, split_paragraphs={self.split_paragraphs})"


class JsonlSource:
    """Records of a JSON-lines file (one JSON object a line; blank lines skipped).

    Line offsets are indexed once at construction, then records are read lazily, so a
    large file costs 16 bytes of memory a line. `fields` picks and renames fields
    (see the module docstring).

    Example:
        >>> lm = JsonlSource("tests/data/sentiment.jsonl", "text")                 # doctest: +SKIP
        >>> cls = JsonlSource("tests/data/sentiment.jsonl", {"text": "text", "label": "label"})  # doctest: +SKIP
        >>> cls[0]                                                                  # doctest: +SKIP
        {'text': 'Offers that rare combination of entertainment and education.', 'label': 'positive'}
    """

    def __init__(self, path: str | Path, fields: Fields = "text"):
        self.path = str(path)
        self.fields = fields
        _check_fields(fields, repr(self))
        if not Path(self.path).is_file():
            raise InputError(f"JsonlSource: {self.path} does not exist or is not a file; pass a .jsonl file")
        starts, lengths, lines = [], [], []
        pos = 0
        with open(self.path, "rb") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    starts.append(pos)
                    lengths.append(len(line))
                    lines.append(number)
                pos += len(line)
        if not starts:
            raise InputError(f"JsonlSource: {self.path} has no records; it is empty or only blank lines")
        self._index = np.array([starts, lengths, lines], dtype=np.int64).T

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = _check_index(index, len(self), repr(self))
        start, length, line = (int(x) for x in self._index[i])
        with open(self.path, "rb") as fh:
            fh.seek(start)
            raw = fh.read(length)
        where = f"{self.path} line {line}"
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{where} is not valid JSON ({e}); fix or delete that line") from e
        if not isinstance(record, dict):
            raise InputError(f"{where} is a JSON {type(record).__name__}, not an object; write one object a line")
        return select_fields(record, self.fields, where)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, fields={self.fields!r})"
