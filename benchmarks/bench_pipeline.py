"""End-to-end throughput of ``ctrkit preprocess`` (analyze + transform + write) on generated Criteo rows.

Reference measured in the same run: the time ``pyarrow.csv`` needs just to read the same file (the floor).
Reports rows/s per size, the ratio to the pyarrow read, and linearity (time(1M) / time(100k), target ≤ 12).

Run:  python3 -m pytest -n 0 -m benchmark benchmarks/bench_pipeline.py -s
Env:  CTRKIT_BENCH_SIZES=100000,1000000   sizes to run (default both)
      CTRKIT_BENCH_REPEATS=3               pipeline runs per size (median reported)
      CTRKIT_BENCH_BEAM_ARGS="--direct_num_workers=2 --direct_running_mode=multi_processing"
Writes benchmarks/out/pipeline.json.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from ctrkit import synthetic
from ctrkit.schema import DataConfig

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def _pyarrow_read_seconds(path: str, repeats: int = 3) -> float:
    names = ["label", *synthetic.NUMERIC, *synthetic.CATEGORICAL]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names),
                       parse_options=pacsv.ParseOptions(delimiter="\t"))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@pytest.mark.benchmark
def test_pipeline_throughput(tmp_path):
    from ctrkit.pipelines import preprocess

    sizes = [int(s) for s in os.environ.get("CTRKIT_BENCH_SIZES", "100000,1000000").split(",")]
    repeats = int(os.environ.get("CTRKIT_BENCH_REPEATS", "3"))
    beam_args = os.environ.get("CTRKIT_BENCH_BEAM_ARGS", "").split()
    results = []
    for n in sizes:
        path = synthetic.write_tsv(synthetic.generate(n, seed=0, timestamp=False), str(tmp_path / f"criteo_{n}.tsv"))
        floor = _pyarrow_read_seconds(path)
        times = []
        for r in range(repeats):
            out = str(tmp_path / f"out_{n}_{r}")
            t = time.perf_counter()
            m = preprocess(DataConfig(window_rows=max(n // 4, 1)), [path], out, pipeline_args=beam_args)
            times.append(time.perf_counter() - t)
            assert m.rows_written == n
            shutil.rmtree(out)
        seconds = statistics.median(times)
        row = {"rows": n, "seconds": round(seconds, 2), "rows_per_s": round(n / seconds),
               "pyarrow_read_seconds": round(floor, 3), "ratio_to_pyarrow_read": round(seconds / floor, 1),
               "repeats": repeats, "file_mb": round(os.path.getsize(path) / 1e6, 1)}
        results.append(row)
        print(f"\n[bench_pipeline] {row}")
        os.remove(path)
    summary = {"name": "pipeline", "beam_args": beam_args, "sizes": results, "cpu_count": os.cpu_count(),
               "pyarrow": pa.__version__}
    by_size = {r["rows"]: r for r in results}
    if 100_000 in by_size and 1_000_000 in by_size:
        summary["linearity_1m_over_100k"] = round(by_size[1_000_000]["seconds"] / by_size[100_000]["seconds"], 2)
        print(f"[bench_pipeline] time(1M)/time(100k) = {summary['linearity_1m_over_100k']} (target <= 12)")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "pipeline.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if "linearity_1m_over_100k" in summary:
        assert summary["linearity_1m_over_100k"] <= 12
