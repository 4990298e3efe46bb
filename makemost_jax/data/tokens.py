"""Documents -> token id arrays, with the BOS/EOS a language model is trained with.

Example:
    >>> import makemost_jax as mm                                  # doctest: +SKIP
    >>> doc_tok = DocumentTokenizer(mm.load_tokenizer())           # doctest: +SKIP
    >>> doc_tok({"text": "Hello world"})                           # doctest: +SKIP
    array([19556,   905,     2], dtype=int32)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from makemost_jax.errors import ConfigError, InputError

__all__ = ["DocumentTokenizer", "TextTokenizer"]


class TextTokenizer(Protocol):
    """What the data pipeline needs of a tokenizer (`makemost_jax.tokenizer.Tokenizer` has it).

    Example:
        >>> import makemost_jax as mm                          # doctest: +SKIP
        >>> tok: TextTokenizer = mm.load_tokenizer()            # doctest: +SKIP
    """

    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    def encode(self, text: str) -> list[int]: ...


class DocumentTokenizer:
    """Maps a record to its token ids: `[BOS] + encode(record[field]) + [EOS]` (int32).

    BOS is added when `add_bos` is True (None: the tokenizer's own `add_bos`); EOS is
    appended by default, so documents packed back to back stay separated and a model
    learns where a document ends. A record whose text is empty or only whitespace is
    an error (usually a wrong field or an unfiltered dataset).

    Example:
        >>> class Chars:  # a toy tokenizer: one id per character
        ...     bos_id, eos_id, add_bos = 1, 0, False
        ...     def encode(self, text): return [ord(c) for c in text]
        >>> DocumentTokenizer(Chars())({"text": "hi"})
        array([104, 105,   0], dtype=int32)
        >>> DocumentTokenizer(Chars(), add_bos=True, add_eos=False)({"text": "hi"})
        array([  1, 104, 105], dtype=int32)
    """

    def __init__(self, tokenizer: TextTokenizer, field: str = "text", add_bos: bool | None = None,
                 add_eos: bool = True):
        if not callable(getattr(tokenizer, "encode", None)):
            raise ConfigError(f"{tokenizer!r} has no encode(str) method; pass a makemost_jax Tokenizer")
        self.tokenizer, self.field = tokenizer, field
        self.add_bos = bool(getattr(tokenizer, "add_bos", False)) if add_bos is None else bool(add_bos)
        self.add_eos = bool(add_eos)
        self._prefix = self._special("bos_id", "add_bos") if self.add_bos else []
        self._suffix = self._special("eos_id", "add_eos") if self.add_eos else []

    def _special(self, attr: str, flag: str) -> list[int]:
        token = getattr(self.tokenizer, attr, None)
        if token is None:
            raise ConfigError(f"{flag}=True but the tokenizer has no {attr}; pass {flag}=False")
        return [int(token)]

    def __call__(self, record: Mapping[str, Any]) -> np.ndarray:
        text = record.get(self.field) if isinstance(record, Mapping) else None
        if not isinstance(text, str):
            raise InputError(
                f"the document has no text field {self.field!r} (got {type(record).__name__} with "
                f"{sorted(record) if isinstance(record, Mapping) else 'no fields'}); choose the source's fields= "
                "or the iterator's field="
            )
        if not text.strip():
            raise InputError(
                f"the document's {self.field!r} is empty; drop empty records from the source first "
                "(e.g. HF: dataset.filter(lambda r: r['text'].strip()))"
            )
        ids = self._prefix + list(self.tokenizer.encode(text)) + self._suffix
        return np.asarray(ids, dtype=np.int32)

    def __repr__(self) -> str:
        return f"DocumentTokenizer({self.tokenizer!r}, field={self.field!r}, add_bos={self.add_bos}, add_eos={self.add_eos})"
