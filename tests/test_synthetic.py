"""ctrkit.synthetic: shape, determinism, planted crosses and the writers' round trips."""
from __future__ import annotations

import gzip

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ctrkit import synthetic


@pytest.fixture(scope="module")
def table():
    return synthetic.generate(20_000, seed=3, days=4, with_truth=True)


def test_schema_and_value_shapes(table):
    assert table.column_names == ["label", *synthetic.NUMERIC, *synthetic.CATEGORICAL, "timestamp", "true_logit"]
    assert set(np.unique(table["label"].to_numpy())) == {0, 1}
    for name in synthetic.CATEGORICAL:
        values = table[name].drop_null().to_pylist()
        assert all(len(v) == 8 and int(v, 16) >= 0 for v in values[:500]), name
    # Missing values exist where Criteo has them, and long tails: the top token covers far more rows
    # than the median token.
    assert table["I1"].null_count > 0 and table["C20"].null_count > 0 and table["C1"].null_count == 0
    counts = np.array(sorted(table["C3"].value_counts().field("counts").to_numpy(), reverse=True))
    assert counts[0] > 20 * np.median(counts)


def test_timestamps_span_days_in_order(table):
    ts = table["timestamp"].to_numpy()
    assert np.all(np.diff(ts) >= 0)
    days = (ts - synthetic.START_TIMESTAMP) // synthetic.SECONDS_PER_DAY
    assert set(np.unique(days)) == {0, 1, 2, 3}


def test_same_seed_same_table_other_seed_differs():
    a = synthetic.generate(2_000, seed=7)
    b = synthetic.generate(2_000, seed=7)
    c = synthetic.generate(2_000, seed=8)
    assert a.equals(b)
    assert not a.equals(c)


def test_labels_follow_planted_logit(table):
    logit = table["true_logit"].to_numpy()
    label = table["label"].to_numpy()
    p = 1 / (1 + np.exp(-logit))
    # Calibrated by construction: mean label within a few standard errors of mean probability...
    assert abs(label.mean() - p.mean()) < 4 * np.sqrt(p.mean() * (1 - p.mean()) / len(p))
    # ...and the planted logit separates clicks from non-clicks (AUC well above chance).
    order = np.argsort(logit)
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    pos = label == 1
    auc = (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
    assert auc > 0.7


def test_drift_weakens_second_order_cross(table):
    """The C1×C2 cross fades: the logit spread it causes is larger on day 0 than on day 3."""
    ts = table["timestamp"].to_numpy()
    day = (ts - synthetic.START_TIMESTAMP) // synthetic.SECONDS_PER_DAY
    logit = table["true_logit"].to_numpy()
    spread = [np.std(logit[day == d]) for d in (0, 3)]
    assert spread[0] > spread[1] + 0.2


@pytest.mark.parametrize("gz", [False, True])
def test_write_tsv_is_criteo_format(tmp_path, table, gz):
    path = str(tmp_path / ("x.tsv.gz" if gz else "x.tsv"))
    synthetic.write_tsv(table, path, gzip=gz)
    opener = gzip.open if gz else open
    with opener(path, "rb") as f:
        lines = f.read().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == table.num_rows
    fields = lines[0].split(b"\t")
    assert len(fields) == 40
    assert fields[0].decode() == str(table["label"][0].as_py())
    assert fields[14].decode() == table["C1"][0].as_py()
    # Missing values are empty fields, not "null"/"None".
    assert b"None" not in lines[1] and b"null" not in lines[1]


def test_csv_and_parquet_round_trip(tmp_path, table):
    small = table.slice(0, 500)
    csv_path = synthetic.write_csv(small, str(tmp_path / "x.csv"))
    pq_path = synthetic.write_parquet(small, str(tmp_path / "x.parquet"))
    back_pq = pq.read_table(pq_path)
    assert back_pq.equals(small.drop_columns(["true_logit"]))
    back_csv = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(
        column_types={c: small.schema.field(c).type for c in back_pq.column_names}, strings_can_be_null=True))
    assert back_csv.column_names == back_pq.column_names
    assert back_csv["C26"].to_pylist() == small["C26"].to_pylist()
    assert back_csv["I12"].to_pylist() == small["I12"].to_pylist()
