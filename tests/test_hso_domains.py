"""benchmarks/hso_domains.py: the quick run end to end (real model, bundled texts, results in a temp folder),
and the texts of every domain, quick and (where the data kit is present) full, long enough and distinct.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from conftest import run_quick

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "hso_domains.py"
DATA = ROOT.parent / "shared" / "data"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Run the script with --quick into a temp folder; (stdout, JSON payload, folder)."""
    out = tmp_path_factory.mktemp("hso_domains")
    stdout, payload = run_quick("hso_domains", "hso_domains", out)
    return stdout, payload, out


@pytest.fixture(scope="module")
def script():
    """The script as a module (for its text loaders)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import hso_domains

    return hso_domains


def positive(x) -> bool:
    """A finite number above zero."""
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_every_number(quick):
    """Files in the temp folder, every number finite and positive, FLOPs ordered, lr chosen, setting recommended."""
    stdout, payload, out = quick
    for ext in ("json", "md", "png"):
        assert (out / f"hso_domains_quick.{ext}").stat().st_size > 0
    assert not (ROOT / "benchmarks" / "results" / "hso_domains_quick.json").exists()
    assert {"machine", "command", "protocol", "flops_per_token", "domains", "recommended", "report"} <= set(payload)
    p = payload["protocol"]
    assert p["sinks"] == [0, 4] and list(payload["domains"]) == p["domains"] == ["austen", "python"]

    flops = payload["flops_per_token"]["sinks"]
    for sink in ("0", "4"):
        f = flops[sink]
        assert all(positive(f[k]) for k in ("hso", "lr0", "sliding_same_context", "sliding_equal"))
        assert f["lr0"] < f["hso"] <= f["sliding_equal"]  # the gradient costs; the window gets at least as much
        assert 1 <= f["equal_stride"] <= p["segment"] + p["cache"]

    for name, domain in payload["domains"].items():
        assert set(domain["sinks"]) == {"0", "4"}
        for sink, s in domain["sinks"].items():
            assert s["lr"] in p["lrs"] and [d["lr"] for d in s["dev"]] == p["lrs"]
            runs = [s["hso"], s["lr0"], s["sliding_same_context"], s["sliding_equal_flops"], *s["dev"]]
            assert all(positive(r["ppl"]) and positive(r["mean_nll"]) for r in runs), (name, sink)
            assert s["hso"]["n_tokens"] == s["lr0"]["n_tokens"] == s["sliding_equal_flops"]["n_tokens"] \
                == p["test_tokens"] - 1
            assert s["sliding_equal_flops"]["stride"] == flops[sink]["equal_stride"]
            assert s["gain_vs_lr0"] == pytest.approx(s["lr0"]["mean_nll"] - s["hso"]["mean_nll"])

    rec = payload["recommended"]
    assert rec["sink"] in (0, 4) and rec["lr"] in p["lrs"] and positive(rec["dev_mean_nll"])
    assert len(rec["all"]) == 2 * len(p["lrs"])
    assert [r["area"] for r in payload["report"]] == ["HSO", "HSO"]
    assert f"recommended (lowest dev NLL averaged over domains): sink {rec['sink']}" in stdout


def test_quick_texts_are_distinct_and_long_enough(script):
    """All four quick domains (the run uses two) have 257 tokens and different dev and test texts."""
    import makemost_jax as mm

    tok = mm.load_tokenizer()
    for name, (dev, test) in script.domain_texts(True, DATA).items():
        dev_ids = script.first_tokens(tok, dev, 257)
        assert len(dev_ids) == 257 and dev[:200] != test[:200], name


@pytest.mark.skipif(not DATA.is_dir(), reason="the offline data kit is not here")
def test_full_texts_are_distinct_and_long_enough(script):
    """The data kit's texts give the full run's dev and test lengths, and differ."""
    import makemost_jax as mm

    tok = mm.load_tokenizer()
    for name, (dev, test) in script.domain_texts(False, DATA).items():
        assert len(script.first_tokens(tok, dev, script.FULL["dev_tokens"])) == script.FULL["dev_tokens"]
        assert len(script.first_tokens(tok, test, script.FULL["test_tokens"])) == script.FULL["test_tokens"]
        assert dev[:200] != test[:200], name
