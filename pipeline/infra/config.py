"""Typed stage configs: dataclasses loaded from YAML plus ``key=value`` overrides.

Like nanoGPT's configurator without its ``exec``: every key must name an existing field, every
value must fit the field's type, and both failures name the offending key.

Layering is done by OmegaConf structured configs: the stage's own defaults (the dataclass with
its ``default_factory`` sections, e.g. classify's ``tracking`` with ``register_model=""``) <- the
YAML file <- the overrides, merged key by key, so setting ``tracking.run_name`` leaves the rest of
the stage's ``tracking`` section as the stage declared it. ``OmegaConf.to_object`` then builds the
real dataclasses, so every ``__post_init__`` check still runs. Values are type-checked here before
the merge, more strictly than OmegaConf would (no ``3`` for a bool, no ``3`` for a string);
ints widen to floats and float literals YAML 1.1 reads as strings (``1e-3``) are floats.

Numbers are refused by rule, whatever the stage: every float must be finite (``nan``/``inf`` never
mean anything in a config), every int must fit 64 bits, and a key whose meaning needs a range
declares it in its class's ``RANGES`` table (key -> interval, e.g. ``"lr": "(0, inf)"``), which the
loader enforces on every value it is given (:func:`declared_ranges`). YAML anchors and aliases are
refused (an alias bomb of a few hundred bytes expands to gigabytes), and a value echoed in an error
message is cut to :data:`MAX_SHOWN` characters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import io
import math
import re
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key that does not exist or a value of the wrong type; the message names the key."""


EXIT_BUDGET = 3  # the CLI's exit status when a study stopped at its time budget


class BudgetReached(Exception):
    """A study stopped before an item its measured cost says would not fit the time budget."""

    def __init__(self, message: str, done: int, left: int, estimate_s: float) -> None:
        super().__init__(message)
        self.done, self.left, self.estimate_s = done, left, estimate_s


MAX_SHOWN = 200  # the most characters of a value (or key) an error message echoes
MAX_MESSAGE = 500  # the most characters of a check's own message (it may hold a value) echoed
RANGES_ATTR = "RANGES"  # the class attribute declaring value ranges: {field name: interval}
INT64 = 2**63
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: ``abc... (1234 chars)``."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def shown(value: Any) -> str:
    """``repr(value)`` as an error message echoes it (see :func:`clip`)."""
    try:
        return clip(repr(value))
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"<an integer of {value.bit_length()} bits>"


def parse_interval(spec: str) -> tuple[float, float, bool, bool]:
    """``"(0, 1]"`` -> ``(0.0, 1.0, lo_open=True, hi_open=False)``; ``inf`` / ``-inf`` for no bound."""
    m = _INTERVAL.match(spec.strip())
    if m is None:
        raise TypeError(f"range {spec!r} is not an interval such as '[0, 1]', '(0, inf)' or '[1, 1000]'")
    lo, hi = float(m.group(2)), float(m.group(3))
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise TypeError(f"range {spec!r} has no values")
    return lo, hi, m.group(1) == "(", m.group(4) == ")"


def in_interval(value: float, spec: str) -> bool:
    lo, hi, lo_open, hi_open = parse_interval(spec)
    return (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)


def declared_ranges(cls: type) -> dict[str, str]:
    """Field name -> interval, from the ``RANGES`` tables of ``cls`` and its dataclass bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get(RANGES_ATTR, {}))
    return out


def _check_range(key: str, value: Any, spec: str) -> None:
    items = enumerate(value) if isinstance(value, list) else [(None, value)]
    for i, v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not in_interval(v, spec):
            where = key if i is None else f"{key}[{i}]"
            raise ConfigError(
                f"config key '{where}' must be in {spec}, got {shown(v)}: set {key} within that range"
            )


class _UnknownKey(Exception):
    def __init__(self, key: str, names: list[str]) -> None:
        super().__init__(key)
        self.key, self.names = key, names


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (after ``get_type_hints``); ints widen to floats.

    Sections (dataclass types) come back as checked dicts, to be merged over the defaults.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(key, value, tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"config key '{key}': expected a list, got {type(value).__name__} {shown(value)}"
            )
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if isinstance(tp, type) and tp in _SCALARS:
        return _SCALARS[tp](key, value)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}': expected a mapping, got {type(value).__name__} {shown(value)}"
            )
        return _check(tp, value, f"{key}.")
    return value  # Any, and annotations no config key uses


def _coerce_union(key: str, value: Any, tp: Any) -> Any:
    """The value as the first member of the union ``tp`` it fits (None for an optional's null)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(key, value, a)
        except ConfigError:
            continue
    raise ConfigError(f"config key '{key}': {shown(value)} does not fit {_type_name(tp)}")


def _as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected true/false, got {shown(value)}")
    return value


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"config key '{key}': expected an integer, got {type(value).__name__} {shown(value)}"
        )
    if not -INT64 <= value < INT64:
        raise ConfigError(f"config key '{key}': {shown(value)} does not fit a 64-bit integer")
    return value


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, str):
        # YAML 1.1 reads "1e-2" (no dot) as a string; accept any float literal
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key '{key}': expected a number, got {type(value).__name__} {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(
            f"config key '{key}': {shown(value)} is not a finite number (nan and inf are refused): "
            "give a finite value"
        )
    return number


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}': expected a string, got {type(value).__name__} {shown(value)}")
    return value


# the scalar annotations of config keys, each with the check (and conversion) of its values
_SCALARS: dict[type, Callable[[str, Any], Any]] = {
    bool: _as_bool,
    int: _as_int,
    float: _as_float,
    str: _as_str,
}


def _check(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The checked (and coerced) copy of ``data`` for section ``cls``; unknown keys raise _UnknownKey."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in _init_fields(cls)]
    ranges = declared_ranges(cls)
    out: dict[str, Any] = {}
    for k, v in data.items():
        if k not in names:
            raise _UnknownKey(f"{prefix}{k}", [f"{prefix}{n}" for n in names])
        out[k] = _coerce(f"{prefix}{k}", v, hints[k])
        if k in ranges and out[k] is not None:
            _check_range(f"{prefix}{k}", out[k], ranges[k])
    return out


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls``: sections and leaves."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in _init_fields(cls):
        out.append(f"{prefix}{f.name}")
        if _is_dataclass_type(hints[f.name]):
            out.extend(all_keys(hints[f.name], f"{prefix}{f.name}."))
    return out


def _unknown_key_message(cls: type, err: _UnknownKey) -> str:
    if len(err.key) > MAX_SHOWN:  # no spelling to suggest (and difflib is quadratic in the length)
        return f"unknown config key {shown(err.key)}"
    keys = all_keys(cls)
    leaf = err.key.rsplit(".", 1)[-1]
    # the key exists in another section (batch_size -> data.batch_size), else a close spelling
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    close = close or difflib.get_close_matches(err.key, keys, n=2, cutoff=0.8)
    close = close or difflib.get_close_matches(
        leaf, [n.rsplit(".", 1)[-1] for n in err.names], n=1, cutoff=0.6
    )
    if close and "." in err.key and "." not in close[0]:  # a leaf name from the same section
        close = [f"{err.key.rsplit('.', 1)[0]}.{close[0]}"]
    hint = ""
    if close:
        hint = f": did you mean {' or '.join(repr(c) for c in close)}?"
    section = err.key.rsplit(".", 1)[0] if "." in err.key else ""
    valid = ", ".join(sorted(n.rsplit(".", 1)[-1] for n in err.names))
    return (
        f"unknown config key '{err.key}'{hint} (valid keys {'in ' + section if section else 'here'}: {valid})"
    )


def _validate(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    try:
        return _check(cls, data, prefix)
    except _UnknownKey as e:
        raise ConfigError(_unknown_key_message(cls, e)) from None


def _instantiate(cls: type[T], conf: Any, prefix: str = "") -> T:
    """``OmegaConf.to_object``, naming the section whose ``__post_init__`` rejected a value."""

    def check_sections(node: Any, where: str) -> None:
        for k in node:
            child = node[k]
            if OmegaConf.is_dict(child) and _is_dataclass_type(OmegaConf.get_type(child)):
                check_sections(child, f"{where}{k}.")
                try:
                    OmegaConf.to_object(child)
                except ConfigError:
                    raise
                except ValueError as e:
                    raise ConfigError(f"config section '{where}{k}': {clip(str(e), MAX_MESSAGE)}") from e

    try:
        return OmegaConf.to_object(conf)  # type: ignore[return-value]
    except ConfigError:
        raise
    except ValueError as e:
        # only on failure: build the sections one by one to name the one that refused the value
        check_sections(conf, prefix)
        where = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"config section '{where}': {clip(str(e), MAX_MESSAGE)}") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"config {cls.__name__}: {clip(str(e).splitlines()[0], MAX_MESSAGE)}") from e


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """The stage's own defaults <- ``data`` (checked), as an instance of ``cls``."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    # load_config renamed (and warned about) what the user wrote; what is left is stored configs
    checked = _validate(cls, current_spelling(cls, data or {}, warn=False), prefix)
    try:
        # the class (not an instance): default_factory sections are called, so each stage's own
        # defaults hold, while no __post_init__ runs before the values are merged (a derived
        # value such as train's model.image_size = data.image_size is then computed once, at the end)
        conf = OmegaConf.merge(OmegaConf.structured(cls), checked)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        raise ConfigError(f"config key '{prefix}{key}': {clip(str(e).splitlines()[0], MAX_MESSAGE)}") from e
    return _instantiate(cls, conf, prefix)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict over its own defaults; bad keys/values raise ConfigError."""
    return _build(cls, data, prefix)


MISSING = object()  # a key one side of a diff does not have


def diff_flat(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The one config differ: ``(key, old value, new value)`` for every key of two flat configs
    whose values differ (:data:`MISSING` for a key one side lacks), keys sorted; a tuple equals
    the list it reads back as."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, MISSING), new.get(k, MISSING)
        if a is MISSING or b is MISSING or norm(a) != norm(b):
            out.append((k, a, b))
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the form MLflow params take."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _yaml_error(where: str, e: yaml.YAMLError) -> ConfigError:
    """One line: where, line and column (1-based), the problem and what the parser was inside."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    msg = f"{where}: invalid YAML{at}: {problem}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        msg += f" ({context}"
        if cmark is not None and (mark is None or (cmark.line, cmark.column) != (mark.line, mark.column)):
            msg += f" that starts at line {cmark.line + 1}, column {cmark.column + 1}"
        msg += ")"
    return ConfigError(" ".join(msg.split()))


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``on``, ``off``, ``yes`` and ``no`` are booleans: then
    ``speed.mode=off`` would arrive as False. Here only true/false are booleans (YAML 1.2).

    Anchors and aliases (``&a``, ``*a``, ``<<: *a``) are refused: nine nested aliases of nine
    make a "billion laughs" bomb of a few hundred bytes that expands to gigabytes when the
    config is checked, merged or echoed; a config never needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML anchors and aliases (&name, *name) are not allowed in configs: write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def yaml_load(text: str) -> Any:
    """YAML with 1.2 booleans (:class:`_Yaml12Loader`): config files and overrides alike."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except ValueError as e:  # an integer literal beyond Python's digit limit
        raise yaml.YAMLError(clip(str(e))) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {shown(item)} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {shown(item)} has an empty key")
    # YAML scalars: 3 -> int, 3e-4 -> float, true -> bool, [1,2] -> list, text -> str; none -> None
    if raw.strip().lower() == "none":
        return key.split("."), None
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise _yaml_error(f"override {shown(item)}", e) from None
    return key.split("."), value


def _set_nested(d: dict[str, Any], path: list[str], value: Any) -> None:
    for i, p in enumerate(path[:-1]):
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{'.'.join(path)}': '{'.'.join(path[: i + 1])}' is not a section")
        d = nxt
    d[path[-1]] = value


# the shipped configs travel inside the package (the repository's configs/ links here), so an
# installed copy finds `configs/kermany64.yaml` from any working directory
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(yaml_path: str | Path) -> Path:
    """``yaml_path`` as given when it exists; else, for ``NAME.yaml`` or ``configs/NAME.yaml``, the
    config of that name shipped with the package."""
    p = Path(yaml_path)
    if p.is_file():
        return p
    packaged = PACKAGED_CONFIGS / p.name
    if not p.is_absolute() and p.parent in (Path("."), Path("configs")) and packaged.is_file():
        return packaged
    shipped = ", ".join(sorted(f"configs/{c.name}" for c in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file {p} does not exist (shipped with the package: {shipped})")


def read_yaml(yaml_path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; a missing file or broken YAML is a one-line ConfigError."""
    p = resolve_config_path(yaml_path)
    try:
        loaded = yaml_load(p.read_text())
    except yaml.YAMLError as e:
        raise _yaml_error(f"config file {p}", e) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """The stage's own defaults <- YAML file <- ``key=value`` overrides, validated into ``cls``."""
    data: dict[str, Any] = {}
    if yaml_path is not None:
        data = current_spelling(cls, read_yaml(yaml_path))
        try:
            _validate(cls, data)  # so that a bad key or value in the file says so
        except ConfigError as e:
            raise ConfigError(f"config file {yaml_path}: {e}") from None
    for item in overrides or []:
        path, value = parse_override(item)
        for new_path, new_value in _renamed_leaves(cls, {".".join(path): value}, ""):
            _set_nested(data, new_path.split("."), new_value)
    return _build(cls, data)


# ----------------------------------------------------------------------------- renamed keys
_WARNED: set[str] = set()


def _renamed_leaves(cls: type, data: dict[str, Any], prefix: str, warn: bool = True) -> list[tuple[str, Any]]:
    """``data``'s (dotted key, value) pairs with every deprecated key (a class's ``RENAMED``
    table: old key -> :class:`pipeline.infra.stage_configs.Renamed`) in its current spelling and
    value; a dotted key (an override) is followed into its sections."""
    hints = typing.get_type_hints(cls)
    table = getattr(cls, "RENAMED", {})
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        head, _, rest = str(key).partition(".")
        if key in table:
            ren = table[key]
            if warn and f"{prefix}{key}" not in _WARNED:
                _WARNED.add(f"{prefix}{key}")
                print(
                    f"config: '{prefix}{key}' is deprecated, read as '{prefix}{ren.new}' (the old spelling "
                    "goes in the next release: write the new one)",
                    file=sys.stderr,
                )
            out.append((f"{prefix}{ren.new}", ren.forward(value)))
        elif head in hints and _is_dataclass_type(hints[head]) and (rest or isinstance(value, dict)):
            inner = {rest: value} if rest else value
            out.extend(_renamed_leaves(hints[head], inner, f"{prefix}{head}.", warn))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def renamed_keys(cls: type, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """Every renamed key of ``cls`` and its sections: dotted new key -> (dotted old key, its
    :class:`pipeline.infra.stage_configs.Renamed`)."""
    hints = typing.get_type_hints(cls)
    out = {f"{prefix}{r.new}": (f"{prefix}{old}", r) for old, r in getattr(cls, "RENAMED", {}).items()}
    for f in _init_fields(cls):
        if _is_dataclass_type(hints[f.name]):
            out.update(renamed_keys(hints[f.name], f"{prefix}{f.name}."))
    return out


def tagged_keys(cls: type, kinds: frozenset[str] | set[str], prefix: str = "") -> frozenset[str]:
    """The dotted keys of ``cls`` and its sections whose kind (the ``RUNS`` tables of a class and
    its bases: field -> kind, ``"*"`` for every field) is one of ``kinds``; a renamed key also in
    its old spelling (a study's records are keyed by those)."""
    hints = typing.get_type_hints(cls)
    runs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        runs.update(vars(klass).get("RUNS", {}))
    out: set[str] = set()
    for f in _init_fields(cls):
        if _is_dataclass_type(hints[f.name]):
            out |= tagged_keys(hints[f.name], kinds, f"{prefix}{f.name}.")
        elif runs.get(f.name, runs.get("*")) in kinds:
            out.add(f"{prefix}{f.name}")
    out |= {old for new, (old, _) in renamed_keys(cls, prefix).items() if new in out}
    return frozenset(out)


def old_spelling(cls: type, flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config of ``cls`` with each renamed key (and value) as it was spelled before: what
    identifies a computation did not change with a name, so a key computed from this one keeps
    records made before the rename valid."""
    table = renamed_keys(cls)
    out = {}
    for k, v in flat.items():
        if k in table:
            old, ren = table[k]
            out[old] = ren.backward(v)
        else:
            out[k] = v
    return out


def current_spelling(cls: type, data: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """A nested config dict with its deprecated keys in their current spelling; a key given in
    both spellings is refused (which one was meant?). ``warn=False``: a config stored before the
    rename (a checkpoint's), which its user did not write: no deprecation message."""
    leaves = _renamed_leaves(cls, data, "", warn)
    seen: set[str] = set()
    out: dict[str, Any] = {}
    for key, value in leaves:
        if key in seen:
            raise ConfigError(
                f"config key '{key}' is given twice (once in a deprecated spelling): keep '{key}'"
            )
        seen.add(key)
        _set_nested(out, key.split("."), value)
    return out


# ----------------------------------------------------------------------------- describing a config
def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _show(value: Any) -> str:
    """A default as it would be written in an override."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "''" if value == "" else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the source comments on it (the lines just above and the trailing one), per class in the MRO."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        out.update(_comments_in_class_source(src))
    return out


def _comments_in_class_source(src: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError):
        return out
    level, depth, above, field, trailing, start = 0, 0, [], None, [], True
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.INDENT:
            level += 1
        elif tok.type == tokenize.DEDENT:
            level -= 1
        elif tok.type == tokenize.COMMENT:
            if field is not None:
                trailing.append(tok.string.lstrip("#").strip())
            elif level <= 1 and tok.line.strip().startswith("#"):
                above.append(tok.string.lstrip("#").strip())
        elif tok.type == tokenize.NL:
            if field is None and depth == 0 and not tok.line.strip():
                above = []  # a blank line ends a comment block
        elif tok.type == tokenize.NEWLINE:
            if field is not None:
                out[field] = " ".join(c for c in [*above, *trailing] if c)
            above, field, trailing, start = [], None, [], True
            continue
        elif tok.type == tokenize.OP:
            depth += tok.string in "([{"
            depth -= tok.string in ")]}"
        elif (
            tok.type == tokenize.NAME
            and start
            and level == 1
            and depth == 0
            and i + 1 < len(tokens)
            and tokens[i + 1].string == ":"
        ):
            field = tok.string
        if tok.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT, tokenize.NL):
            start = False
    return out


def describe(cls: type) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, the stage's default, meaning) for every leaf key of ``cls``."""
    defaults = OmegaConf.to_container(OmegaConf.structured(cls))
    rows: list[tuple[str, str, str, str]] = []

    def walk(klass: type, values: dict[str, Any], prefix: str) -> None:
        hints = typing.get_type_hints(klass)
        comments = field_comments(klass)
        ranges = declared_ranges(klass)
        for f in _init_fields(klass):
            tp = hints[f.name]
            if _is_dataclass_type(tp):
                walk(tp, values[f.name], f"{prefix}{f.name}.")
            else:
                help_ = f.metadata.get("help", "") or comments.get(f.name, "")
                if f.name in ranges:
                    help_ = f"{help_} (range {ranges[f.name]})".lstrip()
                rows.append((f"{prefix}{f.name}", _type_name(tp), _show(values[f.name]), help_))

    walk(cls, defaults, "")  # type: ignore[arg-type]
    return rows


def format_help(cls: type) -> str:
    rows = describe(cls)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = min(max(len(r[2]) for r in rows), 24)
    lines = []
    for key, tp, default, help_ in rows:
        line = f"  {key:<{w0}}  {tp:<{w1}}  {default:<{w2}}  {help_}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
