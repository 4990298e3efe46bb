"""benchmarks/bench_load.py --quick end to end: the checkpoint writer, every loader in its own
subprocess (the old-commit worktree only where this clone has that commit), the results files.

The tiny checkpoint's memory ratios mean nothing (fixed overheads dominate), so the test checks
the schema, that every measured number is positive, that the loaders read the same weights
(float64 sums agree), and the accounting the two-process run reports: each process's share is
half of the checkpoint's fsdp-split tensors and its bytes read match its share.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import makemost_jax as mm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_load.py"
NUMBERS = ("wall_s", "peak_above_baseline_bytes", "baseline_rss_bytes", "share_bytes", "device_bytes",
           "peak_over_checkpoint")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_load")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dir", str(tmp / "ckpt"),
                           "--out-dir", str(tmp / "results")],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp / "results" / "load_cpu_quick.json").read_text())
    return proc.stdout, payload, tmp / "results"


def test_quick_run_writes_results_with_positive_numbers(quick):
    stdout, payload, results = quick
    assert {"machine", "command", "checkpoint", "mesh", "repeats", "targets", "results", "weights_sum",
            "skipped", "report"} <= set(payload)
    assert payload["repeats"] == 1 and payload["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    ckpt = payload["checkpoint"]
    assert ckpt["n_files"] >= 2 and 2e6 < ckpt["tensor_bytes"] <= ckpt["file_bytes"] < 3e7
    assert (results / "load_cpu_quick.md").read_text().startswith("# Loading")

    measured = {r["loader"] for r in payload["results"] if not r.get("skipped")}
    assert {"transformers", "transformers_touched"} <= measured
    if "mesh" in inspect.signature(mm.load).parameters:  # the new loader is here: it must be measured
        assert {"new_mesh", "new_single", "two_process"} <= measured
    for name, why in payload["skipped"].items():
        assert why and name in stdout and "SKIPPED" in stdout  # said so in the output
    if "old" in payload["skipped"]:
        assert "worktree" in payload["skipped"]["old"]

    for row in payload["results"]:
        if row.get("skipped"):
            continue
        for key in NUMBERS:
            assert row[key] > 0, (row["loader"], key, row[key])
        assert row["repeats"] == 1 and len(row["wall_s_all"]) == 1
        assert row["dtypes"] in (["bfloat16"], ["torch.bfloat16"])  # bf16 kept, or cast to bf16 (old path)
        assert row["rss_trace_mib"] and all(mib > 0 for _, mib in row["rss_trace_mib"])
        if not row["loader"].startswith("transformers"):
            assert row["rchar_bytes"] > 0  # read()/pread(); transformers maps the files instead
        if row["loader"] == "old":
            assert not row["makemost_jax_file"].startswith(str(ROOT))  # the old commit's worktree, not today's code
        elif not row["loader"].startswith("transformers"):
            assert row["makemost_jax_file"].startswith(str(ROOT))

    # every loader read the same weights
    sums = payload["weights_sum"]
    assert len(sums) == len(measured - {"transformers_touched"}) and all(payload["weights_sum_agree"].values()), sums

    # the ratios come last
    assert stdout.rstrip().splitlines()[-1].startswith("wall time new (mesh) / ")


def test_two_process_accounting(quick):
    _, payload, _ = quick
    rows = [r for r in payload["results"] if r["loader"] == "two_process" and not r.get("skipped")]
    if not rows:
        pytest.skip("the new loader (mm.load(..., mesh=...)) is not here")
    ckpt = payload["checkpoint"]["tensor_bytes"]
    assert [r["process_id"] for r in rows] == [0, 1]
    for r in rows:
        # half of every fsdp-split tensor, plus the small replicated norms once
        assert 0.45 * ckpt < r["share_bytes"] < 0.6 * ckpt
        assert r["bytes_read"] > 0 and r["read_over_share"] == pytest.approx(1.0, abs=0.1)
        assert r["peak_over_share"] > 0 and isinstance(r["target_peak_met"], bool)
