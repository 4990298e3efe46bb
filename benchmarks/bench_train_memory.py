"""Training-step memory per device under data, fsdp and tensor sharding; MFU on a GPU.

Default (CPU): 8 simulated devices (`--xla_force_host_platform_device_count=8`, set here
before JAX starts). For the GPT-2-small shape, the train step (`makemost_jax.training`:
AdamW, float32 master weights, bfloat16 compute, one 1024-token row per device) is
compiled abstractly for each mesh, and XLA's `memory_analysis()` gives the bytes one
device needs: arguments (params + optimizer state + its batch rows), temporaries
(activations, gradients, gathered weights) and outputs (aliased to the donated inputs).
Nothing runs, so this is a statement about sharding, not speed. With fsdp over 8
devices the resident params + optimizer state should be 1/8 of the total.

`--gpu`: one real device; times the bf16 training step of the GPT-2-small and
SmolLM2-135M shapes and reports model FLOPs utilisation (3 x forward matmul FLOPs, the
convention of `bench_forward.py`) against the card's measured bf16 matmul rate.

Example:
    python benchmarks/bench_train_memory.py            # ~2 min on 2 CPU cores
    python benchmarks/bench_train_memory.py --gpu      # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import sys

if "--gpu" not in sys.argv:  # must precede the first JAX import
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import MiB, command_line, machine, report_row

import makemost_jax as mm
from makemost_jax.sharding import MeshConfig, activate, batch_sharding, make_mesh
from makemost_jax.training import TrainConfig, TrainState, make_optimizer, make_train_step, train_state_shardings

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {
    "gpt2-small": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
                   "n_positions": 1024},
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
}
# name -> (data, fsdp, tensor, remat). GPT-2 small has 12 heads, so tensor=4 (not 8) splits them.
MESHES = {
    "data": (8, 1, 1, "none"),
    "fsdp": (1, 8, 1, "none"),
    "tensor (data 2 x tensor 4)": (2, 1, 4, "none"),
    "fsdp 4 x tensor 2": (1, 4, 2, "none"),
    "fsdp, remat=full per layer": (1, 8, 1, "full"),
}


def memory_report_rows(payload: dict) -> list[dict]:
    """Headline rows for docs/RESULTS.md: per-device peak of the training step on each mesh."""
    return [report_row("Training", f"per-device peak of a {payload['shape']} training step, {r['batch']}, "
                                   f"8 simulated devices, {r['mesh']}, remat {r['remat']}",
                       f"{r['peak_bytes'] / MiB:,.0f} MiB (state {r['state_bytes_per_device'] / MiB:,.0f} MiB)")
            for r in payload["rows"]]


def mfu_report_rows(payload: dict) -> list[dict]:
    """Headline rows for docs/RESULTS.md: the training step's MFU on the GPU."""
    return [report_row("Training", f"training-step MFU, {r['shape']}, bf16, {r['batch']}",
                       f"{r['mfu']:.1%} ({r['tokens_per_s']:,.0f} tok/s)") for r in payload["rows"]]


def abstract_state(shape: str, config: TrainConfig):
    cfg = mm.from_hf_config(SHAPES[shape])
    params = jax.eval_shape(lambda: mm.init_params(cfg, jax.random.key(0)))
    tx, _ = make_optimizer(config)
    return jax.eval_shape(lambda p: TrainState.create(p, tx, config.seed), params)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compiled_memory(name: str, rows_per_device: int, length: int) -> dict:
    """Compile the GPT-2-small train step for mesh `name`; XLA's per-device bytes."""
    data, fsdp, tensor, remat = MESHES[name]
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    config = TrainConfig(compute_dtype="bfloat16", remat=remat)
    state = abstract_state("gpt2-small", config)
    placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, train_state_shardings(state, mesh))
    global_rows = rows_per_device * data * fsdp
    batch = {"tokens": jax.ShapeDtypeStruct((global_rows, length + 1), jnp.int32,
                                            sharding=batch_sharding(mesh, 2, batch_size=global_rows))}
    t0 = time.perf_counter()
    with activate(mesh):  # as `train` does: the model's activations get sharding constraints
        stats = make_train_step(config, state, mesh=mesh).lower(placed, batch, None).compile().memory_analysis()
    resident = sum(int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize for s in jax.tree.leaves(placed))
    peak = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes \
        + stats.temp_size_in_bytes
    return {"mesh": name, "data": data, "fsdp": fsdp, "tensor": tensor, "remat": remat,
            "batch": f"{global_rows} x {length}", "state_bytes_per_device": resident,
            "argument_bytes": stats.argument_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes,
            "output_bytes": stats.output_size_in_bytes, "alias_bytes": stats.alias_size_in_bytes,
            "peak_bytes": peak, "compile_s": time.perf_counter() - t0}


def run_memory(args):
    total_state = nbytes(abstract_state("gpt2-small", TrainConfig()))
    rows = []
    for name in MESHES:
        row = compiled_memory(name, args.rows_per_device, args.length)
        row["state_fraction"] = row["state_bytes_per_device"] / total_state
        rows.append(row)
        print(f"{name:32s} state/device {row['state_bytes_per_device'] / MiB:8.1f} MiB "
              f"({row['state_fraction']:.3f} of all)  peak {row['peak_bytes'] / MiB:8.1f} MiB  "
              f"[compile {row['compile_s']:.0f} s]", flush=True)
    info = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": command_line(), "shape": "gpt2-small",
               "params_plus_optimizer_bytes": total_state, "rows": rows}
    (RESULTS / "train_memory.json").write_text(json.dumps({**payload, "report": memory_report_rows(payload)},
                                                          indent=2))
    lines = [
        "# Training-step memory per device, GPT-2 small (compiled, not run)",
        "",
        f"Machine: {', '.join(f'{k}={v}' for k, v in info.items())}",
        "",
        (f"AdamW, float32 master weights + moments ({total_state / MiB:.0f} MiB in all), bfloat16 compute, "
         f"{args.rows_per_device} row(s) of {args.length} tokens per batch device. Bytes are XLA's "
         "`memory_analysis()` of the compiled step for one device: state = params + optimizer state "
         "resident on it; peak = arguments + temporaries + outputs - outputs aliased to donated inputs. "
         "Command: `python benchmarks/bench_train_memory.py`."),
        "",
        ("| mesh (data x fsdp x tensor) | remat | global batch | params+opt per device (MiB) | share of all "
         "| temporaries (MiB) | peak per device (MiB) |"),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mesh']} ({r['data']} x {r['fsdp']} x {r['tensor']}) | {r['remat']} | {r['batch']} "
                     f"| {r['state_bytes_per_device'] / MiB:.1f} | {r['state_fraction']:.3f} "
                     f"| {r['temp_bytes'] / MiB:.1f} | {r['peak_bytes'] / MiB:.1f} |")
    (RESULTS / "train_memory.md").write_text("\n".join(lines) + "\n")
    fsdp = next(r for r in rows if r["mesh"] == "fsdp")
    print(f"fsdp keeps {fsdp['state_fraction']:.3f} of params+optimizer per device (1/8 = 0.125)")


def run_gpu(args):
    from bench_forward import forward_flops, matmul_rate

    peak = matmul_rate(jnp.bfloat16)
    rows = []
    for shape, hf_config in SHAPES.items():
        cfg = mm.from_hf_config(hf_config)
        config = TrainConfig(compute_dtype="bfloat16", remat=args.remat)
        state = TrainState.create(mm.init_params(cfg, jax.random.key(0)), make_optimizer(config)[0])
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.length + 1), np.int32)
        batch = {"tokens": jax.device_put(tokens)}
        step = make_train_step(config, state)
        for _ in range(2):  # compile + warm up
            state, metrics = step(state, batch, None)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, metrics = step(state, batch, None)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        flops = 3 * forward_flops(cfg, args.batch, args.length)
        rows.append({"shape": shape, "batch": f"{args.batch} x {args.length}", "remat": args.remat,
                     "step_s": seconds, "tokens_per_s": args.batch * args.length / seconds,
                     "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak,
                     "loss": float(metrics["loss"])})
        print(f"{shape}: {seconds * 1e3:.1f} ms/step, {rows[-1]['tokens_per_s']:.0f} tok/s, "
              f"{rows[-1]['tflops']:.0f} TFLOP/s, MFU {rows[-1]['mfu']:.1%}", flush=True)
    info = {**machine(), "bf16_matmul_tflops": peak / 1e12}
    out = RESULTS / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": command_line(), "rows": rows}
    (out / "train_mfu_gpu_bf16.json").write_text(json.dumps({**payload, "report": mfu_report_rows(payload)},
                                                            indent=2))
    lines = ["# Training-step MFU, bfloat16 compute, float32 master weights (AdamW)", "",
             f"Machine: {', '.join(f'{k}={v}' for k, v in info.items())}", "",
             ("MFU = 3 x forward matmul FLOPs (bench_forward.forward_flops, full T x T attention) per second, "
              f"over the measured bf16 matmul rate; median of {args.repeats} steps after warm-up. "
              "Command: `python benchmarks/bench_train_memory.py --gpu`."), "",
             "| shape | batch x length | remat | ms/step | tokens/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['remat']} | {r['step_s'] * 1e3:.1f} "
                     f"| {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {r['mfu']:.1%} |")
    (out / "train_mfu_gpu_bf16.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="time the step on the GPU and report MFU")
    parser.add_argument("--rows-per-device", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16, help="--gpu: rows per step")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--remat", default="none", help="--gpu: remat policy name (TrainConfig.remat)")
    args = parser.parse_args(argv)
    run_gpu(args) if args.gpu else run_memory(args)


if __name__ == "__main__":
    main()
