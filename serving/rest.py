"""TF Serving's REST JSON formats ↔ tensors (no HTTP here; :mod:`ctrkit.serving.server` does that).

Follows https://www.tensorflow.org/tfx/serving/api_rest:

* Predict: row format ``{"signature_name": ..., "instances": [...]}`` → ``{"predictions": [...]}``;
  columnar format ``{"inputs": ...}`` → ``{"outputs": ...}``. Binary strings are ``{"b64": "..."}``.
  A single-input signature takes a plain list of values; a multi-input one a list of objects.
  With one output, ``predictions`` lists values; with several, one object per row.
* Classify / Regress: ``{"signature_name": ..., "context": {...}, "examples": [{feature: value}, ...]}``
  → ``{"results": [[[label, score], ...], ...]}`` / ``{"results": [value, ...]}`` (the key TF Serving
  sends; its REST guide says ``"result"``). Feature values are typed
  as TF Serving types them (an integer is int64, ``null`` is an error), and a column takes as many values
  per example as the model reads (one for ctrkit's raw columns; a multi-valued one as its joined string).

Bad input raises :class:`RequestError` (the server answers 400 with ``{"error": "..."}``).
"""
from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


_FLOAT32_MAX = 3.4028234663852886e38


class RequestError(ValueError):
    """The request body does not fit the API or the signature: HTTP 400."""


class NotFoundError(LookupError):
    """Unknown model, version or signature: HTTP 404."""


def _decode_b64(value: Any) -> Any:
    """Replace ``{"b64": s}`` objects (anywhere in nested lists) with the bytes they encode."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, TypeError, ValueError) as e:
                raise RequestError(f"invalid base64 in {{'b64': ...}}: {e}") from None
        raise RequestError(f"unexpected object {sorted(value)!r} where a tensor value was expected")
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    return value


def to_array(name: str, value: Any, dtype: Any, shape: list[int | None]) -> np.ndarray:
    """JSON value → numpy array for signature input ``name`` (dtype a ``tf.DType``, shape with None = any)."""
    value = _decode_b64(value)
    try:
        if dtype.name == "string":
            def enc(v: Any) -> Any:
                if isinstance(v, list):
                    return [enc(x) for x in v]
                if isinstance(v, bytes):
                    return v
                if isinstance(v, str):
                    return v.encode("utf-8")
                raise RequestError(f"input {name!r}: expected strings, got {type(v).__name__} {v!r}")

            arr = np.array(enc(value), dtype=object)
        else:
            wrong = _first_unaccepted(value, _ACCEPTS.get(dtype.name, _ACCEPTS["integer" if dtype.is_integer else "float"]))
            if wrong:
                _refuse_number(name, wrong[0], dtype)
            arr = np.array(value, dtype=dtype.as_numpy_dtype)
    except RequestError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise RequestError(f"input {name!r}: cannot convert to {dtype.name}: {e}") from None
    if arr.dtype == object and dtype.name != "string":
        raise RequestError(f"input {name!r}: ragged or mixed values")
    if dtype.is_floating and np.isinf(arr).any():
        raise RequestError(f"input {name!r}: ±inf has no meaning (NaN marks a missing value)")
    if arr.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, arr.shape)):
        want = "(" + ", ".join("-1" if s is None else str(s) for s in shape) + ")"
        raise RequestError(f"input {name!r}: shape {tuple(arr.shape)} does not fit the signature's {want}")
    return arr


# The JSON types TF Serving takes for a numeric tensor (json_tensor.cc AddValueToTensor): numbers only, and
# integers only for an integer one. numpy would read null as NaN (a missing value here) and true as 1.
_ACCEPTS: dict[str, tuple[type, ...]] = {"bool": (bool,), "integer": (int,), "float": (int, float)}


def _first_unaccepted(value: Any, accepted: tuple[type, ...]) -> tuple[Any] | None:
    """``(v,)`` for the first value in ``value`` (nested lists) whose exact type is not in ``accepted``."""
    for v in value if isinstance(value, list) else (value,):
        if isinstance(v, list):
            found = _first_unaccepted(v, accepted)
            if found:
                return found
        elif type(v) not in accepted:
            return (v,)
    return None


def _refuse_number(name: str, v: Any, dtype: Any) -> None:
    if isinstance(v, (str, bytes)):
        raise RequestError(f"input {name!r}: expected numbers of type {dtype.name}, got a string")
    if isinstance(v, float) and dtype.is_integer:
        raise RequestError(f"input {name!r}: expected integers ({dtype.name}), got a fractional number")
    text, kind = {type(None): ("null", "Null"), bool: (str(v).lower(), str(v))}.get(type(v), (repr(v), "Number"))
    raise RequestError(f"input {name!r}: JSON Value: {text} Type: {kind} is not of expected type: {dtype.name}"
                       + (" (NaN marks a missing value)" if dtype.is_floating else ""))


def predict_inputs(body: Mapping[str, Any], input_specs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
    """Parse a predict body → (arrays by input name, row_format). ``input_specs``: name → (dtype, shape)."""
    has_instances, has_inputs = "instances" in body, "inputs" in body
    if has_instances == has_inputs:
        raise RequestError("request must have exactly one of 'instances' (row format) or 'inputs' (columnar format)")
    names = sorted(input_specs)
    if has_instances:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise RequestError("'instances' must be a non-empty list")
        objects = [isinstance(i, dict) and set(i) != {"b64"} for i in instances]
        if any(objects) and not all(objects):
            raise RequestError("'instances' mixes named objects and plain values")
        if all(objects):
            columns: dict[str, list[Any]] = {n: [] for n in names}
            for k, inst in enumerate(instances):
                keys = set(inst)
                if keys != set(names):
                    missing, extra = sorted(set(names) - keys), sorted(keys - set(names))
                    raise RequestError(
                        f"instances[{k}]: " + "; ".join(
                            p for p in (f"missing inputs {missing}" if missing else "",
                                        f"unknown inputs {extra}" if extra else "") if p
                        ) + f" (signature inputs: {names})"
                    )
                for n in names:
                    columns[n].append(inst[n])
        else:
            if len(names) != 1:
                raise RequestError(f"the signature has inputs {names}: each instance must be an object naming them")
            columns = {names[0]: instances}
        raw = columns
    else:
        inputs = body["inputs"]
        if isinstance(inputs, dict) and set(inputs) != {"b64"}:
            if set(inputs) != set(names):
                raise RequestError(f"'inputs' has keys {sorted(inputs)}; the signature's inputs are {names}")
            raw = dict(inputs)
        else:
            if len(names) != 1:
                raise RequestError(f"the signature has inputs {names}: 'inputs' must be an object naming them")
            raw = {names[0]: inputs}
    arrays = {n: to_array(n, raw[n], *input_specs[n]) for n in names}
    sizes = {n: a.shape[0] if a.ndim else None for n, a in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise RequestError(f"inputs disagree on the batch size: {sizes}")
    return arrays, has_instances


def jsonable(arr: np.ndarray) -> Any:
    """A numpy output → JSON (bytes as UTF-8 text, or ``{"b64": ...}`` when not valid UTF-8)."""
    if arr.dtype == object:
        def dec(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return [dec(x) for x in v]
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(v).decode("ascii")}

        return dec(arr)
    return arr.tolist()


def predict_response(outputs: Mapping[str, np.ndarray], row_format: bool) -> dict[str, Any]:
    keys = sorted(outputs)
    if row_format:
        if len(keys) == 1:
            return {"predictions": jsonable(outputs[keys[0]])}
        n = len(next(iter(outputs.values())))
        cols = {k: jsonable(outputs[k]) for k in keys}
        return {"predictions": [{k: cols[k][i] for k in keys} for i in range(n)]}
    if len(keys) == 1:
        return {"outputs": jsonable(outputs[keys[0]])}
    return {"outputs": {k: jsonable(outputs[k]) for k in keys}}


def _json_type(v: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number with a fraction",
            str: "string", bytes: "base64 string"}.get(type(v), type(v).__name__)


def _feature(name: str, value: Any, dtype: Any) -> Any:
    """One feature of a Classify/Regress example, typed the way TF Serving types it.

    TF Serving does not look at the model when it turns JSON into a ``tf.Example``: a string (or b64
    object) becomes a bytes_list, a number written with a fraction or exponent a float_list, an integer
    or a boolean an int64_list, and ``null`` is an error. The model's parser then rejects a feature of the
    wrong kind ("Data types don't match"), so ``3`` for a float column fails there and must fail here too,
    or clients tested against ``ctrkit serve`` break on TF Serving.
    """
    import tensorflow as tf

    values = value if isinstance(value, list) else [value]
    values = _decode_b64(values)
    if any(isinstance(v, (list, dict)) for v in values):
        raise RequestError(f"feature {name!r}: values must be a scalar or a flat list, got {value!r}")
    if any(v is None for v in values):
        raise RequestError(
            f"feature {name!r}: null is not a value (TF Serving: \"has element with unexpected JSON type: "
            "Null\"); leave the feature out of the example to send it as missing"
        )
    if dtype.name == "string":
        wrong = [v for v in values if not isinstance(v, (str, bytes))]
        if wrong:
            raise RequestError(f"feature {name!r}: expected strings, got {_json_type(wrong[0])} {wrong[0]!r}")
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() if isinstance(v, str) else v for v in values]))
    if dtype.is_floating:
        wrong = [v for v in values if not isinstance(v, float)]
        if wrong:
            v = wrong[0]
            hint = f" (write {float(v)!r})" if isinstance(v, int) else ""
            raise RequestError(
                f"feature {name!r}: expected numbers with a fraction ({dtype.name}), got {_json_type(v)} {v!r}"
                f"{hint}; TF Serving sends JSON integers and booleans as int64 and the model rejects them"
            )
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            # The model refuses it too (its assertion cannot name the feature); say which one, here.
            raise RequestError(f"feature {name!r}: {bad[0]!r} is not a value the model can score; leave the "
                               "feature out of the example to send it as missing")
        big = [v for v in values if abs(v) > _FLOAT32_MAX]
        if big:
            raise RequestError(f"feature {name!r}: cannot convert {big[0]!r} to {dtype.name} without loss of precision")
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    wrong = [v for v in values if not isinstance(v, int)]  # bool is an int: TF Serving sends it as 0/1
    if wrong:
        raise RequestError(
            f"feature {name!r}: expected integers ({dtype.name}), got {_json_type(wrong[0])} {wrong[0]!r}; "
            "TF Serving sends a number with a fraction as float and the model rejects it"
        )
    if any(not -(2**63) <= v < 2**63 for v in values):
        raise RequestError(f"feature {name!r}: {value!r} does not fit in int64")
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _check_count(name: str, value: Any, size: int, multivalued: Mapping[str, str | None]) -> None:
    """Reject more values than the column holds per example, before TF fails the whole batch with an
    opaque shape error. ctrkit's raw columns hold one value each (pipelines/transform.py); a multi-valued
    one carries its values joined into one string, split by the transform graph as in training."""
    if not isinstance(value, list) or len(value) <= size:
        return
    if name in multivalued:
        sep = multivalued[name]
        how = (f"joined with {sep!r} into one string, e.g. {sep.join(['a', 'b'])!r}" if sep
               else "joined into one string with the separator the pipeline splits it on, as in the raw training data")
        raise RequestError(f"feature {name!r} is multi-valued: send its values {how}, not a list of {len(value)}")
    raise RequestError(f"feature {name!r} takes {size} value(s) per example, got a list of {len(value)}")


def examples_from_body(body: Mapping[str, Any], feature_dtypes: Mapping[str, Any], ignored: set[str],
                       sizes: Mapping[str, int] | None = None,
                       multivalued: Mapping[str, str | None] | None = None) -> list[bytes]:
    """Classify/Regress body → serialized ``tf.Example``s. ``feature_dtypes``: raw feature → tf dtype;
    ``ignored``: columns accepted and dropped (the label); any other unknown feature is an error.
    ``sizes``: raw feature → values per example (default 1); ``multivalued``: raw column → separator of
    the columns that take several values as one joined string."""
    import tensorflow as tf

    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise RequestError("'examples' must be a non-empty list of objects (feature name → value)")
    context = body.get("context", {})
    if not isinstance(context, dict):
        raise RequestError("'context' must be an object (feature name → value)")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise RequestError(f"examples[{i}] must be an object, got {type(ex).__name__}")
        both = sorted(set(context) & set(ex))
        if both:
            raise RequestError(f"examples[{i}]: feature(s) {both} appear in both 'context' and the example")
        merged = {**context, **ex}
        unknown = sorted(set(merged) - set(feature_dtypes) - ignored)
        if unknown:
            raise RequestError(f"examples[{i}]: unknown feature(s) {unknown}; the model reads {sorted(feature_dtypes)}")
        feats = {}
        for name, value in merged.items():
            if name in ignored:
                continue
            try:
                _check_count(name, value, (sizes or {}).get(name, 1), multivalued or {})
                feats[name] = _feature(name, value, feature_dtypes[name])
            except RequestError as e:
                raise RequestError(f"examples[{i}]: {e}") from None
        out.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    return out
