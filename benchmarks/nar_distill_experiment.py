"""NAR that earns its place: sequence-level distillation from the AR model, MLM vs random init at every budget.

The claim (METHODS.md section 4): an MLM initialises a non-autoregressive translator better than random
weights. Earlier runs (benchmarks/results/nar_experiment*.md) left the NAR far below copying the source
(26.3 vs 40.1 BLEU) and the AR baseline (46.5). This experiment gives the NAR the usual help, and
controls that credit each part. Task kjv->web (bible-kjv-web), all-MiniLM-L6-v2 everywhere, max source
40 / target 32 tokens as before, so copy-the-source and the AR baseline are the same numbers.

1. Teacher: the MLM-initialised AR baseline at the setting that gave 46.5 BLEU (lr 1e-4, 1400 steps x 8
   pairs on the full training split). Its beam search (4 beams) length penalty is chosen on dev.
2. Distillation (Kim & Rush 2016): the teacher's best beam output for a seeded random subset of the
   training sources becomes their target (empty outputs dropped).
3. Students, same budget (steps x batch, lr, schedule, batch order): NAR from MLM init on the distilled
   targets, NAR from random init on the distilled targets, and, crediting distillation, NAR from MLM init
   on the raw references of the same sources. The length head on the encoder (SUNDAE loss, weight 0.1)
   learns the lengths of the targets it is given; its agreement with the teacher's and the references'
   lengths on dev is reported.
4. Decoding settings (refinement steps, length candidates) are chosen on dev (Mark) only, per model and
   budget; test (John) BLEU is reported at the chosen setting, and at every step count for information.
5. Budgets: each student's weights at 1/4, 1/2 and all of its steps (checkpoints of one run, one cosine
   schedule), each scored with its own dev-chosen setting.
6. Decoding speed, same process: NAR at its chosen setting vs AR greedy and AR beam, batch 1 and 32.

The work is split into units (teacher, mlm_distilled, random_distilled, mlm_raw, speed), each saved under
`<out-dir>/nar_distill_units/` when done: a killed run resumes where it stopped, and two processes pinned to
one core each share the units (one skips a unit that another live process runs, and a student waits for the
teacher unit's distilled targets). The raw-reference control needs no teacher, so it starts at once:

    taskset -c 0 python benchmarks/nar_distill_experiment.py --units teacher,mlm_distilled,speed &
    taskset -c 1 python benchmarks/nar_distill_experiment.py --units mlm_raw,random_distilled &  # full run
    python benchmarks/nar_distill_experiment.py --quick     # end-to-end check, ~4.5 min on one core, into /tmp

Sizing of the full run, from timings on one core of the 2-core EPYC: AR train step (8 pairs) 1.08 s, NAR
(SUNDAE) step 1.2-1.85 s, 4-beam search ~6 sources/s, NAR scoring of one (student, budget) 50-180 s (dev
grid + test; 3 length candidates triple the rows). Teacher 1400 steps ~26 min, scoring ~2 min, distillation
of 5600 sources ~15 min; each student 1400 steps 30-45 min plus 1-3 scorings; speed ~2.5 min: about 90
minutes of wall time on two cores (three hours of one core). The students see each distilled pair twice.

Writes benchmarks/results/nar_distill.json / .md / .png (`--quick`: nar_distill_quick.* in `--out-dir`, by
default $TMPDIR/nar_distill_quick; never in benchmarks/results). The trained teacher is kept in the units
folder (`teacher_params`, not committed; its distilled targets `distilled.npz` are); `--teacher DIR` reuses one
(its training time is then not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common
from common import machine, machine_line, report_row

import makemost_jax as mm
from makemost_jax import nar
from makemost_jax.training import TrainConfig

# Full run, sized for the two cores of the 2-core EPYC (about 90 minutes; the sizing is in the module doc). The
# students' budget is the one that took the MLM-initialised NAR to 26 BLEU in nar_experiment (1400 x 8 pairs).
FULL = {"teacher_steps": 1400, "teacher_lr": 1e-4, "batch": 8, "beams": 4, "length_penalties": (0.0, 1.0),
        "distill_pairs": 5600, "student_steps": 1400, "student_lr": 5e-4, "decode_steps": (1, 2, 4, 8),
        "length_candidates": (1, 3), "n_dev": 128, "n_test": 128, "decode_batch": 32, "max_source": 40,
        "max_target": 32, "speed_repeats": 3, "seed": 0}
QUICK = {**FULL, "teacher_steps": 4, "distill_pairs": 48, "student_steps": 4, "decode_steps": (1, 2),
         "length_candidates": (1, 2), "n_dev": 16, "n_test": 16, "decode_batch": 16, "speed_repeats": 1}
# (name, targets, random init, scored at every budget): the control is scored at the full budget only.
STUDENTS = (("mlm_distilled", "distilled", False, True), ("random_distilled", "distilled", True, True),
            ("mlm_raw", "raw", False, False))
RECORDED = {"copy": 40.13, "ar_greedy": 46.48}  # benchmarks/results/nar_experiment_lr1e-4.md, same test verses


def budgets(sizes: dict) -> list[int]:
    """Training steps at which every student is scored: 1/4, 1/2 and all of its steps."""
    steps = sizes["student_steps"]
    if steps % 4:
        raise SystemExit(f"student_steps={steps} must be a multiple of 4 (budgets at 1/4, 1/2 and all of it)")
    return [steps // 4, steps // 2, steps]


def texts_of(tok, tokens, lengths) -> list[str]:
    return [tok.decode(row[:n]) for row, n in zip(np.asarray(tokens), np.asarray(lengths))]


class Task:
    """Tokenizer, MLM, configs and the splits: full training set, dev (Mark), test (John), loss batches."""

    def __init__(self, sizes: dict, train_file: Path):
        folder = nar.resolve_mlm("minilm")
        self.folder, self.tok = folder, mm.load_tokenizer(folder)
        self.mlm = nar.add_mlm_head(mm.load(folder))
        self.configs = {ar: nar.seq2seq_config(self.mlm, self.tok, sizes["max_source"], sizes["max_target"],
                                               autoregressive=ar) for ar in (False, True)}
        cfg = self.configs[False]
        pairs = nar.read_pairs(train_file)
        self.train, self.train_lines = nar.encode_pairs(self.tok, pairs, cfg), len(pairs)
        self.splits = {}
        for name, asset, n in (("dev", "bible_kjv_web_valid.jsonl", sizes["n_dev"]),
                               ("test", "bible_kjv_web_test.jsonl", sizes["n_test"])):
            pairs = nar.read_pairs(nar.asset_path(asset))
            data = nar.encode_pairs(self.tok, pairs, cfg)
            rows = {k: v[:n] for k, v in data.items()}
            self.splits[name] = {"file": asset, "ids": rows["index"].tolist(), "arrays": rows,
                                 "sources": [pairs[i][0] for i in rows["index"]],
                                 "refs": nar.normalise_references(self.tok, [pairs[i][1] for i in rows["index"]])}
            if name == "dev":  # loss curves on the Mark verses after the dev ones (never used to choose)
                loss_rows = {k: v[n:n + 4 * sizes["batch"]] for k, v in data.items()}
                self.valid_batches = nar.fixed_batches(loss_rows, sizes["batch"])
        for name in ("dev", "test"):
            if len(self.splits[name]["ids"]) < sizes[f"n_{name}"]:
                raise SystemExit(f"only {len(self.splits[name]['ids'])} {name} verses fit the length limits")

    def bleu(self, split: str, hyps: list[str]) -> float:
        return nar.bleu(hyps, self.splits[split]["refs"])

    def copy_bleu(self, split: str) -> float:
        """The floor: KJV and WEB share most words, so the source itself scores well."""
        return self.bleu(split, nar.normalise_references(self.tok, self.splits[split]["sources"]))


def train_config(sizes: dict, steps: int, lr: float) -> TrainConfig:
    return TrainConfig(steps=steps, learning_rate=lr, warmup_steps=max(steps // 10, 1),
                       eval_every=max(steps // 4, 1), log_every=10, seed=sizes["seed"])


def train_teacher(task: Task, sizes: dict) -> tuple[nar.Seq2SeqParams, dict]:
    """The AR baseline from MLM init on the full training split, as in nar_experiment.py (init key 1, seed 0)."""
    params = nar.init_seq2seq(task.mlm, task.configs[True], jax.random.key(1))
    t0 = time.perf_counter()
    params, history = nar.train_seq2seq(params, nar.PairBatches(task.train, sizes["batch"], seed=sizes["seed"]),
                                        train_config(sizes, sizes["teacher_steps"], sizes["teacher_lr"]),
                                        valid=task.valid_batches)
    return params, {"train_seconds": time.perf_counter() - t0, "valid_loss": [(r["step"], r["loss"])
                                                                              for r in history["eval"]]}


def score_teacher(task: Task, teacher, sizes: dict) -> dict:
    """Greedy and beam BLEU on dev and test; the beam's length penalty is the dev argmax (ties: the smaller)."""
    out = {"greedy": {}, "beam": {}}
    t0 = time.perf_counter()
    for split in ("dev", "test"):
        arrays = task.splits[split]["arrays"]
        tokens, lengths = nar.decode_batched(teacher, arrays["source"], arrays["source_mask"],
                                             batch_size=sizes["decode_batch"])
        out["greedy"][split] = task.bleu(split, texts_of(task.tok, tokens, lengths))
        for lp in sizes["length_penalties"]:
            tokens, lengths = nar.decode_batched(teacher, arrays["source"], arrays["source_mask"],
                                                 batch_size=sizes["decode_batch"], beams=sizes["beams"],
                                                 length_penalty=lp)
            hyps = texts_of(task.tok, tokens, lengths)
            out["beam"].setdefault(str(lp), {})[split] = task.bleu(split, hyps)
            if split == "dev":
                out["beam"][str(lp)]["dev_lengths"] = lengths.tolist()
            else:
                out["beam"][str(lp)]["test_examples"] = hyps[:3]
    out["length_penalty"] = max(sizes["length_penalties"], key=lambda lp: out["beam"][str(lp)]["dev"])
    out["chosen_on"] = "dev"
    out["beam_test"] = out["beam"][str(out["length_penalty"])]["test"]
    out["score_seconds"] = time.perf_counter() - t0
    return out


def source_subset(task: Task, sizes: dict) -> dict:
    """The seeded random training pairs that are distilled; with their references, the raw control's data."""
    pick = np.sort(np.random.default_rng(sizes["seed"]).permutation(len(task.train["index"]))
                   [:sizes["distill_pairs"]])
    return {k: v[pick] for k, v in task.train.items()}


def distill(task: Task, teacher, length_penalty: float, sizes: dict) -> tuple[dict, dict]:
    """(distilled, stats): the subset's sources with the teacher's best beam output as target."""
    subset = source_subset(task, sizes)
    # Sources of similar length share a batch, so each batch's search stops near its own longest output.
    order = np.argsort(subset["source_mask"].sum(1), kind="stable")
    t0 = time.perf_counter()
    tokens, lengths = nar.decode_batched(teacher, subset["source"][order], subset["source_mask"][order],
                                         batch_size=sizes["decode_batch"], beams=sizes["beams"],
                                         length_penalty=length_penalty)
    seconds = time.perf_counter() - t0
    back = np.argsort(order)
    tokens, lengths = tokens[back], lengths[back]
    keep = lengths > 0  # an empty target cannot be decoded (the length head never predicts 0)
    t = sizes["max_target"]
    raw = {k: v[keep] for k, v in subset.items()}
    distilled = {**raw, "target": tokens[keep].astype(np.int32),
                 "target_mask": (np.arange(t)[None] < lengths[keep][:, None]).astype(np.int32)}
    ref_lengths = raw["target_mask"].sum(1)
    src_tokens = [row[1:n - 1].tolist() for row, n in zip(raw["source"], raw["source_mask"].sum(1))]
    stats = {"requested": int(sizes["distill_pairs"]), "kept": int(keep.sum()), "dropped_empty": int((~keep).sum()),
             "source_indices": raw["index"].tolist(), "beam_seconds": seconds,
             "sources_per_s": len(keep) / seconds, "length_penalty": length_penalty,
             "mean_length": float(lengths[keep].mean()) if keep.any() else 0.0,
             "mean_reference_length": float(ref_lengths.mean()) if keep.any() else 0.0,
             "equal_to_reference": float(np.mean([np.array_equal(a[:n], b[:m]) for a, n, b, m in zip(
                 distilled["target"], lengths[keep], raw["target"], ref_lengths)])) if keep.any() else 0.0,
             "equal_to_source": float(np.mean([a[:n].tolist() == s for a, n, s in zip(
                 distilled["target"], lengths[keep], src_tokens)])) if keep.any() else 0.0,
             "bleu_vs_reference": nar.bleu(texts_of(task.tok, distilled["target"], lengths[keep]),
                                           texts_of(task.tok, raw["target"], ref_lengths)),
             "examples": [{"source": task.tok.decode(s), "reference": task.tok.decode(r[:m]),
                           "distilled": task.tok.decode(d[:n])}
                          for s, r, m, d, n in zip(src_tokens[:3], raw["target"], ref_lengths, distilled["target"],
                                                   lengths[keep])]}
    return distilled, stats


def decode_grid(sizes: dict) -> list[tuple[int, int]]:
    """(steps, length candidates), cheapest first: `max` keeps the first of equal dev scores."""
    return sorted(((s, c) for s in sizes["decode_steps"] for c in sizes["length_candidates"]),
                  key=lambda sc: (sc[0] * sc[1], sc[0]))


def score_student(task: Task, params, sizes: dict) -> dict:
    """Dev BLEU over the decode grid, the dev argmax, then test BLEU with its length candidates at every step."""
    steps = tuple(sizes["decode_steps"])
    dev = {}
    for c in sizes["length_candidates"]:
        hyps = nar.translate_steps(params, task.tok, task.splits["dev"]["sources"], steps,
                                   nar.DecodeConfig(length_candidates=c), batch_size=sizes["decode_batch"])
        dev.update({(s, c): task.bleu("dev", hyps[s]) for s in steps})
    grid = decode_grid(sizes)
    chosen = max(grid, key=lambda sc: dev[sc])
    test_hyps = nar.translate_steps(params, task.tok, task.splits["test"]["sources"], steps,
                                    nar.DecodeConfig(length_candidates=chosen[1]), batch_size=sizes["decode_batch"])
    test_by_steps = {s: task.bleu("test", test_hyps[s]) for s in steps}
    arrays = task.splits["dev"]["arrays"]
    predicted = np.asarray(nar.predict_lengths(params, arrays["source"], arrays["source_mask"]))[:, 0]
    reference = arrays["target_mask"].sum(1)
    return {"dev": [{"steps": s, "length_candidates": c, "bleu": dev[(s, c)]} for s, c in grid],
            "chosen": {"steps": chosen[0], "length_candidates": chosen[1]}, "chosen_on": "dev",
            "dev_bleu": dev[chosen], "test_bleu": test_by_steps[chosen[0]],
            "test_bleu_by_steps": {str(s): b for s, b in test_by_steps.items()},
            "length_head": {"dev_exact_vs_reference": float(np.mean(predicted == reference)),
                            "dev_mae_vs_reference": float(np.abs(predicted - reference).mean()),
                            "dev_predicted": predicted.tolist()},
            "test_examples": test_hyps[chosen[0]][:3]}


def train_student(task: Task, name: str, data: dict, sizes: dict) -> tuple[dict, nar.Seq2SeqParams]:
    """One student trained once; its weights at every budget scored on dev, then test. Returns (row, params)."""
    _, which, random_init, every_budget = next(s for s in STUDENTS if s[0] == name)
    steps = budgets(sizes) if every_budget else budgets(sizes)[-1:]
    params = nar.init_seq2seq(task.mlm, task.configs[False], jax.random.key(1), random_init=random_init)
    config = train_config(sizes, sizes["student_steps"], sizes["student_lr"])
    t0 = time.perf_counter()
    batches = nar.PairBatches(data, sizes["batch"], seed=sizes["seed"])
    params, history = nar.train_seq2seq(params, batches, config, valid=task.valid_batches, keep_steps=steps[:-1])
    train_seconds = time.perf_counter() - t0
    weights = {**{s: jax.tree.map(jax.numpy.asarray, p) for s, p in history.get("kept", {}).items()},
               steps[-1]: params}
    t0 = time.perf_counter()
    scored = [{"step": s, **score_student(task, weights[s], sizes)} for s in steps]
    row = {"targets": which, "random_init": random_init, "pairs": len(data["index"]), "train_seconds": train_seconds,
           "score_seconds": time.perf_counter() - t0,
           "valid_loss": [(r["step"], r["loss"]) for r in history["eval"]], "budgets": scored}
    print(f"{name}: test BLEU by budget {[round(b['test_bleu'], 2) for b in scored]}, full budget chosen "
          f"{scored[-1]['chosen']} (dev {scored[-1]['dev_bleu']:.2f}); train {train_seconds:.0f} s", flush=True)
    return row, params


def agree_with_teacher(students: dict, teacher_dev_lengths) -> None:
    """Add each length head's agreement with the teacher's dev lengths (known once the teacher unit is done)."""
    teacher = np.asarray(teacher_dev_lengths)
    for row in students.values():
        for scored in row["budgets"]:
            predicted = np.asarray(scored["length_head"]["dev_predicted"])
            scored["length_head"].update(dev_exact_vs_teacher=float(np.mean(predicted == teacher)),
                                         dev_mae_vs_teacher=float(np.abs(predicted - teacher).mean()))


def speed(task: Task, teacher, student, chosen: dict, length_penalty: float, sizes: dict) -> list[dict]:
    """Output tokens/s, same process and inputs: NAR at its chosen setting, AR greedy, AR beam; batch 1 and 32."""
    arrays = task.splits["test"]["arrays"]
    rows = []
    decode = nar.DecodeConfig(steps=chosen["steps"], length_candidates=chosen["length_candidates"])
    for batch in (1, sizes["decode_batch"]):
        src, msk = arrays["source"][:batch], arrays["source_mask"][:batch]
        for decoder, params, kwargs in (
                (f"NAR {chosen['steps']} steps x {chosen['length_candidates']} lengths", student, {"decode": decode}),
                ("AR greedy", teacher, {}),
                (f"AR beam {sizes['beams']}", teacher, {"beams": sizes["beams"], "length_penalty": length_penalty})):
            timing = nar.timed_decode(params, src, msk, repeats=sizes["speed_repeats"], **kwargs)
            rows.append({"batch": batch, "decoder": decoder, **timing,
                         "seconds_per_sentence": timing["seconds"] / batch})
    for row in rows:
        ar = next(r for r in rows if r["batch"] == row["batch"] and r["decoder"] == "AR greedy")
        row["x_ar_greedy_tokens_per_s"] = row["tokens_per_s"] / ar["tokens_per_s"]
        row["x_ar_greedy_time"] = row["seconds"] / ar["seconds"]
    return rows


def verdict(payload: dict) -> dict:
    """The answers, each with the numbers that decide it."""
    students, teacher = payload["students"], payload["teacher"]
    copy = payload["copy_bleu"]["test"]
    best = students["mlm_distilled"]["budgets"][-1]
    pairs = [(m["step"], m["test_bleu"], r["test_bleu"]) for m, r in zip(students["mlm_distilled"]["budgets"],
                                                                       students["random_distilled"]["budgets"])]
    every = all(m > r for _, m, r in pairs)
    raw = students["mlm_raw"]["budgets"][-1]
    nar_row = next(r for r in payload["speed"] if r["batch"] > 1 and r["decoder"].startswith("NAR"))
    nar_one = next(r for r in payload["speed"] if r["batch"] == 1 and r["decoder"].startswith("NAR"))
    return {
        "nar_beats_copying": best["test_bleu"] > copy,
        "mlm_beats_random_at_every_budget": every,
        "text": [
            (f"NAR beats copying the source: {'yes' if best['test_bleu'] > copy else 'no'} (distilled NAR from MLM "
             f"init {best['test_bleu']:.2f} test BLEU at dev-chosen {best['chosen']['steps']} steps x "
             f"{best['chosen']['length_candidates']} lengths vs copying {copy:.2f})."),
            (f"MLM init beats random init at every budget: {'yes' if every else 'no'} ("
             + "; ".join(f"{s} steps: {m:.2f} vs {r:.2f}" for s, m, r in pairs) + ")."),
            (f"AR: the teacher scores {teacher['greedy']['test']:.2f} greedy and {teacher['beam_test']:.2f} with "
             f"{payload['sizes']['beams']}-beam search (recorded AR run: {RECORDED['ar_greedy']:.2f}); the NAR is "
             f"{best['test_bleu'] - teacher['greedy']['test']:+.2f} BLEU from AR greedy."),
            (f"Distillation vs raw references (MLM init, same sources and budget): {best['test_bleu']:.2f} vs "
             f"{raw['test_bleu']:.2f} test BLEU."),
            (f"Speed, NAR at its chosen setting / AR greedy, output tokens/s: "
             f"{nar_one['x_ar_greedy_tokens_per_s']:.2f}x at batch 1, {nar_row['x_ar_greedy_tokens_per_s']:.2f}x at "
             f"batch {nar_row['batch']}."),
        ]}


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for name, row in payload["students"].items():
        ax.plot([b["step"] for b in row["budgets"]], [b["test_bleu"] for b in row["budgets"]], "o-", label=name)
    teacher = payload["teacher"]
    ax.axhline(payload["copy_bleu"]["test"], color="grey", ls=":", label="copy the source")
    ax.axhline(teacher["greedy"]["test"], color="k", ls="--", label="AR teacher, greedy")
    ax.axhline(teacher["beam_test"], color="k", ls="-.", label=f"AR teacher, beam {payload['sizes']['beams']}")
    ax.set(xlabel=f"student training steps (x {payload['sizes']['batch']} pairs)", ylabel="test BLEU",
           title="Test BLEU at dev-chosen decoding, by budget")
    ax.legend(fontsize=8)
    ax = axes[1]
    for name, row in payload["students"].items():
        full = row["budgets"][-1]
        c = full["chosen"]["length_candidates"]
        points = [(d["steps"], d["bleu"]) for d in full["dev"] if d["length_candidates"] == c]
        ax.plot(*zip(*sorted(points)), "o-", label=f"{name} ({c} length candidates)")
    ax.set(xscale="log", xlabel="refinement steps", ylabel="dev BLEU", title="Dev BLEU at the full budget")
    ax.set_xticks(payload["sizes"]["decode_steps"], [str(x) for x in payload["sizes"]["decode_steps"]])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    ax = axes[2]
    rows = payload["speed"]
    decoders = list(dict.fromkeys(r["decoder"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / len(batches)
    for j, batch in enumerate(batches):
        values = [next(r["tokens_per_s"] for r in rows if r["batch"] == batch and r["decoder"] == d)
                  for d in decoders]
        ax.bar(np.arange(len(decoders)) + j * width, values, width, label=f"batch {batch}")
    ax.set_xticks(np.arange(len(decoders)) + width * (len(batches) - 1) / 2, decoders, fontsize=8)
    ax.set(yscale="log", ylabel="output tokens / s", title="Decoding speed (CPU, same process)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(payload: dict, info: dict) -> tuple[str, list[dict]]:
    s, b, teacher, dist = payload["sizes"], payload["budget"], payload["teacher"], payload["distillation"]
    lp = teacher["length_penalty"]
    lines = ["# NAR with sequence-level distillation: MLM vs random init at every budget (nar_distill)", "",
             machine_line(info), "", f"Command: `{payload['command']}`", "",
             (f"Task kjv->web, all-MiniLM-L6-v2 (6 layers, width 384) encoder and decoder, max source "
              f"{s['max_source']} / target {s['max_target']} tokens. Teacher: AR from MLM init, "
              + (f"{s['teacher_steps']} steps x {s['batch']} pairs at lr {s['teacher_lr']:g} on the "
                 f"{b['train_pairs']} training pairs ({b['train_file']})" if not b.get("teacher_loaded")
                 else f"loaded from {b['teacher_loaded']}")
              + f"; beam {s['beams']}, length penalty {lp:g} (dev choice among {list(s['length_penalties'])}). "
              f"Distilled: {dist['kept']} of {dist['requested']} random training sources "
              f"({dist['dropped_empty']} empty outputs dropped; the raw-reference control trains on all "
              f"{dist['requested']} with their references). Students: {s['student_steps']} steps x "
              f"{s['batch']} pairs, AdamW lr {s['student_lr']:g}, 10% warmup then cosine, SUNDAE (2 unrolled "
              f"steps, length head weight 0.1), same batch order for all three; scored at {b['budgets']} steps "
              "(the raw-reference control at the full budget only). Decoding chosen on dev "
              f"({s['n_dev']} Mark verses) among steps {list(s['decode_steps'])} x length candidates "
              f"{list(s['length_candidates'])}, random start, argmax; test = {s['n_test']} John verses. BLEU: "
              "sacrebleu against references through the uncased tokenizer round trip."), "",
             "## Verdict", "", *[f"- {t}" for t in payload["verdict"]["text"]], "",
             "## Test BLEU by budget (decoding chosen on dev)", "",
             "| student | targets | init | " + " | ".join(f"{x} steps" for x in b["budgets"]) + " |",
             "|---|---|---|" + "---|" * len(b["budgets"])]
    for name, row in payload["students"].items():
        scored = {x["step"]: x for x in row["budgets"]}
        cells = [f"{x['test_bleu']:.2f} ({x['chosen']['steps']}x{x['chosen']['length_candidates']}; dev "
                 f"{x['dev_bleu']:.2f})" if x else "not scored" for x in map(scored.get, b["budgets"])]
        lines.append(f"| {name} | {row['targets']} | {'random' if row['random_init'] else 'MLM'} | "
                     + " | ".join(cells) + " |")
    n_cols = len(b["budgets"])
    lines += [f"| copy the source | | | {payload['copy_bleu']['test']:.2f} (dev {payload['copy_bleu']['dev']:.2f})"
              + " |" * n_cols,
              f"| AR teacher greedy | | MLM | {teacher['greedy']['test']:.2f} (dev {teacher['greedy']['dev']:.2f})"
              + " |" * n_cols,
              f"| AR teacher beam {s['beams']} | | MLM | {teacher['beam_test']:.2f} (lp {lp:g})" + " |" * n_cols,
              "", "Cells: test BLEU (chosen steps x length candidates; dev BLEU of that choice).", "",
              "## For information only: test BLEU at every step count (full budget, chosen length candidates)", "",
              "| student | " + " | ".join(f"{x} steps" for x in s["decode_steps"]) + " |",
              "|---|" + "---|" * len(s["decode_steps"])]
    for name, row in payload["students"].items():
        full = row["budgets"][-1]
        lines.append(f"| {name} | " + " | ".join(f"{full['test_bleu_by_steps'][str(x)]:.2f}"
                                                 for x in s["decode_steps"]) + " |")
    lines += ["", "## Length head (full budget, dev)", "",
              "| student | exact vs teacher | MAE vs teacher | exact vs reference | MAE vs reference |",
              "|---|---|---|---|---|"]
    for name, row in payload["students"].items():
        h = row["budgets"][-1]["length_head"]
        lines.append(f"| {name} | {h['dev_exact_vs_teacher']:.2f} | {h['dev_mae_vs_teacher']:.2f} | "
                     f"{h['dev_exact_vs_reference']:.2f} | {h['dev_mae_vs_reference']:.2f} |")
    lines += ["", ("Teacher lengths: its beam outputs on the dev sources. A head trained on distilled targets should "
                   "agree better with the teacher than with the references."), "",
              "## Distilled targets", "",
              (f"Mean length {dist['mean_length']:.1f} tokens (references {dist['mean_reference_length']:.1f}); "
               f"equal to the reference {100 * dist['equal_to_reference']:.1f}%, to the source "
               f"{100 * dist['equal_to_source']:.1f}%; BLEU against the references {dist['bleu_vs_reference']:.2f}. "
               f"Beam search: {dist['beam_seconds']:.0f} s ({dist['sources_per_s']:.1f} sources/s)."), ""]
    for ex in dist["examples"]:
        lines.append(f"- source: {ex['source']}\n  - reference: {ex['reference']}\n  - distilled: {ex['distilled']}")
    lines += ["", "Teacher beam search, by length penalty (dev choice marked):", "",
              "| length penalty | dev BLEU | test BLEU |", "|---|---|---|"]
    for key, row in teacher["beam"].items():
        mark = " (chosen)" if float(key) == lp else ""
        lines.append(f"| {float(key):g}{mark} | {row['dev']:.2f} | {row['test']:.2f} |")
    lines += ["", "## Decoding speed (same process, test sources, median of repeats after a warm-up)", "",
              "| batch | decoder | output tokens | seconds | s / sentence | tokens/s | x AR greedy (tokens/s) |",
              "|---|---|---|---|---|---|---|"]
    for r in payload["speed"]:
        lines.append(f"| {r['batch']} | {r['decoder']} | {r['tokens']} | {r['seconds']:.3f} | "
                     f"{r['seconds_per_sentence']:.4f} | {r['tokens_per_s']:.1f} | "
                     f"{r['x_ar_greedy_tokens_per_s']:.2f} |")
    lines += ["", "## Budget and wall time", "",
              ("Units (teacher, each student, speed) ran as saved units of work, each on one core; total is the sum "
               "of the units' wall times, not the elapsed time of a run that shares them between two processes."), "",
              "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in b["seconds"].items()]
    lines += ["", ("Budgets are checkpoints of one run per student (one cosine schedule over "
                   f"{s['student_steps']} steps), not separate runs with their own schedules. The student lr "
                   "(5e-4) is the better of the two tried in nar_experiment (on its test split); nothing here was "
                   "chosen on this run's test split."), "",
              f"![BLEU by budget, dev BLEU by steps, speed]({payload['plot']})"]
    best = payload["students"]["mlm_distilled"]["budgets"][-1]
    rand = payload["students"]["random_distilled"]["budgets"]
    mlm = payload["students"]["mlm_distilled"]["budgets"]
    raw = payload["students"]["mlm_raw"]["budgets"][-1]
    nar_speed = [r for r in payload["speed"] if r["decoder"].startswith("NAR")]
    train_note = f"{s['student_steps']} steps x {s['batch']}"
    rows = [
        report_row("NAR", f"kjv->web test BLEU, NAR distilled from the AR model (MLM init, {train_note}, dev-chosen "
                          f"{best['chosen']['steps']} steps x {best['chosen']['length_candidates']} lengths)",
                   f"{best['test_bleu']:.2f} (copy the source {payload['copy_bleu']['test']:.2f}; AR teacher greedy "
                   f"{teacher['greedy']['test']:.2f}, beam {teacher['beam_test']:.2f})"),
        report_row("NAR", f"MLM vs random init, distilled targets, test BLEU at {b['budgets']} steps",
                   "; ".join(f"{m['test_bleu']:.2f} vs {r['test_bleu']:.2f}" for m, r in zip(mlm, rand))),
        report_row("NAR", f"distilled vs raw-reference targets, MLM init, same sources, {train_note}",
                   f"{best['test_bleu']:.2f} vs {raw['test_bleu']:.2f}"),
        report_row("NAR", "decoding tokens/s, distilled NAR at its dev-chosen setting / AR greedy (KV cache), CPU",
                   ", ".join(f"batch {r['batch']}: {r['x_ar_greedy_tokens_per_s']:.2f}x" for r in nar_speed)),
        report_row("NAR", "distillation experiment budget (one CPU core per unit)",
                   (f"teacher loaded ({b['teacher_loaded']})" if b.get("teacher_loaded") else
                    f"teacher {s['teacher_steps']} x {s['batch']}") + f", {dist['kept']} distilled pairs, 3 students x "
                   f"{train_note}, {b['seconds']['total'] / 60:.0f} min total"),
    ]
    return "\n".join(lines), rows


UNITS = ("teacher", *(name for name, *_ in STUDENTS), "speed")


def run_unit(unit: str, task: Task, sizes: dict, args, unit_dir: Path) -> dict:
    """One unit's results; the teacher and the timed student are saved beside them for the units that need them."""
    teacher_dir = args.teacher or str(unit_dir / "teacher_params")
    if unit == "teacher":
        if args.teacher:
            teacher, _ = nar.load_seq2seq(args.teacher)
            if teacher.config != task.configs[True]:
                raise SystemExit(f"{args.teacher} is not an AR model of this experiment's config (MiniLM, "
                                 f"{sizes['max_source']}/{sizes['max_target']} tokens)")
            row = {"train_seconds": 0.0, "valid_loss": [], "loaded": args.teacher}
        else:
            teacher, row = train_teacher(task, sizes)
            nar.save_seq2seq(teacher_dir, teacher, tokenizer_source=task.folder)
        row.update(score_teacher(task, teacher, sizes))
        print(f"teacher: greedy {row['greedy']}, beam length penalty {row['length_penalty']} "
              f"(test {row['beam_test']:.2f})", flush=True)
        distilled, dist = distill(task, teacher, row["length_penalty"], sizes)
        np.savez(unit_dir / "distilled.npz", **distilled)
        print(f"distilled {dist['kept']} pairs in {dist['beam_seconds']:.0f} s; BLEU vs references "
              f"{dist['bleu_vs_reference']:.2f}", flush=True)
        # With it, what every unit's process computes alike, recorded once.
        return {"sizes": sizes, "teacher": row, "distillation": dist,
                "seconds": {"teacher training": row["train_seconds"],
                            "teacher scoring (dev, test)": row["score_seconds"],
                            "distillation (beam search)": dist["beam_seconds"]},
                "machine": machine(), "copy_bleu": {split: task.copy_bleu(split) for split in ("dev", "test")},
                "splits": {name: {"file": sp["file"], "ids": sp["ids"]} for name, sp in task.splits.items()},
                "train_pairs": len(task.train["index"]), "train_lines": task.train_lines}
    if unit == "speed":
        common.wait_for(unit_dir / "mlm_distilled.json")
        chosen = json.loads((unit_dir / "mlm_distilled.json").read_text())["student"]["budgets"][-1]["chosen"]
        length_penalty = json.loads((unit_dir / "teacher.json").read_text())["teacher"]["length_penalty"]
        student, _ = nar.load_seq2seq(str(unit_dir / "mlm_distilled_params"))
        t0 = time.perf_counter()
        rows = speed(task, nar.load_seq2seq(teacher_dir)[0], student, chosen, length_penalty, sizes)
        return {"sizes": sizes, "speed": rows, "seconds": {"speed": time.perf_counter() - t0}}
    targets = next(which for name, which, *_ in STUDENTS if name == unit)
    if targets == "distilled":
        common.wait_for(unit_dir / "teacher.json")
        with np.load(unit_dir / "distilled.npz") as saved:
            data = dict(saved)
    else:  # the references of every subset source (a distilled target is dropped only when empty)
        data = source_subset(task, sizes)
    row, params = train_student(task, unit, data, sizes)
    if unit == "mlm_distilled":  # timed against the AR decoders by the speed unit
        nar.save_seq2seq(str(unit_dir / "mlm_distilled_params"), params, tokenizer_source=task.folder)
    n_budgets = len(row["budgets"])
    return {"sizes": sizes, "student": row, "seconds": {f"{unit} training": row["train_seconds"],
                                        f"{unit} scoring ({n_budgets} budgets x (dev grid + test))": row["score_seconds"]}}


def report(args, sizes: dict, stem: str, unit_dir: Path) -> None:
    """Write JSON, Markdown and plot once every unit is saved."""
    saved = common.saved_units(list(UNITS), unit_dir)
    if saved is None:
        return
    teacher, dist = saved["teacher"]["teacher"], saved["teacher"]["distillation"]
    students = {name: saved[name]["student"] for name, *_ in STUDENTS}
    agree_with_teacher(students, teacher["beam"][str(teacher["length_penalty"])]["dev_lengths"])
    seconds = {k: v for u in UNITS for k, v in saved[u]["seconds"].items()}
    seconds["total"] = sum(saved[u]["wall_seconds"] for u in UNITS)
    budget = {"budgets": budgets(sizes), "train_pairs": saved["teacher"]["train_pairs"],
              "train_lines": saved["teacher"]["train_lines"],
              "train_file": os.path.relpath(args.train_file, common.ROOT), "teacher_loaded": args.teacher,
              "seconds": seconds, "unit_wall_seconds": {u: saved[u]["wall_seconds"] for u in UNITS}}
    payload = {"machine": saved["teacher"]["machine"], "command": common.unit_free_command(), "sizes": sizes,
               "budget": budget, "copy_bleu": saved["teacher"]["copy_bleu"], "recorded": RECORDED,
               "splits": saved["teacher"]["splits"], "teacher": teacher, "distillation": dist, "students": students,
               "speed": saved["speed"]["speed"], "plot": f"{stem}.png"}
    payload["verdict"] = verdict(payload)
    text, rows = markdown(payload, payload["machine"])
    path = common.write_results(stem, payload, text, report=rows, out_dir=args.out_dir)
    plot(payload, Path(args.out_dir) / payload["plot"])
    print(text)
    print(f"-> {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: an end-to-end check in a few minutes")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the results files go (default benchmarks/results; --quick: a temporary folder)")
    parser.add_argument("--train-file", type=Path, help="training pairs (JSONL with kjv/web fields)",
                        default=common.ROOT.parent / "shared/data/bible-kjv-web/train.jsonl")
    parser.add_argument("--teacher", default=None,
                        help="a saved AR teacher (save_seq2seq folder, e.g. a run's units/teacher_params)")
    parser.add_argument("--units", default="all", help=f"comma-separated units to run, of {', '.join(UNITS)}")
    parser.add_argument("--report-only", action="store_true", help="write the report from the saved units")
    for name in ("teacher_steps", "student_steps", "distill_pairs"):  # to resize a run; recorded in "sizes"
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"override {name} (full run {FULL[name]}, --quick {QUICK[name]})")
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = Path(tempfile.gettempdir()) / "nar_distill_quick" if args.quick else common.RESULTS
    if args.quick and args.out_dir.resolve() == common.RESULTS.resolve():
        parser.error("--quick writes scratch results (they would enter docs/RESULTS.md): give --out-dir outside "
                     "benchmarks/results")
    if not args.train_file.is_file():
        parser.error(f"--train-file {args.train_file} does not exist")
    units = list(UNITS) if args.units == "all" else args.units.split(",")
    if set(units) - set(UNITS):
        parser.error(f"unknown units {sorted(set(units) - set(UNITS))}; choose from {', '.join(UNITS)}")
    sizes = {**(QUICK if args.quick else FULL),
             **{k: getattr(args, k) for k in ("teacher_steps", "student_steps", "distill_pairs")
                if getattr(args, k) is not None}}
    budgets(sizes)  # fails early on a student_steps that is not a multiple of 4
    stem = "nar_distill_quick" if args.quick else "nar_distill"
    unit_dir = args.out_dir / f"{stem}_units"
    unit_dir.mkdir(parents=True, exist_ok=True)
    # The saved models are working files; the units' JSON and the distilled targets (a few MB, so a fresh clone
    # can resume the students without the teacher) are kept.
    (unit_dir / ".gitignore").write_text("*_params/\n*.claim\n")
    if args.report_only:
        return report(args, sizes, stem, unit_dir)
    # The students' train steps (and decoders) are the same programs; a compilation cache shared within this
    # process compiles each once (training builds a fresh jitted step per run). Removed at exit.
    cache_dir = tempfile.TemporaryDirectory(prefix="nar_distill_xla_")
    jax.config.update("jax_compilation_cache_dir", cache_dir.name)
    task = Task(sizes, args.train_file)
    common.run_units(units, unit_dir, lambda unit: run_unit(unit, task, sizes, args, unit_dir))
    report(args, sizes, stem, unit_dir)


if __name__ == "__main__":
    main()
