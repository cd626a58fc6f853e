"""Run every benchmark and write ``benchmarks/results.md``.

    python3 benchmarks/run_all.py            # all benchmarks (layers, pipeline, trainer, serving)
    python3 benchmarks/run_all.py layers     # only bench_layers.py (the others' last results are kept)
    python3 benchmarks/run_all.py --render-only   # rebuild results.md from benchmarks/out/ without running

Each ``bench_*.py`` is a pytest module marked ``benchmark`` that writes its measurements as JSON to
``benchmarks/out/<name>.json``; this script runs them one at a time (they would distort each other's timings on
a 2-core machine) and renders the JSON with the machine and package versions into one Markdown file.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
PACKAGES = ("tensorflow", "keras", "keras-rs", "tensorflow-recommenders", "tf-keras", "tensorflow-transform",
            "apache-beam", "pyarrow", "numpy")


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": mem, "python": platform.python_version(),
            "os": platform.platform()}


def versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _flatten(d: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(d, dict):
        rows = []
        for k, v in d.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):  # e.g. one dict per measured shape
        return [row for i, x in enumerate(d) for row in _flatten(x, f"{prefix}[{i}]")]
    return [(prefix, d)]


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(_fmt(float(x)) for x in v) + "]"
    return str(v)


def render(results: dict[str, dict], runs: dict[str, dict]) -> str:
    lines = ["# ctrkit benchmark results", "",
             f"Written {datetime.datetime.now():%Y-%m-%d %H:%M} by `python3 benchmarks/run_all.py`. Every ratio "
             "compares against a reference measured in the same run; times are medians of repeats (see each "
             "benchmark's docstring).", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in versions().items()]
    for name in sorted(set(results) | set(runs)):
        lines += ["", f"## {name}", ""]
        run = runs.get(name)
        if run:
            lines.append(f"`{run['command']}` → exit {run['returncode']} in {run['seconds']:.0f} s")
            lines.append("")
        if name not in results:
            lines.append("(no results written)")
            continue
        lines += ["| measurement | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(results[name])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="benchmark names (bench_NAME.py); default: all")
    parser.add_argument("--render-only", action="store_true", help="rebuild results.md from benchmarks/out/")
    args = parser.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    modules = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    names = [os.path.basename(m)[6:-3] for m in modules]
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in args.only]
    runs_file = os.path.join(OUT, "_runs.json")  # command, exit code and time of each benchmark's last run
    runs = {}
    if os.path.exists(runs_file):
        with open(runs_file, encoding="utf-8") as f:
            runs = json.load(f)
    if args.render_only:
        names = []
    for name in names:
        cmd = [sys.executable, "-m", "pytest", "-n", "0", "-m", "benchmark", "-s", "-q", os.path.join(HERE, f"bench_{name}.py")]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=os.path.dirname(HERE))
        runs[name] = {"command": " ".join(["python3", *cmd[1:]]).replace(os.path.dirname(HERE) + "/", ""),
                      "returncode": rc, "seconds": time.perf_counter() - t0}
        with open(runs_file, "w", encoding="utf-8") as f:
            json.dump(runs, f, indent=2)
    results = {}
    for path in sorted(glob.glob(os.path.join(OUT, "[!_]*.json"))):
        with open(path, encoding="utf-8") as f:
            results[os.path.basename(path)[:-5]] = json.load(f)
    target = os.path.join(HERE, "results.md")
    with open(target, "w", encoding="utf-8") as f:
        f.write(render(results, runs))
    print(f"wrote {target}")
    return 0 if all(runs[n]["returncode"] == 0 for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
