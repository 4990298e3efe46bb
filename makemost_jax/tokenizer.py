"""A thin wrapper over Hugging Face `tokenizers`, built from a GGUF file or a HF folder.

`load_tokenizer()` gives the embedded SmolLM2 tokenizer (byte-level BPE read from the
GGUF metadata); `load_tokenizer(path_or_id)` reads a `.gguf` file, a Hugging Face
directory (`tokenizer.json`, else GPT-2 `vocab.json` + `merges.txt`, else BERT
`vocab.txt`) or a hub id. `transformers` is never imported.

SentencePiece folders without a `tokenizer.json` read through the `sentencepiece` package:
Marian / OPUS-MT (`source.spm` for sources, `target.spm` for targets, piece -> id maps in
`vocab.json`, and `target_vocab.json` for separate vocabularies; a leading `>>xx<<` language
code stays one token; `</s>` appended to sources) and T5 (`spiece.model`, its ids, plus the
`<extra_id_N>` sentinels). `encode` is the target side, `encode_source` the source side.

GGUF tokenizers are rebuilt the way llama.cpp (and transformers' GGUF converter) read
them: byte-level BPE for `tokenizer.ggml.model == "gpt2"`, with the pre-tokenizer named
by `tokenizer.ggml.pre` (for "smollm": split every digit, then the GPT-2 regex, the same
as SmolLM2's own `tokenizer.json`); sentencepiece-style BPE with byte fallback for
`"llama"`. Control tokens become special tokens, user-defined tokens added tokens.

Example:
    >>> tok = load_tokenizer()                      # doctest: +SKIP
    >>> tok.encode("Hello world")                   # doctest: +SKIP
    [19556, 905]
    >>> tok.decode([19556, 905])                    # doctest: +SKIP
    'Hello world'
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE, WordPiece

from makemost_jax.checkpoints.gguf import default_gguf_path, read_gguf_metadata
from makemost_jax.checkpoints.hf import find_tokenizer_files, resolve_model_dir
from makemost_jax.errors import CheckpointError, ConfigError, InputError, ModelNotFoundError

__all__ = ["Tokenizer", "load_tokenizer"]

# GGUF token types (llama.cpp `llama_token_type`).
_CONTROL, _USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` values whose splitting is "each digit alone, then the GPT-2 regex"
# (llama.cpp applies "\p{N}" before the GPT-2 expression for all of these).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2 = {None, "default", "gpt2", "gpt-2"}
# Regex splits for other common BPE families, as in transformers' GGUF converter.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class Tokenizer:
    """Text <-> token ids, plus the special ids a language model needs.

    `encode` adds no special tokens unless `add_special_tokens=True` (then the
    tokenizer's own template applies: BOS for models that want one, [CLS]/[SEP] for
    BERT). `add_bos` says whether the model expects a BOS token prepended to a
    document (SmolLM2's GGUF and GPT-2: False).

    Example:
        >>> tok = load_tokenizer("../shared/data/gpt2-tokenizer")  # doctest: +SKIP
        >>> tok.encode("Hello world"), tok.eos_id                   # doctest: +SKIP
        ([15496, 995], 50256)
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        name: str = "",
        source_backend=None,
    ):
        # Encoding must return every id: padding/truncation belong to the data pipeline.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.source_backend = source_backend  # a seq2seq model's source side, when it has its own
        self._bos, self._eos, self._pad, self._unk = bos_id, eos_id, pad_id, unk_id
        self._add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.name = name

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self._bos}, eos={self._eos})"

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (ids are 0..vocab_size-1)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None."""
        return self._bos

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None."""
        return self._eos

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None."""
        return self._pad

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id, or None (byte-level BPE needs none)."""
        return self._unk

    @property
    def add_bos(self) -> bool:
        """Whether the model expects a BOS token before each document."""
        return self._add_bos

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`.

        Example:
            >>> load_tokenizer().encode(" 123")  # doctest: +SKIP
            [216, 33, 34, 35]
        """
        if not isinstance(text, str):
            raise InputError(f"encode() takes a str, got {type(text).__name__}; pass the text itself")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_for_model(self, text: str) -> list[int]:
        """Token ids of `text` as the model reads a sequence: BOS first when `add_bos`.

        Example:
            >>> load_tokenizer().encode_for_model("Hello")  # doctest: +SKIP
            [19556]
        """
        ids = self.encode(text)
        return [self.bos_id] + ids if self.add_bos and self.bos_id is not None else ids

    def encode_source(self, text: str) -> list[int]:
        """Token ids of an encoder-decoder's source: the tokenizer's own template (`</s>` appended
        for Marian and T5, `<s> ... </s>` for BART), with Marian's source SentencePiece model.

        Example:
            >>> # load_tokenizer("opus-mt-en-es").encode_source("Hello")[-1] == tok.eos_id
        """
        if not isinstance(text, str):
            raise InputError(f"encode_source() takes a str, got {type(text).__name__}; pass the text itself")
        return (self.source_backend or self.backend).encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text (unpadded, in parallel).

        Example:
            >>> load_tokenizer().encode_batch(["Hello", "world"])  # doctest: +SKIP
            [[19556], [6693]]
        """
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise InputError(
                f"encode_batch() takes strings; item {bad[0]} is {type(texts[bad[0]]).__name__}"
            )
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list, numpy or JAX array of ints).

        Example:
            >>> tok = load_tokenizer()                       # doctest: +SKIP
            >>> tok.decode(tok.encode("naïve café\\n"))      # doctest: +SKIP
            'naïve café\\n'
        """
        try:
            ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        except (TypeError, ValueError) as e:
            raise InputError(f"decode() takes a 1-D sequence of ints ({e})") from e
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise InputError(f"decode(): id {bad[0]} is outside the vocabulary [0, {n})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (as spelled in the vocabulary), or None.

        Example:
            >>> load_tokenizer().token_to_id("<|im_end|>")  # doctest: +SKIP
            2
        """
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (byte-level spelling, e.g. 'Ġworld'), or None.

        Example:
            >>> load_tokenizer().id_to_token(905)  # doctest: +SKIP
            'Ġworld'
        """
        return self.backend.id_to_token(int(token_id))

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render chat `messages` ([{"role": ..., "content": ...}]) with the model's template.

        Example:
            >>> load_tokenizer().apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
            '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...'
        """
        if not self.chat_template:
            raise ConfigError(
                f"tokenizer {self.name!r} has no chat template; format the prompt yourself"
            )
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise ConfigError("apply_chat_template needs jinja2: `pip install jinja2`") from e

        def raise_exception(message):
            raise InputError(f"chat template rejected the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        special = {
            "bos_token": self.id_to_token(self._bos) if self._bos is not None else "",
            "eos_token": self.id_to_token(self._eos) if self._eos is not None else "",
        }
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **special
            )
        except TemplateError as e:
            raise ConfigError(f"chat template of {self.name!r} failed to render: {e}") from e

    def user_turn(self, text: str) -> str:
        """`text` as one user message in the chat template, ready for the assistant's reply.

        Example:
            >>> load_tokenizer().user_turn("Hi").endswith("<|im_start|>assistant\\n")  # doctest: +SKIP
            True
        """
        return self.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _split_merge(merge: str) -> tuple[str, str]:
    # The separator is the first space after the first character (a token may be " ").
    i = merge.find(" ", 1)
    if i < 0:
        raise ValueError(f"merge {merge!r} has no space separator")
    return merge[:i], merge[i + 1 :]


def _gguf_byte_level(meta: dict, source: str) -> _Backend:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet (rare mislabels) are respelled byte by byte.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(meta["tokens"])
    }
    try:
        merges = [_split_merge(m) for m in meta["merges"]]
    except ValueError as e:
        raise CheckpointError(f"{source}: tokenizer.ggml.merges is malformed ({e}); re-convert the model") from e
    backend = _Backend(
        BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    pre = meta.get("pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in _GPT2:
            warnings.warn(
                f"{source}: tokenizer.ggml.pre={pre!r} is not known here; splitting words with the "
                "GPT-2 regex, which may tokenize some text differently from llama.cpp",
                stacklevel=3,
            )
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    _add_gguf_tokens(backend, meta, lambda t: set(t) <= alphabet)
    return backend


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    best score first (transformers' `generate_merges`)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [
            (token[:k], token[k:], score)
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _gguf_sentencepiece(meta: dict, source: str) -> _Backend:
    tokens = meta["tokens"]
    if meta.get("merges"):
        merges = [_split_merge(m) for m in meta["merges"]]
    elif len(meta.get("scores") or []) == len(tokens):
        merges = _sentencepiece_merges(tokens, meta["scores"])
    else:
        raise CheckpointError(
            f"{source}: a sentencepiece GGUF vocabulary needs tokenizer.ggml.scores or merges; re-convert the model"
        )
    unk = meta.get("unk_token_id")
    backend = _Backend(
        BPE(
            {t: i for i, t in enumerate(tokens)},
            merges,
            unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    prefix = meta.get("add_space_prefix")
    prefix = True if prefix is None else bool(prefix)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    _add_gguf_tokens(backend, meta, lambda t: True)
    return backend


def _add_gguf_tokens(backend: _Backend, meta: dict, spellable) -> None:
    """Control tokens -> special tokens, user-defined tokens -> added tokens (kept whole)."""
    pairs = list(zip(meta["tokens"], meta.get("token_type") or ()))
    control = [AddedToken(t, normalized=False, special=True) for t, k in pairs if k == _CONTROL and spellable(t)]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, k in pairs if k == _USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)


def _id_or_none(meta: dict, key: str) -> int | None:
    v = meta.get(key)
    return int(v) if v is not None and 0 <= int(v) < len(meta["tokens"]) else None


def _from_gguf(path: str) -> Tokenizer:
    _, meta = read_gguf_metadata(path)
    if not meta["tokens"]:
        raise CheckpointError(f"{path}: no tokenizer.ggml.tokens in the file; pass a tokenizer folder instead")
    model = meta["model"]
    if model == "gpt2":
        backend = _gguf_byte_level(meta, path)
    elif model == "llama":
        backend = _gguf_sentencepiece(meta, path)
    else:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model={model!r} is not supported (only 'gpt2' byte-level BPE "
            "and 'llama' sentencepiece); pass a Hugging Face tokenizer folder instead"
        )
    bos, eos = _id_or_none(meta, "bos_token_id"), _id_or_none(meta, "eos_token_id")
    add_bos = meta.get("add_bos_token")
    # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise.
    add_bos = (model == "llama") if add_bos is None else bool(add_bos)
    add_eos = bool(meta.get("add_eos_token"))
    template, specials = ["$A"], []
    if add_bos and bos is not None:
        template.insert(0, meta["tokens"][bos])
        specials.append((meta["tokens"][bos], bos))
    if add_eos and eos is not None:
        template.append(meta["tokens"][eos])
        specials.append((meta["tokens"][eos], eos))
    if specials:
        backend.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=specials)
    return Tokenizer(
        backend,
        bos_id=bos,
        eos_id=eos,
        pad_id=_id_or_none(meta, "pad_token_id"),
        unk_id=_id_or_none(meta, "unk_token_id"),
        add_bos=add_bos and bos is not None,
        chat_template=meta.get("chat_template"),
        name=str(path),
    )


def _read_json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-download it") from e
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _gpt2_files(vocab_path: Path, merges_path: Path, special: Iterable[str]) -> _Backend:
    try:
        vocab, merges = BPE.read_file(str(vocab_path), str(merges_path))
    except Exception as e:  # tokenizers raises plain Exceptions for bad files
        raise CheckpointError(
            f"{vocab_path} / {merges_path}: not a valid GPT-2 vocabulary and merges pair ({e}); re-download them"
        ) from e
    backend = _Backend(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokens = [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(special) if t in vocab]
    if tokens:
        backend.add_special_tokens(tokens)
    return backend


def _bert_files(vocab_path: Path, lowercase: bool) -> _Backend:
    try:
        vocab = WordPiece.read_file(str(vocab_path))
    except Exception as e:
        raise CheckpointError(f"{vocab_path}: not a valid WordPiece vocabulary ({e}); re-download it") from e
    missing = [t for t in ("[UNK]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise CheckpointError(f"{vocab_path}: a BERT vocabulary needs {missing[0]}; re-download it")
    backend = _Backend(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens(
        [AddedToken(t, special=True) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab]
    )
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return backend


def _from_hf_dir(directory: Path) -> Tokenizer:
    files = find_tokenizer_files(directory)
    tok_config = _read_json(files.get("tokenizer_config.json"))
    special_map = _read_json(files.get("special_tokens_map.json"))
    model_config = _read_json(files.get("config.json"))

    def special(name: str) -> str | None:
        return _token_text(tok_config.get(name)) or _token_text(special_map.get(name))

    sentencepiece = (directory / "source.spm").is_file() or (directory / "spiece.model").is_file()
    if "tokenizer.json" not in files and sentencepiece:
        return _from_sentencepiece_dir(directory, tok_config, special)
    if "tokenizer.json" in files:
        try:
            backend = _Backend.from_file(str(files["tokenizer.json"]))
        except Exception as e:
            raise CheckpointError(
                f"{files['tokenizer.json']}: cannot be read by tokenizers ({e}); re-download it"
            ) from e
    elif "vocab.json" in files and "merges.txt" in files:
        # GPT-2 convention: <|endoftext|> is bos, eos and unk unless the config says otherwise.
        for name in ("bos_token", "eos_token", "unk_token"):
            tok_config.setdefault(name, special(name) or "<|endoftext|>")
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        backend = _gpt2_files(files["vocab.json"], files["merges.txt"], filter(None, map(special, names)))
    elif "vocab.txt" in files:
        backend = _bert_files(files["vocab.txt"], bool(tok_config.get("do_lower_case", True)))
        for name, text in (("unk_token", "[UNK]"), ("pad_token", "[PAD]")):
            tok_config.setdefault(name, special(name) or text)
    else:
        raise ModelNotFoundError(
            f"{directory} has no tokenizer files (tokenizer.json, vocab.json + merges.txt, vocab.txt, Marian's "
            "source.spm + target.spm + vocab.json, or T5's spiece.model); pass a folder that has them or a .gguf file"
        )

    def special_id(name: str) -> int | None:
        text = special(name)
        if text is not None and backend.token_to_id(text) is not None:
            return backend.token_to_id(text)
        value = model_config.get(f"{name}_id")
        return value if isinstance(value, int) else None

    bos = special_id("bos_token")
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:
        # Follow what the tokenizer's own template does with special tokens.
        with_special = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and with_special[:1] == [bos] and backend.encode("a").ids[:1] != [bos]
    template = tok_config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return Tokenizer(
        backend,
        bos_id=bos,
        eos_id=special_id("eos_token"),
        pad_id=special_id("pad_token"),
        unk_id=special_id("unk_token"),
        add_bos=bool(add_bos) and bos is not None,
        chat_template=template if isinstance(template, str) else None,
        name=str(directory),
    )


class _Ids:
    """What `tokenizers` returns from encode, as far as `Tokenizer` reads it."""

    def __init__(self, ids: list[int]):
        self.ids = ids


class _SentencePieceBackend:
    """The part of a `tokenizers.Tokenizer` that `Tokenizer` uses, over a SentencePiece model.

    `vocab` maps pieces to ids (Marian: its `vocab.json`; a piece missing there is `<unk>`);
    None uses the model's own ids (T5), with `extra` sentinel tokens after them. `specials`
    never reach SentencePiece: skipped on decode, and `eos` is appended by the template.
    """

    def __init__(self, model_path: Path, vocab: dict[str, int] | None, specials: Sequence[str], eos: str,
                 unk: str = "<unk>", extra: int = 0, language_codes: bool = False):
        try:
            import sentencepiece
        except ImportError as e:
            raise ConfigError(f"{model_path} is a SentencePiece model: pip install sentencepiece") from e
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{model_path}: not a readable SentencePiece model ({e})") from e
        if vocab is None:
            size = self.sp.get_piece_size()
            vocab = {self.sp.id_to_piece(i): i for i in range(size)}
            vocab.update({f"<extra_id_{n}>": size + extra - 1 - n for n in range(extra)})
        self.vocab = dict(vocab)
        self.pieces = {i: p for p, i in self.vocab.items()}
        self.specials = {p for p in specials if p in self.vocab}
        self.eos, self.unk = eos, unk
        self.language_codes = language_codes

    def no_padding(self):
        pass

    def no_truncation(self):
        pass

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return max(self.vocab.values()) + 1

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.pieces.get(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> _Ids:
        code = []
        if self.language_codes and text.startswith(">>") and (end := text.find("<<")) != -1:
            code, text = [text[:end + 2]], text[end + 2:]  # Marian's target-language token, never split
        pieces = code + self.sp.encode(text, out_type=str)
        ids = [self.vocab.get(p, self.vocab[self.unk]) for p in pieces]
        return _Ids(ids + [self.vocab[self.eos]] if add_special_tokens else ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[_Ids]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """SentencePiece's text of the pieces; kept special tokens are spelled between them (as transformers)."""
        out, run = [], []
        for token_id in ids:
            piece = self.pieces.get(int(token_id), self.unk)
            if piece not in self.specials:
                run.append(piece)
            elif not skip_special_tokens:
                out += [self.sp.decode_pieces(run), piece] if run else [piece]
                run = []
        if run:
            out.append(self.sp.decode_pieces(run))
        return " ".join(out)


def _from_sentencepiece_dir(directory: Path, tok_config: dict, special) -> Tokenizer:
    """A Marian (source.spm / target.spm / vocab.json) or T5 (spiece.model) folder."""
    names = {name: special(name) for name in ("eos_token", "unk_token", "pad_token")}
    defaults = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    eos, unk, pad = (names[n] or defaults[n] for n in ("eos_token", "unk_token", "pad_token"))
    specials = [eos, unk, pad]
    if (directory / "source.spm").is_file():
        vocab = _read_json(directory / "vocab.json")
        separate = bool(tok_config.get("separate_vocabs")) and (directory / "target_vocab.json").is_file()
        target_vocab = _read_json(directory / "target_vocab.json") if separate else vocab
        if unk not in vocab:
            raise CheckpointError(f"{directory / 'vocab.json'} has no {unk!r} entry; it is not a Marian vocabulary")
        source = _SentencePieceBackend(directory / "source.spm", vocab, specials, eos, unk, language_codes=True)
        backend = _SentencePieceBackend(directory / "target.spm", target_vocab, specials, eos, unk,
                                        language_codes=not separate)
    else:
        extra = int(tok_config.get("extra_ids", 100))
        backend = _SentencePieceBackend(directory / "spiece.model", None, specials, eos, unk, extra=extra)
        source = None
    return Tokenizer(backend, eos_id=backend.token_to_id(eos), pad_id=backend.token_to_id(pad),
                     unk_id=backend.token_to_id(unk), name=str(directory), source_backend=source)


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load_tokenizer(source: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer: None = the default SmolLM2 GGUF, a `.gguf` path, a HF folder or a hub id.

    Raises `ModelNotFoundError` when `source` cannot be found or holds no tokenizer,
    `CheckpointError` when its files are malformed.

    Example:
        >>> tok = load_tokenizer()                        # doctest: +SKIP
        >>> tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos  # doctest: +SKIP
        (49152, 1, 2, False)
    """
    if source is None:
        return _from_gguf(default_gguf_path())
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        if _is_gguf_file(path):
            return _from_gguf(str(path))
        if path.name in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt"):
            return _from_hf_dir(path.parent)
        raise ModelNotFoundError(
            f"{str(source)!r} is neither a .gguf file nor a tokenizer file; pass a .gguf file or a model folder"
        )
    if str(source).lower().endswith(".gguf"):
        raise ModelNotFoundError(f"GGUF file {str(source)!r} does not exist; check the path")
    return _from_hf_dir(resolve_model_dir(source, weights=False))
