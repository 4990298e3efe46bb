"""The `makemost` command: one JSON object with --json, one `error:` line and status 2 on bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import makemost_jax as mm
from makemost_jax.assets import read_sample
from makemost_jax.cli import main
from makemost_jax.decoding import generate_text
from makemost_jax.perplexity import perplexity_of_text

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    """(exit status, stdout, stderr) of `makemost argv`, run in this process."""
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def one_json(stdout: str) -> dict:
    """The stdout must be exactly one JSON object (and a newline)."""
    assert stdout.endswith("\n") and stdout.count("\n") == 1, stdout
    obj = json.loads(stdout)
    assert isinstance(obj, dict)
    return obj


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "austen.txt"
    path.write_text(read_sample("austen")[:1500], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corrupt_dir(tiny_gpt2_dir, tmp_path_factory):
    """A checkpoint folder whose model.safetensors is cut in half."""
    folder = tmp_path_factory.mktemp("corrupt") / "gpt2"
    shutil.copytree(tiny_gpt2_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(scope="module")
def mismatched_dir(tiny_gpt2_dir, tmp_path_factory):
    """A checkpoint folder whose config.json claims one layer more than its weights hold."""
    folder = tmp_path_factory.mktemp("mismatched") / "gpt2"
    shutil.copytree(tiny_gpt2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------- --json output


def test_info_json(capsys, tiny_gpt2_dir):
    status, out, err = run(capsys, "info", tiny_gpt2_dir, "--json")
    assert status == 0, err
    info = one_json(out)
    assert info["command"] == "info"
    assert (info["family"], info["n_layers"], info["d_model"], info["vocab_size"]) == ("gpt2", 2, 32, 101)
    assert info["max_positions"] == 64 and info["dtype"] == "float32"


def test_info_table(capsys, tiny_llama_dir):
    status, out, _ = run(capsys, "info", tiny_llama_dir)
    assert status == 0
    assert "n_kv_heads" in out and "llama" in out
    assert not out.lstrip().startswith("{")


def test_ppl_json_matches_library(capsys, tiny_gpt2_dir, text_file):
    status, out, err = run(capsys, "ppl", tiny_gpt2_dir, text_file, "--context", 32, "--stride", 16,
                           "--batch-size", 3, "--json")
    assert status == 0, err
    report = one_json(out)
    params, tok = mm.load(str(tiny_gpt2_dir)), mm.load_tokenizer(str(tiny_gpt2_dir))
    direct = perplexity_of_text(params, tok, text_file.read_text(encoding="utf-8"), context=32, stride=16,
                                batch_size=3, progress=False)
    assert (report["context"], report["stride"], report["batch_size"]) == (32, 16, 3)
    assert report["n_tokens"] == direct.n_tokens and report["n_words"] == direct.n_words
    assert report["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
    assert report["word_ppl"] == pytest.approx(math.exp(report["nll_sum"] / report["n_words"]))
    assert report["seconds"] > 0 and report["load_seconds"] > 0


def test_ppl_table_and_bfloat16(capsys, tiny_llama_dir, text_file):
    status, out, err = run(capsys, "ppl", tiny_llama_dir, text_file, "--dtype", "bfloat16")
    assert status == 0, err
    assert "ppl per token" in out and "ppl per word" in out


def test_generate_json_is_deterministic_when_greedy(capsys, tiny_llama_dir):
    argv = ("generate", tiny_llama_dir, "Sir Walter", "Anne Elliot was", "--max-new-tokens", 5, "--json")
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    report = one_json(out)
    assert [g["prompt"] for g in report["generations"]] == ["Sir Walter", "Anne Elliot was"]
    assert all(1 <= g["n_new_tokens"] <= 5 for g in report["generations"])
    assert report["temperature"] == 0.0 and report["max_new_tokens"] == 5
    direct = generate_text(mm.load(str(tiny_llama_dir)), mm.load_tokenizer(str(tiny_llama_dir)),
                           ["Sir Walter", "Anne Elliot was"], max_new_tokens=5)
    assert [g["completion"] for g in report["generations"]] == [g["completion"] for g in direct]


def test_module_entry_point_prints_one_json_object(tiny_gpt2_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "makemost_jax.cli", "info", str(tiny_gpt2_dir), "--json"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert one_json(proc.stdout)["n_layers"] == 2


# ---------------------------------------------------------------- errors


@pytest.fixture
def empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    return path


@pytest.mark.parametrize("case", [
    "unknown model", "missing file", "empty file", "folder as file", "not utf-8", "stride 0",
    "stride > context", "context too large", "corrupted checkpoint", "corrupted checkpoint info",
    "bad top-p", "bad max-new-tokens", "prompt too long", "mismatched checkpoint",
    "distributed, no cluster", "distributed, no coordinator",
])
def test_errors_are_one_line_and_status_2(capsys, case, tiny_gpt2_dir, text_file, empty_file,
                                          corrupt_dir, mismatched_dir, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    argv, words = {
        "unknown model": (("info", "no-such-model-anywhere", "--json"), "no-such-model-anywhere"),
        "missing file": (("ppl", tiny_gpt2_dir, tmp_path / "missing.txt", "--json"), "missing.txt"),
        "empty file": (("ppl", tiny_gpt2_dir, empty_file), "shorter than 2 tokens"),
        "folder as file": (("ppl", tiny_gpt2_dir, tmp_path), "folder"),
        "not utf-8": (("ppl", tiny_gpt2_dir, latin1), "UTF-8"),
        "stride 0": (("ppl", tiny_gpt2_dir, text_file, "--stride", 0, "--json"), "stride=0"),
        "stride > context": (("ppl", tiny_gpt2_dir, text_file, "--context", 8, "--stride", 9), "stride=9"),
        "context too large": (("ppl", tiny_gpt2_dir, text_file, "--context", 65), "max_positions=64"),
        "corrupted checkpoint": (("ppl", corrupt_dir, text_file, "--json"), "model.safetensors"),
        "corrupted checkpoint info": (("info", corrupt_dir), "model.safetensors"),
        "bad top-p": (("generate", tiny_gpt2_dir, "Sir", "--top-p", 0), "top_p"),
        "bad max-new-tokens": (("generate", tiny_gpt2_dir, "Sir", "--max-new-tokens", 0), "max_new_tokens"),
        "prompt too long": (("generate", tiny_gpt2_dir, "Sir Walter " * 40, "--max-new-tokens", 8), "context"),
        "mismatched checkpoint": (("info", mismatched_dir), "h.2.ln_1.weight"),
        "distributed, no cluster": (("info", tiny_gpt2_dir, "--distributed"), "could not join"),
        "distributed, no coordinator": (("info", tiny_gpt2_dir, "--distributed", "--num-processes", 2),
                                        "coordinator"),
    }[case]
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    assert words in err


def test_error_in_a_real_process_has_no_traceback(text_file):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "makemost_jax.cli", "ppl", "/no/such/model", str(text_file)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


# ---------------------------------------------------------------- the README's promise


@pytest.mark.slow
def test_demo_json_on_the_real_model(capsys):
    status, out, err = run(capsys, "demo", "--json")
    assert status == 0, err
    report = one_json(out)
    assert report["model"]["n_layers"] == 30 and report["model"]["d_model"] == 576
    for name in ("austen", "wiki"):
        scores = report["perplexity"][name]
        assert scores["n_tokens"] > 2000
        assert 3 < scores["ppl"] < 60  # real English under a real model
        assert scores["word_ppl"] > scores["ppl"]
    greedy = [g for g in report["generations"] if g["mode"] == "greedy"]
    assert "Paris" in greedy[0]["completion"]
    assert report["total_seconds"] < 120
