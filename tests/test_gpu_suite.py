"""The GPU suite (benchmarks/gpu/run_all.sh): `--smoke` end to end on any machine, its summary's schema,
failure handling, and the full (GPU) settings accepted by every step (`--dry-run`).

The smoke run's tiny shapes make its speed ratios meaningless; the test checks that every
step ran, that every method has a row with positive JAX and reference times and a ratio that
is their quotient, and that the outputs agree where the suite measures agreement.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "benchmarks" / "gpu" / "run_all.sh"
STEPS = ["forward", "greedy", "beam", "exact", "hso", "recurrence", "nar", "train"]
METHODS = ["forward", "greedy", "beam", "cbs", "exact", "hso", "recurrence", "nar", "train"]
ROW_KEYS = {"method", "step", "setting", "unit", "jax_s", "reference", "reference_s", "torch_s", "ratio", "mfu_jax",
            "mfu_reference", "extra", "status"}
NOT_PYTORCH = {"recurrence", "nar"}  # references that are our own (no PyTorch implementation exists)


def run_all(*args, extra_env=None, timeout=420):
    env = dict(os.environ)
    # conftest's eight simulated CPU devices are for the sharding tests, not for these processes
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env.update(extra_env or {})
    return subprocess.run(["bash", str(RUN_ALL), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "out"
    proc = run_all("--smoke", "--out", out)
    return proc, out


def test_smoke_runs_every_step_and_every_method_has_positive_times(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"schema", "suite", "mode", "dtype", "machine", "date", "budget_s", "wall_s", "steps", "failed",
            "methods"} <= set(summary)
    assert summary["schema"] == 1 and summary["mode"] == "smoke" and summary["failed"] == []
    assert summary["machine"]["jax_backend"] in ("cpu", "gpu") and summary["machine"]["cpu_count"] >= 1
    assert [s["step"] for s in summary["steps"]] == STEPS
    for s in summary["steps"]:
        assert s["status"] == "ok" and s["exit_code"] == 0 and 0 < s["seconds"] <= s["budget_s"] + 5
        assert s["results"] == f"suite_{s['step']}.json"
    assert summary["budget_s"] <= 470 and 0 < summary["wall_s"] <= summary["budget_s"]

    rows = summary["methods"]
    assert sorted({r["method"] for r in rows}) == sorted(METHODS)
    for r in rows:
        assert set(r) == ROW_KEYS, r
        assert r["status"] == "ok" and r["setting"] and r["unit"] and r["reference"]
        assert r["jax_s"] > 0 and r["reference_s"] > 0
        assert r["ratio"] == pytest.approx(r["reference_s"] / r["jax_s"])
        assert r["torch_s"] == (None if r["method"] in NOT_PYTORCH else r["reference_s"])
        if summary["machine"]["jax_backend"] == "cpu":
            assert r["mfu_jax"] is None and r["mfu_reference"] is None  # no MFU without a measured GPU peak

    by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    assert [len(by[m]) for m in ("forward", "exact", "hso", "nar")] == [2, 2, 2, 2]
    assert all(r["extra"]["max_abs_logit_diff"] < 1e-3 for r in by["forward"])  # float32 on the CPU
    assert by["greedy"][0]["extra"]["same_sequences_fraction"] == 1.0
    assert by["beam"][0]["extra"]["same_sequences_fraction"] == 1.0
    assert by["beam"][0]["extra"]["compiles_during_repeats"] == 0
    assert by["cbs"][0]["extra"]["cbs_all_finished"] is True
    assert all(r["extra"]["max_segment_nll_diff"] < 1e-2 for r in by["hso"])  # nats per segment, vs PyTorch
    assert by["exact"][0]["extra"]["nodes_per_s"] > 0 and by["exact"][0]["extra"]["jax_decode_rows_per_s"] > 0
    assert all(r["extra"]["nar_tokens"] > 0 and r["extra"]["ar_tokens"] > 0 for r in by["nar"])

    table = (out / "summary.md").read_text()
    assert table.startswith("# GPU suite summary (smoke") and "All steps passed." in table
    for title in ("forward (scoring)", "greedy decode", "beam search", "CBS", "exact search", "HSO loop",
                  "recurrence training step", "NAR decoding", "training step"):
        assert f"| {title} |" in table
    assert "=== train" in (out / "run_all.log").read_text()


def test_smoke_step_files_carry_report_rows_for_makemost_report(smoke):
    from makemost_jax.report import collect_rows

    _, out = smoke
    for step in STEPS:
        payload = json.loads((out / f"suite_{step}.json").read_text())
        assert payload["complete"] is True and payload["step"] == step and payload["report"]
        assert (out / f"suite_{step}.md").read_text().startswith(f"# GPU suite, step {step}")
    rows = collect_rows(out)  # what `makemost report` reads (summary.json has no report rows: no duplicates)
    areas = {r.area for r in rows}
    assert {"Models", "Beam search", "CBS", "Exact search", "HSO", "Recurrence", "NAR", "Training"} <= areas
    assert all(r.result.startswith("GPU suite: ") and r.source.startswith("suite_") for r in rows)


def test_a_failed_step_does_not_stop_the_others_and_the_exit_status_says_so(tmp_path):
    out = tmp_path / "out"
    proc = run_all("--smoke", "--only", "nar,greedy", "--out", out,
                   extra_env={"MAKEMOST_SUITE_FAIL_STEPS": "greedy"})  # greedy fails at once; nar still runs
    assert proc.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["greedy"]
    assert {s["step"]: s["status"] for s in summary["steps"]} == {"greedy": "failed", "nar": "ok"}
    greedy = [r for r in summary["methods"] if r["method"] == "greedy"]
    assert greedy == [{**greedy[0], "status": "failed", "jax_s": None, "ratio": None}]
    assert all(r["status"] == "ok" and r["jax_s"] > 0 for r in summary["methods"] if r["method"] == "nar")
    assert "Failed steps: greedy" in (out / "summary.md").read_text()
    assert "failure injected" in (out / "run_all.log").read_text()


def test_full_gpu_settings_parse_and_fit_eight_minutes(tmp_path):
    assert subprocess.run(["bash", "-n", str(RUN_ALL)], check=False).returncode == 0
    proc = run_all("--dry-run", "--out", tmp_path / "dry", timeout=120)
    assert proc.returncode == 0, proc.stderr
    plans = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [p["step"] for p in plans] == STEPS and all(p["mode"] == "full" for p in plans)
    commands = [line for line in proc.stdout.splitlines() if line.startswith("timeout")]
    budgets = [int(line.split()[2]) for line in commands]
    assert len(commands) == len(STEPS) and sum(budgets) <= 470  # + start-up and summary: <= 8 minutes
    settings = {p["step"]: p["settings"] for p in plans}
    assert (settings["beam"]["batch"], settings["beam"]["beams"], settings["beam"]["new_tokens"]) == (8, 8, 64)
    assert (settings["forward"]["batch"], settings["forward"]["length"]) == (16, 1024)
    assert (settings["train"]["batch"], settings["train"]["length"]) == (16, 1024)
    assert not list((tmp_path / "dry").glob("*.json"))  # a dry run writes nothing


def test_smoke_refuses_to_write_into_the_recorded_results():
    proc = run_all("--smoke", "--out", ROOT / "benchmarks" / "results" / "gpu", timeout=30)
    assert proc.returncode == 2 and "must not write under benchmarks/results" in proc.stderr
