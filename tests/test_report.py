"""`makemost report`: the results table is rebuilt from the scripts' JSON files, with plots, commands and machines."""

from __future__ import annotations

import json

from test_cli import REPO, one_json, run

from makemost_jax.report import collect_rows


def write(folder, stem, payload):
    (folder / f"{stem}.json").write_text(json.dumps(payload))


def test_report_gathers_rows_in_area_order_with_plots(capsys, tmp_path):
    results = tmp_path / "results"
    (results / "gpu").mkdir(parents=True)
    write(results, "b", {"command": "python benchmarks/b.py", "machine": {"cpu": "EPYC", "cpu_count": 2,
                                                                         "date": "2026-11-20T09:00:00"},
                         "report": [{"area": "Recurrence", "result": "ppl | W=16", "value": "204.9"}]})
    write(results / "gpu", "a", {"command": "python benchmarks/a.py --gpu", "machine": {"gpu": "NVIDIA H200"},
                                 "report": [{"area": "HSO", "result": "speed", "value": "2.5x"},
                                            {"area": "HSO", "result": "memory", "value": "979 MiB"}]})
    write(results, "raw", {"rows": [1, 2, 3]})  # no report rows: not in the table
    (results / "b.png").write_bytes(b"\x89PNG")
    (results / "orphan.png").write_bytes(b"\x89PNG")  # no JSON beside it: not a script's plot
    out = tmp_path / "docs" / "RESULTS.md"

    status, stdout, _ = run(capsys, "report", "--results", results, "--out", out, "--json")
    assert status == 0
    report = one_json(stdout)
    assert [(r["area"], r["result"]) for r in report["rows"]] == [("HSO", "speed"), ("HSO", "memory"),
                                                                  ("Recurrence", "ppl | W=16")]
    text = out.read_text()
    assert "| HSO | speed | 2.5x | `python benchmarks/a.py --gpu` | NVIDIA H200 |" in text
    assert "| Recurrence | ppl \\| W=16 | 204.9 | `python benchmarks/b.py` | EPYC (2 cores) | 2026-11-20 |" in text
    assert "![b](../results/b.png)" in text and "orphan" not in text


def test_malformed_results_are_named(capsys, tmp_path):
    write(tmp_path, "bad", {"report": [{"area": "HSO", "value": "1"}]})
    status, _, stderr = run(capsys, "report", "--results", tmp_path, "--out", tmp_path / "R.md")
    assert status == 2 and "bad.json" in stderr and "area, result and value" in stderr
    (tmp_path / "bad.json").write_text("{not json")
    status, _, stderr = run(capsys, "report", "--results", tmp_path, "--out", tmp_path / "R.md")
    assert status == 2 and "bad.json" in stderr and "rerun" in stderr
    status, _, stderr = run(capsys, "report", "--results", tmp_path / "missing", "--out", tmp_path / "R.md")
    assert status == 2 and "does not exist" in stderr


def test_committed_results_table_is_current():
    """docs/RESULTS.md is what `makemost report` makes of the committed results files."""
    rows = collect_rows(REPO / "benchmarks" / "results")
    text = (REPO / "docs" / "RESULTS.md").read_text()
    assert len(rows) >= 40
    for r in rows:
        assert r.value.replace("|", "\\|") in text
