"""GGUF architectures beyond Llama: Mistral, Qwen 2/3, Gemma 1/2/3, Phi-3.

For each architecture a tiny random Hugging Face model is built with transformers, written
to GGUF the way llama.cpp's converter would (`tests/gguf_writer.py`: its metadata keys,
tensor names and transforms), and read back with `read_gguf`:

(a) the tensors are exactly the HF state dict (names, shapes, values: bit-exact for F32,
    the quantize/dequantize of the original for Q8_0);
(b) the config dict, given to transformers' own config class, has every field that
    changes the computation equal to the original config's;
(c) where transformers' GGUF loader supports the architecture, it reads the same file
    and its logits equal the original model's: an independent check of the writer.
    Its config mapping omits some fields (`_TRANSFORMERS_UNMAPPED`), which are passed to
    `from_pretrained` from the original config so that the weights are what is compared.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from gguf_writer import Q, write_gguf

from makemost_jax.checkpoints import gguf as gguf_mod
from makemost_jax.checkpoints.gguf import read_gguf, read_gguf_metadata
from makemost_jax.checkpoints.gguf_arch import ARCHS, Hparams
from makemost_jax.errors import CheckpointError

VOCAB = 101
_BASE = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
_GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
_LONGROPE = {"rope_type": "longrope", "rope_theta": 20000.0, "partial_rotary_factor": 0.5,
             "long_factor": [1.0, 1.5, 2.25, 4.0], "short_factor": [1.0, 1.1, 1.2, 1.3]}


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str  # general.architecture
    model_type: str  # HF
    config: dict
    name: str = "tiny"  # general.name
    transformers_reads: bool = True  # does transformers' GGUF loader support the architecture?


CASES = {
    # Q/K permuted rows with biases (llama.cpp permutes q/k biases too); an untied head.
    "llama": Case("llama", "llama", {"attention_bias": True, "tie_word_embeddings": False,
                                     "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}),
    # A Mistral model converted to llama, head_dim != hidden / heads (as in Mistral Nemo).
    "mistral": Case("llama", "mistral", {"tie_word_embeddings": False, "sliding_window": None, "head_dim": 32},
                    name="Mistral-Tiny-v0.3"),
    "qwen2": Case("qwen2", "qwen2", {"tie_word_embeddings": True,
                                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen3": Case("qwen3", "qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    "gemma": Case("gemma", "gemma", {"head_dim": 32, "num_key_value_heads": 1}, transformers_reads=False),
    # query_pre_attn_scalar = head_dim: llama.cpp's rule except for the 27B size.
    "gemma2": Case("gemma2", "gemma2", {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16,
                                        "attn_logit_softcapping": 20.0, "final_logit_softcapping": 15.0}),
    # Six layers: five sliding, one global with linear rope scaling; q/k norms.
    "gemma3": Case("gemma3", "gemma3_text", {"hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 2,
                                             "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 4,
                                             "query_pre_attn_scalar": 16, "final_logit_softcapping": 25.0,
                                             "rope_parameters": _GEMMA3_ROPE}),
    "phi3": Case("phi3", "phi3", {"tie_word_embeddings": False}),
    # Partial rotary, LongRoPE factors (as tensors) and a sliding window; the prompt (12)
    # is longer than the original context (8), so the long factors are the ones in use.
    "phi3-longrope": Case("phi3", "phi3", {"tie_word_embeddings": False, "rope_parameters": _LONGROPE,
                                           "original_max_position_embeddings": 8, "sliding_window": 6}),
}

# Fields transformers' GGUF config mapping (integrations/ggml.py) does not read back.
_TRANSFORMERS_UNMAPPED = {
    "llama": ["attention_bias"],
    "qwen3": ["head_dim"],
    "gemma2": ["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"],
    "gemma3": ["query_pre_attn_scalar", "final_logit_softcapping", "rope_parameters"],
    "phi3-longrope": ["rope_parameters", "original_max_position_embeddings", "sliding_window"],
}

# Attributes of a transformers config that change what the model computes.
_COMPUTATION = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "tie_word_embeddings", "hidden_act", "hidden_activation", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
    "final_logit_softcapping", "original_max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)
_MISSING = "<missing>"
PROMPT = [[1, 5, 9, 17, 33, 2, 44, 70, 99, 3, 8, 12]]


def _tiny(case: Case):
    """A tiny random model; norm scales and biases are random too (HF initialises them to constants)."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(case.model_type, **(_BASE | case.config))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Gemma's norms compute x * (1 + w), the others x * w: centre each on its identity.
            centre = 1.0 if "norm" in name and not case.arch.startswith("gemma") else 0.0
            p.copy_(centre + (0.1 if "norm" in name else 0.2) * torch.randn(p.shape, generator=gen))
    return model.eval()


def _state(model) -> dict[str, np.ndarray]:
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the file has no output.weight: the reader reports tying
    return state


def _computation(config) -> dict:
    return {k: getattr(config, k, _MISSING) for k in _COMPUTATION}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{case: (model, path)}, each model written once as F32."""
    folder = tmp_path_factory.mktemp("gguf_arch")
    out = {}
    for key, case in CASES.items():
        model = _tiny(case)
        path = folder / f"{key}.gguf"
        write_gguf(path, model, case.arch, name=case.name)
        out[key] = (model, path)
    return out


@pytest.mark.parametrize("key", list(CASES))
def test_tensors_are_the_hf_state_dict(written, key):
    model, path = written[key]
    _config, tensors, tok = read_gguf(path)
    state = _state(model)
    assert sorted(tensors) == sorted(state)
    for name, orig in state.items():
        got = tensors[name]
        assert got.dtype == np.float32 and got.shape == orig.shape, name
        if CASES[key].arch.startswith("gemma") and name.endswith("norm.weight"):
            # The file holds float32(1 + w); subtracting 1 is exact, the rounding of 1 + w is not undone.
            np.testing.assert_array_equal(got, (orig + np.float32(1)) - np.float32(1), err_msg=name)
            np.testing.assert_allclose(got, orig, rtol=0, atol=2 ** -23, err_msg=name)
        else:
            np.testing.assert_array_equal(got, orig, err_msg=name)
    assert tok["model"] == "gpt2" and len(tok["tokens"]) == VOCAB and tok["eos_token_id"] == 2


@pytest.mark.parametrize("key", list(CASES))
def test_config_matches_the_original(written, key):
    model, path = written[key]
    config, _, _ = read_gguf(path)
    case = CASES[key]
    assert config["model_type"] == case.model_type
    assert config["architectures"] == [type(model).__name__]
    rebuilt = transformers.AutoConfig.for_model(**copy.deepcopy(config))  # transformers edits nested dicts
    assert type(rebuilt) is type(model.config)
    assert _computation(rebuilt) == _computation(model.config)
    assert read_gguf_metadata(path)[0] == config


@pytest.mark.parametrize("key", [k for k, c in CASES.items() if c.transformers_reads])
def test_transformers_reads_the_file(written, key):
    model, path = written[key]
    overrides = {k: getattr(model.config, k) for k in _TRANSFORMERS_UNMAPPED.get(key, [])}
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager", dtype=torch.float32, **overrides
    )
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        np.testing.assert_allclose(ref(ids).logits.numpy(), model(ids).logits.numpy(), rtol=0, atol=1e-4)
    # ... and it dequantizes to the same arrays as read_gguf.
    _, tensors, _ = read_gguf(path)
    theirs = ref.state_dict()
    for name, arr in tensors.items():
        np.testing.assert_array_equal(arr, theirs[name].numpy(), err_msg=name)


@pytest.mark.parametrize("key", list(CASES))
def test_mm_load_of_the_file_matches_the_original_model(written, key):
    """The whole path: GGUF file -> mm.load -> forward, against the PyTorch model it was written from."""
    import makemost_jax as mm

    model, path = written[key]
    with torch.no_grad():
        ref = model(torch.tensor(PROMPT)).logits.numpy()
    np.testing.assert_allclose(np.asarray(mm.forward(mm.load(str(path)), np.asarray(PROMPT)).logits), ref,
                               rtol=0, atol=1e-4)


def test_gemma_is_not_read_by_transformers(written):
    """transformers' GGUF loader has no gemma (v1); read_gguf is checked against the model alone."""
    _, path = written["gemma"]
    with pytest.raises(ValueError, match="gemma"):
        transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("key, qtype", [("qwen2", Q.Q8_0), ("llama", Q.Q8_0), ("gemma3", Q.Q8_0)],
                         ids=["qwen2-Q8_0", "llama-Q8_0", "gemma3-Q8_0"])
def test_quantized(tmp_path, key, qtype):
    case = CASES[key]
    model = _tiny(case)
    path = tmp_path / f"{key}.gguf"
    write_gguf(path, model, case.arch, qtype=qtype, name=case.name)
    _, tensors, _ = read_gguf(path)
    state = _state(model)
    assert sorted(tensors) == sorted(state)
    for name, orig in state.items():
        if orig.ndim == 1:
            continue  # F32 in every llama.cpp file (checked above)
        # Q8_0 blocks run along rows, so they commute with the Q/K row permutation.
        expected = gguf.quants.dequantize(gguf.quants.quantize(orig, qtype), qtype)
        np.testing.assert_array_equal(tensors[name], expected, err_msg=name)
        scale = np.abs(orig).max(axis=-1, keepdims=True)
        assert np.all(np.abs(tensors[name] - orig) <= 1e-2 * scale + 1e-7), name
    if case.transformers_reads:
        overrides = {k: getattr(model.config, k) for k in _TRANSFORMERS_UNMAPPED.get(key, [])}
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, attn_implementation="eager", dtype=torch.float32, **overrides
        )
        theirs = ref.state_dict()
        for name, arr in tensors.items():
            np.testing.assert_array_equal(arr, theirs[name].numpy(), err_msg=name)


def test_mistral_needs_its_name(tmp_path):
    """The same llama file is Llama unless general.name (or basename) says Mistral."""
    model = _tiny(CASES["mistral"])
    plain, named = tmp_path / "plain.gguf", tmp_path / "named.gguf"
    write_gguf(plain, model, "llama", name="tiny")
    write_gguf(named, model, "llama", name="tiny", meta={"general.basename": ("Mistral-7B", gguf.GGUFValueType.STRING)})
    assert read_gguf_metadata(plain)[0]["model_type"] == "llama"
    config = read_gguf_metadata(named)[0]
    assert config["model_type"] == "mistral" and config["sliding_window"] is None
    # A stored window is kept (llama.cpp's llama architecture does not write one itself).
    windowed = tmp_path / "windowed.gguf"
    write_gguf(windowed, model, "llama", name="Mistral-7B-v0.1",
               meta={"llama.attention.sliding_window": (4096, gguf.GGUFValueType.UINT32)})
    assert read_gguf_metadata(windowed)[0]["sliding_window"] == 4096


def test_phi3_split_qkv_is_fused(tmp_path):
    model = _tiny(CASES["phi3"])
    path = tmp_path / "split.gguf"
    write_gguf(path, model, "phi3", split_qkv=True)
    _, tensors, _ = read_gguf(path)
    state = _state(model)
    assert sorted(tensors) == sorted(state)
    for name, orig in state.items():
        np.testing.assert_array_equal(tensors[name], orig, err_msg=name)


def test_missing_biases_are_zero(tmp_path):
    """A file with only some of the attention biases gets zeros for the rest (the same computation)."""
    model = _tiny(CASES["llama"])
    path = tmp_path / "partial_bias.gguf"
    dropped = tuple(f"model.layers.{i}.self_attn.o_proj.bias" for i in range(2))
    write_gguf(path, model, "llama", skip=dropped)
    config, tensors, _ = read_gguf(path)
    assert config["attention_bias"] is True
    for name in dropped:
        np.testing.assert_array_equal(tensors[name], np.zeros(64, np.float32))


def test_bias_the_hf_model_lacks_is_rejected(tmp_path):
    model = _tiny(CASES["qwen2"])
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.bias = torch.nn.Parameter(torch.ones(64))
    path = tmp_path / "o_bias.gguf"
    write_gguf(path, model, "qwen2")
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_output\.bias.*does not have"):
        read_gguf(path)


def test_inconsistent_metadata_is_rejected(tmp_path):
    model = _tiny(CASES["qwen3"])
    path = tmp_path / "bad_head_dim.gguf"
    write_gguf(path, model, "qwen3", meta={"qwen3.attention.key_length": (16, gguf.GGUFValueType.UINT32),
                                           "qwen3.attention.value_length": (16, gguf.GGUFValueType.UINT32)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q\.weight.*metadata implies") as err:
        read_gguf(path)
    assert str(path) in str(err.value)
    path = tmp_path / "bad_rope.gguf"
    write_gguf(path, model, "qwen3", meta={"qwen3.rope.dimension_count": (8, gguf.GGUFValueType.UINT32)})
    with pytest.raises(CheckpointError, match="partial rotary"):
        read_gguf_metadata(path)


def test_unsupported_architecture_names_file_arch_and_alternatives(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for reader in (read_gguf, read_gguf_metadata):
        with pytest.raises(CheckpointError) as err:
            reader(path)
        message = str(err.value)
        assert str(path) in message and "'mamba'" in message
        assert all(arch in message for arch in ARCHS) and "Mistral" in message


def _hparams(arch: str, meta: dict) -> Hparams:
    meta = {f"{arch}.{k}": v for k, v in meta.items()}
    return Hparams(meta, arch, Path("x.gguf"), {}, lambda name: None)


_GEMMA_27B = {"embedding_length": 4608, "attention.head_count": 32, "attention.head_count_kv": 16,
              "attention.key_length": 128, "attention.value_length": 128, "feed_forward_length": 36864,
              "context_length": 8192, "attention.layer_norm_rms_epsilon": 1e-6}


def test_gemma_attention_scalar_follows_llama_cpp():
    """llama.cpp scales Gemma 27B queries by 1/sqrt(hidden / heads), other sizes by 1/sqrt(head_dim)."""
    assert ARCHS["gemma2"].config(_hparams("gemma2", _GEMMA_27B | {"block_count": 46}))["query_pre_attn_scalar"] == 144
    assert ARCHS["gemma2"].config(_hparams("gemma2", _GEMMA_27B | {"block_count": 42}))["query_pre_attn_scalar"] == 128
    g3 = _GEMMA_27B | {"embedding_length": 5376, "block_count": 62, "attention.sliding_window": 1024}
    config = ARCHS["gemma3"].config(_hparams("gemma3", g3))
    assert config["query_pre_attn_scalar"] == 168 and config["rope_local_base_freq"] == 10000.0
    assert config["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
    # Gemma 2 defaults (llama.cpp's): window 4096, softcaps 50 and 30, alternating layers.
    config = ARCHS["gemma2"].config(_hparams("gemma2", _GEMMA_27B | {"block_count": 4}))
    assert (config["sliding_window"], config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (
        4096, 50.0, 30.0)
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    # Gemma 3 without a window (or with 0) has global attention everywhere.
    config = ARCHS["gemma3"].config(_hparams("gemma3", _GEMMA_27B | {"block_count": 6}))
    assert config["sliding_window"] is None and set(config["layer_types"]) == {"full_attention"}


def test_rope_scaling_metadata():
    meta = _GEMMA_27B | {"block_count": 2, "rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                         "rope.scaling.original_context_length": 32768, "rope.scaling.yarn_beta_fast": 32.0}
    config = ARCHS["qwen2"].config(_hparams("qwen2", meta))
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 32768, "beta_fast": 32.0}
    with pytest.raises(CheckpointError, match="'weird'.*supported: none, linear, yarn"):
        ARCHS["qwen2"].config(_hparams("qwen2", meta | {"rope.scaling.type": "weird"}))
    # Float32 metadata comes back as the decimal the HF config had.
    assert config["rms_norm_eps"] == 1e-6 and math.isclose(float(np.float32(1e-6)), 1e-6, rel_tol=1e-7)


def test_llama_tables_keep_their_old_names():
    assert gguf_mod._LAYER_NAMES["ffn_norm"] == "post_attention_layernorm"
    assert gguf_mod._GLOBAL_NAMES["output.weight"] == "lm_head.weight"
