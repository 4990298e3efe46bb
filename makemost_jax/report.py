"""`makemost report`: every measured result of the project in one table, rebuilt from the results files.

Each benchmark and experiment script writes `benchmarks/results/<stem>.json` with the machine it ran on,
the command that produced it and a `report` list of headline rows ({"area", "result", "value"};
`benchmarks/common.py`). This module gathers those rows, one table row each with the command, the
machine and the date, embeds the plots the scripts wrote (`<stem>.png`), and writes `docs/RESULTS.md`.
Nothing in the table is typed by hand: rerunning a script and then `makemost report` updates it.

Example:
    >>> import json, tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "x.json").write_text(json.dumps({"command": "python benchmarks/x.py",
    ...     "machine": {"cpu": "AMD EPYC", "cpu_count": 2, "date": "2026-11-26T10:00:00"},
    ...     "report": [{"area": "HSO", "result": "perplexity", "value": "42.9"}]}))
    >>> [(r.area, r.value, r.machine, r.date) for r in collect_rows(folder)]
    [('HSO', '42.9', 'AMD EPYC (2 cores)', '2026-11-26')]
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from makemost_jax.errors import InputError

# The order of the areas in the table; areas not listed follow, alphabetically.
AREAS = ("Models", "Training", "HSO", "Few-shot", "Beam search", "CBS", "Exact search", "Likelihood vs quality",
         "Recurrence", "NAR")


@dataclasses.dataclass(frozen=True)
class ResultRow:
    """One line of the results table.

    Example:
        >>> ResultRow("HSO", "ppl", "42.9", "python x.py", "CPU", "2026-11-26", "x.json").area
        'HSO'
    """

    area: str
    result: str
    value: str
    command: str
    machine: str
    date: str
    source: str  # the results file, relative to the results folder


def describe_machine(machine: dict) -> str:
    """A short name for the machine a results file records (GPU name, else CPU model and cores).

    Example:
        >>> describe_machine({"gpu": "NVIDIA H200", "cpu": "Xeon"})
        'NVIDIA H200'
        >>> describe_machine({"cpu_model": "AMD EPYC", "cpu_count": 2})
        'AMD EPYC (2 cores)'
    """
    if machine.get("gpu"):
        return machine["gpu"]
    cpu = machine.get("cpu") or machine.get("cpu_model") or "CPU"
    return f"{cpu} ({machine['cpu_count']} cores)" if machine.get("cpu_count") else cpu


def _date(payload: dict) -> str:
    """The day the machine record gives (a file's modification time says nothing after a clone)."""
    return str(payload.get("machine", {}).get("date") or "unknown")[:10]


def _read(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"results file {path} is not readable JSON ({e}); rerun the script that writes it "
                         "or delete the file") from None
    if not isinstance(payload, dict):
        raise InputError(f"results file {path} holds {type(payload).__name__}, not an object; rerun its script")
    return payload


def collect_rows(results_dir: str | os.PathLike) -> list[ResultRow]:
    """The headline rows of every `*.json` under `results_dir` (sorted by area, then file, then order).

    Files without a `report` list (raw data, older formats) are skipped; a malformed row is an error that
    names the file.

    Example:
        >>> collect_rows("benchmarks/results")  # doctest: +SKIP
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise InputError(f"results folder {root} does not exist; run from the repository root or pass --results")
    rows = []
    for path in sorted(root.rglob("*.json")):
        payload = _read(path)
        command = payload.get("command", "")
        machine = describe_machine(payload.get("machine", {}))
        for i, row in enumerate(payload.get("report", [])):
            if not isinstance(row, dict) or not {"area", "result", "value"} <= row.keys():
                raise InputError(f"{path}: report row {i} must have area, result and value, got {row!r}")
            rows.append(ResultRow(str(row["area"]), str(row["result"]), str(row["value"]), command, machine,
                                  _date(payload), str(path.relative_to(root))))

    def key(r: ResultRow):
        return (AREAS.index(r.area) if r.area in AREAS else len(AREAS), r.area, r.source)

    return sorted(rows, key=key)  # stable: rows of one file keep their order


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[ResultRow], results_dir: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """The Markdown of docs/RESULTS.md: the table, then each plot under its results file's name.

    Example:
        >>> render([], "benchmarks/results", "docs/RESULTS.md").splitlines()[0]
        '# Results'
    """
    root, out_dir = Path(results_dir), Path(out_path).resolve().parent
    lines = ["# Results", "",
             ("Every measured result of makemost_jax, one row per headline number. Generated by `makemost report` "
             "from the JSON files the benchmark and experiment scripts write to `benchmarks/results/`; do not edit "
             "by hand. Rerun the command of a row to remeasure it, then `makemost report`. Machines are shared and "
             "noisy: compare ratios measured in one run, not absolute rates across rows."), "",
             "| area | result | value | command | machine | date |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_cell(r.area)} | {_cell(r.result)} | {_cell(r.value)} | `{_cell(r.command)}` | "
                     f"{_cell(r.machine)} | {r.date} |")
    plots = sorted(p for p in root.rglob("*.png") if p.with_suffix(".json").exists())
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            rel = os.path.relpath(p.resolve(), out_dir)
            lines += [f"### {p.stem}", "", f"![{p.stem}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(results_dir: str | os.PathLike = "benchmarks/results",
                 out_path: str | os.PathLike = "docs/RESULTS.md") -> tuple[Path, list[ResultRow]]:
    """Collect the rows, render them and write `out_path`; returns the path and the rows.

    Example:
        >>> path, rows = write_report()  # doctest: +SKIP
    """
    rows = collect_rows(results_dir)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, results_dir, out))
    return out, rows
