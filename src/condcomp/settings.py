"""The one config machinery: typed, validated settings dataclasses read from plain mappings.

Every config in condcomp (the LM run config, each technique's settings, the CoDA conversion and the
classifier trainer) is a dataclass deriving from ``Settings``, with fields declared by ``setting``:

    @dataclass
    class MoESettings(Settings):
        num_experts: int = setting(8, ge=1)
        router: str = setting("top_k", choices=("top_k", "expert_choice"))

Construction checks every range and choice and then the class's own ``check``; ``from_dict`` reads a
mapping (YAML), failing at once on an unknown key, a wrong type or an out-of-range value, each error
naming the full key path (``model.moe.k: must be >= 1, got 0``), so a typo never trains silently with
a default. ``to_dict`` writes the mapping back. This module imports nothing else of condcomp.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import re
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what to change."""


def setting(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None, choices=None, help: str = "",
            default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a validated range or set of choices (``choices`` may be a callable)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "help": help}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_value(name: str, value: Any, meta: typing.Mapping, error: type[ConfigError] = ConfigError) -> None:
    """Raise ``error`` if ``value`` breaks the range or choices in a field's metadata."""
    if value is None or isinstance(value, (Settings, dict, list)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise error(f"{name}: must be a finite number, got {value}")
    if meta.get("choices") is not None:
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        if value not in choices:
            raise error(f"{name}: {value!r} is not one of {sorted(choices)}")
    if meta.get("ge") is not None and value < meta["ge"]:
        raise error(f"{name}: must be >= {meta['ge']}, got {value}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise error(f"{name}: must be > {meta['gt']}, got {value}")
    if meta.get("le") is not None and value > meta["le"]:
        raise error(f"{name}: must be <= {meta['le']}, got {value}")
    if meta.get("lt") is not None and value >= meta["lt"]:
        raise error(f"{name}: must be < {meta['lt']}, got {value}")


class Settings:
    """Base of every settings dataclass: field checks after construction, then ``check``.

    A class may hold *open sections*: settings dataclasses registered elsewhere (the techniques'),
    kept in its ``sections`` field and read and written as if they were fields of their own
    (``model.moe.k``). Such a class overrides ``open_sections``.
    """

    # The error raised on a bad value: a subclass of ConfigError where a module has its own.
    error: typing.ClassVar[type[ConfigError]] = ConfigError

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name), f.metadata, self.error)
        self.check()

    def check(self) -> None:
        """Cross-field checks; subclasses override and raise ConfigError naming the key."""

    @classmethod
    def open_sections(cls) -> dict[str, type]:
        """Section name -> settings class for sections held in ``self.sections``; none by default."""
        return {}

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any, prefix: str = ""):
        return from_dict(cls, data, prefix)

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, constraints and help) per field, for listings and docs."""
        rows = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "sections":
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            m = f.metadata
            limits = [f"{op} {m[key]}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                      if m.get(key) is not None]
            if m.get("choices") is not None:
                choices = m["choices"]() if callable(m["choices"]) else m["choices"]
                limits.append("one of " + ", ".join(map(str, choices)))
            text = "; ".join(filter(None, [", ".join(limits), m.get("help", "")]))
            rows.append((f.name, _type_name(hints[f.name]), default, text))
        return rows


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp)).replace("NoneType", "null")
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(tp, value, key: str):
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float only)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not fit {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key + ".")
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k_tp, k, f"{key}.{k}"): _coerce(v_tp, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept it as the number the user meant.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls, data: Any, prefix: str = ""):
    """Build settings class ``cls`` from a plain mapping, naming the full key path in any error."""
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    open_sections = cls.open_sections() if issubclass(cls, Settings) else {}
    names = [f.name for f in dataclasses.fields(cls) if not (open_sections and f.name == "sections")]
    valid = names + list(open_sections)
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    kwargs = {name: _coerce(hints[name], data[name], prefix + name) for name in names if name in data}
    sections = {name: from_dict(section_cls, data[name], prefix=f"{prefix}{name}.")
                for name, section_cls in open_sections.items() if name in data}
    if sections:
        kwargs["sections"] = sections
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise type(e)(f"{prefix}{e}") from None


def to_dict(obj: Any) -> Any:
    """Settings -> plain mapping (open sections written as keys of their holder), recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == "sections" and isinstance(obj, Settings) and obj.open_sections():
                out.update({name: to_dict(section) for name, section in value.items()})
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a mapping with the same key twice (plain YAML keeps the last one
    silently, and a grid would lose a variant)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: the key {key!r} appears twice in one mapping")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
# YAML 1.1 (PyYAML) reads 1e-5 and 3e13 as strings: it wants a dot in a float. Read them as numbers
# (YAML 1.2, and what JSON writes: a run's config.json holds norm_eps: 1e-05).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml_file(path: str | Path, *, what: str = "config") -> Any:
    """Parse a YAML file safely (no code runs), refusing duplicate keys; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{line}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``key.path=value`` (value in YAML syntax) to a raw mapping, in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.steps=100")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML") from None


def read_yaml(path: str | Path | None, overrides: list[str] | None = None, *, what: str = "config",
              base: dict | None = None) -> dict:
    """A YAML mapping from ``path`` (or ``base``, or an empty one) with ``key=value`` overrides applied."""
    raw: dict = dict(base or {})
    if path is not None:
        raw = load_yaml_file(path, what=what) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return raw


def changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config mappings, with both values:
    ["model.d_model: 256 -> 512", ...] (sorted)."""
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_keys(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
