"""benchmarks/cbs_experiment.py --quick end to end: judge, heads, five searches, results files.

The quick sizes are too small for the success rates to mean anything; the test checks what must
hold at any size: every method's per-prompt bookkeeping, that the searches that filter by the
judge return only outputs it accepts, that reranking beam search's outputs never does worse than
its best output, and that the paired differences are the per-prompt ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_quick

pytestmark = pytest.mark.slow  # loads the real model and MiniLM

METHODS = ["beam", "beam + rerank", "beam + filter", "FUDGE", "CBS"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("cbs")
    return run_quick("cbs_experiment", "cbs_experiment", out)[1], out


def test_quick_run_writes_every_file_and_field(quick):
    payload, out = quick
    assert {"machine", "command", "sizes", "judge", "results", "report", "seconds"} <= set(payload)
    assert 0.5 < payload["judge"]["test_accuracy"] <= 1  # better than chance on held-out sentences
    assert payload["judge"]["l2"] in {float(k) for k in payload["judge"]["dev_accuracy"]}
    assert set(payload["results"]) == {"positive", "ends-in-window"}
    m, n = payload["sizes"]["window"]
    assert payload["results"]["ends-in-window"]["attribute"] == f"min-length:{m}+max-length:{m + n}"
    for r in payload["results"].values():
        assert list(r["methods"]) == METHODS
        for row in r["methods"].values():
            assert len(row["per_prompt_success"]) == r["eval_prompts"]
            assert 0 <= row["success"] <= row["found"] <= 1
    assert (out / "cbs_experiment_quick.md").read_text().startswith("# CBS where the classifier matters")
    assert (out / "cbs_experiment_quick.png").stat().st_size > 0


def test_judged_searches_return_only_accepted_outputs_and_pairs_are_per_prompt(quick):
    payload, _ = quick
    for r in payload["results"].values():
        rows = r["methods"]
        success = {name: np.array(row["per_prompt_success"]) for name, row in rows.items()}
        for name in ("beam + rerank", "beam + filter", "CBS"):
            assert rows[name]["success"] == rows[name]["found"], name  # whatever they return, the judge accepts
        assert np.all(success["beam + rerank"] >= success["beam"])  # beam's best is among the reranked
        for name in METHODS[:-1]:
            diff = rows[name]["cbs_minus_this"]
            assert diff["mean"] == pytest.approx(np.mean(success["CBS"].astype(float) - success[name]))
            assert diff["low"] <= diff["mean"] <= diff["high"]
