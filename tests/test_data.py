"""Data pipeline: sources on real files, packing, document-contiguous rows, resumption, sharding.

The text, sentiment and Bible samples are in tests/data (licences in its README). The
TFDS and Hugging Face `datasets` tests are skipped where those optional packages are
not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import makemost_jax as mm
from makemost_jax.data import (
    DocumentContiguousBatches,
    DocumentSource,
    DocumentTokenizer,
    HFDatasetSource,
    JsonlSource,
    PackedLMBatches,
    RecordBatches,
    TextFiles,
    TfdsSource,
    epoch_permutation,
    merge_states,
    select_fields,
)
from makemost_jax.errors import ConfigError, InputError

DATA = Path(__file__).parent / "data"
AUSTEN = DATA / "austen"
WIKI = DATA / "wiki" / "articles.txt"
SENTIMENT = DATA / "sentiment.jsonl"
BIBLE = DATA / "bible_en_es.jsonl"


@pytest.fixture(scope="module")
def tok():
    return mm.load_tokenizer()


@pytest.fixture(scope="module")
def paragraphs():
    """The Austen openings as 49 paragraph documents (1 to ~300 tokens each)."""
    return TextFiles(AUSTEN, split_paragraphs=True)


@pytest.fixture(scope="module")
def long_docs():
    """Six documents of 200 to 1,400 tokens: three Austen openings and three Wikipedia articles."""
    return [*TextFiles(AUSTEN), *TextFiles(WIKI, split_paragraphs=True)]


def stream_order(n: int, num_docs: int, seed: int, shuffle: bool = True) -> list[int]:
    """The first num_docs document indices of the stream: epoch 0's order, epoch 1's, ..."""
    out = []
    epoch = 0
    while len(out) < num_docs:
        out += epoch_permutation(n, seed, epoch, shuffle).tolist()
        epoch += 1
    return out[:num_docs]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --------------------------------------------------------------------------- sources


def test_text_files_folder_glob_and_file():
    files = sorted(AUSTEN.glob("*.txt"))
    docs = TextFiles(AUSTEN)
    assert isinstance(docs, DocumentSource)
    assert len(docs) == 3
    assert [d["text"] for d in docs] == [f.read_text(encoding="utf-8") for f in files]
    assert docs[0]["text"].startswith("EMMA")
    assert [d["text"] for d in TextFiles(str(AUSTEN / "*.txt"))] == [d["text"] for d in docs]
    assert [d["text"] for d in TextFiles(files[1])] == [files[1].read_text(encoding="utf-8")]
    with pytest.raises(IndexError):
        docs[3]


def test_text_files_paragraphs():
    wiki = TextFiles(WIKI, split_paragraphs=True)
    assert [d["text"].split("\n")[0] for d in wiki] == ["= Abstract (law) =", "= Ampere =", "= Asphalt ="]
    assert "\n\n".join(d["text"] for d in wiki) + "\n" == WIKI.read_text(encoding="utf-8")
    paras = TextFiles(AUSTEN, split_paragraphs=True)
    expected = [p.strip() for f in sorted(AUSTEN.glob("*.txt")) for p in f.read_text(encoding="utf-8").split("\n\n")]
    assert [d["text"] for d in paras] == [p for p in expected if p]
    assert len(paras) == 49


def test_text_files_paragraph_edge_cases(tmp_path):
    (tmp_path / "a.txt").write_text("\n \nFirst para\nline two\n\n\n  \t\nSecond\r\n\r\nThird  \n\n", encoding="utf-8")
    assert [d["text"] for d in TextFiles(tmp_path, split_paragraphs=True)] == [
        "First para\nline two", "Second", "Third"]


def test_text_files_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        TextFiles(tmp_path / "missing")
    with pytest.raises(InputError, match="has no .txt files"):
        TextFiles(tmp_path)
    with pytest.raises(InputError, match="matches no files"):
        TextFiles(str(tmp_path / "*.md"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="empty.txt is empty"):
        TextFiles(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(InputError, match="empty.txt has no text"):
        TextFiles(tmp_path)[0]
    with pytest.raises(InputError, match="no paragraph has any text"):
        TextFiles(tmp_path, split_paragraphs=True)


def test_jsonl_sentiment_and_bible():
    lines = [json.loads(x) for x in SENTIMENT.read_text(encoding="utf-8").splitlines()]
    lm = JsonlSource(SENTIMENT)
    assert len(lm) == 50 and [r["text"] for r in lm] == [x["text"] for x in lines]
    cls = JsonlSource(SENTIMENT, {"text": "text", "label": "label"})
    assert [r for r in cls] == [{"text": x["text"], "label": x["label"]} for x in lines]
    assert sorted({r["label"] for r in cls}) == ["negative", "positive"]
    pairs = JsonlSource(BIBLE, {"source": "en", "target": "es"})
    assert len(pairs) == 50
    assert pairs[0] == {"source": "The beginning of the Good News of Jesus Christ, the Son of God.",
                        "target": "PRINCIPIO del evangelio de Jesucristo, Hijo de Dios."}
    assert JsonlSource(BIBLE, ["ref", "es"])[49]["ref"] == "Mark.2.5"


def test_jsonl_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": broken}\n[1, 2]\n{"body": "b"}\n', encoding="utf-8")
    src = JsonlSource(path)
    assert len(src) == 4 and src[0] == {"text": "a"}
    with pytest.raises(InputError, match="line 4 is not valid JSON"):
        src[1]
    with pytest.raises(InputError, match="line 5 is a JSON list"):
        src[2]
    with pytest.raises(InputError, match=r"line 6 has no field 'text' \(it has \['body'\]\)"):
        src[3]
    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(InputError, match="has no records"):
        JsonlSource(tmp_path / "blank.jsonl")
    with pytest.raises(ConfigError, match="fields="):
        JsonlSource(path, fields=3)
    with pytest.raises(InputError, match="does not exist"):
        JsonlSource(tmp_path / "missing.jsonl")


def test_select_fields_normalises_tfds_values():
    record = {"sentence": np.array(b"caf\xc3\xa9"), "label": np.array(1), "idx": np.int32(7)}
    assert select_fields(record, {"text": "sentence", "label": "label"}, "r") == {"text": "café", "label": 1}
    assert type(select_fields(record, ["idx"], "r")["idx"]) is int


# ----------------------------------------------------------------------- tokenization


def test_document_tokenizer(tok):
    text = "It is a truth universally acknowledged."
    ids = DocumentTokenizer(tok)({"text": text})
    assert ids.dtype == np.int32
    assert ids.tolist() == tok.encode(text) + [tok.eos_id]
    assert DocumentTokenizer(tok, add_bos=True, add_eos=False)({"text": text}).tolist() == [tok.bos_id] + tok.encode(text)
    assert DocumentTokenizer(tok, field="en")({"en": text}).tolist() == ids.tolist()
    with pytest.raises(InputError, match="'text' is empty"):
        DocumentTokenizer(tok)({"text": " \n"})
    with pytest.raises(InputError, match="no text field 'text'"):
        DocumentTokenizer(tok)({"en": text})

    class NoEos:
        bos_id, eos_id, add_bos = None, None, False

        def encode(self, text):
            return [1]

    with pytest.raises(ConfigError, match="no eos_id"):
        DocumentTokenizer(NoEos())
    with pytest.raises(ConfigError, match="no encode"):
        DocumentTokenizer(object())


def test_epoch_permutation():
    a = epoch_permutation(100, seed=3, epoch=0)
    np.random.seed(0)  # global numpy state must not matter
    assert np.array_equal(a, epoch_permutation(100, 3, 0))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, epoch_permutation(100, 3, 1))
    assert not np.array_equal(a, epoch_permutation(100, 4, 0))
    assert epoch_permutation(5, 3, 2, shuffle=False).tolist() == [0, 1, 2, 3, 4]


# -------------------------------------------------------------------------- packing


def row_streams(batches, rows):
    """Each row's token stream and (position, segment) labels, rebuilt from its batches."""
    out = []
    for r in range(rows):
        stream = [int(batches[0]["tokens"][r, 0])]
        for b in batches:
            m = b["loss_mask"][r] > 0
            assert m.tolist() == sorted(m.tolist(), reverse=True), "padding only at the end of a row"
            stream += b["tokens"][r, 1:][m].tolist()
        out.append(stream)
    return out


@pytest.mark.parametrize("batch_size", [1, 3])
def test_packing_reconstructs_the_token_stream(tok, paragraphs, batch_size):
    seq_len, epochs, seed = 32, 2, 5
    batches = list(PackedLMBatches(paragraphs, tok, batch_size, seq_len, seed=seed, num_epochs=epochs,
                                   process_index=0, process_count=1))
    n = len(paragraphs)
    order = stream_order(n, n * epochs, seed)
    docs = [DocumentTokenizer(tok)(paragraphs[d]) for d in range(n)]
    total = sum(len(d) for d in docs) * epochs
    assert sum(b["loss_mask"].sum() for b in batches) == total - batch_size  # each row's first token has no target
    for r, stream in enumerate(row_streams(batches, batch_size)):
        mine = order[r::batch_size]
        assert stream == np.concatenate([docs[d] for d in mine]).tolist()
        # segment ids and positions: which document of the chunk, and where in it, each input is
        doc_of = np.concatenate([np.full(len(docs[d]), k) for k, d in enumerate(mine)])
        pos_of = np.concatenate([np.arange(len(docs[d])) for d in mine])
        for s, b in enumerate(batches):
            m = b["loss_mask"][r] > 0
            assert not b["segment_ids"][r][~m].any() and not b["tokens"][r, m.sum() + 1:].any()
            if m.any():
                idx = s * seq_len + np.arange(m.sum())
                assert b["positions"][r][m].tolist() == pos_of[idx].tolist()
                assert b["segment_ids"][r][m].tolist() == (doc_of[idx] - doc_of[idx[0]] + 1).tolist()
    # every document exactly `epochs` times over all rows
    assert sorted(order) == sorted(list(range(n)) * epochs)
    # a row is full until its last chunk, then padding
    for r in range(batch_size):
        filled = [int(b["loss_mask"][r].sum()) for b in batches]
        last = max(s for s, f in enumerate(filled) if f)
        assert filled[:last] == [seq_len] * last and not any(filled[last + 1:])


def test_packing_infinite_has_no_padding(tok, paragraphs):
    it = PackedLMBatches(paragraphs, tok, 2, 64, seed=1, process_index=0, process_count=1)
    batches = take(it, 60)  # about three epochs of ~3,800 tokens
    assert all(b["loss_mask"].all() for b in batches)
    assert it.epoch >= 2
    order = stream_order(len(paragraphs), 200, seed=1)
    for r, stream in enumerate(row_streams(batches, 2)):
        docs = np.concatenate([DocumentTokenizer(tok)(paragraphs[d]) for d in order[r::2]])
        assert stream == docs[:len(stream)].tolist()


# --------------------------------------------------------------- document-contiguous


def check_contiguous(batches, docs, order, batch_size, window):
    """Each row's windows rebuild its documents, whole and in order, with reset on each first window
    (the last one may be cut short where the batches stop)."""
    for r in range(batch_size):
        mine = order[r::batch_size]
        rebuilt, current = [], None
        for b in batches:
            m = b["loss_mask"][r] > 0
            assert m.tolist() == sorted(m.tolist(), reverse=True)
            if b["reset"][r]:
                if current is not None:
                    rebuilt.append(current)
                current = [int(b["tokens"][r, 0])]
                assert b["positions"][r, 0] == 0
            elif current is None or not m.any():
                assert not m.any() and not b["reset"][r]  # a row that has run out: padding only
                continue
            else:
                assert b["positions"][r, 0] == len(current) - 1  # continues where the last window ended
                assert b["tokens"][r, 0] == current[-1]
            assert b["positions"][r][m].tolist() == list(range(len(current) - 1, len(current) - 1 + m.sum()))
            current += b["tokens"][r, 1:][m].tolist()
            assert not b["tokens"][r, m.sum() + 1:].any()
        expected = [docs[d].tolist() for d in mine[:len(rebuilt) + 1]]
        assert rebuilt == expected[:len(rebuilt)]
        assert current == expected[len(rebuilt)][:len(current)]


def test_document_contiguous_rows_follow_documents(tok, long_docs):
    batch_size, window, seed, epochs = 2, 64, 11, 2
    docs = [DocumentTokenizer(tok)(d) for d in long_docs]
    batches = list(DocumentContiguousBatches(long_docs, tok, batch_size, window, seed=seed, num_epochs=epochs,
                                             process_index=0, process_count=1))
    order = stream_order(len(docs), len(docs) * epochs, seed)
    check_contiguous(batches, docs, order, batch_size, window)
    # every row read all of its documents: n_i - 1 targets in ceil((n_i - 1) / window) windows each
    for r in range(batch_size):
        mine = order[r::batch_size]
        assert sum(b["reset"][r] for b in batches) == len(mine)
        assert sum(b["loss_mask"][r].sum() for b in batches) == sum(len(docs[d]) - 1 for d in mine)
    assert len(batches) == max(sum(-(-(len(docs[d]) - 1) // window) for d in order[r::batch_size])
                               for r in range(batch_size))


def test_document_contiguous_infinite_and_short_documents(tok, paragraphs):
    docs = [DocumentTokenizer(tok)(d) for d in paragraphs]
    assert min(len(d) for d in docs) == 2  # "EMMA" and EOS: one target
    it = DocumentContiguousBatches(paragraphs, tok, 4, 16, seed=2, process_index=0, process_count=1)
    batches = take(it, 150)
    check_contiguous(batches, docs, stream_order(len(docs), 400, seed=2), 4, 16)
    assert it.epoch >= 1


def test_determinism_and_seed(tok, long_docs, paragraphs):
    def first(cls, source, seed, n=6):
        return take(cls(source, tok, 2, 32, seed=seed, process_index=0, process_count=1), n)

    for cls, source in [(PackedLMBatches, paragraphs), (DocumentContiguousBatches, long_docs)]:
        assert_batches_equal(first(cls, source, 7), first(cls, source, 7))
        assert not np.array_equal(first(cls, source, 7)[0]["tokens"], first(cls, source, 8)[0]["tokens"])
    unshuffled = take(PackedLMBatches(paragraphs, tok, 1, 32, shuffle=False, process_index=0, process_count=1), 1)
    in_order = np.concatenate([DocumentTokenizer(tok)(paragraphs[d]) for d in range(5)])
    assert unshuffled[0]["tokens"][0].tolist() == in_order[:33].tolist()


# ------------------------------------------------------------------------- resumption


def row_epochs(state, n):
    rows = state["rows"]
    return {(rows["start"] + i + s * state["batch_size"]) // n for i, s in enumerate(rows["slot"])}


@pytest.mark.parametrize("cls", [PackedLMBatches, DocumentContiguousBatches])
def test_resume_gives_the_uninterrupted_batches(tok, long_docs, cls):
    kw = {"seed": 4, "process_index": 0, "process_count": 1}
    total = 70
    reference = take(cls(long_docs, tok, 2, 48, **kw), total)
    seen_epochs = set()
    for k in range(0, total, 3):
        it = cls(long_docs, tok, 2, 48, **kw)
        take(it, k)
        saved = json.loads(json.dumps(it.state()))  # must survive JSON (the checkpoint stores it so)
        assert saved["step"] == k
        seen_epochs.add(frozenset(row_epochs(saved, len(long_docs))))
        resumed = cls(long_docs, tok, 2, 48, state=saved, **kw)
        assert_batches_equal(take(resumed, total - k), reference[k:])
        other = cls(long_docs, tok, 2, 48, **kw)  # restore() on a used iterator works the same
        take(other, 5)
        other.restore(saved)
        assert_batches_equal(take(other, min(3, total - k)), reference[k:k + 3])
    # states were taken mid-epoch, with rows in different epochs, and after crossing epochs
    assert {frozenset({0}), frozenset({0, 1})} <= seen_epochs and any(min(e) >= 1 for e in seen_epochs)


@pytest.mark.parametrize("cls", [PackedLMBatches, DocumentContiguousBatches])
def test_resume_finite_run_to_the_end(tok, paragraphs, cls):
    kw = {"seed": 9, "num_epochs": 2, "process_index": 0, "process_count": 1}
    reference = list(cls(paragraphs, tok, 3, 24, **kw))
    for k in (1, len(reference) // 2, len(reference) - 1, len(reference)):
        it = cls(paragraphs, tok, 3, 24, **kw)
        take(it, k)
        assert it.exhausted == (k == len(reference))
        assert_batches_equal(list(cls(paragraphs, tok, 3, 24, state=it.state(), **kw)), reference[k:])


def test_restore_rejects_mismatched_states(tok, paragraphs):
    it = PackedLMBatches(paragraphs, tok, 2, 32, process_index=0, process_count=1)
    next(it)
    saved = it.state()
    with pytest.raises(ConfigError, match="seq_len=32 but this iterator has seq_len=16"):
        PackedLMBatches(paragraphs, tok, 2, 16, state=saved, process_index=0, process_count=1)
    with pytest.raises(ConfigError, match="seed=0 but this iterator has seed=1"):
        PackedLMBatches(paragraphs, tok, 2, 32, seed=1, state=saved, process_index=0, process_count=1)
    with pytest.raises(ConfigError, match="for a packed_lm iterator, not document_contiguous"):
        DocumentContiguousBatches(paragraphs, tok, 2, 32, state=saved, process_index=0, process_count=1)
    with pytest.raises(ConfigError, match="not a data-iterator state"):
        it.restore({"step": 3})
    with pytest.raises(ConfigError, match="restore from merge_states"):
        PackedLMBatches(paragraphs, tok, 4, 32, process_index=1, process_count=2).restore(
            {**saved, "batch_size": 4})


# --------------------------------------------------------------------- multi-process


@pytest.mark.parametrize("cls", [PackedLMBatches, DocumentContiguousBatches])
def test_process_slices_union_equals_global_batch(tok, long_docs, cls):
    batch_size, steps = 4, 40
    single = cls(long_docs, tok, batch_size, 40, seed=3, process_index=0, process_count=1)
    reference = take(single, steps)
    for count in (2, 4):
        procs = [cls(long_docs, tok, batch_size, 40, seed=3, process_index=p, process_count=count)
                 for p in range(count)]
        local = [take(it, steps) for it in procs]
        assert local[0][0]["tokens"].shape == (batch_size // count, 41)
        union = [{k: np.concatenate([local[p][s][k] for p in range(count)]) for k in reference[s]}
                 for s in range(steps)]
        assert_batches_equal(union, reference)
        assert merge_states([it.state() for it in reversed(procs)]) == single.state()
    # a merged state restores onto another process count
    merged = merge_states([it.state() for it in procs])
    after = take(cls(long_docs, tok, batch_size, 40, seed=3, process_index=0, process_count=1, state=merged), 5)
    half = take(cls(long_docs, tok, batch_size, 40, seed=3, process_index=1, process_count=2, state=merged), 5)
    assert_batches_equal([{k: v[2:] for k, v in b.items()} for b in after], half)


def test_merge_states_errors(tok, paragraphs):
    a = PackedLMBatches(paragraphs, tok, 4, 8, process_index=0, process_count=2)
    b = PackedLMBatches(paragraphs, tok, 4, 8, process_index=1, process_count=2)
    next(a)
    with pytest.raises(ConfigError, match=r"differ in \['step'\]"):
        merge_states([a.state(), b.state()])
    next(b)
    with pytest.raises(ConfigError, match="not adjacent"):
        merge_states([b.state()] * 2)
    with pytest.raises(ConfigError, match="at least one"):
        merge_states([])


# -------------------------------------------------------------------- record batches


def test_record_batches(tmp_path):
    src = JsonlSource(SENTIMENT, {"text": "text", "label": "label"})
    texts = [r["text"] for r in src]
    batches = list(RecordBatches(src, 8, seed=1, num_epochs=2, process_index=0, process_count=1))
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)  # 100 records, the last 4 dropped
    order = stream_order(50, 96, seed=1)
    assert [r["text"] for b in batches for r in b] == [texts[d] for d in order]
    tail = list(RecordBatches(src, 8, seed=1, num_epochs=2, drop_remainder=False, process_index=0, process_count=1))
    assert len(tail) == 13 and len(tail[-1]) == 4
    # sharded: process slices are the global batch's rows
    for count in (2, 4):
        parts = [list(RecordBatches(src, 8, seed=1, num_epochs=2, process_index=p, process_count=count))
                 for p in range(count)]
        assert [[r for p in range(count) for r in parts[p][s]] for s in range(12)] == batches
    # resume
    it = RecordBatches(src, 8, seed=1, num_epochs=2, process_index=0, process_count=1)
    take(it, 7)
    state = json.loads(json.dumps(it.state()))
    assert state["epoch"] == 1 and merge_states([state, state]) == state
    assert list(RecordBatches(src, 8, seed=1, num_epochs=2, state=state, process_index=0, process_count=1)) == \
        batches[7:]


# ----------------------------------------------------------------------------- errors


def test_iterator_errors(tok, paragraphs):
    one = {"process_index": 0, "process_count": 1}
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible by process_count=4"):
        PackedLMBatches(paragraphs, tok, 6, 32, process_index=0, process_count=4)
    with pytest.raises(ConfigError, match="process_index=2 must be < process_count=2"):
        PackedLMBatches(paragraphs, tok, 4, 32, process_index=2, process_count=2)
    with pytest.raises(ConfigError, match="seq_len=0 must be an integer >= 1"):
        PackedLMBatches(paragraphs, tok, 2, 0, **one)
    with pytest.raises(ConfigError, match="window=-1 must be an integer >= 1"):
        DocumentContiguousBatches(paragraphs, tok, 2, -1, **one)
    with pytest.raises(ConfigError, match="num_epochs=0"):
        RecordBatches(paragraphs, 2, num_epochs=0, **one)
    with pytest.raises(InputError, match="has no documents"):
        PackedLMBatches([], tok, 2, 8, **one)
    with pytest.raises(ConfigError, match="not a document source"):
        PackedLMBatches(iter([{"text": "a"}]), tok, 2, 8, **one)
    docs = [{"text": "Some text."}, {"text": ""}]
    with pytest.raises(InputError, match=r"\[1\]: the document's 'text' is empty"):
        list(PackedLMBatches(docs, tok, 1, 8, shuffle=False, num_epochs=1, **one))
    with pytest.raises(InputError, match="no text field 'text'"):
        next(DocumentContiguousBatches([{"en": "x"}], tok, 1, 8, **one))


def test_default_process_is_jax(tok, paragraphs):
    it = PackedLMBatches(paragraphs, tok, 2, 8)
    assert (it.row_start, it.row_stop) == (0, 2)  # one JAX process


# --------------------------------------------------------------- optional extras


def test_optional_packages_are_imported_lazily():
    code = ("import sys, makemost_jax.data; "
            "print(sorted(m for m in ('tensorflow_datasets', 'datasets', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_optional_packages_give_install_hints(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match="pip install tensorflow-datasets"):
        TfdsSource("imdb_reviews", "train")
    with pytest.raises(ConfigError, match="pip install datasets"):
        HFDatasetSource("imdb", "train")


@pytest.fixture
def tfds_mock():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        yield tfds


def test_tfds_source_on_mock_data(tfds_mock, tok):
    raw = tfds_mock.data_source("imdb_reviews", split="train")
    src = TfdsSource("imdb_reviews", "train", "text")
    assert len(src) == 12
    assert [r["text"] for r in src] == [raw[i]["text"].decode() if isinstance(raw[i]["text"], bytes)
                                        else raw[i]["text"] for i in range(12)]
    labelled = TfdsSource("imdb_reviews", "train", {"text": "text", "label": "label"})
    assert all(isinstance(r["label"], int) and isinstance(r["text"], str) for r in labelled)
    # builders TFDS registers only on demand without TensorFlow (see TfdsSource)
    sst2 = TfdsSource("glue/sst2", "validation", {"text": "sentence", "label": "label"})
    assert len(sst2) == 12 and set(sst2[0]) == {"text", "label"}
    wmt = TfdsSource("wmt14_translate/de-en", "train", {"source": "de", "target": "en"})
    assert all(isinstance(r["source"], str) and isinstance(r["target"], str) for r in wmt)
    books = TfdsSource("pg19", "train", "book_text")
    # and it feeds the iterators like any source
    packed = list(PackedLMBatches(books, tok, 2, 8, seed=0, num_epochs=1, process_index=0, process_count=1))
    same = list(PackedLMBatches([books[i] for i in range(len(books))], tok, 2, 8, seed=0, num_epochs=1,
                                process_index=0, process_count=1))
    assert_batches_equal(packed, same)


def test_tfds_source_errors(tfds_mock, tmp_path):
    with pytest.raises(InputError, match="has no dataset 'no_such_dataset'"):
        TfdsSource("no_such_dataset", "train", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="fields="):
        TfdsSource("imdb_reviews", "train", fields=[1])
    with pytest.raises(InputError, match="has no field 'sentence'"):
        TfdsSource("imdb_reviews", "train", "sentence")[0]


def test_tfds_source_not_prepared(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(InputError, match="Prepare it first with `tfds build imdb_reviews"):
        TfdsSource("imdb_reviews", "train", data_dir=str(tmp_path), download=False)


def test_hf_dataset_source(tok):
    datasets = pytest.importorskip("datasets")
    records = [json.loads(x) for x in BIBLE.read_text(encoding="utf-8").splitlines()]
    ds = datasets.Dataset.from_list(records)
    pairs = HFDatasetSource(ds, fields={"source": "en", "target": "es"})
    assert [r for r in pairs] == [r for r in JsonlSource(BIBLE, {"source": "en", "target": "es"})]
    split = HFDatasetSource(datasets.DatasetDict({"valid": ds}), "valid", "en")
    assert split[3] == {"text": records[3]["en"]}
    kw = {"seed": 2, "process_index": 0, "process_count": 1}
    assert_batches_equal(take(DocumentContiguousBatches(split, tok, 2, 16, **kw), 20),
                         take(DocumentContiguousBatches(JsonlSource(BIBLE, "en"), tok, 2, 16, **kw), 20))
    with pytest.raises(InputError, match=r"split 'test' is not one of \['valid'\]"):
        HFDatasetSource(datasets.DatasetDict({"valid": ds}), "test")
    with pytest.raises(ConfigError, match="streaming datasets have no random access"):
        HFDatasetSource(ds.to_iterable_dataset())
    with pytest.raises(InputError, match="is empty"):
        HFDatasetSource(ds.select([]))
    with pytest.raises(InputError, match="has no field 'text'"):
        HFDatasetSource(ds)[0]
