"""The run report: ``RUN_DIR/report.html`` (self-contained, plots inlined) and ``report.md`` (plots as PNGs).

Inputs are plain data, so the report can be rebuilt from a finished run's files without TensorFlow:
per-window progressive-validation curves per model, predictions and labels for reliability diagrams, the
prediction difference between seeds, and tables of final metrics, model size and throughput.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PLOT_FILES = {
    "auc": "progressive_auc.png",
    "logloss": "progressive_logloss.png",
    "reliability": "reliability.png",
}


@dataclasses.dataclass
class ReliabilityCurve:
    """Mean predicted vs observed click rate in equal-width probability bins."""

    mean_predicted: list[float]
    observed_rate: list[float]
    counts: list[int]

    @classmethod
    def from_predictions(
        cls, probabilities: Sequence[float], labels: Sequence[float], bins: int = 10, min_count: int = 1
    ) -> ReliabilityCurve:
        """Equal-width bins; bins with fewer than ``min_count`` examples are left out (their observed rate is
        noise, and a plot would draw it as a miscalibration)."""
        p = np.asarray(probabilities, dtype=np.float64).ravel()
        y = np.asarray(labels, dtype=np.float64).ravel()
        if p.shape != y.shape:
            raise ValueError(f"{p.size} predictions but {y.size} labels")
        idx = np.clip((p * bins).astype(int), 0, bins - 1)
        counts = np.bincount(idx, minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_p = np.bincount(idx, weights=p, minlength=bins) / counts
            rate = np.bincount(idx, weights=y, minlength=bins) / counts
        keep = counts >= max(min_count, 1)
        return cls(mean_p[keep].tolist(), rate[keep].tolist(), counts[keep].astype(int).tolist())


@dataclasses.dataclass
class ReportData:
    title: str
    # model name -> list of per-window rows, each with "window" and metric keys ("auc", "logloss", ...)
    curves: Mapping[str, Sequence[Mapping[str, Any]]]
    # "before"/"after" calibration -> reliability curve
    reliability: Mapping[str, ReliabilityCurve] = dataclasses.field(default_factory=dict)
    # model name -> final metrics (auc, logloss, ne, calibration_ratio, ece, ...)
    final_metrics: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    # table rows: model name -> {"parameters": ..., "size_mb": ...}
    model_size: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # table rows: stage -> {"rows": ..., "seconds": ..., "rows_per_s": ...}
    throughput: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # prediction difference between two seeds (and anything else worth a line), e.g. {"PD (ReLU)": 0.04}
    prediction_difference: Mapping[str, float] = dataclasses.field(default_factory=dict)
    notes: Sequence[str] = ()


def _curve_points(
    curves: Mapping[str, Sequence[Mapping[str, Any]]], metric: str
) -> tuple[list[str], dict[str, tuple[list[int], list[float]]]]:
    """The shared window labels (first-seen order over all models) and, per model with any value, the x
    positions (index of its window in the shared labels) and values of ``metric``. Rows whose metric is None
    (e.g. AUC of a single-class window) are skipped without shifting the model's later points."""
    windows: list[str] = []
    position: dict[str, int] = {}
    for rows in curves.values():
        for r in rows:
            w = str(r["window"])
            if w not in position:
                position[w] = len(windows)
                windows.append(w)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for name, rows in curves.items():
        points = [(position[str(r["window"])], float(r[metric])) for r in rows if r.get(metric) is not None]
        if points:
            series[name] = ([x for x, _ in points], [y for _, y in points])
    return windows, series


def _plot_curves(data: ReportData, metric: str, ylabel: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    windows, series = _curve_points(data.curves, metric)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xticks(range(len(windows)))
    ax.set_xticklabels(windows, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("time window (progressive validation: scored before training on it)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_reliability(data: ReportData, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=110)
    top = 0.0
    for name, curve in data.reliability.items():
        ax.plot(curve.mean_predicted, curve.observed_rate, marker="o", label=name)
        top = max([top, *curve.mean_predicted, *curve.observed_rate])
    top = min(1.0, top * 1.1 + 1e-3)
    ax.plot([0, top], [0, top], "k--", lw=1, label="perfectly calibrated")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mean predicted CTR (bin)")
    ax.set_ylabel("observed CTR (bin)")
    ax.set_title("Reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if v is None:  # a metric the data leaves undefined (AUC of one class)
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table_rows(table: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols: list[str] = []
    for row in table.values():
        cols.extend(k for k in row if k not in cols)
    return cols, [[name, *[_fmt(row.get(c, "")) for c in cols]] for name, row in table.items()]


def _md_table(table: Mapping[str, Mapping[str, Any]], first: str) -> str:
    cols, rows = _table_rows(table)
    lines = ["| " + " | ".join([first, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(table: Mapping[str, Mapping[str, Any]], first: str) -> str:
    cols, rows = _table_rows(table)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [first, *cols])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.meta{color:#666;font-size:.9rem}
"""


def write_report(run_dir: str, data: ReportData) -> dict[str, str]:
    """Write report.html, report.md and the PNG plots into ``run_dir``; returns their paths."""
    os.makedirs(run_dir, exist_ok=True)
    plots: dict[str, str] = {}
    if data.curves:
        for metric, label in (("auc", "progressive AUC"), ("logloss", "progressive log loss")):
            path = os.path.join(run_dir, PLOT_FILES[metric])
            _plot_curves(data, metric, label, path)
            plots[metric] = path
    if data.reliability:
        plots["reliability"] = os.path.join(run_dir, PLOT_FILES["reliability"])
        _plot_reliability(data, plots["reliability"])

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sections: list[tuple[str, str, str]] = []  # (title, markdown body, html body)

    def img(key: str, alt: str) -> tuple[str, str]:
        if key not in plots:
            return "", ""
        with open(plots[key], "rb") as f:
            b64 = base64.b64encode(f.read()).decode("ascii")
        return f"![{alt}]({os.path.basename(plots[key])})", f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'

    md_auc, html_auc = img("auc", "progressive AUC per window")
    md_ll, html_ll = img("logloss", "progressive log loss per window")
    if md_auc:
        sections.append(("Progressive validation over time", f"{md_auc}\n\n{md_ll}", f"{html_auc}\n{html_ll}"))
    md_rel, html_rel = img("reliability", "reliability diagram before and after calibration")
    if md_rel:
        sections.append(("Calibration", md_rel, html_rel))
    if data.final_metrics:
        sections.append(("Final metrics", _md_table(data.final_metrics, "model"), _html_table(data.final_metrics, "model")))
    if data.prediction_difference:
        pd_table = {k: {"value": float(v)} for k, v in data.prediction_difference.items()}
        sections.append(
            (
                "Reproducibility: prediction difference between seeds",
                "PD = mean |p1 − p2| / ((p1 + p2) / 2)\n\n" + _md_table(pd_table, "comparison"),
                "<p>PD = mean |p1 − p2| / ((p1 + p2) / 2)</p>" + _html_table(pd_table, "comparison"),
            )
        )
    if data.model_size:
        sections.append(("Model size", _md_table(data.model_size, "model"), _html_table(data.model_size, "model")))
    if data.throughput:
        sections.append(("Throughput", _md_table(data.throughput, "stage"), _html_table(data.throughput, "stage")))
    if data.notes:
        sections.append(
            (
                "Notes",
                "\n".join(f"- {n}" for n in data.notes),
                "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in data.notes) + "</ul>",
            )
        )

    md = [f"# {data.title}", "", f"Generated {stamp} by ctrkit.", ""]
    for title, body, _ in sections:
        md += [f"## {title}", "", body, ""]
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(data.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(data.title)}</h1><p class=meta>Generated {stamp} by ctrkit.</p>",
    ]
    for title, _, body in sections:
        page += [f"<h2>{html.escape(title)}</h2>", body]
    page.append("</body></html>")

    paths = {"html": os.path.join(run_dir, "report.html"), "md": os.path.join(run_dir, "report.md"), **plots}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write("\n".join(page))
    return paths
