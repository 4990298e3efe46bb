"""Shared test helpers: tiny random-weight Hugging Face checkpoints, built offline.

The factories build a `transformers` model with `torch.manual_seed(0)`, perturb its
1-D parameters (norm scales and biases, which Hugging Face initialises to exactly 1 and
0 and so would hide bugs in them), save it with safetensors and return the folder.
Keyword arguments go to the `transformers` config; the defaults are tiny, float32, with
eager attention. With `tokenizer=True` (the default) the folder also gets a small
Metaspace-BPE `tokenizer.json` trained on the bundled Austen sample, so the CLI can
read text with it.

Example (in a test):
    def test_logits(tmp_path):
        folder = make_hf_gpt2(tmp_path / "gpt2", n_layer=3)
        params = mm.load(str(folder))
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder)

or with the fixtures: `def test_x(hf): folder = hf.llama("m", num_key_value_heads=1)`
(a folder under the test's tmp_path),
`def test_y(tiny_gpt2_dir): ...` (one shared folder per session).
"""

from __future__ import annotations

import collections
import gc
import json
import os
import subprocess
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Eight simulated CPU devices for the sharded-equality tests (must precede importing jax);
# unsharded computations still run on device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import pytest

jax.config.update("jax_enable_x64", False)
# One XLA compilation cache for the whole run: this process, pytest-xdist's workers and the CLI and benchmark
# subprocesses inherit the folder. Many tests compile the same program (the default model's forward, a
# family's train step) from a fresh jitted function; a hit skips XLA's compile. A fresh folder per run,
# removed at its end by the process that made it, so nothing carries over between runs.
_OWN_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    _OWN_XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="makemost_tests_xla_")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

VOCAB = 101  # deliberately not a power of two
SPECIALS = ("<|endoftext|>", "<unk>")  # ids 0 and 1 in the test tokenizer


def _perturb_vectors(model, scale: float = 0.1):
    """Add N(0, scale) noise to every 1-D parameter (norm scales, biases)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(scale * torch.randn_like(p))


def _write_tokenizer(folder: Path, vocab_size: int):
    """A deterministic Metaspace BPE tokenizer of at most `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from makemost_jax.assets import read_sample

    lines = read_sample("austen").splitlines()
    # The trainer's own alphabet limit breaks ties between equally frequent characters in hash
    # order, which differs between processes: choose the alphabet here, ties by character.
    counts = collections.Counter(ch for line in lines for ch in line.replace(" ", "\u2581"))
    alphabet = sorted(counts, key=lambda ch: (-counts[ch], ch))[:min(60, vocab_size // 2)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[0],
                            unk_token=SPECIALS[1]).save_pretrained(folder)


def _save(model, folder, tokenizer: bool) -> Path:
    folder = Path(folder)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer and model.config.vocab_size >= 64:
        _write_tokenizer(folder, model.config.vocab_size)
    return folder


def make_hf_gpt2(folder, tokenizer: bool = True, **overrides) -> Path:
    """A random-weight `GPT2LMHeadModel` saved in `folder`; overrides go to GPT2Config.

    Example:
        >>> # make_hf_gpt2(tmp_path / "m", n_layer=3, n_positions=128)
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
               bos_token_id=0, eos_token_id=0, initializer_range=0.1,
               attn_implementation="eager", dtype="float32")
    cfg.update(overrides)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**cfg))
    _perturb_vectors(model)
    return _save(model, folder, tokenizer)


def make_hf_llama(folder, tokenizer: bool = True, **overrides) -> Path:
    """A random-weight `LlamaForCausalLM` (grouped-query attention) saved in `folder`.

    Overrides go to LlamaConfig.

    Example:
        >>> # make_hf_llama(tmp_path / "m", num_key_value_heads=4, tie_word_embeddings=True)
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0,
               pad_token_id=None, initializer_range=0.1, tie_word_embeddings=False,
               attn_implementation="eager", dtype="float32")
    cfg.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    _perturb_vectors(model)
    return _save(model, folder, tokenizer)


def make_hf_bert(folder, roberta: bool = False, mlm: bool = True, tokenizer: bool = False,
                 **overrides) -> Path:
    """A random-weight BERT (or RoBERTa) encoder saved in `folder`.

    `mlm=True` saves the masked-LM model (`*ForMaskedLM`), `mlm=False` the bare encoder
    (`BertModel`/`RobertaModel`, like all-MiniLM-L6-v2). Overrides go to
    BertConfig/RobertaConfig.

    Example:
        >>> # make_hf_bert(tmp_path / "m", roberta=True, num_hidden_layers=3)
    """
    import torch
    import transformers as tr

    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2,
               initializer_range=0.1, attn_implementation="eager", dtype="float32")
    if roberta:
        cfg.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, max_position_embeddings=66,
                   type_vocab_size=1)
    cfg.update(overrides)
    torch.manual_seed(0)
    if roberta:
        config = tr.RobertaConfig(**cfg)
        model = tr.RobertaForMaskedLM(config) if mlm else tr.RobertaModel(config)
    else:
        config = tr.BertConfig(**cfg)
        model = tr.BertForMaskedLM(config) if mlm else tr.BertModel(config)
    _perturb_vectors(model)
    return _save(model, folder, tokenizer)


ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, stem: str, out: Path, timeout: int = 600) -> tuple[str, dict]:
    """Run `benchmarks/<script>.py --quick --out-dir out`; (stdout, the payload of `out/<stem>_quick.json`).

    The experiments' end-to-end tests share this; a failing run fails the test with the output's tail.
    """
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / f"{stem}_quick.json").read_text())


@pytest.fixture
def hf(tmp_path):
    """The factories with `folder` relative to this test's tmp_path.

    Example:
        >>> # def test_x(hf): folder = hf.gpt2("a", n_layer=3)
    """
    def bind(factory):
        return lambda name="model", **kw: factory(tmp_path / name, **kw)

    return types.SimpleNamespace(gpt2=bind(make_hf_gpt2), llama=bind(make_hf_llama),
                                 bert=bind(make_hf_bert))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """One default tiny GPT-2 folder (with tokenizer) shared by the whole session."""
    return make_hf_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """One default tiny Llama folder (with tokenizer) shared by the whole session."""
    return make_hf_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    One pytest process (or each of `-n 2`'s two) runs many modules; without this, every module's executables
    (several real-model programs among them) stay resident to the end, and a late XLA compilation crashed the
    process once.
    """
    yield
    jax.clear_caches()
    gc.collect()


def pytest_unconfigure(config):
    if _OWN_XLA_CACHE:
        import shutil

        shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when JAX sees only a CPU; leave out the notebook runs unless `-m` names them.

    Executing every notebook takes tens of minutes on a 2-core CPU, so the default run (the README's
    command) does not; `.ci/run` runs them in a second step with `-m notebook`.
    """
    if "notebook" not in (config.option.markexpr or ""):
        kept = [item for item in items if "notebook" not in item.keywords]
        config.hook.pytest_deselected(items=[item for item in items if "notebook" in item.keywords])
        items[:] = kept
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU or TPU; JAX sees only a CPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
