"""Typed, validated loading of nested dataclasses from YAML/dicts.

Every config section is a plain dataclass; :func:`from_dict` builds it from parsed YAML and rejects
unknown keys and wrongly typed values with the full dotted path of the offending key, so a typo in a
config file fails loudly instead of silently falling back to a default.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import reprlib
import re
import types
import typing
from typing import IO, Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


# A value quoted in an error message is shortened: a few YAML anchors and aliases make a value whose full repr
# is billions of characters (a 415-byte config ran ctrkit to 1 GB and on for minutes building one message).
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel = 2
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 100


def _shown(value: Any) -> str:
    text = _SHOWN.repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


class ConfigError(ValueError):
    """A config file or dict does not match the expected schema."""


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3``, ``5E-4``, ``+1e3`` and ``1.0e3`` as floats.

    PyYAML follows YAML 1.1, whose float needs a dot and a signed exponent, so those common spellings of a
    learning rate would arrive as strings. Everything else resolves exactly as with ``yaml.safe_load``.
    """


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    """A key given twice is an error: YAML keeps the last one, so the first was silently ignored."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                    key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


ConfigLoader.construct_mapping = _mapping_without_duplicates  # type: ignore[method-assign]

# add_implicit_resolver copies SafeLoader's table into ConfigLoader first, so SafeLoader is left unchanged.
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(stream: str | IO[str]) -> Any:
    """Parse config YAML (a string or an open file) with :class:`ConfigLoader`; use it for every config file."""
    return yaml.load(stream, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader


_READING_RECORDED = contextvars.ContextVar("ctrkit_reading_recorded_config", default=False)


@contextlib.contextmanager
def reading_recorded_config():
    """Within this block, settings a config would ignore are accepted instead of refused.

    For configs ctrkit recorded itself (a pipeline output's ``manifest.json``, a run directory's
    ``config.yaml``): an older ctrkit may have accepted such a setting, which had no effect there either,
    and refusing it now would make that data or run unusable. Values that are wrong, not just ineffective,
    are still refused.
    """
    token = _READING_RECORDED.set(True)
    try:
        yield
    finally:
        _READING_RECORDED.reset(token)


def refuses_ignored_settings() -> bool:
    """False inside :func:`reading_recorded_config`."""
    return not _READING_RECORDED.get()


# A name that becomes a directory, a URL path part (TF Serving's /v1/models/NAME), a Keras name and a TF scope.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def is_plain_name(value: str) -> bool:
    """Letters, digits, '_', '-', '.', not starting with '.' or '-' (run, model and column names)."""
    return bool(_PLAIN_NAME.fullmatch(value))


def from_dict(cls: type[T], data: Any, path: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise :class:`ConfigError`.

    ``path`` is the dotted key of ``data`` in error messages (default: the class name; ``""``: the root, so
    its fields are named bare, ``model.embedding_dim``).
    """
    return _convert(cls, data, cls.__name__ if path is None else path)


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def to_dict(obj: Any) -> Any:
    """Inverse of :func:`from_dict`: plain dicts/lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        where = path or "top level"
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__} {_shown(value)}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed keys are {', '.join(sorted(fields))}"
            )
        missing = [name for name, f in fields.items() if name not in value
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
        kwargs = {name: _convert(hints[name], value[name], _key(path, name)) for name in fields if name in value}
        try:
            return tp(**kwargs)
        except ConfigError as e:
            # A section's own checks name keys from where it usually sits (``model.``); the teacher's
            # model sits at ``distill.teacher_model``.
            usual = getattr(tp, "CONFIG_KEY", None)
            if usual and path and path != usual:
                keys = "|".join(map(re.escape, fields))  # only keys: a value such as 'model.relu' stays as given
                raise ConfigError(re.sub(rf"(?<![\w.]){re.escape(usual)}\.(?=(?:{keys})\b)", f"{path}.", str(e))) from e
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from e
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {_shown(value)} matches none of {_describe(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {_shown(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {_shown(value)}")
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {_shown(value)}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_convert(key_tp, k, _key(path, "<key>")): _convert(val_tp, v, _key(path, str(k)))
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {_shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {_shown(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_shown(value)}")
        return value
    raise ConfigError(f"{path}: unsupported config type {_describe(tp)}")
