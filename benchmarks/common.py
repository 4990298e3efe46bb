"""What every benchmark and experiment shares: where it ran, XLA's memory numbers, and the results files.

Each script writes `benchmarks/results/<stem>.json` and `<stem>.md`. The JSON carries `machine`, `command`
and a `report` list of headline rows ({"area", "result", "value"}) that `makemost report` gathers into
docs/RESULTS.md, so the project's results table is regenerated from the scripts' outputs, never edited by hand.

Example:
    >>> row = report_row("HSO", "perplexity on Persuasion", "42.92 (lr=0: 44.11)")
    >>> sorted(row)
    ['area', 'result', 'value']
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MiB = 2 ** 20


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform module only gives the architecture)."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine slows PyTorch's threads far more than XLA's."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine() -> dict:
    """A description of where the numbers were measured (PyTorch's part only when it is imported)."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "jax_device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "load_average_at_start": load_average()}
    if jax.default_backend() != "cpu":
        info["gpu"] = jax.devices()[0].device_kind  # what the report names the machine by
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        info["transformers"] = transformers.__version__
    return info


def machine_line(info: dict) -> str:
    """One Markdown line naming the machine, for the top of a results file."""
    usable = info.get("cores_usable", info["cpu_count"])
    pinned = f", this process pinned to {usable}" if usable < info["cpu_count"] else ""
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores{pinned})"
    torch = f", torch {info['torch']} ({info['torch_threads']} threads)" if "torch" in info else ""
    return (f"Machine: {where}, JAX {info['jax']} on {info['jax_backend']}{torch}; {info['date']}, load average "
            f"{info['load_average_at_start']} at start.")


def memory_mib(compiled) -> dict:
    """XLA's memory analysis of a compiled function, in MiB (peak = arguments + temporaries + outputs - aliased)."""
    m = compiled.memory_analysis()
    parts = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
             "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes}
    parts["peak"] = parts["arguments"] + parts["temporaries"] + parts["outputs"] - parts["aliased"]
    return {k: round(v / MiB, 1) for k, v in parts.items()}


def report_row(area: str, result: str, value: str) -> dict:
    """One headline row for docs/RESULTS.md: the method area, what was measured, and the number(s)."""
    return {"area": area, "result": result, "value": value}


def command_line() -> str:
    """How this script was run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script.name
    return " ".join(["python", str(name), *sys.argv[1:]])


def claim(path: Path) -> bool:
    """Take the unit of work saved at `path` for this process, unless another live process holds it.

    Experiments split into units (each saved as a file when done) let two processes pinned to one core each
    share the work, and a killed run resume: a unit file that exists is done, a `.claim` file names its runner.
    """
    lock = path.with_suffix(".claim")
    try:
        holder = int(lock.read_text())
        os.kill(holder, 0)  # raises when that process is gone
        return False
    except (OSError, ValueError):
        lock.write_text(str(os.getpid()))
        return True


def wait_for(path: Path, poll_s: float = 20.0) -> None:
    """Block until the unit saved at `path` exists; fail if nobody is running it (run that unit first)."""
    lock = path.with_suffix(".claim")
    while not path.exists():
        try:
            os.kill(int(lock.read_text()), 0)
        except (OSError, ValueError):
            raise SystemExit(f"{path.name} is needed and neither saved nor running: run its unit first") from None
        time.sleep(poll_s)


def unit_path(unit_dir: Path, unit: str) -> Path:
    """Where a unit's results are saved (":" in a unit name is not portable in file names)."""
    return unit_dir / f"{unit.replace(':', '_')}.json"


def run_units(units: list[str], unit_dir: Path, run, time_key: str = "wall_seconds") -> None:
    """Run and save each unit that is neither saved nor claimed by a live process (`claim`).

    `run(unit)` returns a JSON-able dict; it is saved with the unit's name and its wall time under `time_key`.
    """
    for unit in units:
        path = unit_path(unit_dir, unit)
        if path.exists():
            print(f"[{unit}] done earlier", flush=True)
            continue
        if not claim(path):
            print(f"[{unit}] running in another process", flush=True)
            continue
        print(f"[{unit}]", flush=True)
        t0 = time.perf_counter()
        result = run(unit)
        path.write_text(json.dumps({"unit": unit, time_key: time.perf_counter() - t0, **result}, indent=1,
                                   default=str))
        path.with_suffix(".claim").unlink()


def saved_units(units: list[str], unit_dir: Path) -> dict | None:
    """{unit: its saved results} once every unit is saved; None, after naming the missing ones, before."""
    missing = [u for u in units if not unit_path(unit_dir, u).exists()]
    if missing:
        print(f"units still to run: {', '.join(missing)}; the report is written when they are done")
        return None
    return {u: json.loads(unit_path(unit_dir, u).read_text()) for u in units}


def unit_free_command() -> str:
    """`command_line()` without `--units X` and `--report-only`: how units were split is not how to reproduce."""
    words = command_line().split()
    return " ".join(w for i, w in enumerate(words) if w not in ("--units", "--report-only")
                    and (i == 0 or words[i - 1] != "--units"))


def write_results(stem: str, payload: dict, markdown: str, report: list[dict] | None = None,
                  out_dir: Path = RESULTS) -> Path:
    """Write `<stem>.json` (payload + machine, command and report rows unless given) and `<stem>.md` in `out_dir`.

    Quick runs pass a temporary `out_dir`: only full runs belong in benchmarks/results (docs/RESULTS.md
    is built from every JSON there).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "command": command_line(), **payload}
    if report is not None:
        payload["report"] = report
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown.rstrip() + "\n")
    return path


def timed(fn):
    """(seconds, result) of one call of `fn`."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median ms of `repeats` calls of `fn` after `warmup` calls (the first compiles; a second call
    compiles again if the first returned other input types)."""
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(timed(fn)[0] for _ in range(repeats))


def matmul_times(shapes: list[tuple], rows: int, repeats: int, chain: int = 16) -> list[dict]:
    """ms and GFLOP/s of each dense matmul of a step, JAX and PyTorch, same inputs, same threads.

    `shapes`: (name, K, N, count, layout) with `layout` "NN" for `x @ w`, w stored (K, N), or "NT" for
    `x @ w.T`, w stored (N, K) (a linear layer's backward, a tied head). `count`: how often the step runs it.
    Each is timed as `chain` dependent products, JAX's inside one jitted loop (a jitted call per product
    would time JAX's dispatch instead of its matmul). Each product's output is added, scaled down, into
    part of the next input, elementwise: feeding it through a reduction (say its mean) lets XLA fuse the
    product with the reduction into a kernel that runs on one thread, half the speed on two cores.
    """
    import torch  # only the scripts that compare with PyTorch call this

    def product(x, w, layout):
        return x @ (w.T if layout == "NT" else w)

    def jax_feed(x, y):  # x (M, K), y (M, N)
        k, n = x.shape[1], y.shape[1]
        return x + 1e-6 * y[:, :k] if n >= k else x.at[:, :n].add(1e-6 * y)  # (in place in the loop)

    @functools.partial(jax.jit, static_argnames="layout")
    def jax_loop(x, w, layout):
        return jax.lax.fori_loop(0, chain, lambda _, c: jax_feed(c, product(c, w, layout)), x)

    def torch_loop(x, w, layout):
        k = x.shape[1]
        for _ in range(chain):
            y = product(x, w, layout)
            if y.shape[1] >= k:
                x = x + 1e-6 * y[:, :k]
            else:
                x[:, :y.shape[1]] += 1e-6 * y
        return x

    rng = np.random.default_rng(0)
    out = []
    for name, k, n, count, layout in shapes:
        x = rng.standard_normal((rows, k), np.float32)
        w = 0.02 * rng.standard_normal((k, n) if layout == "NN" else (n, k), np.float32)
        xj, wj, xt, wt = jax.numpy.asarray(x), jax.numpy.asarray(w), torch.tensor(x), torch.from_numpy(w)
        with torch.inference_mode():
            ms = {"jax": median_ms(lambda a=xj, b=wj, f=layout: jax_loop(a, b, f).block_until_ready(), repeats) / chain,
                  "torch": median_ms(lambda a=xt, b=wt, f=layout: torch_loop(a, b, f), repeats) / chain}
        out.append({"matmul": name, "shape": [rows, k, n], "layout": layout, "count": count, "ms": ms,
                    "gflop_per_s": {fw: 2 * rows * k * n / (t * 1e6) for fw, t in ms.items()}})
    return out
