"""benchmarks/nar_distill_experiment.py --quick end to end: the protocol's bookkeeping and the results files.

The quick sizes (a few training steps) are far too small for the BLEU values to mean anything; the test
checks that every choice (the teacher's length penalty, each student's decoding setting at each budget)
is the argmax of the dev scores, that test BLEU is read at that choice, that the students share one
source subset and one budget, and that the JSON, Markdown, plot and report rows are all written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_quick

pytestmark = pytest.mark.slow  # trains MiniLM-sized models (about 5 minutes on one core)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("nar_distill")
    return run_quick("nar_distill_experiment", "nar_distill", out, timeout=900)[1], out


def test_quick_run_writes_every_file(quick):
    payload, out = quick
    assert {"machine", "command", "sizes", "budget", "copy_bleu", "splits", "teacher", "distillation", "students",
            "speed", "verdict", "report", "plot"} <= set(payload)
    assert (out / "nar_distill_quick.md").read_text().startswith("# NAR with sequence-level distillation")
    assert (out / "nar_distill_quick.png").stat().st_size > 0
    assert payload["report"] and all(set(r) == {"area", "result", "value"} and r["area"] == "NAR"
                                     for r in payload["report"])
    seconds = payload["budget"]["seconds"]
    assert seconds["total"] >= sum(v for k, v in seconds.items() if k != "total") * 0.99
    assert {"teacher training", "distillation (beam search)", "mlm_distilled training", "speed"} <= set(seconds)
    verdict = payload["verdict"]
    assert len(verdict["text"]) == 5
    best = payload["students"]["mlm_distilled"]["budgets"][-1]
    assert verdict["nar_beats_copying"] == (best["test_bleu"] > payload["copy_bleu"]["test"])


def test_every_choice_is_the_dev_argmax(quick):
    from nar_distill_experiment import decode_grid

    payload, _ = quick
    sizes, teacher = payload["sizes"], payload["teacher"]
    penalties = [float(lp) for lp in sizes["length_penalties"]]
    assert teacher["chosen_on"] == "dev"
    assert teacher["length_penalty"] == max(penalties, key=lambda lp: teacher["beam"][str(lp)]["dev"])
    assert teacher["beam_test"] == teacher["beam"][str(teacher["length_penalty"])]["test"]
    grid = [list(sc) for sc in decode_grid(sizes)]
    assert sorted(map(tuple, grid)) == sorted((s, c) for s in sizes["decode_steps"]
                                              for c in sizes["length_candidates"])
    for name, row in payload["students"].items():
        for scored in row["budgets"]:
            assert scored["chosen_on"] == "dev"
            assert [[d["steps"], d["length_candidates"]] for d in scored["dev"]] == grid  # cheapest first
            first_best = max(scored["dev"], key=lambda d: d["bleu"])  # the first of equal scores: the cheapest
            assert scored["chosen"] == {"steps": first_best["steps"],
                                        "length_candidates": first_best["length_candidates"]}, name
            assert scored["dev_bleu"] == first_best["bleu"]
            assert set(scored["test_bleu_by_steps"]) == {str(s) for s in sizes["decode_steps"]}
            assert scored["test_bleu"] == scored["test_bleu_by_steps"][str(scored["chosen"]["steps"])]
            assert all(0 <= v <= 1 for k, v in scored["length_head"].items() if k.startswith("dev_exact"))


def test_students_share_sources_budget_and_splits(quick):
    payload, _ = quick
    sizes, budget, dist = payload["sizes"], payload["budget"], payload["distillation"]
    steps = sizes["student_steps"]
    assert budget["budgets"] == [steps // 4, steps // 2, steps]
    students = payload["students"]
    assert [b["step"] for b in students["mlm_distilled"]["budgets"]] == budget["budgets"]
    assert [b["step"] for b in students["random_distilled"]["budgets"]] == budget["budgets"]
    assert [b["step"] for b in students["mlm_raw"]["budgets"]] == [steps]
    assert [students[n]["targets"] for n in ("mlm_distilled", "random_distilled", "mlm_raw")] == \
        ["distilled", "distilled", "raw"]
    assert dist["kept"] + dist["dropped_empty"] == dist["requested"] == sizes["distill_pairs"]
    assert students["mlm_raw"]["pairs"] == dist["requested"]  # every subset source, with its reference
    assert students["mlm_distilled"]["pairs"] == students["random_distilled"]["pairs"] == dist["kept"]
    indices = dist["source_indices"]
    assert len(indices) == dist["kept"] and indices == sorted(set(indices))
    assert 0 <= indices[0] and indices[-1] < budget["train_lines"]  # lines of the training file
    splits = payload["splits"]
    assert splits["dev"]["file"].endswith("valid.jsonl") and splits["test"]["file"].endswith("test.jsonl")
    assert len(splits["dev"]["ids"]) == sizes["n_dev"] and len(splits["test"]["ids"]) == sizes["n_test"]
    speed = payload["speed"]
    assert sorted({r["batch"] for r in speed}) == [1, sizes["decode_batch"]]
    for batch in (1, sizes["decode_batch"]):
        rows = [r for r in speed if r["batch"] == batch]
        assert len(rows) == 3 and sum(r["decoder"].startswith("NAR") for r in rows) == 1
        assert next(r for r in rows if r["decoder"] == "AR greedy")["x_ar_greedy_tokens_per_s"] == 1.0


def test_a_second_run_resumes_from_the_saved_units(quick):
    payload, out = quick
    units = out / "nar_distill_quick_units"
    assert sorted(p.stem for p in units.glob("*.json")) == sorted(
        ["teacher", "mlm_distilled", "random_distilled", "mlm_raw", "speed"])
    assert not list(units.glob("*.claim")) and (units / ".gitignore").read_text().startswith("*_params/")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nar_distill_experiment.py"), "--quick",
                           "--out-dir", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done earlier") == 5 and "test BLEU by budget" not in proc.stdout
    again = json.loads((out / "nar_distill_quick.json").read_text())
    assert again["students"] == payload["students"] and again["speed"] == payload["speed"]
