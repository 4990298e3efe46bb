"""HSO language modelling across domains, with and without attention sinks, against sliding windows at equal FLOPs.

Four domains: Jane Austen, Wikipedia, the King James Bible and Python source (files of the standard library
of the running interpreter). Each has a dev text and a different test text. Per domain and sink (0 or 4
never-evicted first tokens), the learning rate (hso_steps 1) is chosen by the dev perplexity; on the test
text the script reports HSO at that lr, the same loop at lr=0 and the same sink, the strided sliding window
with the same left context (context segment + cache, stride segment) and a sliding window at equal FLOPs
(the same context, the largest stride whose FLOPs per scored token are at least HSO's).
FLOPs come from XLA's cost analysis of the compiled programs (`recurrence.evaluate.compiled_stats`, which
counts the scanned layers one by one): one HSO segment step (gradient, Adam update, recompute, append) and
one sliding window, each divided by the tokens it scores.

Full mode reads the offline data kit (`--data`, default ../shared/data beside the repository): dev Emma and
test Persuasion (from the middle of each novel), wiki/valid.txt and wiki/test.txt, the KJV side of bible-kjv-web
valid.jsonl (Mark) and test.jsonl (Joshua, John), and fixed, different lists of stdlib modules. `--quick`
needs only the repository: the bundled Austen sample (dev and test from different parts) and the stdlib by
default (`--domains` adds the bundled Wikipedia sample and KJV verses), with tiny sizes and one lr.

Writes `<out-dir>/hso_domains.json`, `.md` and `.png` (`hso_domains_quick.*` with `--quick`); the JSON holds
every number, the chosen lrs, the FLOPs and "recommended": the (sink, lr) with the lowest dev NLL averaged
over the domains, the candidate library default.

Example:
    taskset -c 1 python benchmarks/hso_domains.py                  # ~20 min on one core
    python benchmarks/hso_domains.py --quick --out-dir /tmp/hso    # ~1.5 min
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import command_line, machine, machine_line, report_row, write_results

import makemost_jax as mm
from makemost_jax.assets import read_sample
from makemost_jax.data.pairs import asset_path, read_pairs
from makemost_jax.hso import HSOConfig, hso_nll, hso_segment_step, lm_segments
from makemost_jax.hso.lm import init_state
from makemost_jax.perplexity import _window_nll_sums, perplexity  # the unjitted window scorer, traced afresh
from makemost_jax.recurrence.evaluate import compiled_stats

SINKS = (0, 4)
LABELS = {"austen": "Austen", "wiki": "Wikipedia", "kjv": "KJV Bible", "python": "Python stdlib"}
FULL = {"domains": tuple(LABELS), "segment": 128, "cache": 384, "dev_tokens": 1025, "test_tokens": 3073,
        "lrs": (3e-3, 1e-2, 3e-2)}
QUICK = {"domains": ("austen", "python"), "segment": 32, "cache": 64, "dev_tokens": 129, "test_tokens": 129,
         "lrs": (1e-2,)}  # dev and test of one length: one compilation serves both
PYTHON_DEV = ("textwrap.py", "shlex.py")
PYTHON_TEST = ("argparse.py", "fractions.py")


def from_middle(text: str, fraction: float) -> str:
    """`text` from the first line start at or after `fraction` of its length (a fixed slice, no front matter)."""
    return text[text.find("\n", int(len(text) * fraction)) + 1:] if fraction else text


def kjv(path: str | Path) -> str:
    """The KJV side of a bible-kjv-web JSONL file, consecutive verses joined by spaces."""
    return " ".join(k for k, _ in read_pairs(str(path), "kjv", "web"))


def stdlib(names) -> str:
    """The source of the named standard-library modules, concatenated."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((folder / name).read_text(encoding="utf-8") for name in names)


def domain_texts(quick: bool, data: Path) -> dict[str, tuple[str, str]]:
    """name -> (dev text, test text): the data kit's splits, or with `quick` the bundled samples."""
    python = (from_middle(stdlib(PYTHON_DEV), 0.2), from_middle(stdlib(PYTHON_TEST), 0.2))
    if quick:
        return {"austen": (from_middle(read_sample("austen"), 0.1), from_middle(read_sample("austen"), 0.5)),
                "wiki": (from_middle(read_sample("wiki"), 0.1), from_middle(read_sample("wiki"), 0.5)),
                "kjv": (kjv(asset_path("bible_kjv_web_valid.jsonl")), kjv(asset_path("bible_kjv_web_test.jsonl"))),
                "python": python}
    austen = data / "austen"
    return {"austen": (from_middle((austen / "emma.txt").read_text(encoding="utf-8"), 0.5),
                       from_middle((austen / "persuasion.txt").read_text(encoding="utf-8"), 0.5)),
            "wiki": ((data / "wiki" / "valid.txt").read_text(encoding="utf-8"),
                     (data / "wiki" / "test.txt").read_text(encoding="utf-8")),
            "kjv": (kjv(data / "bible-kjv-web" / "valid.jsonl"), kjv(data / "bible-kjv-web" / "test.jsonl")),
            "python": python}


def first_tokens(tok, text: str, n: int) -> np.ndarray:
    """The first `n` model ids of `text`; an error if it is shorter."""
    ids = np.asarray(tok.encode_for_model(text), np.int32)
    if len(ids) < n:
        raise SystemExit(f"a text has {len(ids)} tokens, fewer than the {n} needed")
    return ids[:n]


def hso_flops_per_token(params, config: HSOConfig, update: bool) -> float:
    """FLOPs per scored token of one HSO segment step (lr=0 loop: `update=False`) on a batch of one text."""
    seg = jax.tree.map(lambda x: x[0], lm_segments(np.zeros((1, config.segment + 1), np.int32),
                                                   np.array([config.segment + 1]), config.segment))
    state = init_state(params, 1, config.cache_size, config.offsets, update)
    step = functools.partial(hso_segment_step, hso_steps=config.hso_steps, recompute=config.recompute,
                             sink=config.sink)
    return compiled_stats(step, params, state, seg, config.hyper(), memory=False)["flops"] / config.segment


def window_flops(params, context: int) -> float:
    """FLOPs of one sliding window of `context` tokens (it scores `stride` of them)."""
    window = np.zeros((1, context), np.int32)
    return compiled_stats(_window_nll_sums, params, window, window, np.ones((1, context), np.float32),
                          memory=False)["flops"]


def equal_flops_stride(per_window: float, hso_flops: float, context: int) -> int:
    """The largest stride <= context at which a window of `per_window` FLOPs costs at least `hso_flops` per token."""
    return max(1, min(context, math.floor(per_window / hso_flops)))


def flops_table(params, p: dict) -> dict:
    """Measured FLOPs per token: HSO and lr=0 per sink, the sliding window per stride, and each sink's equal stride."""
    context = p["segment"] + p["cache"]
    per_window = window_flops(params, context)
    out = {"sliding_window_flops": per_window, "context": context, "sinks": {}}
    for sink in SINKS:
        config = HSOConfig(segment=p["segment"], cache_size=p["cache"], sink=sink)
        hso = hso_flops_per_token(params, config, update=True)
        stride = equal_flops_stride(per_window, hso, context)
        out["sinks"][sink] = {"hso": hso, "lr0": hso_flops_per_token(params, config, update=False),
                              "equal_stride": stride, "sliding_equal": per_window / stride,
                              "sliding_same_context": per_window / p["segment"]}
        print(f"FLOPs/token, sink {sink}: HSO {hso:.3g}, lr=0 {out['sinks'][sink]['lr0']:.3g}, sliding "
              f"{context}/{p['segment']} {per_window / p['segment']:.3g}; equal-FLOPs stride {stride} "
              f"({per_window / stride:.3g})", flush=True)
    return out


def summary(r) -> dict:
    """The numbers of one HSO-loop or sliding-window result."""
    return {"ppl": r.ppl, "mean_nll": r.mean_nll, "n_tokens": r.n_tokens, "seconds": r.seconds}


def run_domain(params, name: str, dev: np.ndarray, test: np.ndarray, p: dict, flops: dict) -> dict:
    """Choose lr on the dev ids per sink, then score the test ids with HSO, lr=0 and both sliding windows."""
    context, out = p["segment"] + p["cache"], {"sinks": {}}
    sliding = {}

    def window(stride):  # sink-independent: run each stride once
        if stride not in sliding:
            sliding[stride] = {**summary(perplexity(params, test, context=context, stride=stride, progress=False)),
                               "context": context, "stride": stride}
        return sliding[stride]

    for sink in SINKS:
        config = HSOConfig(segment=p["segment"], cache_size=p["cache"], sink=sink)
        dev_runs = {}
        for lr in p["lrs"]:
            r = hso_nll(params, dev, dataclasses.replace(config, lr=lr))
            dev_runs[lr] = summary(r)
            print(f"{name} sink {sink} dev lr {lr:g}: ppl {r.ppl:.3f} ({r.seconds:.0f} s)", flush=True)
        lr = min(dev_runs, key=lambda k: dev_runs[k]["mean_nll"])
        hso = summary(hso_nll(params, test, dataclasses.replace(config, lr=lr)))
        lr0 = summary(hso_nll(params, test, config, update=False))
        same, equal = window(p["segment"]), window(flops[sink]["equal_stride"])
        out["sinks"][sink] = {
            "lr": lr, "dev": [{"lr": k, **v} for k, v in dev_runs.items()], "hso": hso, "lr0": lr0,
            "sliding_same_context": same, "sliding_equal_flops": equal,
            "gain_vs_lr0": lr0["mean_nll"] - hso["mean_nll"],
            "gain_vs_sliding_same_context": same["mean_nll"] - hso["mean_nll"],
            "gain_vs_sliding_equal_flops": equal["mean_nll"] - hso["mean_nll"]}
        print(f"{name} sink {sink} test (lr {lr:g}): HSO {hso['ppl']:.3f}, lr=0 {lr0['ppl']:.3f}, sliding "
              f"{context}/{p['segment']} {same['ppl']:.3f}, equal FLOPs {context}/{equal['stride']} "
              f"{equal['ppl']:.3f}", flush=True)
    return out


def recommend(results: dict, lrs) -> dict:
    """The (sink, lr) with the lowest dev mean NLL averaged over the domains."""
    mean = {(sink, lr): float(np.mean([next(d["mean_nll"] for d in r["sinks"][sink]["dev"] if d["lr"] == lr)
                                       for r in results.values()]))
            for sink in SINKS for lr in lrs}
    (sink, lr), nll = min(mean.items(), key=lambda kv: kv[1])
    return {"sink": sink, "lr": lr, "dev_mean_nll": nll,
            "all": [{"sink": s, "lr": l, "dev_mean_nll": v} for (s, l), v in mean.items()]}


def plot(payload: dict, path: Path) -> None:
    """Grouped bars: test perplexity per domain for HSO (sink 0, 4), lr=0 (sink 4) and the equal-FLOPs window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("HSO, sink 0", lambda r: r["sinks"][0]["hso"]), ("HSO, sink 4", lambda r: r["sinks"][4]["hso"]),
              ("same loop lr=0, sink 4", lambda r: r["sinks"][4]["lr0"]),
              ("sliding window, equal FLOPs", lambda r: r["sinks"][4]["sliding_equal_flops"])]
    names = list(payload["domains"])
    x, width = np.arange(len(names)), 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (label, get) in enumerate(series):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, [get(payload["domains"][n])["ppl"] for n in names],
                      width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks(x, [LABELS[n] for n in names])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("domain (test text)")
    ax.set_ylabel("perplexity (per token, log scale)")
    p = payload["protocol"]
    ax.set_title(f"HSO on SmolLM2-135M: {p['test_tokens'] - 1} test tokens per domain, segment {p['segment']}, "
                 f"cache {p['cache']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(payload: dict, info: dict, stem: str) -> str:
    """The results file: protocol, FLOPs, one row per domain x sink, the recommendation and the plot."""
    p, f = payload["protocol"], payload["flops_per_token"]
    context = p["segment"] + p["cache"]
    lines = [f"# HSO across domains ({stem})", "", machine_line(info), "", f"Command: `{payload['command']}`", "",
             (f"SmolLM2-135M-Instruct (float32). Per domain: dev {p['dev_tokens']} tokens, test {p['test_tokens']} "
              f"tokens; segment {p['segment']}, cache {p['cache']}, hso_steps 1; lr chosen from "
              f"{', '.join(f'{lr:g}' for lr in p['lrs'])} by the dev perplexity, per domain and sink. Gains are "
              "baseline mean NLL minus HSO's (nats/token; positive: HSO better)."), "",
             "FLOPs per scored token (XLA cost analysis of the compiled programs):", "",
             (f"| sink | HSO | lr=0 loop | sliding window {context}/{p['segment']} | equal-FLOPs stride "
              "| sliding window at that stride |"), "|---|---|---|---|---|---|"]
    for sink, s in f["sinks"].items():
        lines.append(f"| {sink} | {s['hso']:.3g} | {s['lr0']:.3g} | {s['sliding_same_context']:.3g} | "
                     f"{s['equal_stride']} | {s['sliding_equal']:.3g} |")
    lines += ["", "Test perplexities:", "",
              (f"| domain | sink | lr | HSO | lr=0 | sliding {context}/{p['segment']} | sliding equal FLOPs "
               "| gain vs lr=0 | gain vs sliding same context | gain vs sliding equal FLOPs |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in payload["domains"].items():
        for sink, s in r["sinks"].items():
            eq = s["sliding_equal_flops"]
            lines.append(f"| {LABELS[name]} | {sink} | {s['lr']:g} | {s['hso']['ppl']:.3f} | {s['lr0']['ppl']:.3f} "
                         f"| {s['sliding_same_context']['ppl']:.3f} | {eq['ppl']:.3f} ({context}/{eq['stride']}) "
                         f"| {s['gain_vs_lr0']:+.4f} | {s['gain_vs_sliding_same_context']:+.4f} "
                         f"| {s['gain_vs_sliding_equal_flops']:+.4f} |")
    rec = payload["recommended"]
    lines += ["", "Dev mean NLL averaged over the domains (nats/token):", "", "| sink | lr | dev mean NLL |",
              "|---|---|---|", *(f"| {a['sink']} | {a['lr']:g} | {a['dev_mean_nll']:.4f} |" for a in rec["all"]),
              "", f"Recommended (lowest average dev NLL): sink {rec['sink']}, lr {rec['lr']:g}.", "",
              f"{payload['seconds']:.0f} s.", "", f"![test perplexity per domain]({stem}.png)"]
    return "\n".join(lines)


def report_rows(payload: dict) -> list[dict]:
    """One headline row per domain: its test perplexities."""
    p, rows = payload["protocol"], []
    for name, r in payload["domains"].items():
        s0, s4 = r["sinks"][0], r["sinks"][4]
        eq = s4["sliding_equal_flops"]
        rows.append(report_row("HSO", f"test perplexity across domains: {LABELS[name]}, SmolLM2-135M "
                                      f"({p['test_tokens'] - 1} tokens, segment {p['segment']}, cache {p['cache']}, "
                                      "lr chosen on dev)",
                               f"HSO sink 0 {s0['hso']['ppl']:.2f} (lr {s0['lr']:g}), sink 4 {s4['hso']['ppl']:.2f} "
                               f"(lr {s4['lr']:g}); lr=0 sink 4 {s4['lr0']['ppl']:.2f}; sliding window "
                               f"{eq['context']}/{p['segment']} {s4['sliding_same_context']['ppl']:.2f}, equal FLOPs "
                               f"{eq['context']}/{eq['stride']} {eq['ppl']:.2f}"))
    return rows


def main(argv=None):
    """Run the experiment and write the JSON, Markdown and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, bundled texts, one lr (~1.5 minutes)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                        help="the offline data kit (full mode)")
    parser.add_argument("--domains", help="comma-separated subset of " + ",".join(LABELS) + " (default: all; "
                        "--quick: austen,python)")
    parser.add_argument("--test-tokens", type=int, default=None, help="override the test length (full: 3073)")
    parser.add_argument("--out-dir", help="default: benchmarks/results; --quick: hso_domains_quick in the temp "
                        "folder (quick numbers never land among the committed results)")
    args = parser.parse_args(argv)
    p = {**(QUICK if args.quick else FULL)}
    p["test_tokens"] = args.test_tokens or p["test_tokens"]
    p["domains"] = tuple(args.domains.split(",")) if args.domains else p["domains"]
    unknown = sorted(set(p["domains"]) - set(LABELS))
    if unknown:
        parser.error(f"unknown domains {unknown}; choose from {list(LABELS)}")
    stem = "hso_domains_quick" if args.quick else "hso_domains"
    info, t0 = machine(), time.perf_counter()
    params, tok = mm.load(), mm.load_tokenizer()
    texts = domain_texts(args.quick, Path(args.data))
    print(f"domains {', '.join(p['domains'])}: dev {p['dev_tokens']} / test {p['test_tokens']} tokens, segment "
          f"{p['segment']}, cache {p['cache']}, lrs {p['lrs']}", flush=True)
    flops = flops_table(params, p)
    results = {name: run_domain(params, name, first_tokens(tok, texts[name][0], p["dev_tokens"]),
                                first_tokens(tok, texts[name][1], p["test_tokens"]), p, flops["sinks"])
               for name in p["domains"]}
    payload = {"command": command_line(), "model": "SmolLM2-135M-Instruct (default, float32)",
               "protocol": {**p, "sinks": list(SINKS), "hso_steps": 1, "python_dev": PYTHON_DEV,
                            "python_test": PYTHON_TEST, "data": None if args.quick else args.data},
               "flops_per_token": flops, "domains": results, "recommended": recommend(results, p["lrs"]),
               "seconds": time.perf_counter() - t0}
    out = Path(args.out_dir or (Path(tempfile.gettempdir()) / "hso_domains_quick" if args.quick else
                                ROOT / "benchmarks" / "results"))
    write_results(stem, {"machine": info, **payload}, markdown(payload, info, stem), report=report_rows(payload),
                  out_dir=out)
    plot(payload, out / f"{stem}.png")
    rec = payload["recommended"]
    print(f"wrote {out / stem}.json, .md, .png ({payload['seconds']:.0f} s)")
    print(f"recommended (lowest dev NLL averaged over domains): sink {rec['sink']}, lr {rec['lr']:g} "
          f"({rec['dev_mean_nll']:.4f} nats/token)")


if __name__ == "__main__":
    main()
