"""benchmarks/hso_fewshot_experiment.py --quick end to end: dev selection, test draws, results files.

The quick sizes are too small for the accuracies to mean anything; the test checks the protocol's
bookkeeping: dev, test and demonstration pool are disjoint, the chosen settings come from the dev
grid, the paired intervals are computed from the per-draw accuracies, and every file is written.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_quick

pytestmark = pytest.mark.slow  # loads the real model



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("hso_fewshot")
    return run_quick("hso_fewshot_experiment", "hso_fewshot", out)[1], out


def test_quick_run_keeps_dev_test_and_demonstrations_apart(quick):
    payload, out = quick
    assert {"machine", "command", "sizes", "results", "report", "seconds"} <= set(payload)
    dev, test = set(payload["dev_ids"]), set(payload["test_ids"])
    assert len(dev) == payload["n_dev"] and len(test) == payload["n_test"]
    for r in payload["results"]:
        demos = {i for draw in r["draws"] for i in draw}
        assert not demos & dev, "a dev sentence was used as a demonstration"
        assert len(r["draws"]) == payload["sizes"]["draws"] and all(len(d) == r["k"] for d in r["draws"])
    assert (out / "hso_fewshot_quick.md").read_text().startswith("# HSO few-shot")
    assert (out / "hso_fewshot_quick.png").stat().st_size > 0


def test_quick_run_chooses_on_dev_and_pairs_the_draws(quick):
    payload, _ = quick
    for r in payload["results"]:
        for name in ("hso", "calibrated_hso"):
            chosen = [d for d in r["dev"] if all(d[key] == value for key, value in r["chosen"][name].items())]
            assert len(chosen) == 1 and chosen[0][name] == max(d[name] for d in r["dev"])
        for key, a, b in (("hso_minus_plain", "hso", "plain"),
                          ("calibrated_hso_minus_calibrated", "calibrated_hso", "calibrated")):
            diffs = np.subtract(r["accuracy"][a], r["accuracy"][b])
            np.testing.assert_allclose(r[key]["per_draw"], diffs)
            assert r[key]["low"] <= r[key]["mean"] <= r[key]["high"]
            assert all(0 <= x <= 1 for x in r["accuracy"][a])
