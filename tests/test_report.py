"""The run report: plots a person would look at, a self-contained HTML page that renders in Chromium."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from ctrkit.report import ReliabilityCurve, ReportData, write_report


def _report_data() -> ReportData:
    rng = np.random.default_rng(0)
    windows = [f"day{i}" for i in range(4)]
    curves = {
        name: [{"window": w, "auc": 0.70 + lift + 0.01 * i, "logloss": 0.47 - lift / 2 - 0.003 * i} for i, w in enumerate(windows)]
        for name, lift in (("teacher", 0.04), ("student (distilled)", 0.02), ("student (no distillation)", 0.0))
    }
    p = rng.uniform(0.01, 0.6, 5000)
    y = (rng.uniform(size=p.size) < p * 0.7).astype(float)  # an over-predicting model
    return ReportData(
        title="ctrkit run: test",
        curves=curves,
        reliability={
            "before calibration": ReliabilityCurve.from_predictions(p, y),
            "after calibration": ReliabilityCurve.from_predictions(p * 0.7, y),
        },
        final_metrics={"student": {"auc": 0.74, "logloss": 0.45, "calibration_ratio": 1.01}},
        model_size={"student": {"parameters": 123456, "size_mb": 0.5}},
        throughput={"train": {"rows": 200000, "seconds": 20.0, "rows_per_s": 10000.0}},
        prediction_difference={"seed 0 vs seed 1 (ReLU)": 0.05},
        notes=["a note with <html> characters"],
    )


def test_reliability_bins_match_numpy():
    p = np.array([0.05, 0.07, 0.15, 0.95, 0.99])
    y = np.array([0, 1, 0, 1, 1])
    c = ReliabilityCurve.from_predictions(p, y, bins=10)
    assert c.counts == [2, 1, 2]
    np.testing.assert_allclose(c.mean_predicted, [0.06, 0.15, 0.97])
    np.testing.assert_allclose(c.observed_rate, [0.5, 0.0, 1.0])
    sparse = ReliabilityCurve.from_predictions(p, y, bins=10, min_count=2)
    assert sparse.counts == [2, 2]  # the single-example bin is left out
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        ReliabilityCurve.from_predictions([0.1, 0.2, 0.3], [0, 1])


def test_report_files_are_self_contained(tmp_path):
    paths = write_report(str(tmp_path), _report_data())
    for key in ("html", "auc", "logloss", "reliability"):
        assert os.path.getsize(paths[key]) > 10_000, key  # real images, not empty figures
    page = open(paths["html"], encoding="utf-8").read()
    assert page.count('src="data:image/png;base64,') == 3
    assert not re.search(r'(src|href)="(?!data:)', page), "report.html must not reference external files"
    assert "&lt;html&gt;" in page  # user text is escaped
    md = open(paths["md"], encoding="utf-8").read()
    for name in ("progressive_auc.png", "progressive_logloss.png", "reliability.png"):
        assert f"]({name})" in md
    assert "| student | 0.7400 | 0.4500 | 1.0100 |" in md


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    paths = write_report(str(tmp_path / "run"), _report_data())
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
         "--window-size=1100,1800", "file://" + paths["html"]],
        check=True, capture_output=True, timeout=120,
    )
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (1800, 1100)
    # A blank or error page is nearly uniform; the report has text, tables and three plots.
    assert img.std() > 20, f"screenshot looks blank (pixel std {img.std():.1f})"
    assert (img < 128).mean() > 0.01, "almost no dark pixels: text and plot lines did not render"
    keep = os.environ.get("CTRKIT_REPORT_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_progressive_curves_keep_each_point_under_its_window(tmp_path, monkeypatch):
    """A None metric (single-class window) is skipped without shifting the model's later points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes

    from ctrkit.report import _plot_curves

    plotted, axes = {}, []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        lines = original(self, *args, **kwargs)
        plotted[kwargs.get("label")] = list(lines[0].get_xdata()), list(lines[0].get_ydata())
        axes.append(self)
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    data = ReportData("t", curves={
        "teacher": [{"window": "w0", "auc": 0.6}, {"window": "w1", "auc": 0.7}, {"window": "w2", "auc": 0.8}],
        "student": [{"window": "w0", "auc": 0.61}, {"window": "w1", "auc": None}, {"window": "w2", "auc": 0.81}],
        "late": [{"window": "w0", "auc": None}, {"window": "w1", "auc": None}, {"window": "w2", "auc": 0.9}],
    })
    _plot_curves(data, "auc", "AUC", str(tmp_path / "auc.png"))
    assert plotted["teacher"] == ([0, 1, 2], [0.6, 0.7, 0.8])
    assert plotted["student"] == ([0, 2], [0.61, 0.81])
    assert plotted["late"] == ([2], [0.9])
    assert [t.get_text() for t in axes[-1].get_xticklabels()] == ["w0", "w1", "w2"]
