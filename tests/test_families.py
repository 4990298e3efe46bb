"""Every decoder family against Hugging Face PyTorch (transformers, eager attention, float32).

For each model_type of `tiny_families.CONFIGS` (non-default tiny configs: sliding windows
of 5, GQA, soft-capping, partial rotary, untied heads, ...), a few extra variants of them
(qwen2 without sliding, GPT-NeoX sequential residual, post-LN OPT, Gemma 2 tied with HF's
default soft-caps, Phi-3 with longrope) and Llama with every rotary scaling type:

(a) full-sequence logits of a (3, 17) batch within 1e-4 of HF's;
(b) cached decoding: a 5-token prefill into a 17-slot cache, then one token per call,
    each step's logits within 1e-4 of HF's logits at that position (this runs the
    sliding windows across the cache). Where rotary frequencies depend on the current
    length (longrope past its original context, dynamic NTK past the context) HF's own
    cached decoding keeps the keys it computed before the switch, so the reference there
    is HF's cached decoding (`model(..., cache=...)`), not its full forward;
(c) greedy `mm.generate` of 12 tokens token-identical to HF's `generate` (no EOS stop); where
    the rotary frequencies switch inside the decode (longrope), `mm.generate` re-encodes at the
    switch, so the reference is HF's `generate(use_cache=False)`: each token the argmax of the
    full forward of its prefix (HF's Phi-3 generation re-encodes too, its generic one does not);
(d) the rolling cache of Mistral (every layer slides over 5): `cache_size` is smaller than
    the decode, a forward through a 5-slot rolling cache reproduces HF's logits, and a
    40-token greedy decode past a 6-token prompt equals HF's.

Also: bad checkpoints and configs raise the library's errors naming the culprit (an
unknown rope type, a deleted or misshapen tensor, an unsupported model_type), `makemost
info --json` reports the attention pattern (Gemma 2 slides on even layers, Qwen2 on
layers >= max_window_layers), and README.md's table of families matches the registry.

HF models and their reference outputs are built once per module (lazily, per variant).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import make_hf_llama
from tiny_families import CONFIGS, make

import makemost_jax as mm
from makemost_jax.errors import CheckpointError, ConfigError
from makemost_jax.models.cache import cache_size
from makemost_jax.models.registry import FAMILIES

REPO = Path(__file__).resolve().parents[1]
TOKENS = np.random.RandomState(0).randint(2, 101, (3, 17))  # ids in [2, 101)
PREFILL = 5
NEW = 12

LLAMA_HEAD = 48 // 4  # hidden / heads of conftest's tiny Llama
PHI3_ROTARY = int(48 // 4 * 0.5)  # head_dim * partial_rotary_factor of the tiny Phi-3


def _factors(n, seed):
    return [round(float(x), 3) for x in 1.0 + np.random.RandomState(seed).rand(n) * 3.0]


# id -> (builder, model_type, overrides, options). Options: "seq_dependent" (rotary depends on
# the current length past the threshold: (b) compares with HF's cached decoding), "prompt" (the
# prompt length of (c); 8 + 12 new tokens takes the longrope decodes past their original 16).
VARIANTS = {mt: ("tiny", mt, {}, {}) for mt in CONFIGS}
VARIANTS.update({
    "qwen2-no-sliding": ("tiny", "qwen2", {"use_sliding_window": False}, {}),
    "gpt_neox-sequential": ("tiny", "gpt_neox", {"use_parallel_residual": False}, {}),
    "opt-post-ln": ("tiny", "opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 48}, {}),
    "gemma2-tied-hf-defaults": ("tiny", "gemma2", {"tie_word_embeddings": True, "attn_logit_softcapping": 50.0,
                                                   "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256}, {}),
    "phi3-longrope": ("tiny", "phi3", {
        "rope_scaling": {"rope_type": "longrope", "short_factor": _factors(PHI3_ROTARY // 2, 1),
                         "long_factor": _factors(PHI3_ROTARY // 2, 2), "original_max_position_embeddings": 16},
        "original_max_position_embeddings": 16, "max_position_embeddings": 64}, {"seq_dependent": True, "prompt": 8}),
    "llama": ("llama", "llama", {}, {}),
    "llama-linear": ("llama", "llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.5}}, {}),
    # max_position_embeddings=16 < 17 tokens: the NTK base grows in the full forward.
    "llama-dynamic": ("llama", "llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 3.0},
                                         "max_position_embeddings": 16}, {"seq_dependent": True, "prompt": 4}),
    "llama-yarn": ("llama", "llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0,
                                                       "beta_slow": 1.0, "original_max_position_embeddings": 16}}, {}),
    "llama-llama3": ("llama", "llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 16}}, {}),
    "llama-longrope": ("llama", "llama", {
        "rope_scaling": {"rope_type": "longrope", "short_factor": _factors(LLAMA_HEAD // 2, 3),
                         "long_factor": _factors(LLAMA_HEAD // 2, 4), "original_max_position_embeddings": 16}},
        {"seq_dependent": True, "prompt": 8}),
})


class Case:
    """One variant: its folder, our params, the HF model and (lazily) HF's reference outputs."""

    def __init__(self, name, root: Path):
        builder, model_type, overrides, self.options = VARIANTS[name]
        folder = root / name
        if builder == "tiny":
            self.folder = make(model_type, folder, **overrides)
        else:
            self.folder = make_hf_llama(folder, tokenizer=False, **overrides)
        self.model_type = model_type
        self.model = transformers.AutoModelForCausalLM.from_pretrained(self.folder).eval()
        self.params = mm.load(str(self.folder))
        self._cache = {}

    def once(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def hf_full(self):
        def run():
            with torch.no_grad():
                return self.model(torch.tensor(TOKENS)).logits.numpy()
        return self.once("full", run)

    def hf_cached(self):
        """HF's own cached decoding of TOKENS: a PREFILL-token prefill, then one token per call."""
        def run():
            ids = torch.tensor(TOKENS)
            with torch.no_grad():
                out = self.model(ids[:, :PREFILL], use_cache=True)
                pieces, past = [out.logits], out.cache
                for t in range(PREFILL, ids.shape[1]):
                    out = self.model(ids[:, t:t + 1], cache=past, use_cache=True)
                    pieces.append(out.logits)
                    past = out.cache
            return torch.cat(pieces, 1).numpy()
        return self.once("cached", run)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(name) -> Case:
        if name not in built:
            built[name] = Case(name, root)
        return built[name]

    return get


# Jitted (eager dispatch of a whole forward costs more than compiling it); one program per shape.
_forward = jax.jit(lambda params, tokens, cache: mm.forward(params, tokens, cache=cache))


def hf_greedy(model, prompts, max_new_tokens, use_cache=True):
    """HF greedy generation of exactly `max_new_tokens` tokens (no EOS, so nothing stops early)."""
    config = transformers.GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                           do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0,
                                           bos_token_id=None, use_cache=use_cache)
    ids = torch.tensor(np.asarray(prompts))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out[:, ids.shape[1]:].numpy()
    assert new.shape == (len(prompts), max_new_tokens)
    return new


# ------------------------------------------------------------------------ (a) (b) (c)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_full_sequence_logits_match(cases, name):
    case = cases(name)
    ours = np.asarray(_forward(case.params, TOKENS, None).logits)
    np.testing.assert_allclose(ours, case.hf_full(), atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_matches(cases, name):
    case = cases(name)
    reference = case.hf_cached() if case.options.get("seq_dependent") else case.hf_full()
    cache = mm.init_cache(case.params.config, TOKENS.shape[0], TOKENS.shape[1])
    out = _forward(case.params, TOKENS[:, :PREFILL], cache)
    np.testing.assert_allclose(np.asarray(out.logits), reference[:, :PREFILL], atol=1e-4, rtol=0,
                               err_msg=f"{name}: prefill")
    cache = out.cache
    for t in range(PREFILL, TOKENS.shape[1]):
        out = _forward(case.params, TOKENS[:, t:t + 1], cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), reference[:, t], atol=1e-4, rtol=0,
                                   err_msg=f"{name}: step at position {t}")
    assert int(cache.fill) == TOKENS.shape[1]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_generation_matches_transformers(cases, name):
    case = cases(name)
    prompts = [list(row) for row in TOKENS[:, :case.options.get("prompt", PREFILL)]]
    result = mm.generate(case.params, prompts, max_new_tokens=NEW)
    assert np.asarray(result.lengths).tolist() == [NEW] * len(prompts)
    reference = hf_greedy(case.model, prompts, NEW, use_cache=not case.options.get("seq_dependent"))
    np.testing.assert_array_equal(np.asarray(result.tokens), reference, err_msg=name)


# ------------------------------------------------------------------------ (d) rolling cache


def test_mistral_rolling_cache_decodes_like_transformers(cases):
    case = cases("mistral")
    cfg = case.params.config
    assert cfg.uniform_window == 5 and cfg.sliding_layers == tuple(range(cfg.n_layers))
    prompt_len, new = 6, 40
    total = prompt_len + new
    assert total < cfg.max_positions  # HF's reference needs the whole decode inside its context
    size = cache_size(cfg, prompt_len, total)
    assert size < total and size == max(prompt_len, 5)

    # A 5-slot rolling buffer (the window, one token per call) reproduces the full forward.
    cache = mm.init_cache(cfg, TOKENS.shape[0], cache_size(cfg, 1, TOKENS.shape[1]))
    assert cache.size == 5
    full = case.hf_full()
    for t in range(TOKENS.shape[1]):
        out = _forward(case.params, TOKENS[:, t:t + 1], cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, t], atol=1e-4, rtol=0,
                                   err_msg=f"rolling 5-slot cache, position {t}")
    assert int(cache.fill) == TOKENS.shape[1] and sorted(np.asarray(cache.positions[0]).tolist()) == [12, 13, 14,
                                                                                                     15, 16]

    prompts = [list(row) for row in TOKENS[:, :prompt_len]]
    result = mm.generate(case.params, prompts, max_new_tokens=new)
    np.testing.assert_array_equal(np.asarray(result.tokens), hf_greedy(case.model, prompts, new))


# ------------------------------------------------------------------------ bad input


def _copy(case: Case, tmp_path: Path) -> Path:
    folder = tmp_path / case.folder.name
    shutil.copytree(case.folder, folder)
    return folder


def _rewrite(folder: Path, edit):
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_unknown_rope_type_is_named(cases, tmp_path):
    folder = _copy(cases("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "weird", "factor": 2}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="weird"):
        mm.load(str(folder))


def _layer_tensor(tensors, layer: int, ndim: int | None = None) -> str:
    names = sorted(n for n in tensors if re.search(rf"layers\.{layer}\.", n)
                   and (ndim is None or tensors[n].ndim == ndim))
    assert names, sorted(tensors)
    return names[0]


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_missing_tensor_is_named(cases, tmp_path, model_type):
    folder = _copy(cases(model_type), tmp_path)
    removed = []

    def edit(tensors):
        name = _layer_tensor(tensors, 1)
        del tensors[name]
        removed.append(name)

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError, match=re.escape(removed[0])):
        mm.load(str(folder))


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_misshapen_tensor_is_named(cases, tmp_path, model_type):
    folder = _copy(cases(model_type), tmp_path)
    names = []

    def edit(tensors):
        name = _layer_tensor(tensors, 0, ndim=2)
        rows, cols = tensors[name].shape
        tensors[name] = np.zeros((rows + 1, cols), tensors[name].dtype)
        names.append(name)

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError, match=re.escape(names[0])):
        mm.load(str(folder))


def test_unsupported_model_type_lists_the_supported(cases, tmp_path):
    folder = _copy(cases("llama"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="mamba") as error:
        mm.load(str(folder))
    for family in FAMILIES:
        assert family.model_type in str(error.value)


# ------------------------------------------------------------------------ makemost info


def _info(folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "makemost_jax", "info", str(folder), "--json"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1, proc.stdout
    info = json.loads(proc.stdout)
    assert isinstance(info, dict)
    return info


def test_info_reports_the_attention_pattern(cases, capsys):
    from makemost_jax.cli import main

    gemma2 = _info(cases("gemma2").folder)  # one run of the real command line
    assert {"family", "n_params", "max_positions", "attention_pattern", "sliding_layers", "dtype"} <= set(gemma2)
    assert gemma2["sliding_layers"] == [0, 2] and gemma2["dtype"] == "float32" and gemma2["max_positions"] == 64
    assert gemma2["n_params"] == sum(p.numel() for p in cases("gemma2").model.parameters())
    assert "sliding" in gemma2["attention_pattern"] and "full" in gemma2["attention_pattern"]

    assert main(["info", str(cases("qwen2").folder), "--json"]) == 0  # the same command, in this process
    qwen2 = json.loads(capsys.readouterr().out)
    assert qwen2["sliding_layers"] == [2, 3] and qwen2["family"] and qwen2["n_params"] > 0
    assert "sliding" in qwen2["attention_pattern"] and "full" in qwen2["attention_pattern"]


# ------------------------------------------------------------------------ README


def _readme_family_rows() -> dict[str, list[str]]:
    """README.md's table of families (the one whose header starts | model_type |): model_type -> its cells."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    header = [i for i, line in enumerate(lines) if re.match(r"^\|\s*model_type\s*\|", line)]
    assert len(header) == 1, "README.md needs one table of families headed | model_type | HF | GGUF | notes |"
    assert len(lines[header[0]].strip().strip("|").split("|")) == 4, lines[header[0]]
    rows = {}
    for line in lines[header[0] + 2:]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        match = re.match(r"^\| `([^`]+)`", line)
        assert match, f"README family row does not start with | `model_type`: {line!r}"
        assert match.group(1) not in rows, f"duplicate README row for {match.group(1)}"
        rows[match.group(1)] = [cell.strip() for cell in line.strip().strip("|").split("|")]
    return rows


def test_readme_table_lists_exactly_the_registry():
    rows = _readme_family_rows()
    registry = {f.model_type: f for f in FAMILIES}
    assert set(registry) - set(rows) == set(), "registry families missing from README's table"
    assert set(rows) - set(registry) == set(), "README table rows not in the registry"
    for model_type, (_, hf, gguf, notes) in rows.items():  # and each row says what the registry says
        family = registry[model_type]
        assert gguf == (f"`{family.gguf}`" if family.gguf else "no"), (model_type, gguf)
        assert notes == family.notes, (model_type, notes)
