"""Raw input schema and per-column preprocessing options (the ``data:`` section of a config).

Owned by the pipeline (``ctrkit.pipelines``) but defined in the core, so the trainer and the CLI can read
a config without importing Beam or tensorflow-transform.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Literal

from ctrkit.configio import ConfigError, from_dict, is_plain_name, reading_recorded_config, refuses_ignored_settings

ColumnKind = Literal["label", "numeric", "categorical", "timestamp", "teacher_logit", "ignore"]

# A column the pipeline reads becomes a Keras input and weight name, a TF scope and a SavedModel argument:
# Keras refuses "/", TF scopes refuse spaces (found at export, after a whole training run).
COLUMN_NAME_RULE = "letters, digits, '_', '-', '.' (not starting with '.' or '-')"

CRITEO_NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))


@dataclasses.dataclass
class ColumnSpec:
    """How one raw column is read and transformed.

    numeric:     missing → ``fill``; optional ``log1p`` of max(x, 0); ``zscore`` and/or ``buckets`` quantile
                 buckets (the bucket id becomes an extra categorical feature ``<name>_bucket``).
    categorical: ``encoding: vocabulary`` (``top_k`` / ``frequency_threshold`` + ``oov_buckets``) or
                 ``encoding: hash`` into ``hash_buckets`` buckets (ids that keep arriving after the
                 analyzed span get their own bucket from their first appearance); ``separator`` makes the
                 column multi-valued.
    """

    name: str  # as in the CSV header or Parquet schema; letters, digits, '_', '-', '.', not starting with '.' or '-', unless kind is ignore
    kind: ColumnKind = "categorical"  # what the column is; ignore: read past, any name and type
    fill: float = 0.0  # numeric: the value of a missing field
    log1p: bool = False  # numeric: log(1 + max(x, 0)) first (the built-in Criteo schema sets it on I1-I13)
    zscore: bool = True  # numeric: standardize with the analyzed mean and standard deviation
    buckets: int = 0  # numeric: N > 0 adds the quantile bucket id as the categorical feature `<name>_bucket`
    encoding: Literal["vocabulary", "hash"] = "vocabulary"  # categorical: ids from the analyzed vocabulary, or hashed
    top_k: int | None = None  # vocabulary: keep the k most frequent values; null: all
    frequency_threshold: int = 1  # vocabulary: keep values seen at least this often in the analyzed windows
    oov_buckets: int = 1  # vocabulary: ids for values outside the vocabulary
    hash_buckets: int = 0  # hash: the number of buckets (>= 1 with encoding hash)
    separator: str | None = None  # categorical: splits a field into several values (multi-valued); null: one value

    def __post_init__(self) -> None:
        self.check()

    def applicable_settings(self) -> tuple[str, ...]:
        """The settings this column's kind (and encoding) uses; the others must keep their defaults."""
        if self.kind == "numeric":
            return ("fill", "log1p", "zscore", "buckets")
        if self.kind == "categorical":
            by_encoding = ("top_k", "frequency_threshold", "oov_buckets") if self.encoding == "vocabulary" \
                else ("hash_buckets",)
            return ("encoding", "separator") + by_encoding
        return ()

    def effective(self) -> dict:
        """Name, kind and the settings this column uses: what decides its transformed ids and values."""
        return {k: getattr(self, k) for k in ("name", "kind", *self.applicable_settings())}

    def ignored_settings(self) -> list[str]:
        """Settings set away from their defaults that this column's kind or encoding would not use."""
        used = {"name", "kind", *self.applicable_settings()}
        return [f.name for f in dataclasses.fields(self)
                if f.name not in used and getattr(self, f.name) != f.default]

    def check(self) -> None:
        """Refuse values out of range, and settings this column's kind or encoding would silently ignore."""
        where = f"column {self.name!r}"
        if not self.name:
            raise ConfigError("data.columns: a column has an empty name; every column needs a non-empty name")
        if self.kind != "ignore" and not is_plain_name(self.name):
            raise ConfigError(f"{where}: a column the pipeline reads needs a name of {COLUMN_NAME_RULE}, since it "
                              "becomes a model input name; rename it (in the file's header too), or give it "
                              "kind: ignore")
        ignored = self.ignored_settings()
        if ignored and refuses_ignored_settings():
            uses = ", ".join(self.applicable_settings()) or "no other settings"
            raise ConfigError(f"{where}: {', '.join(ignored)} would be ignored: a {self.kind} column"
                              f"{' with encoding ' + repr(self.encoding) if self.kind == 'categorical' else ''} "
                              f"uses {uses}; remove it or change the kind/encoding")
        if self.kind == "categorical" and self.encoding == "hash" and self.hash_buckets < 1:
            raise ConfigError(f"{where}: encoding 'hash' needs hash_buckets >= 1, got {self.hash_buckets}")
        if self.kind == "categorical" and self.encoding == "vocabulary":
            if self.oov_buckets < 1:
                raise ConfigError(f"{where}: oov_buckets must be >= 1 (unseen ids need a row), got {self.oov_buckets}")
            if self.top_k is not None and self.top_k < 1:
                raise ConfigError(f"{where}: top_k must be >= 1 or null, got {self.top_k}")
            if self.frequency_threshold < 1 and refuses_ignored_settings():  # an older ctrkit read < 1 as 1
                raise ConfigError(f"{where}: frequency_threshold must be >= 1 (1 keeps every token), "
                                  f"got {self.frequency_threshold}")
        if self.kind == "numeric" and (self.buckets < 0 or self.buckets == 1):
            raise ConfigError(f"{where}: buckets must be 0 (off) or >= 2, got {self.buckets}")
        if self.separator == "" and self.kind == "categorical":
            raise ConfigError(f"{where}: separator must be a non-empty string or null")


def duplicated_names(names: list[str]) -> list[str]:
    """The names that appear more than once in ``names``, sorted."""
    return sorted(n for n, count in collections.Counter(names).items() if count > 1)


def _as_tf_argument(name: str) -> str:
    """TensorFlow's ``sanitize_arg_name``: non-alphanumerics to '_', 'arg_' before a non-letter start."""
    swapped = "".join(ch if ch.isalnum() else "_" for ch in name)
    return swapped if swapped[0].isalpha() else "arg_" + swapped


def recorded_columns(recorded_data: dict | None, where: str) -> list[ColumnSpec] | None:
    """The columns of a ``data:`` section ctrkit recorded (a manifest's ``config["data"]``); None if absent."""
    if not recorded_data:
        return None
    if not recorded_data.get("columns"):  # as in a config: no columns means the Criteo schema
        return criteo_columns()
    with reading_recorded_config():  # an older ctrkit recorded settings a column ignores
        return [from_dict(ColumnSpec, c, f"{where} data.columns") for c in recorded_data["columns"]]


def differing_columns(ours: list[ColumnSpec], theirs: list[ColumnSpec]) -> list[str]:
    """The columns whose transformed ids or values would differ between two ``data.columns`` lists, by name:
    one the other lacks, or one whose kind or a setting it uses differs (a setting it ignores does not count).

    Column order and ``ignore`` columns do not count: the transform reads the columns it uses by name and never
    sees an ignored one, so a log that gains an unused column, or a CSV whose header was reordered, keeps its
    transform. ``ours`` is the config in hand, ``theirs`` a recorded one: each entry is a column name, with
    " (only here)" or " (only there)" where one of them lacks it.
    """
    mine = {c.name: c.effective() for c in ours if c.kind != "ignore"}
    other = {c.name: c.effective() for c in theirs if c.kind != "ignore"}
    differ = []
    for name in sorted(set(mine) | set(other), key=lambda n: (n not in mine, n)):
        if name not in other:
            differ.append(f"{name} (only here)")
        elif name not in mine:
            differ.append(f"{name} (only there)")
        elif mine[name] != other[name]:
            differ.append(name)
    return differ


def criteo_columns(log1p: bool = True) -> list[ColumnSpec]:
    """The default Criteo schema: label, I1..I13 numeric, C1..C26 categorical."""
    return (
        [ColumnSpec("label", kind="label")]
        + [ColumnSpec(n, kind="numeric", log1p=log1p) for n in CRITEO_NUMERIC]
        + [ColumnSpec(n, kind="categorical") for n in CRITEO_CATEGORICAL]
    )


@dataclasses.dataclass
class DataConfig:
    """Where raw logs come from and how the pipeline turns them into windows of training data."""

    format: Literal["criteo_tsv", "csv", "parquet"] = "criteo_tsv"  # text formats may be compressed (gzip, bz2, zstd, lz4)
    columns: list[ColumnSpec] = dataclasses.field(default_factory=list)  # empty: the Criteo schema
    delimiter: str | None = None  # default: tab for criteo_tsv, comma for csv
    header: bool = True  # csv only: first line names the columns
    short_rows: Literal["pad", "reject"] = "pad"  # rows with stripped trailing empty fields
    # Fail the job when more of the rows read are rejected (a format or schema change, not junk); null: only
    # when every row is. The failed job keeps its rejected rows in <output>.rejected/.
    max_rejected_fraction: float | None = 0.01
    window_rows: int = 100_000  # window size when there is no timestamp column
    window_seconds: int = 86_400  # window size when there is a timestamp column
    analyze_windows: int | None = None  # analyze on the first N windows; None: all of them
    batch_size: int = 50_000  # rows per record batch inside the pipeline

    def __post_init__(self) -> None:
        if not self.columns:
            self.columns = criteo_columns()
        self.check()

    def check(self) -> None:
        """Validate the section; the pipeline calls it again at start, for configs changed after loading."""
        for c in self.columns:
            c.check()
        names = [c.name for c in self.columns]
        dupes = duplicated_names(names)
        if dupes:
            raise ConfigError(f"data.columns: duplicate column names {dupes}")
        # The serving signature takes each column clients send as a function argument, whose name TF makes
        # a Python name (tensorflow function_type.sanitize_arg_name): two columns equal after that fail at export.
        as_argument: dict[str, str] = {}
        for c in self.columns:
            if c.kind in ("numeric", "categorical", "timestamp"):
                other = as_argument.setdefault(_as_tf_argument(c.name), c.name)
                if other != c.name:
                    raise ConfigError(f"data.columns: {other!r} and {c.name!r} become the same argument name "
                                      f"{_as_tf_argument(c.name)!r} in a SavedModel signature; rename one")
        labels = [c.name for c in self.columns if c.kind == "label"]
        if len(labels) != 1:
            raise ConfigError(f"data.columns: exactly one column must have kind 'label', found {labels or 'none'}")
        if len([c for c in self.columns if c.kind == "timestamp"]) > 1:
            raise ConfigError("data.columns: at most one column may have kind 'timestamp'")
        teachers = [c.name for c in self.columns if c.kind == "teacher_logit"]
        if len(teachers) > 1:
            raise ConfigError(f"data.columns: at most one column may have kind 'teacher_logit', found {teachers}")
        for c in self.columns:
            if c.kind == "numeric" and c.buckets and f"{c.name}_bucket" in names:
                raise ConfigError(f"data.columns: {c.name}_bucket (buckets of {c.name!r}) collides with a raw "
                                  "column; rename that column")
        if not any(c.kind in ("numeric", "categorical") for c in self.columns):
            raise ConfigError("data.columns: no feature columns; at least one column must have kind 'numeric' "
                              "or 'categorical'")
        for key in ("window_rows", "window_seconds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {getattr(self, key)}")
        if self.analyze_windows is not None and self.analyze_windows < 1:
            raise ConfigError(f"data.analyze_windows: must be >= 1 or null (all windows), got {self.analyze_windows}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size: must be >= 1, got {self.batch_size}")
        limit = self.max_rejected_fraction
        if limit is not None and (isinstance(limit, bool) or not 0 <= limit <= 1):
            raise ConfigError(f"data.max_rejected_fraction: must be a fraction from 0 to 1 (0.01: 1% of the rows "
                              f"read) or null (fail only when every row is rejected), got {limit!r}")
        if self.format != "parquet" and self.delimiter is not None and len(self.delimiter) != 1:
            raise ConfigError(f"data.delimiter: must be a single character or null for format {self.format!r}, "
                              f"got {self.delimiter!r}")
        for name, because in self.ignored_settings().items():
            raise ConfigError(f"data.{name}: {getattr(self, name)!r} would be ignored because {because}; remove it")

    def ignored_settings(self) -> dict[str, str]:
        """Settings away from their defaults that the format or the columns make ineffective → why.

        Empty inside :func:`~ctrkit.configio.reading_recorded_config` (an older ctrkit recorded them).
        """
        if not refuses_ignored_settings():
            return {}
        fmt = f"data.format is {self.format!r}"
        timed = self.timestamp is not None
        unused = {
            "delimiter": (self.format != "parquet", fmt),
            "short_rows": (self.format != "parquet", fmt),
            "header": (self.format == "csv", fmt),
            "window_rows": (not timed, f"column {self.timestamp!r} has kind 'timestamp' (windows are "
                                       "window_seconds long)"),
            "window_seconds": (timed, "no column has kind 'timestamp' (windows are window_rows long)"),
        }
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {name: because for name, (used, because) in unused.items()
                if not used and getattr(self, name) != defaults[name]}

    @property
    def label(self) -> str:
        return next(c.name for c in self.columns if c.kind == "label")

    @property
    def timestamp(self) -> str | None:
        return next((c.name for c in self.columns if c.kind == "timestamp"), None)
