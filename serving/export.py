"""Export a trained ctrkit model as a TF Serving SavedModel with the transform graph inside.

``export_model`` writes ``BASE/NAME/<version>/`` (see :mod:`ctrkit.serving.versions` for the atomic
publish), containing the TFT graph and the Keras 3 model behind the signatures described in
:mod:`ctrkit.serving.signatures`, plus ``assets.extra/tf_serving_warmup_requests``. Every export is
validated (``saved_model_cli show --all`` and a fresh-process reload whose predictions must match the
in-memory model's) *before* it is renamed into place, so a bad export never becomes a version.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ctrkit.manifest import Manifest
from ctrkit.serving import versions
from ctrkit.serving.signatures import METHOD_NAMES, ExportError, ServingModule

log = logging.getLogger(__name__)

EXPORT_INFO_FILE = "ctrkit_export.json"  # in assets.extra/: what was exported, for humans and the local server
# Key of EXPORT_INFO_FILE: the TensorFlow version whose TF1 session ran the export's reload check (None: not run).
SESSION_CHECKED_WITH = "tf_serving_session_checked_with_tensorflow"
DEFAULT_WARMUP_ROWS = 64

RawRows = Sequence[Mapping[str, Any] | bytes]


def set_method_names(export_dir: str, method_names: Mapping[str, str] = METHOD_NAMES) -> None:
    """Rewrite the SignatureDef method names in ``saved_model.pb``.

    ``tf.saved_model.save`` marks every signature ``tensorflow/serving/predict``; TF Serving's Classify
    and Regress APIs refuse a signature unless its method name is ``…/classify`` / ``…/regress``.
    The fingerprint is rewritten afterwards because it hashes ``saved_model.pb``.
    """
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model import fingerprinting_utils

    path = os.path.join(export_dir, "saved_model.pb")
    sm = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        sm.ParseFromString(f.read())
    for meta_graph in sm.meta_graphs:
        for name, method in method_names.items():
            if name not in meta_graph.signature_def:
                raise ExportError(f"signature {name!r} missing from {path}")
            meta_graph.signature_def[name].method_name = method
    with open(path, "wb") as f:
        f.write(sm.SerializeToString())
    fingerprinting_utils.write_fingerprint(export_dir)


def _load_manifest(manifest_or_dir: Manifest | str) -> Manifest:
    if isinstance(manifest_or_dir, Manifest):
        if manifest_or_dir.root is None:
            raise ExportError("the manifest must be loaded from its pipeline directory (Manifest.load(dir))")
        return manifest_or_dir
    return Manifest.load(manifest_or_dir)


def export_model(
    model: Any,
    manifest_or_dir: Manifest | str,
    base_path: str,
    model_name: str,
    version: int | None = None,
    keep_versions: int = 5,
    warmup_examples: RawRows | None = None,
    validate: bool = True,
    exclude_raw_features: Iterable[str] = (),
    atol: float = 1e-5,
) -> str:
    """Export ``model`` with its transform graph to ``base_path/model_name/<version>``; returns that path.

    Args:
        model: Keras 3 model, dict of transformed features → dict with ``logits``/``probabilities`` (B, 1).
        manifest_or_dir: the pipeline output directory, or its loaded :class:`Manifest`.
        base_path: TF Serving's ``--model_base_path`` parent; versions go to ``base_path/model_name``.
        model_name: the model name clients use in ``/v1/models/NAME``.
        version: integer version; default: above every existing one (unix seconds, or latest + 1).
        keep_versions: how many newest versions to keep after publishing.
        warmup_examples: raw training rows (dicts, ``None`` = missing) or serialized raw ``tf.Example``s
            for the warmup requests and the reload check; default: the first rows of the pipeline's
            raw input via :func:`raw_rows_from_manifest`. An explicit empty sequence is an error.
        validate: run the ``saved_model_cli`` and fresh-process reload checks before publishing.
        exclude_raw_features: raw columns clients do not send besides the label / teacher logit.
        atol: tolerance of the reload check.
    """
    import numpy as np
    import tensorflow as tf
    from ctrkit.runtime import import_tft

    tft = import_tft()

    from ctrkit.serving.warmup import WARMUP_DIR, serialize_rows, write_warmup

    manifest = _load_manifest(manifest_or_dir)
    if keep_versions < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
    tft_output = tft.TFTransformOutput(manifest.transform_output_dir)
    module = ServingModule(model, tft_output, manifest, exclude_raw_features)
    if warmup_examples is None:
        warmup_examples = raw_rows_from_manifest(manifest, DEFAULT_WARMUP_ROWS)
    serialized = serialize_rows(warmup_examples, module.parse_spec)
    if not serialized:
        raise ExportError("warmup_examples is empty: TF Serving warmup and the reload check need raw rows")

    path = versions.model_dir(base_path, model_name)
    _clean_leftovers(path)
    explicit = version is not None
    version = versions.next_version(path, version)
    staged = versions.staging_dir(path)
    try:
        signatures = module.signatures()
        expected = module.serve_examples(tf.constant(serialized))["probabilities"].numpy()
        if not np.all(np.isfinite(expected)):
            raise ExportError("the model produces non-finite probabilities on the warmup rows")
        tf.saved_model.save(module, staged, signatures=signatures)
        set_method_names(staged)
        write_warmup(staged, serialized, model_name, module.parse_spec)
        info = {
            "model_name": model_name,
            "features": [f.name for f in manifest.features],
            "raw_features": sorted(module.parse_spec),
            "multivalued": multivalued_columns(manifest, module.parse_spec),
            "label": manifest.label,
            "pipeline_dir": manifest.transform_output_dir,
            # The reload check below scores the warmup rows in a TF1 session as TF Serving loads a version;
            # `ctrkit serve` then skips that second, in-process load (it held a second copy of the weights
            # for as long as the server ran) when it runs the same TensorFlow.
            SESSION_CHECKED_WITH: tf.__version__ if validate else None,
        }
        info_path = os.path.join(staged, WARMUP_DIR, EXPORT_INFO_FILE)

        def write_info(v: int) -> None:
            with open(info_path, "w", encoding="utf-8") as f:
                json.dump({**info, "version": v}, f, indent=2, sort_keys=True)

        write_info(version)
        if validate:
            from ctrkit.serving.validate import validate_export

            validate_export(staged, module.parse_spec, serialized, expected, atol=atol)
        if explicit:
            final = versions.publish(staged, path, version)
        else:
            final = versions.publish_latest(staged, path, version, relabel=write_info)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    try:
        removed = versions.prune(path, keep_versions)
    except OSError as e:
        # The new version is already published and serving: a failed cleanup must not fail the export
        # (the trainer would stop exporting); the next export retries the prune.
        log.warning("exported %s, but pruning old versions in %s failed: %s", final, path, e)
        return final
    log.info("exported %s (removed old versions %s)", final, removed)
    return final


def _clean_leftovers(path: str) -> None:
    """Remove staging and doomed directories that crashed or killed exports left in ``path``."""
    try:
        removed = versions.clean_stale_staging(path)
    except OSError as e:  # housekeeping: never the reason an export fails
        log.warning("could not clean leftovers of earlier exports in %s: %s", path, e)
        return
    if removed:
        log.info("removed leftovers of earlier exports: %s", removed)


def multivalued_columns(manifest: Manifest, raw_features: Iterable[str]) -> dict[str, str | None]:
    """Served raw columns that hold several values, as raw column → separator (``None`` when the manifest
    does not record it). The pipeline reads such a column as one joined string ("a|b") and splits it in
    the transform graph, so a served ``tf.Example`` must carry the joined string too, not a list."""
    served = set(raw_features)
    columns = (manifest.config.get("data") or {}).get("columns") or []
    separators = {c.get("name"): c.get("separator") for c in columns if isinstance(c, Mapping)}
    return {
        f.source: separators.get(f.source)
        for f in manifest.features
        if f.multivalent and f.source in served
    }


def raw_rows_from_manifest(manifest: Manifest, n: int = DEFAULT_WARMUP_ROWS) -> list[dict[str, Any]]:
    """The first ``n`` clean raw rows the pipeline read, for warmup requests.

    Reads the raw inputs recorded in the manifest (``config["inputs"]``, ``config["data"]``, as
    ``ctrkit.pipelines.preprocess`` writes them) with the pipeline's own reader, so warmup rows are parsed
    exactly as training rows were. Raises :class:`ExportError` when the manifest records no inputs or they
    are gone, so the caller passes ``warmup_examples`` instead of exporting without warmup unnoticed.
    """
    from ctrkit.configio import from_dict, reading_recorded_config
    from ctrkit.schema import DataConfig

    inputs = manifest.config.get("inputs")
    data = manifest.config.get("data")
    hint = ("give raw rows for them with ctrkit export --warmup-rows ROWS.jsonl (library: warmup_examples=[raw row "
            "dicts or serialized tf.Examples])")
    if not inputs or data is None:
        raise ExportError(f"the manifest in {manifest.root} records no raw inputs to build warmup requests from: {hint}")
    from ctrkit.errors import InputError
    from ctrkit.pipelines import read_file

    with reading_recorded_config():  # written by the pipeline, possibly an older ctrkit's
        config = from_dict(DataConfig, data, "manifest.config.data")
    rows: list[dict[str, Any]] = []
    for i, path in enumerate(inputs):
        if not os.path.exists(path) and "://" not in path:
            where = (" (a path relative to where an older ctrkit ran preprocess: run the export from there)"
                     if not os.path.isabs(path) else "")
            raise ExportError(f"raw input {path} recorded in the manifest is not there{where}; {hint}")
        try:
            for batch, _rejected in read_file(path, i, config):
                rows.extend(batch.slice(0, n - len(rows)).to_pylist())
                if len(rows) >= n:
                    return rows
        except InputError as e:  # the reader's advice is for preprocess, which this is not
            raise ExportError(f"raw input {path} recorded in the manifest, read for warmup requests, no longer "
                              f"reads as it did when it was preprocessed (rotated or rewritten since?): {e}; {hint}") from e
    if not rows:
        raise ExportError(f"the raw inputs {inputs} hold no clean rows: {hint}")
    return rows


def make_export_fn(
    base_path: str,
    model_name: str,
    keep_versions: int = 5,
    warmup_examples: RawRows | None = None,
    validate: bool = True,
    exclude_raw_features: Iterable[str] = (),
    downsampling_rate: float | None = None,
) -> Callable[[Any, Manifest, int], str]:
    """The callable the trainer calls every export interval: ``export_fn(model, manifest, step) -> path``.

    Versions are chosen by :func:`ctrkit.serving.versions.next_version` (always increasing); the step is
    recorded in the log line, not used as the version, so a restarted run can never go backwards.

    ``downsampling_rate`` (``calibration.downsampling_rate``: the model trains on data whose negatives were
    kept at that rate): every version is published with the closed-form correction
    q = p / (p + (1 − p) / w) in the model's calibration layer, so TF Serving never serves the inflated
    click rates of the training stream. The model itself, which goes on training, keeps its weights.
    """
    from ctrkit.calibrate import downsampling_corrected

    def export_fn(model: Any, manifest: Manifest, step: int) -> str:
        with downsampling_corrected(model, downsampling_rate):
            path = export_model(
                model,
                manifest,
                base_path,
                model_name,
                keep_versions=keep_versions,
                warmup_examples=warmup_examples,
                validate=validate,
                exclude_raw_features=exclude_raw_features,
            )
        log.info("step %d exported to %s", step, path)
        return path

    return export_fn
