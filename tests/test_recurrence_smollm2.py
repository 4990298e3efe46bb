"""benchmarks/recurrence_smollm2.py --quick end to end: units, resumption, costs, results files.

The quick run uses a tiny random Llama with the real tokenizer, so its perplexities mean nothing; the test
checks what must hold at any size: every method scores the same tokens, the costs are ordered as the methods
dictate (a sliding window at stride W/k costs k times a disjoint window; training the LM needs more memory
than training the module alone), each training ran its steps, and a second run finds every unit saved.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_quick

METHODS = {"full context", "disjoint", "sliding W/2", "sliding W/4", "recurrence, LM frozen",
           "recurrence + LM finetuned", "LM finetuned, disjoint", "frozen-LM module, memory reset each window",
           "disjoint + BOS sink"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("recurrence_smollm2")
    return run_quick("recurrence_smollm2", "recurrence_smollm2", out)[1], out


def test_every_method_scores_the_same_tokens_of_both_domains(quick):
    payload, out = quick
    rows = payload["rows"]
    assert {r["method"] for r in rows} == METHODS
    for domain in ("austen", "wiki"):
        mine = [r for r in rows if r["domain"] == domain]
        assert len(mine) == len(METHODS)
        assert len({r["n_tokens"] for r in mine}) == 1
        assert len({tuple(r["doc_tokens"]) for r in mine}) == 1
    assert len(payload["report"]) == 2  # one headline row per domain and window
    assert (out / "recurrence_smollm2_quick.md").read_text().startswith("# Recurrence on a pretrained LM")
    assert (out / "recurrence_smollm2_quick.png").stat().st_size > 0


def test_costs_follow_the_methods(quick):
    payload, _ = quick
    by = {r["method"]: r for r in payload["rows"] if r["domain"] == "austen"}
    disjoint = by["disjoint"]["flops_per_token"]
    assert by["sliding W/2"]["flops_per_token"] == pytest.approx(2 * disjoint)
    assert by["sliding W/4"]["flops_per_token"] == pytest.approx(4 * disjoint)
    assert by["recurrence, LM frozen"]["flops_per_token"] > disjoint  # the memory's keys, values and update
    reset = by["frozen-LM module, memory reset each window"]
    assert reset["training"] == by["recurrence, LM frozen"]["training"]  # the same module, scored without carry
    assert by["recurrence, LM frozen"]["train_peak_bytes"] < by["recurrence + LM finetuned"]["train_peak_bytes"]
    assert by["LM finetuned, disjoint"]["train_peak_bytes"] < by["recurrence + LM finetuned"]["train_peak_bytes"]
    steps = payload["settings"]["steps"]
    for method in ("recurrence, LM frozen", "recurrence + LM finetuned", "LM finetuned, disjoint"):
        assert len(by[method]["training"]["losses"]) == steps


def test_a_second_run_resumes_from_the_saved_units(quick):
    payload, out = quick
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recurrence_smollm2.py"), "--quick",
                           "--out-dir", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done earlier") == 6 and "\n  trained " not in proc.stdout
    again = json.loads((out / "recurrence_smollm2_quick.json").read_text())
    assert again["rows"] == payload["rows"]
