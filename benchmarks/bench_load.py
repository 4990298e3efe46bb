"""Loading a checkpoint: wall time, peak host memory and bytes read, new loader vs today's vs transformers.

A synthetic Llama-shaped checkpoint (about 2 GB of bfloat16, random weights, several
safetensors files with `model.safetensors.index.json`) is written once and cached. Each
loader then runs in its own fresh subprocess, so its memory numbers are its own: the
subprocess imports everything and lets JAX initialise its devices, measures its baseline
RSS, loads (blocking until every array is ready), and reports the wall time and its peak
RSS above the baseline (VmHWM after resetting it through /proc/self/clear_refs, checked
against a thread sampling VmRSS every 5 ms). Loaders:

- ``new_mesh``: ``mm.load(dir, dtype=None, mesh=make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))`` on
  8 simulated CPU devices: every parameter made in its final sharding, bf16 kept;
- ``new_single``: ``mm.load(dir, dtype=None)`` on one device;
- ``old``: today's path (commit 89e0cc6, from a git worktree outside the repository):
  ``shard_params(mm.load(dir, dtype="bfloat16"), mesh)``, which reads every tensor into host
  numpy, widens bf16 to float32, stacks the layers and puts everything on one device first;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)``. It maps the
  files and keeps bf16 tensors as views of the mapping, so it returns before reading anything; the
  same process then touches one element of every 4 KiB page of every weight, reported as
  ``transformers_touched`` (wall time from the start of ``from_pretrained``, peak RSS including the
  file-backed pages, which the page cache shares);
- ``two_process``: two JAX processes (4 simulated CPU devices each, gloo collectives) loading
  onto one mesh over all 8 devices with the new API; each reports its peak RSS, the bytes it
  read (``makemost_jax.checkpoints.lazy.bytes_read()``) and its share (the distinct slices of
  its addressable shards).

Every loader is repeated (a fresh process each time; repeats interleaved across loaders) and
the medians are reported; the files are in the page cache for every run (warm reads). The
weights' float64 sum is compared across loaders (for the two-process run: the union of both
processes' slices), so a loader that reads the wrong bytes fails loudly. The ratios are
printed last; JSON, Markdown and an RSS-over-time plot go to `benchmarks/results/load_<tag>.*`.

Example:
    nice python benchmarks/bench_load.py                       # ~2 GB checkpoint, 3 repeats
    python benchmarks/bench_load.py --quick --out-dir /tmp/q   # a few MB, 1 repeat, < 1 minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
RESULT_PREFIX = "BENCH_LOAD_RESULT "
OLD_COMMIT = "89e0cc6"
LOADERS = ("new_mesh", "new_single", "old", "transformers", "two_process")
LABELS = {"new_mesh": "new, mesh 1x4x2 (8 devices)", "new_single": "new, 1 device",
          "old": f"old ({OLD_COMMIT}) + shard_params", "transformers": "transformers from_pretrained (mapped, unread)",
          "transformers_touched": "transformers from_pretrained + first touch of every weight page",
          "two_process": "new, 2 processes x 4 devices"}
MESH = {"data": 1, "fsdp": 4, "tensor": 2}
TARGET_PEAK = 1.3  # peak RSS above baseline / checkpoint bytes (one host) or / share (per process)
TARGET_READ = 0.10  # bytes read within 10% of the process's share
MiB = 2 ** 20

SPECS = {
    # ~0.94 B parameters, ~1.9 GB in bf16, in 500 MB files.
    "full": {"config": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18,
                        "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
                        "max_position_embeddings": 2048, "tie_word_embeddings": False},
             "max_shard_size": "500MB", "expect_bytes": (1.5e9, 2.5e9)},
    # ~5 M parameters, ~10 MB, in 4 MB files.
    "quick": {"config": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
                         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096,
                         "max_position_embeddings": 256, "tie_word_embeddings": False},
              "max_shard_size": "4MB", "expect_bytes": (2e6, 3e7)},
}


# ----------------------------------------------------------------------------- the checkpoint

def write_checkpoint(directory: Path, spec: dict) -> None:
    """Random bf16 Llama weights saved by transformers (runs in its own subprocess)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**spec["config"])
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):  # no init pass: allocate once, fill once
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms: around 1
                p.normal_(1.0, 0.1, generator=generator)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    model.config.dtype = "bfloat16"
    model.save_pretrained(directory, max_shard_size=spec["max_shard_size"])


def checkpoint_bytes(directory: Path) -> dict:
    """Tensor bytes (the index's total_size) and file bytes of the safetensors files."""
    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    total = json.loads(index.read_text()).get("metadata", {}).get("total_size") if index.exists() else None
    file_bytes = sum(f.stat().st_size for f in files)
    return {"tensor_bytes": int(total or file_bytes), "file_bytes": file_bytes, "n_files": len(files)}


def ensure_checkpoint(directory: Path, kind: str) -> dict:
    """Write the checkpoint unless `directory` already holds this one; return its sizes."""
    spec = SPECS[kind]
    marker = directory / "bench_load_spec.json"
    want = {"kind": kind, "config": spec["config"], "max_shard_size": spec["max_shard_size"]}
    if marker.exists() and json.loads(marker.read_text()).get("spec") == want:
        info = json.loads(marker.read_text())
        print(f"checkpoint: reusing {directory}", flush=True)
        return {**checkpoint_bytes(directory), "write_s": info.get("write_s"), "reused": True}
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("*.safetensors"), *directory.glob("*.json")]:
        stale.unlink()
    print(f"checkpoint: writing a {kind} Llama-shaped bf16 checkpoint to {directory} ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(SCRIPT), "--write", "--kind", kind, "--dir", str(directory)], check=True,
                   env={**os.environ, "PYTHONPATH": _pythonpath(ROOT)})
    sizes = checkpoint_bytes(directory)
    low, high = spec["expect_bytes"]
    if not low <= sizes["tensor_bytes"] <= high:
        raise SystemExit(f"checkpoint in {directory} holds {sizes['tensor_bytes']:,} bytes, outside the expected "
                         f"{low:,.0f}..{high:,.0f}; delete the directory and rerun")
    if sizes["n_files"] < 2 or not (directory / "model.safetensors.index.json").exists():
        raise SystemExit(f"checkpoint in {directory} is not sharded ({sizes['n_files']} file(s)); expected an index")
    write_s = time.perf_counter() - t0
    marker.write_text(json.dumps({"spec": want, "write_s": write_s, **sizes}, indent=2))
    print(f"checkpoint: {sizes['tensor_bytes'] / 1e9:.3f} GB of tensors in {sizes['n_files']} files, "
          f"written in {write_s:.0f} s", flush=True)
    return {**sizes, "write_s": write_s, "reused": False}


def ensure_old_worktree(path: Path, commit: str) -> tuple[bool, str]:
    """A detached git worktree of `commit` at `path` (created if missing); (ok, why not)."""
    def head(p):
        r = subprocess.run(["git", "-C", str(p), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        return r.stdout.strip() if r.returncode == 0 else None

    want = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", commit + "^{commit}"],
                          capture_output=True, text=True, check=False)
    if want.returncode != 0:
        return False, f"commit {commit} is not in this clone (shallow clone?)"
    want_sha = want.stdout.strip()
    if path.exists():
        if head(path) == want_sha and (path / "makemost_jax" / "loading.py").exists():
            return True, ""
        return False, f"{path} exists but is not a worktree of {commit}; remove it or pass --old-worktree"
    r = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), want_sha],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return False, f"git worktree add failed: {' '.join(r.stderr.split())[:200]}"
    return True, ""


# ----------------------------------------------------------------------------- inside one subprocess

def _statuses(*fields: str) -> dict[str, int]:
    """/proc/self/status memory fields in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name = line.split(":", 1)[0]
            if name in fields:
                out[name] = int(line.split()[1]) * 1024
    missing = set(fields) - set(out)
    if missing:
        raise RuntimeError(f"no {sorted(missing)} in /proc/self/status")
    return out


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    return _statuses(field)[field]


def _rchar() -> int:
    """Bytes this process has read through read()/pread() calls (mmap faults are not counted)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


class RssSampler(threading.Thread):
    """VmRSS (and its anonymous and file-backed parts) every `period` seconds: peaks and a trace."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, period=0.005):
        super().__init__(daemon=True)
        self.period, self.stop_event, self.trace = period, threading.Event(), []
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self.t0 = time.perf_counter()

    @property
    def peak(self) -> int:
        return self.peaks["VmRSS"]

    def sample(self):
        now = _statuses(*self.FIELDS)
        for k, v in now.items():
            self.peaks[k] = max(self.peaks[k], v)
        self.trace.append((time.perf_counter() - self.t0, now["VmRSS"]))

    def run(self):
        while not self.stop_event.is_set():
            self.sample()
            time.sleep(self.period)

    def stop(self):
        self.stop_event.set()
        self.join()
        self.sample()


def _thin(trace, n=400):
    step = max(1, len(trace) // n)
    return [[round(t, 4), round(b / MiB, 1)] for t, b in trace[::step]] + ([[round(trace[-1][0], 4),
                                                                            round(trace[-1][1] / MiB, 1)]]
                                                                          if trace else [])


def _jax_slices(weights) -> dict:
    """Per-process accounting of a pytree of jax Arrays.

    share: bytes of the distinct slices on this process's devices (each slice once);
    device: bytes of all addressable shards (replicas counted per device: on simulated
    CPU devices that is host memory); replicated: bytes of fully replicated leaves;
    sums: {leaf/slice: float64 sum} so the parent can check the weights across loaders.
    """
    import jax
    import numpy as np

    share = device = replicated = 0
    sums, dtypes, seen = {}, set(), set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(weights):
        name = jax.tree_util.keystr(path)
        dtypes.add(str(leaf.dtype))
        if leaf.sharding.is_fully_replicated:
            replicated += leaf.nbytes
        for shard in leaf.addressable_shards:
            device += shard.data.nbytes
            index = tuple((s.start, s.stop, s.step) for s in shard.index)
            key = f"{name}{list(index)}"
            if key in seen:
                continue
            seen.add(key)
            share += shard.data.nbytes
            sums[key] = float(np.asarray(shard.data).astype(np.float32).sum(dtype=np.float64))
    return {"share_bytes": share, "device_bytes": device, "replicated_bytes": replicated, "slice_sums": sums,
            "dtypes": sorted(dtypes), "n_leaves": len(jax.tree_util.tree_leaves(weights))}


def worker(args) -> dict:
    """Measure one load in this (fresh) process; returns the JSON-ready result."""
    loader, directory = args.worker, args.dir
    out = {"loader": loader, "pid": os.getpid()}
    if loader == "transformers":
        import torch
        import transformers
        import transformers.models.llama.modeling_llama  # imported before the baseline
        from transformers import AutoModelForCausalLM

        major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kwarg = "dtype" if major_minor >= (4, 56) else "torch_dtype"
        out.update(torch_threads=torch.get_num_threads(), dtype_kwarg=dtype_kwarg)

        def load():
            model = AutoModelForCausalLM.from_pretrained(directory, **{dtype_kwarg: torch.bfloat16})
            return model.eval()

        def materialise(model):
            # safetensors maps the files and from_pretrained keeps bf16 tensors as views of the
            # mapping, so nothing is read until used: touch one element per 4 KiB page.
            with torch.no_grad():
                for p in model.parameters():
                    p.detach().reshape(-1)[::4096 // p.element_size()].float().sum()

        def account(model):
            params = list(model.parameters())
            nbytes = sum(p.numel() * p.element_size() for p in params)
            total = sum(float(p.detach().float().sum(dtype=torch.float64)) for p in params)
            return {"share_bytes": nbytes, "device_bytes": nbytes, "replicated_bytes": 0,
                    "slice_sums": {"all": total}, "dtypes": sorted({str(p.dtype) for p in params}),
                    "n_leaves": len(params)}
    else:
        import inspect

        import jax
        import numpy as np

        import makemost_jax as mm
        import makemost_jax.checkpoints.hf
        import makemost_jax.loading
        from makemost_jax.sharding import MeshConfig, make_mesh, shard_params
        from makemost_jax.training import maybe_initialize_distributed

        out["makemost_jax_file"] = mm.__file__
        if loader == "old" and not mm.__file__.startswith(str(Path(args.old_worktree).resolve())):
            raise SystemExit(f"old loader: imported {mm.__file__}, not the worktree {args.old_worktree}")
        if loader in ("new_mesh", "new_single", "two_process"):
            if "mesh" not in inspect.signature(mm.load).parameters:
                return {**out, "skipped": "the new loader is not here yet: mm.load has no `mesh` argument"}
            try:
                from makemost_jax.checkpoints.lazy import bytes_read
            except ImportError as error:
                return {**out, "skipped": f"makemost_jax.checkpoints.lazy.bytes_read is missing ({error})"}
        else:
            def bytes_read():
                return None
        if loader == "two_process":
            assert maybe_initialize_distributed(f"127.0.0.1:{args.port}", 2, args.process_id)
            out["process_id"] = jax.process_index()
        # JAX's devices up and usable before the baseline.
        for d in jax.local_devices():
            jax.device_put(np.zeros(4, np.float32), d).block_until_ready()
        out.update(devices=jax.device_count(), local_devices=jax.local_device_count(),
                   processes=jax.process_count())
        mesh = make_mesh(MeshConfig(**MESH)) if loader != "new_single" else None

        def load():
            if loader == "old":
                params = mm.load(directory, dtype="bfloat16")
                params = shard_params(params, mesh)
            elif loader == "new_single":
                params = mm.load(directory, dtype=None)
            else:
                params = mm.load(directory, dtype=None, mesh=mesh)
            return jax.block_until_ready(params)

        def account(params):
            return _jax_slices(params.weights)

        materialise = None

    gc.collect()
    base = _statuses(*RssSampler.FIELDS)
    baseline = base["VmRSS"]
    hwm_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        hwm_reset = False
    read0, rchar0 = bytes_read() if loader != "transformers" else None, _rchar()
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    result = load()
    wall = time.perf_counter() - t0

    def peaks():
        hwm = _status("VmHWM")
        sampler.sample()
        return {"vmhwm_bytes": hwm, "sampled_peak_bytes": sampler.peak,
                "peak_above_baseline_bytes": (max(hwm, sampler.peak) if hwm_reset else sampler.peak) - baseline,
                "peak_anon_above_baseline_bytes": sampler.peaks["RssAnon"] - base["RssAnon"],
                "peak_file_above_baseline_bytes": sampler.peaks["RssFile"] - base["RssFile"],
                "retained_above_baseline_bytes": _status("VmRSS") - baseline, "rchar_bytes": _rchar() - rchar0}

    out.update(wall_s=wall, baseline_rss_bytes=baseline, hwm_reset=hwm_reset, **peaks())
    n_samples = len(sampler.trace)
    if materialise is not None:
        materialise(result)
        out["touched"] = {"wall_s": time.perf_counter() - t0, **peaks()}
    sampler.stop()
    read1 = bytes_read() if loader != "transformers" else None
    out.update(bytes_read=None if read0 is None or read1 is None else read1 - read0,
               rss_trace_mib=_thin(sampler.trace[:n_samples]))
    if materialise is not None:
        out["touched"]["rss_trace_mib"] = _thin(sampler.trace)
    out.update(account(result))
    if loader == "two_process":
        import jax

        jax.distributed.shutdown()
    return out


# ----------------------------------------------------------------------------- the parent

def _pythonpath(first: Path) -> str:
    rest = os.environ.get("PYTHONPATH")
    return str(first) + (os.pathsep + rest if rest else "")


def _env(n_devices: int, path: Path) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": _pythonpath(path), "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={n_devices}"])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse(proc_out: str, what: str) -> dict:
    lines = [line for line in proc_out.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"{what} printed no result:\n{proc_out[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def run_loader(loader: str, directory: Path, old_worktree: Path, timeout: float) -> list[dict]:
    """One measurement (two for the two-process run), each in fresh processes."""
    base = [sys.executable, str(SCRIPT), "--worker", loader, "--dir", str(directory),
            "--old-worktree", str(old_worktree)]
    if loader == "two_process":
        port = _free_port()
        procs = [subprocess.Popen([*base, "--port", str(port), "--process-id", str(i)], env=_env(4, ROOT),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        try:
            outs = [p.communicate(timeout=timeout)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, o in zip(procs, outs):
            if p.returncode != 0:
                raise RuntimeError(f"two_process worker exited {p.returncode}:\n{o[-3000:]}")
        return [_parse(o, f"two_process worker {i}") for i, o in enumerate(outs)]
    n_devices = 1 if loader == "new_single" else 8
    path = old_worktree if loader == "old" else ROOT
    proc = subprocess.run(base, env=_env(n_devices, path), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{loader} worker exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return [_parse(proc.stdout, loader)]


def _median(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(loader: str, runs: list[list[dict]], ckpt_bytes: int) -> list[dict]:
    """One row per loader (per process for the two-process run), medians over repeats."""
    rows = []
    for pid in range(len(runs[0])):
        per = [r[pid] for r in runs]
        last = per[-1]
        row = {"loader": loader, "label": LABELS[loader], "repeats": len(per)}
        if len(runs[0]) > 1:
            row["process_id"] = pid
            row["label"] += f", process {pid}"
        for key in ("wall_s", "peak_above_baseline_bytes", "baseline_rss_bytes", "retained_above_baseline_bytes",
                    "peak_anon_above_baseline_bytes", "peak_file_above_baseline_bytes",
                    "bytes_read", "rchar_bytes", "sampled_peak_bytes", "vmhwm_bytes"):
            row[key] = _median(per, key)
        for key in ("share_bytes", "device_bytes", "replicated_bytes", "dtypes", "n_leaves", "devices",
                    "local_devices", "processes", "makemost_jax_file", "torch_threads", "dtype_kwarg", "hwm_reset"):
            if key in last:
                row[key] = last[key]
        row["wall_s_all"] = [r["wall_s"] for r in per]
        row["peak_above_baseline_bytes_all"] = [r["peak_above_baseline_bytes"] for r in per]
        row["peak_over_checkpoint"] = row["peak_above_baseline_bytes"] / ckpt_bytes
        if loader == "two_process":
            row["peak_over_share"] = row["peak_above_baseline_bytes"] / row["share_bytes"]
            row["read_over_share"] = row["bytes_read"] / row["share_bytes"] if row["bytes_read"] is not None else None
            row["target_peak_met"] = row["peak_over_share"] <= TARGET_PEAK
            row["target_read_met"] = (row["read_over_share"] is not None
                                      and abs(row["read_over_share"] - 1) <= TARGET_READ)
        elif loader.startswith("new"):
            row["target_peak_met"] = row["peak_over_checkpoint"] <= TARGET_PEAK
            if row["bytes_read"] is not None:
                row["read_over_checkpoint"] = row["bytes_read"] / ckpt_bytes
        median_run = min(per, key=lambda r: abs(r["wall_s"] - row["wall_s"]))
        row["rss_trace_mib"] = median_run["rss_trace_mib"]
        rows.append(row)
    return rows


def checksums(loader: str, runs: list[list[dict]]) -> float:
    """The weights' float64 sum seen by `loader`'s last repeat (union of the processes' slices)."""
    merged = {}
    for r in runs[-1]:
        merged.update(r["slice_sums"])
    return sum(merged.values())


def _gb(x):
    return "n/a" if x is None else f"{x / 1e9:.3f}"


def table(rows: list[dict]) -> str:
    head = ("| loader | wall (s, median) | peak RSS above baseline (GB) | / checkpoint | / share "
            "| of it anon / file-backed (GB) | retained (GB) | bytes read (GB) | rchar (GB) | share (GB) "
            "| dtypes | target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['label']} | skipped: {r['skipped']} |" + " |" * 10)
            continue
        if r["loader"] == "two_process":
            target = (f"peak <= {TARGET_PEAK}x share: {'met' if r['target_peak_met'] else 'MISSED'}; "
                      f"read within {TARGET_READ:.0%} of share: {'met' if r['target_read_met'] else 'MISSED'}")
        elif r["loader"].startswith("new"):
            target = f"peak <= {TARGET_PEAK}x checkpoint: {'met' if r['target_peak_met'] else 'MISSED'}"
        else:
            target = ""
        share = r.get("peak_over_share")
        lines.append(
            f"| {r['label']} | {r['wall_s']:.2f} | {_gb(r['peak_above_baseline_bytes'])} "
            f"| {r['peak_over_checkpoint']:.2f}x | {'' if share is None else f'{share:.2f}x'} "
            f"| {_gb(r['peak_anon_above_baseline_bytes'])} / {_gb(r['peak_file_above_baseline_bytes'])} "
            f"| {_gb(r['retained_above_baseline_bytes'])} | {_gb(r['bytes_read'])} | {_gb(r['rchar_bytes'])} "
            f"| {_gb(r.get('share_bytes'))} | {','.join(r.get('dtypes', []))} | {target} |")
    return "\n".join(lines)


def ratio_lines(rows: list[dict], ckpt_bytes: int, quick: bool = False) -> list[str]:
    by = {r["loader"]: r for r in rows if not r.get("skipped") and "process_id" not in r}
    lines = [("--quick: a few-MB checkpoint, where fixed overheads dominate; the ratios below say nothing "
              "about the targets")] if quick else []
    lines.append(f"peak RSS above baseline / checkpoint bytes ({ckpt_bytes / 1e9:.3f} GB):")
    for r in rows:
        if r.get("skipped"):
            lines.append(f"  {r['label']}: skipped ({r['skipped']})")
            continue
        note = ""
        if r["loader"].startswith("new"):
            note = f"  [target <= {TARGET_PEAK}x: {'met' if r['target_peak_met'] else 'MISSED'}; 1.0x is the floor]"
        elif r["loader"] == "two_process":
            note = (f"  [/ share {r['peak_over_share']:.2f}x, target <= {TARGET_PEAK}x: "
                    f"{'met' if r['target_peak_met'] else 'MISSED'}; bytes read / share "
                    f"{r['read_over_share'] if r['read_over_share'] is None else round(r['read_over_share'], 3)}, "
                    f"target 1 +- {TARGET_READ}: {'met' if r['target_read_met'] else 'MISSED'}]")
        elif r["loader"] == "old":
            note = "  [expected ~3.9x]"
        elif r["loader"] == "transformers":
            note = "  [weights mapped, not yet read]"
        elif r["loader"] == "transformers_touched":
            note = "  [expected ~0.9x; file-backed pages, shared with the page cache]"
        lines.append(f"  {r['label']}: {r['peak_over_checkpoint']:.2f}x{note}")
    if "old" in by and "new_mesh" in by:
        lines.append(f"wall time new (mesh) / old: {by['new_mesh']['wall_s'] / by['old']['wall_s']:.2f}x")
    if "new_mesh" in by and "transformers" in by:
        for name, what in (("transformers_touched", "transformers + touching every weight"),
                           ("transformers", "transformers from_pretrained alone (nothing read)")):
            ratio = by["new_mesh"]["wall_s"] / by[name]["wall_s"]
            lines.append(f"wall time new (mesh) / {what}: {ratio:.2f}x  [target <= 1.0x: "
                         f"{'met' if ratio <= 1.0 else 'MISSED'}]")
    else:
        lines.append("wall time new (mesh) / transformers: n/a (a loader was skipped)")
    return lines


def report_rows(rows: list[dict], ckpt_bytes: int, kind: str) -> list[dict]:
    """The headline row for docs/RESULTS.md: peak RSS / checkpoint of each loader, wall time vs transformers."""
    from common import report_row

    by = {r["loader"]: r for r in rows if not r.get("skipped") and "process_id" not in r}
    if "new_mesh" not in by:
        return []
    names = {"old": "old", "transformers_touched": "transformers (weights touched)"}
    parts = [f"new {by['new_mesh']['peak_over_checkpoint']:.2f}x"]
    parts += [f"{names[k]} {by[k]['peak_over_checkpoint']:.2f}x" for k in names if k in by]
    wall = (f"; wall new / transformers (weights touched) "
            f"{by['new_mesh']['wall_s'] / by['transformers_touched']['wall_s']:.1f}x"
            if "transformers_touched" in by else "")
    return [report_row("Models", f"peak host RSS / checkpoint bytes, {ckpt_bytes / 1e9:.1f} GB bf16 Llama "
                       f"({kind}), mesh 1x4x2 on 8 CPU devices", ", ".join(parts) + wall)]


def plot(rows: list[dict], path: Path, title: str, ckpt_bytes: int | None = None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        if r.get("skipped") or not r.get("rss_trace_mib"):
            continue
        t, mib = zip(*r["rss_trace_mib"])
        base = r["baseline_rss_bytes"] / MiB
        ax.plot(t, [(m - base) / 1024 for m in mib], label=r["label"])
    if ckpt_bytes:
        ax.axhline(ckpt_bytes / 2 ** 30, color="grey", linestyle="--", linewidth=1, label="checkpoint bytes")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("RSS above baseline (GiB)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None,
                        help="checkpoint cache (default /tmp/makemost_bench_load, or ..._quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="a few-MB checkpoint and 1 repeat (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="fresh processes per loader (default 3; 1 quick)")
    parser.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated subset of {','.join(LOADERS)}")
    parser.add_argument("--old-worktree", default="/tmp/makemost_old_loader")
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--tag", default=None, help="results stem load_<tag> (default cpu; cpu_quick with --quick)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    # internal: one measurement in this process, or the checkpoint writer
    parser.add_argument("--worker", choices=LOADERS, help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=sorted(SPECS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.write:
        write_checkpoint(Path(args.dir), SPECS[args.kind])
        return
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    sys.path.insert(0, str(SCRIPT.parent))
    from common import load_average, machine, machine_line

    kind = "quick" if args.quick else "full"
    repeats = args.repeats or (1 if args.quick else 3)
    directory = Path(args.dir or ("/tmp/makemost_bench_load" + ("_quick" if args.quick else "")))
    tag = args.tag or ("cpu_quick" if args.quick else "cpu")
    loaders = [x for x in args.loaders.split(",") if x]
    unknown = set(loaders) - set(LOADERS)
    if unknown:
        raise SystemExit(f"unknown loader(s) {sorted(unknown)}; choose from {', '.join(LOADERS)}")
    timeout = 300 if args.quick else 1800

    info = machine()  # the load average before the runs
    ckpt = ensure_checkpoint(directory, kind)
    ckpt_bytes = ckpt["tensor_bytes"]
    skipped = {}
    old_worktree = Path(args.old_worktree)
    if "old" in loaders:
        ok, why = ensure_old_worktree(old_worktree, args.old_commit)
        if not ok:
            skipped["old"] = f"no worktree of {args.old_commit}: {why}"
            print(f"old loader SKIPPED: {skipped['old']}", flush=True)

    runs = {name: [] for name in loaders}
    t_all = time.perf_counter()
    for rep in range(repeats):  # interleaved, so drift in machine load hits every loader alike
        for name in loaders:
            if name in skipped:
                continue
            t0 = time.perf_counter()
            result = run_loader(name, directory, old_worktree, timeout)
            if result[0].get("skipped"):
                skipped[name] = result[0]["skipped"]
                print(f"{name} SKIPPED: {skipped[name]}", flush=True)
                continue
            runs[name].append(result)
            desc = "; ".join(f"{r['wall_s']:.2f} s, peak +{r['peak_above_baseline_bytes'] / 1e9:.3f} GB" for r in result)
            print(f"[{rep + 1}/{repeats}] {name}: {desc} ({time.perf_counter() - t0:.0f} s with start-up)", flush=True)

    rows, sums = [], {}
    for name in loaders:
        if name in skipped:
            rows.append({"loader": name, "label": LABELS[name], "skipped": skipped[name]})
            continue
        rows.extend(summarise(name, runs[name], ckpt_bytes))
        sums[name] = checksums(name, runs[name])
        if name == "transformers":  # the same processes, after touching every weight page
            touched = [[{**r, **r["touched"], "loader": "transformers_touched"} for r in run] for run in runs[name]]
            rows.extend(summarise("transformers_touched", touched, ckpt_bytes))
    reference = next(iter(sums.values()), None)
    agree = {name: abs(s - reference) <= 1e-9 * max(1.0, abs(reference)) for name, s in sums.items()}

    info.update(load_average_at_end=load_average(), transformers=metadata.version("transformers"), torch=metadata.version("torch"),
                safetensors=metadata.version("safetensors"))
    threads = [r["torch_threads"] for r in rows if r.get("torch_threads")]
    info["torch_threads"] = threads[0] if threads else None
    payload = {
        "checkpoint": {"dir": str(directory), "kind": kind, "config": SPECS[kind]["config"], "dtype": "bfloat16",
                       "max_shard_size": SPECS[kind]["max_shard_size"], **ckpt},
        "mesh": MESH, "repeats": repeats, "page_cache": "warm (files read before every measured run)",
        "targets": {"peak_over_checkpoint_new": TARGET_PEAK, "peak_over_share_per_process": TARGET_PEAK,
                    "read_over_share_tolerance": TARGET_READ, "wall_new_over_transformers": 1.0},
        "weights_sum": sums, "weights_sum_agree": agree, "skipped": skipped, "results": rows,
        "total_s": time.perf_counter() - t_all,
    }
    table_md = table(rows)
    ratios = ratio_lines(rows, ckpt_bytes, args.quick)
    report = report_rows(rows, ckpt_bytes, kind)
    notes = (
        f"Checkpoint: {directory} ({ckpt['n_files']} safetensors files, {ckpt_bytes:,} tensor bytes, random "
        f"weights; config {json.dumps(SPECS[kind]['config'])}). Each loader in a fresh process, median of "
        f"{repeats} repeat(s); page cache warm. Peak = VmHWM (reset after imports and device start-up) minus the "
        f"RSS then, split into anonymous and file-backed (mapped) memory; rchar = bytes read through "
        f"read()/pread() (mmap reads are not counted); share = the distinct slices of the process's addressable "
        f"shards. transformers maps the files and returns before reading them: its second row adds touching "
        f"one element per 4 KiB page of every weight, in the same process. On simulated CPU devices the device "
        f"buffers are host memory, so 1.0x the checkpoint is the floor for a one-host load. Targets: new path "
        f"peak <= {TARGET_PEAK}x the checkpoint (one host) and <= {TARGET_PEAK}x its share per process, bytes "
        f"read within {TARGET_READ:.0%} of the share, wall time no slower than transformers.")
    md = "\n".join([
        f"# Loading a {ckpt_bytes / 1e9:.2f} GB bf16 Llama-shaped checkpoint: wall time and peak host memory ({tag})",
        "", machine_line(info), "",
        notes,
        "", f"Command: `{payload_command()}`", "", table_md, "",
        "Weights' float64 sum per loader (must agree): " + ", ".join(
            f"{k} {v:.6f} ({'agrees' if agree[k] else 'DIFFERS'})" for k, v in sums.items()),
        "", *([f"Skipped: {k}: {v}" for k, v in skipped.items()] + [""] if skipped else []),
        "```", *ratios, "```", "", f"![RSS over time](load_{tag}.png)"])

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"load_{tag}.json").write_text(json.dumps(
        {"machine": info, "command": payload_command(), **payload, "report": report}, indent=2, default=str) + "\n")
    (out_dir / f"load_{tag}.md").write_text(md + "\n")
    plot(rows, out_dir / f"load_{tag}.png", f"Loading {ckpt_bytes / 1e9:.2f} GB of bf16 (median run of each loader)",
         ckpt_bytes)
    print()
    print(table_md)
    print()
    if skipped:
        for k, v in skipped.items():
            print(f"skipped {k}: {v}")
    if not all(agree.values()):
        print(f"WARNING: the loaders' weights differ: {sums}")
    print(f"wrote {out_dir / f'load_{tag}.json'} and .md")
    print("\n".join(ratios))


def payload_command() -> str:
    from common import command_line

    return command_line()


if __name__ == "__main__":
    main()
