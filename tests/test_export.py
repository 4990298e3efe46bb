"""Export: `mm.save_hf` for every family (streamed, sharded), Orbax params checkpoints onto another mesh,
and `makemost convert`.

For each registered family (a tiny random-weight Hugging Face model built with PyTorch: `conftest`'s
GPT-2, Llama, BERT and RoBERTa, every decoder of `tiny_families`, every encoder-decoder variant of
`tiny_seq2seq`, which adds T5's untied head and Marian's separate vocabularies):

(a) `mm.load` then `mm.save_hf` writes exactly the tensor names transformers itself saved, and
    `mm.load` of the export equals the original params bit for bit, config included;
(b) transformers loads the export (AutoModelForCausalLM / Seq2SeqLM / MaskedLM) to logits within
    1e-4 of the original PyTorch model's (float32).

Also: a bare BERT encoder exports as `BertModel` (without the pooler it never loaded); a config with no
Hugging Face spelling is refused before anything is written; a bfloat16 export is "BF16" in the file headers (padded to 8 bytes) and in config.json; a small
`max_shard_bytes` writes Hugging Face's numbered shards and index, which transformers reads; params
sharded over a mesh write the same bytes as on one device, also when read in blocks of a few rows;
the host holds about one tensor during an export (tracemalloc); an Orbax checkpoint saved from
fsdp=8 restores onto fsdp=2 x tensor=4 bit for bit, each device holding the new mesh's shard; a
folder that is not such a checkpoint is a `CheckpointError` naming it; `makemost convert` (--to hf
and --to orbax) end to end on a tiny model, and (slow) on the embedded GGUF model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import struct
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
import tiny_families
import tiny_seq2seq
import torch
import transformers
from conftest import make_hf_bert, make_hf_gpt2, make_hf_llama

import makemost_jax as mm
from makemost_jax.checkpoints import export
from makemost_jax.checkpoints.bundle import save_bundle
from makemost_jax.checkpoints.export import is_orbax_params, restore_orbax
from makemost_jax.checkpoints.hf import read_safetensors
from makemost_jax.cli import main
from makemost_jax.errors import CheckpointError, ConfigError
from makemost_jax.models.registry import supported_model_types
from makemost_jax.sharding import MeshConfig, make_mesh, param_shardings, shard_params

# name -> (builder of the HF folder, transformers auto class)
CASES = {
    "gpt2": (functools.partial(make_hf_gpt2, tokenizer=False), "causal"),
    "llama": (functools.partial(make_hf_llama, tokenizer=False), "causal"),
    **{mt: (functools.partial(tiny_families.make, mt), "causal") for mt in tiny_families.CONFIGS},
    **{v: (functools.partial(tiny_seq2seq.make, v), "seq2seq") for v in tiny_seq2seq.VARIANTS},
    "bert": (make_hf_bert, "mlm"),
    "roberta": (functools.partial(make_hf_bert, roberta=True), "mlm"),
}
AUTO = {"causal": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "mlm": transformers.AutoModelForMaskedLM}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`tiny(name)`: the HF folder of case `name`, built once per module."""
    root = tmp_path_factory.mktemp("tiny")

    @functools.cache
    def build(name):
        return CASES[name][0](root / name)

    return build


def assert_same_params(a, b):
    assert a.config == b.config
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a.weights)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b.weights)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


def hf_logits(folder, kind: str, tokens: np.ndarray, **kw) -> np.ndarray:
    model = AUTO[kind].from_pretrained(folder, **kw).eval()
    ids = torch.tensor(tokens)
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids) if kind == "seq2seq" else model(input_ids=ids)
    return out.logits.float().numpy()


def tokens_for(config) -> np.ndarray:
    vocab = min(config.vocab_size, config.encoder.vocab_size if config.encoder else config.vocab_size)
    return np.random.RandomState(0).randint(2, vocab, (2, 7))  # ids >= 2: never RoBERTa's padding


def header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def test_every_registered_family_has_a_case():
    assert {name.split("-")[0] for name in CASES} == set(supported_model_types())


@pytest.mark.parametrize("name", list(CASES))
def test_export_round_trip(name, tiny, tmp_path):
    folder = tiny(name)
    params = mm.load(str(folder))
    out = mm.save_hf(params, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # Hugging Face's own layout: the names transformers saved, no more (tied copies) and no fewer.
    assert sorted(read_safetensors(out / "model.safetensors")) == sorted(read_safetensors(folder / "model.safetensors"))
    assert_same_params(mm.load(str(out)), params)
    kind, tokens = CASES[name][1], tokens_for(params.config)
    np.testing.assert_allclose(hf_logits(out, kind, tokens), hf_logits(folder, kind, tokens), atol=1e-4, rtol=0)


def test_bare_encoder_exports_without_the_pooler(tmp_path):
    """A BERT without MLM head (like all-MiniLM-L6-v2) exports as `BertModel`; its pooler was never loaded,
    so it is not written, and transformers' fresh pooler changes no hidden state."""
    folder = make_hf_bert(tmp_path / "bare", mlm=False)
    params = mm.load(str(folder))
    out = mm.save_hf(params, tmp_path / "export")
    written, saved = set(read_safetensors(out / "model.safetensors")), set(read_safetensors(folder / "model.safetensors"))
    assert written == saved - {"pooler.dense.weight", "pooler.dense.bias"}
    assert_same_params(mm.load(str(out)), params)
    ids = torch.tensor(tokens_for(params.config))
    with torch.no_grad():
        hidden = [transformers.AutoModel.from_pretrained(f).eval()(input_ids=ids).last_hidden_state for f in (out, folder)]
    np.testing.assert_allclose(hidden[0].numpy(), hidden[1].numpy(), atol=1e-4, rtol=0)


def test_config_without_a_hf_spelling_is_refused(tmp_path):
    cfg = mm.from_hf_config({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 10,
                             "n_positions": 8})
    odd = cfg.replace(attention=dataclasses.replace(cfg.attention, scale=0.5))  # GPT-2 scales by 1 or 1/sqrt(K)
    with pytest.raises(ConfigError, match="attention would read back differently"):
        mm.save_hf(mm.init_params(odd, jax.random.key(0)), tmp_path / "odd")
    assert not (tmp_path / "odd").exists()


def test_bf16_export_stays_bf16(tiny, tmp_path):
    folder = tiny("llama")
    params = mm.load(str(folder), dtype="bfloat16")
    out = mm.save_hf(params, tmp_path / "bf16")
    n, entries = header(out / "model.safetensors")
    assert n % 8 == 0
    assert {e["dtype"] for name, e in entries.items() if name != "__metadata__"} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = mm.load(str(out))  # the checkpoint's own dtype
    assert back.dtype == ml_dtypes.bfloat16
    assert_same_params(back, params)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    original = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    assert exported.dtype == torch.bfloat16
    for name, value in exported.state_dict().items():  # round to nearest even, as torch rounds
        assert torch.equal(value, original[name].to(torch.bfloat16)), name


def test_sharded_export_writes_hf_index(tiny, tmp_path):
    folder = tiny("llama")
    params = mm.load(str(folder))
    limit = 50_000
    out = mm.save_hf(params, tmp_path / "sharded", max_shard_bytes=limit)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) >= 3 and files == [f"model-{k:05d}-of-{len(files):05d}.safetensors"
                                         for k in range(1, len(files) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes = {}
    for file in files:
        _, entries = header(out / file)
        entries.pop("__metadata__")
        assert {n for n, f in index["weight_map"].items() if f == file} == set(entries)
        sizes[file] = [e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values()]
        assert sum(sizes[file]) <= limit or len(sizes[file]) == 1
    assert index["metadata"]["total_size"] == sum(map(sum, sizes.values()))
    assert sorted(index["weight_map"]) == sorted(read_safetensors(folder / "model.safetensors"))
    tokens = tokens_for(params.config)
    np.testing.assert_allclose(hf_logits(out, "causal", tokens), hf_logits(folder, "causal", tokens),
                               atol=1e-4, rtol=0)
    assert_same_params(mm.load(str(out)), params)
    # Exporting again into the folder replaces the old weight files, leaving none behind.
    (out / "tokenizer.json").write_text("{}")
    mm.save_hf(params, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3", "bart"])
def test_params_on_a_mesh_export_the_same_bytes(name, tiny, tmp_path, monkeypatch):
    """Fused (GPT-2 along columns, Phi-3 along rows), per-head interleaved (GPT-NeoX), reshaped (BART's
    final_logits_bias) and transposed tensors, read from 8 devices a few rows at a time."""
    params = mm.load(str(tiny(name)))
    plain = mm.save_hf(params, tmp_path / "plain")
    sharded = shard_params(params, make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(sharded.weights))
    monkeypatch.setattr(export, "READ_BYTES", 300)  # blocks of one or two rows
    blocked = mm.save_hf(sharded, tmp_path / "sharded")
    for file in ("config.json", "model.safetensors"):
        assert (blocked / file).read_bytes() == (plain / file).read_bytes()


def test_export_holds_about_one_tensor_on_the_host(tmp_path):
    """tracemalloc's peak during `save_hf` of a model 30x larger than its largest tensor stays below
    2x that tensor + 256 KiB. The params are sharded over 8 devices, so every fetched tensor is
    assembled in a fresh host buffer that tracemalloc sees; gathering the whole model (the
    pre-streaming export) peaks at its full size, far above the bound."""
    cfg = mm.from_hf_config({"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 8,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 1024,
                             "vocab_size": 101, "max_position_embeddings": 64})
    params = shard_params(mm.init_params(cfg, jax.random.key(0)), make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
    _, tensors = export.to_hf(params)
    largest, total = max(t.nbytes for t in tensors.values()), sum(t.nbytes for t in tensors.values())
    bound = 2 * largest + 256 * 1024
    assert total > 10 * bound
    mm.save_hf(params, tmp_path / "warm")  # compile the slicing programs first
    tracemalloc.start()
    try:
        mm.save_hf(params, tmp_path / "measured")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bound, (peak, largest, total)
    assert (tmp_path / "measured" / "model.safetensors").stat().st_size > total


def test_orbax_checkpoint_restores_onto_another_mesh(tiny, tmp_path):
    params = mm.load(str(tiny("llama")))
    saved = shard_params(params, make_mesh(MeshConfig(data=1, fsdp=8)))
    path = mm.save_orbax(saved, tmp_path / "orbax")
    assert is_orbax_params(path) and not is_orbax_params(tiny("llama")) and not is_orbax_params(tmp_path / "none")
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    restored = restore_orbax(path, mesh=mesh)
    assert_same_params(restored, params)
    want = jax.tree.leaves(param_shardings(params, mesh).weights)
    for leaf, sharding in zip(jax.tree.leaves(restored.weights), want):
        assert leaf.sharding == sharding
        assert {s.data.shape for s in leaf.addressable_shards} == {sharding.shard_shape(leaf.shape)}
    q = restored.weights["layers"]["attn"]["q"]["kernel"]  # (L, D, H*K) split over fsdp and tensor
    assert {s.data.shape for s in q.addressable_shards} == {(q.shape[0], q.shape[1] // 2, q.shape[2] // 4)}
    half = restore_orbax(path, dtype="bfloat16")  # one device, cast on restore
    for a, b in zip(jax.tree.leaves(half.weights), jax.tree.leaves(params.weights)):
        assert a.dtype == ml_dtypes.bfloat16 and len(a.sharding.device_set) == 1
        assert np.array_equal(np.asarray(a), np.asarray(b).astype(ml_dtypes.bfloat16))


def test_restore_orbax_refuses_other_folders(tiny, tmp_path):
    other = save_bundle(str(tmp_path / "other"), {"format": 1}, weights={"w": np.ones(2, np.float32)})
    broken = mm.save_orbax(mm.load(str(tiny("llama"))), tmp_path / "broken")
    shutil.rmtree(f"{broken}/weights")
    for folder, reason in [(tiny("llama"), "no meta/ folder"), (tmp_path / "missing", "no meta/ folder"),
                           (other, "not a params checkpoint"), (broken, "do not fit")]:
        with pytest.raises(CheckpointError, match=reason) as e:
            restore_orbax(folder)
        assert str(folder) in str(e.value)


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_cli_convert(tiny, tmp_path, capsys):
    folder = tiny("qwen2")
    params = mm.load(str(folder))
    status, out, _ = run(capsys, "convert", folder, "--to", "hf", tmp_path / "hf", "--max-shard-size", "40KB",
                         "--json")
    assert status == 0 and out.count("\n") == 1
    report = json.loads(out)
    assert report["command"] == "convert" and report["model_type"] == "qwen2" and report["dtype"] == "float32"
    assert "model.safetensors.index.json" in report["files"] and len(report["files"]) >= 4
    tokens = tokens_for(params.config)
    np.testing.assert_allclose(hf_logits(tmp_path / "hf", "causal", tokens), hf_logits(folder, "causal", tokens),
                               atol=1e-4, rtol=0)
    assert_same_params(mm.load(str(tmp_path / "hf")), params)

    status, out, _ = run(capsys, "convert", folder, "--to", "orbax", tmp_path / "orbax", "--dtype", "bfloat16")
    assert status == 0 and "Orbax checkpoint" in out and "bfloat16" in out
    restored = restore_orbax(tmp_path / "orbax")
    assert restored.config == params.config and restored.dtype == ml_dtypes.bfloat16

    for argv, message in [
        (("--to", "hf", tmp_path / "hf"), "not empty"),
        (("--to", "orbax", tmp_path / "o2", "--max-shard-size", "1GB"), "applies to --to hf"),
        (("--to", "hf", tmp_path / "h2", "--max-shard-size", "lots"), "not a size"),
    ]:
        status, out, err = run(capsys, "convert", folder, *argv)
        assert status == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err
    status, _, err = run(capsys, "convert", tmp_path / "nothing-here", "--to", "hf", tmp_path / "h3")
    assert status == 2 and err.count("\n") == 1
    status, _, _ = run(capsys, "convert", folder, "--to", "hf", tmp_path / "hf", "--overwrite")
    assert status == 0


@pytest.mark.slow
def test_cli_convert_embedded_gguf_to_hf(tmp_path, capsys):
    """The embedded SmolLM2 GGUF, converted: transformers reads the folder to the logits it computes from the
    GGUF itself (both PyTorch, the same dequantised weights), and within 1e-3 of mm.forward's."""
    from makemost_jax.checkpoints.gguf import default_gguf_path

    status, out, _ = run(capsys, "convert", "default", "--to", "hf", tmp_path / "smol", "--json")
    assert status == 0 and json.loads(out)["model_type"] == "llama"
    tokens = np.array([mm.load_tokenizer().encode_for_model("It is a truth universally acknowledged, that")])
    exported = hf_logits(tmp_path / "smol", "causal", tokens)
    gguf = default_gguf_path()
    reference = hf_logits(gguf.rsplit("/", 1)[0], "causal", tokens, gguf_file=gguf.rsplit("/", 1)[1],
                          dtype=torch.float32)
    np.testing.assert_allclose(exported, reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(exported, mm.forward(mm.load(), tokens).logits, atol=1e-3, rtol=0)
