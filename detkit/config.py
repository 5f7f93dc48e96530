"""YAML configs: ``_base_`` inheritance, ``a.b.c=value`` overrides, validation against typed
dataclass schemas, and errors that name the key, the file and the closest valid key.

This module is the generic machinery; the schema dataclasses live in ``detkit/schema.py``.

Pipeline of :func:`load_config` (each step is public, so it can be used alone)::

    load_yaml(path)            -> data, origins   # _base_ merge, then ${VAR} interpolation
    apply_overrides(data, ...) -> data            # "a.b.c=value" on top, origin "command line"
    from_dict(schema, data, origins) -> instance  # types checked, paths resolved

Rules, stated once:

- ``_base_``: a path or a list of paths, relative to the directory of the file that names
  them. Bases are merged in order (a later base overrides an earlier one), then the including
  file on top. Dicts merge key by key; lists and scalars replace. A dict holding
  ``_delete_: true`` replaces the inherited dict instead of merging into it (as in
  mmdetection). ``_delete_`` acts within the chain of the file that writes it.
- Origins: ``origins[key_path]`` is the file (absolute path) that set ``key_path`` last, or
  :data:`COMMAND_LINE`. Key paths are dotted (``"model.rpn.nms_thresh"``); every dict node
  has an entry, lists are leaves, and ``origins[""]`` is the entry file.
- Interpolation: in every string value (also inside lists) ``${VAR}`` is replaced by the
  environment variable VAR, ``${VAR:default}`` falls back to ``default`` when VAR is unset
  (an empty default ``${VAR:}`` is allowed), ``$${`` is a literal ``${``. It runs once, on the
  merged result, so a base's ``${VAR}`` that a child overrides is never looked up. The result
  stays a string (``${N:4}`` is the string "4", not an int).
- Paths: a field typed :data:`PathStr` (or declared with ``field(metadata={"path": True})``)
  is resolved as below; with ``metadata={"path": True, "relative_to": "root"}`` a relative
  value is joined to the (resolved) sibling field ``root`` instead, when that is set.
  Otherwise a path field
  is, *after* interpolation, expanded with ``~`` and, if relative, joined to the directory of
  the file that set that key (for command-line overrides: to the working directory at
  validation time), then normalised to an absolute path. So ``configs/_base_/datasets/x.yaml``
  may say ``root: ${DETKIT_DATA:../../../../shared/data}/BCCD`` and work from any cwd. Note the
  order: a *relative* value of DETKIT_DATA is also taken relative to that YAML file, so set
  such variables to absolute paths. Empty strings and schema defaults are left as they are.
- Scalars follow YAML 1.2 rather than PyYAML's YAML 1.1: ``1e-3`` is a float (PyYAML reads it
  as a string), only ``true``/``false`` are booleans (``yes``/``on`` stay strings), ``010`` is
  not octal, ``1:30`` is not a base-60 int, dates stay strings. Duplicate keys are errors.
  Loading is still "safe": the loader is a ``yaml.SafeLoader`` with these resolvers swapped.

Supported schema annotations: int, float (accepts an int, never a bool), bool (only
true/false), str, PathStr, Any, Optional[X], Union of those, List[X], Tuple[X, ...],
Tuple[X, Y] (YAML lists), Dict[K, V], Literal[...], nested dataclasses. Schemas that use
string annotations (``from __future__ import annotations``) must be defined at module level.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import PurePath
from typing import Any, Dict, Iterable, List, NewType, Optional, Sequence, Tuple

import yaml

from detkit import errors as _errors

__all__ = [
    "COMMAND_LINE",
    "ConfigError",
    "PathStr",
    "apply_overrides",
    "dump_config",
    "from_dict",
    "interpolate",
    "load_config",
    "load_yaml",
    "resolve_path",
    "to_dict",
]

#: A str that names a file or directory; resolved relative to the YAML file that set it.
PathStr = NewType("PathStr", str)

#: The origin recorded for values set by :func:`apply_overrides`.
COMMAND_LINE = "command line"

Origins = Dict[str, str]


# A config problem, always reported on one line naming the key, the file and the fault
# (DetkitError folds newlines: YAML problems and __post_init__ messages may contain them).
ConfigError = _errors.ConfigError


# --------------------------------------------------------------------------------------------
# YAML dialect
# --------------------------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_REPLACED_TAGS = {_TAG + t for t in ("bool", "int", "float", "timestamp", "value")}


def _yaml12_resolvers() -> dict:
    table = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def add(tag, pattern, first_chars):
        rx = re.compile(pattern, re.X)
        for ch in first_chars:
            table.setdefault(ch, []).append((_TAG + tag, rx))

    add("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF")
    # int before float: the first matching resolver wins.
    add("int", r"^(?:[-+]?(?:0|[1-9][0-9_]*) | [-+]?0x[0-9a-fA-F_]+ | [-+]?0b[01_]+)$", "-+0123456789")
    add(
        "float",
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                     |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                     |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                     |[-+]?\.(?:inf|Inf|INF)
                     |\.(?:nan|NaN|NAN))$""",
        "-+0123456789.",
    )
    return {k: v for k, v in table.items() if v}


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and duplicate-key detection."""

    yaml_implicit_resolvers = _yaml12_resolvers()

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == _TAG + "merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _resolve_plain(table: dict, value: str) -> Optional[str]:
    for tag, rx in table.get(value[:1], []) + table.get(None, []):
        if rx.match(value):
            return tag
    return None


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes a str whenever either dialect would read it as something else
    ("1e-3" for ours, "yes" for plain PyYAML), so a dump reads back the same in both."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == _TAG + "str":
            return _resolve_plain(_Loader.yaml_implicit_resolvers, value) or tag
        return tag


def _describe_yaml_error(err: yaml.YAMLError, where: str, one_line_input: bool) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    text = f"{problem} ({context})" if context else problem
    if mark is None:
        return f"{where}: invalid YAML: {text}"
    if one_line_input:
        return f"{where}: invalid YAML at column {mark.column + 1}: {text}"
    return f"{where}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {text}"


def _parse_yaml(text: str, where: str, one_line_input: bool = False) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(_describe_yaml_error(err, where, one_line_input)) from None


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def _display(origin: str) -> str:
    """A file relative to the cwd when it lies below it, else as stored."""
    if origin == COMMAND_LINE:
        return origin
    try:
        rel = os.path.relpath(origin)
    except ValueError:  # another drive on Windows
        return origin
    return origin if rel.startswith("..") else rel


def _in(origin: Optional[str]) -> str:
    if origin is None:
        return ""
    return "on the command line" if origin == COMMAND_LINE else f"in {_display(origin)}"


def _suffix(origin: Optional[str]) -> str:
    return f" ({_in(origin)})" if origin is not None else ""


def _lookup(origins: Optional[Origins], opath: str) -> Optional[str]:
    """Origin of ``opath`` or of its nearest ancestor that has one."""
    if not origins:
        return None
    while True:
        if opath in origins:
            return origins[opath]
        if not opath:
            return None
        opath = opath.rpartition(".")[0]


def _show_value(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


# --------------------------------------------------------------------------------------------
# Loading and merging
# --------------------------------------------------------------------------------------------


def _node_paths(data: dict, prefix: str = "") -> Iterable[str]:
    for key, value in data.items():
        if key == "_delete_":
            continue
        path = _join(prefix, key)
        yield path
        if isinstance(value, dict):
            yield from _node_paths(value, path)


def _drop_origins(origins: Origins, path: str) -> None:
    below = path + "."
    for key in [k for k in origins if k == path or k.startswith(below)]:
        del origins[key]


def _merge_into(dst: dict, dst_origins: Origins, src: dict, src_origins: Origins, prefix: str = "") -> None:
    """Deep-merge ``src`` into ``dst`` (in place), moving origins along."""
    for key, value in src.items():
        if key == "_delete_":
            continue
        path = _join(prefix, key)
        if isinstance(value, dict):
            delete = value.get("_delete_", False)
            if not isinstance(delete, bool):
                raise ConfigError(
                    f"{_join(path, '_delete_')} must be true or false, got "
                    f"{_show_value(delete)}{_suffix(src_origins.get(path))}"
                )
            if delete or not isinstance(dst.get(key), dict):
                _drop_origins(dst_origins, path)
                dst[key] = {}
            dst_origins[path] = src_origins[path]
            _merge_into(dst[key], dst_origins, value, src_origins, path)
        else:
            _drop_origins(dst_origins, path)
            dst[key] = copy.deepcopy(value)
            dst_origins[path] = src_origins[path]


def _read_yaml_file(path: str, included_from: Optional[str], spelled: str) -> dict:
    if not os.path.isfile(path):
        if included_from is not None:
            raise ConfigError(
                f"{_display(included_from)}: _base_ file '{spelled}' not found (looked for {_display(path)})"
            )
        raise ConfigError(f"config file '{spelled}' not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{_display(path)}: cannot read: {err}") from None
    data = _parse_yaml(text, _display(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_display(path)}: the top level must be a mapping of keys, got {_show_value(data)}")
    return data


def _load_chain(path: str, stack: List[str], included_from: Optional[str], spelled: str) -> Tuple[dict, Origins]:
    if path in stack:
        cycle = stack[stack.index(path) :] + [path]
        raise ConfigError("cycle in _base_: " + " -> ".join(_display(p) for p in cycle))
    raw = _read_yaml_file(path, included_from, spelled)
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            f"{_display(path)}: _base_ must be a file path or a list of file paths, got {_show_value(bases)}"
        )
    data: dict = {}
    origins: Origins = {}
    here = os.path.dirname(path)
    for base in bases:
        base_path = os.path.normpath(os.path.join(here, os.path.expanduser(base)))
        base_data, base_origins = _load_chain(base_path, stack + [path], path, base)
        base_origins.pop("", None)
        _merge_into(data, origins, base_data, base_origins)
    _merge_into(data, origins, raw, {p: path for p in _node_paths(raw)})
    return data, origins


def load_yaml(path) -> Tuple[dict, Origins]:
    """Load a YAML file with its ``_base_`` chain; returns the merged, interpolated dict and
    its origins (key path -> absolute file path; ``origins[""]`` is ``path`` itself)."""
    abspath = os.path.abspath(os.fspath(path))
    data, origins = _load_chain(abspath, [], None, os.fspath(path))
    origins[""] = abspath
    return interpolate(data, origins), origins


# --------------------------------------------------------------------------------------------
# Interpolation and paths
# --------------------------------------------------------------------------------------------

_INTERP = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}|\$\{")


def _interpolate_str(text: str, path: str, origin: Optional[str]) -> str:
    if "${" not in text:
        return text

    def replace(match):
        token = match.group(0)
        if token == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name is None:
            raise ConfigError(
                f"{path}: malformed '${{...}}' in {text!r}; write ${{VAR}} or "
                f"${{VAR:default}}, or $${{ for a literal ${{{_suffix(origin)}"
            )
        value = os.environ.get(name)
        if value is not None:
            return value
        if default is not None:
            return default
        raise ConfigError(
            f"{path}: environment variable {name} is not set and '{token}' has no default{_suffix(origin)}"
        )

    return _INTERP.sub(replace, text)


def interpolate(data: Any, origins: Optional[Origins] = None, prefix: str = "") -> Any:
    """Return ``data`` with ``${VAR}`` / ``${VAR:default}`` replaced in every string value."""
    if isinstance(data, str):
        return _interpolate_str(data, prefix, _lookup(origins, prefix))
    if isinstance(data, dict):
        return {k: interpolate(v, origins, _join(prefix, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [interpolate(v, origins, prefix) for v in data]
    return data


def _escape(data: Any) -> Any:
    """Inverse of interpolation for literal strings, so a dump loads back unchanged."""
    if isinstance(data, str):
        return data.replace("${", "$${")
    if isinstance(data, dict):
        return {k: _escape(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_escape(v) for v in data]
    return data


def resolve_path(value: str, origin: Optional[str]) -> str:
    """Resolve a path value set by ``origin`` (a YAML file, :data:`COMMAND_LINE` or None).

    ``~`` is expanded; a relative path is joined to the origin file's directory (to the cwd
    for the command line or an unknown origin); the result is absolute and normalised. The
    empty string stays empty (it means "not set").
    """
    if value == "":
        return value
    value = os.path.expanduser(value)
    if not os.path.isabs(value):
        base = os.getcwd() if origin in (None, COMMAND_LINE) else os.path.dirname(origin)
        value = os.path.join(base, value)
    return os.path.normpath(os.path.abspath(value))


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def apply_overrides(data: dict, overrides: Sequence[str], origins: Optional[Origins] = None) -> dict:
    """Apply ``"a.b.c=value"`` overrides to ``data`` in place (and record them in ``origins``
    as :data:`COMMAND_LINE`); returns ``data``.

    The value is parsed as YAML ("0.01" -> 0.01, "[1,2]" -> [1, 2], "null" -> None,
    "true" -> True, "abc" -> "abc", "" -> None) and interpolated like a file value. A dict
    value merges into the existing dict like a YAML file would. Missing intermediate dicts
    are created (and a null one replaced), so that unknown keys are reported by validation.
    """
    if origins is None:
        origins = {}
    if isinstance(overrides, str):  # a lone "a=b" would otherwise be split into characters
        overrides = [overrides]
    for item in overrides:
        key, eq, text = str(item).partition("=")
        key = key.strip()
        parts = key.split(".")
        if not eq or not all(parts):
            raise ConfigError(
                f"malformed override '{item}': expected KEY=VALUE with a dotted KEY, e.g. model.rpn.nms_thresh=0.7"
            )
        value = _parse_yaml(text, f"override '{item}'", one_line_input=True)
        value = interpolate(value, {key: COMMAND_LINE}, key)
        node, prefix = data, ""
        for part in parts[:-1]:
            prefix = _join(prefix, part)
            if node.get(part) is None:
                node[part] = {}
                _drop_origins(origins, prefix)
                origins[prefix] = COMMAND_LINE
            elif not isinstance(node[part], dict):
                raise ConfigError(
                    f"override '{item}': '{prefix}' is "
                    f"{_show_value(node[part])}, not a mapping"
                    f"{_suffix(origins.get(prefix))}"
                )
            node = node[part]
        src = {parts[-1]: value}
        _merge_into(node, origins, src, {_join(prefix, p): COMMAND_LINE for p in _node_paths(src)}, prefix)
    return data


# --------------------------------------------------------------------------------------------
# Validation against a schema
# --------------------------------------------------------------------------------------------

_NoneType = type(None)
_UNION_TYPES = (typing.Union,) + ((types.UnionType,) if hasattr(types, "UnionType") else ())
_hints_cache: Dict[type, Dict[str, Any]] = {}


def _hints(cls: type) -> Dict[str, Any]:
    if cls not in _hints_cache:
        _hints_cache[cls] = typing.get_type_hints(cls)
    return _hints_cache[cls]


def _init_fields(cls: type) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _type_name(tp: Any) -> str:
    if tp is PathStr:
        return "path"
    if tp is Any:
        return "any value"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        return " or ".join("null" if a is _NoneType else _type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, List):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (tuple, Tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
    if origin in (dict, Dict):
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class _Ctx:
    """Where a value sits: display path (with [i]), origin path (dict keys only)."""

    __slots__ = ("path", "opath", "origins", "root", "is_path")

    def __init__(self, path, opath, origins, root, is_path=False):
        self.path, self.opath, self.origins = path, opath, origins
        self.root, self.is_path = root, is_path

    def child(self, key, is_path=False) -> "_Ctx":
        return _Ctx(_join(self.path, key), _join(self.opath, key), self.origins, self.root, is_path)

    def item(self, index) -> "_Ctx":
        return _Ctx(f"{self.path}[{index}]", self.opath, self.origins, self.root, self.is_path)

    @property
    def origin(self) -> Optional[str]:
        return _lookup(self.origins, self.opath)

    def type_error(self, tp, value) -> "_TypeMismatch":
        where = self.path or "<top level>"
        return _TypeMismatch(
            f"{where}: expected {_type_name(tp)}, got {_show_value(value)}{_suffix(self.origin)}", self.path
        )


class _TypeMismatch(ConfigError):
    """A value of the wrong kind at ``path`` itself (not somewhere inside it)."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path


def _all_key_paths(cls: type, prefix: str = "", stack: Tuple[type, ...] = ()) -> List[str]:
    """Every key path reachable through dataclass fields (used for "did you mean")."""
    out = []
    for f in _init_fields(cls):
        path = _join(prefix, f.name)
        out.append(path)
        tp = _hints(cls)[f.name]
        candidates = typing.get_args(tp) if typing.get_origin(tp) in _UNION_TYPES else (tp,)
        for c in candidates:
            if isinstance(c, type) and dataclasses.is_dataclass(c) and c not in stack:  # recursive schemas end
                out.extend(_all_key_paths(c, path, stack + (cls,)))
    return out


def _unknown_key(cls: type, key: str, ctx: _Ctx) -> ConfigError:
    sub = ctx.child(key)
    names = [f.name for f in _init_fields(cls)]
    close = difflib.get_close_matches(str(key), names, n=1)
    if close:
        hint = f" (did you mean '{_join(ctx.path, close[0])}'?)"
    else:
        # Leave out the key's own ancestors: 'model.rpn' is no fix for 'model.rpn.nms'.
        candidates = [p for p in _all_key_paths(ctx.root) if not (sub.opath + ".").startswith(p + ".")]
        close = difflib.get_close_matches(sub.opath, candidates, n=1)
        if close:
            hint = f" (did you mean '{close[0]}'?)"
        else:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            hint = f" (valid keys{' under ' + repr(ctx.path) if ctx.path else ''}: {shown})"
    where = _in(sub.origin) or "in the config"
    return ConfigError(f"unknown key '{sub.path}' {where}{hint}")


def _build_dataclass(cls: type, value: Any, ctx: _Ctx) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ctx.type_error(cls, value)
    fields = _init_fields(cls)
    names = {f.name for f in fields}
    for key in value:
        if key not in names:
            raise _unknown_key(cls, key, ctx)
    hints = _hints(cls)
    kwargs: Dict[str, Any] = {}
    # Fields with metadata {"path": True, "relative_to": "root"} are resolved after the
    # others: a relative value joins the sibling's resolved path when that is set.
    ordered = sorted(fields, key=lambda f: bool(f.metadata.get("relative_to")))
    for f in ordered:
        if f.name in value:
            anchor = f.metadata.get("relative_to")
            raw = value[f.name]
            if (
                anchor
                and kwargs.get(anchor)
                and isinstance(raw, str)
                and raw
                and not os.path.isabs(os.path.expanduser(raw))
            ):
                sub = ctx.child(f.name)
                converted = _convert(hints[f.name], raw, sub)
                kwargs[f.name] = os.path.normpath(os.path.join(kwargs[anchor], converted))
                continue
            sub = ctx.child(f.name, is_path=bool(f.metadata.get("path", False)))
            kwargs[f.name] = _convert(hints[f.name], value[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{ctx.child(f.name).path}'{_suffix(ctx.origin)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # __post_init__ checks
        where = f"{ctx.path}: " if ctx.path else ""
        raise ConfigError(f"{where}{err}{_suffix(ctx.origin)}") from None


def _convert(tp: Any, value: Any, ctx: _Ctx) -> Any:
    if tp is Any:
        return value
    if tp is PathStr or (tp is str and ctx.is_path):
        if not isinstance(value, str):
            raise ctx.type_error(tp, value)
        return resolve_path(value, ctx.origin)
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.type_error(tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.type_error(tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.type_error(tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ctx.type_error(tp, value)
        return value
    if tp in (list, dict):
        if not isinstance(value, tp):
            raise ctx.type_error(tp, value)
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, ctx)

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        others = [a for a in args if a is not _NoneType]
        if value is None and len(others) < len(args):
            return None
        if len(others) == 1:  # Optional[X]: keep X's message for faults inside the value
            try:
                return _convert(others[0], value, ctx)
            except _TypeMismatch as err:
                if err.path != ctx.path:
                    raise
                raise ctx.type_error(tp, value) from None
        # A member of exactly the value's type first, so Union[float, int] keeps 3 an int.
        exact = [a for a in others if a in (bool, int, float, str) and type(value) is a]
        for member in exact + others:
            try:
                return _convert(member, value, ctx)
            except ConfigError:
                continue
        raise ctx.type_error(tp, value)
    if origin is typing.Literal:
        for allowed in args:
            if type(value) is type(allowed) and value == allowed:
                return value
        raise ctx.type_error(tp, value)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ctx.type_error(tp, value)
        item_tp = args[0] if args else Any
        return [_convert(item_tp, v, ctx.item(i)) for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ctx.type_error(tp, value)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_tp = args[0] if args else Any
            return tuple(_convert(item_tp, v, ctx.item(i)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ctx.type_error(tp, value)
        return tuple(_convert(a, v, ctx.item(i)) for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ctx.type_error(tp, value)
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            sub = ctx.child(k)
            if key_tp is not Any:
                try:
                    k = _convert(key_tp, k, _Ctx(sub.path, ctx.opath, ctx.origins, ctx.root))
                except ConfigError:
                    raise ConfigError(
                        f"{sub.path}: key expected {_type_name(key_tp)}, got {_show_value(k)}{_suffix(ctx.origin)}"
                    ) from None
            out[k] = _convert(val_tp, v, sub)
        return out
    raise TypeError(f"detkit.config: unsupported schema annotation {tp!r} at '{ctx.path}'")


def from_dict(schema_cls: type, data: dict, origins: Optional[Origins] = None) -> Any:
    """Build ``schema_cls`` (a dataclass) from ``data``, checking every key and type.

    ``origins`` (key path -> file, as returned by :func:`load_yaml`) names files in errors
    and anchors relative path fields. Raises :class:`ConfigError`.
    """
    if not dataclasses.is_dataclass(schema_cls) or not isinstance(schema_cls, type):
        raise TypeError(f"from_dict expects a dataclass type, got {schema_cls!r}")
    return _build_dataclass(schema_cls, data, _Ctx("", "", origins or {}, schema_cls))


def load_config(path, schema_cls: type, overrides: Sequence[str] = ()) -> Any:
    """Load ``path`` (with its ``_base_`` chain), apply ``overrides`` and validate."""
    data, origins = load_yaml(path)
    apply_overrides(data, overrides, origins)
    return from_dict(schema_cls, data, origins)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def to_dict(instance: Any) -> Any:
    """Plain YAML-safe data (dict/list/str/int/float/bool/None) in schema field order."""
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        return {f.name: to_dict(getattr(instance, f.name)) for f in _init_fields(type(instance))}
    if isinstance(instance, dict):
        return {k: to_dict(v) for k, v in instance.items()}
    if isinstance(instance, (list, tuple)):
        return [to_dict(v) for v in instance]
    if isinstance(instance, PurePath):
        return str(instance)
    if instance is None or isinstance(instance, (bool, int, float, str)):
        return instance
    raise TypeError(f"to_dict: cannot represent {type(instance).__name__} {instance!r}")


def dump_config(instance: Any, path) -> None:
    """Write the resolved config as YAML; :func:`load_config` on it gives an equal instance
    (path fields are absolute by then, and literal ``${`` is escaped)."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    text = yaml.dump(
        _escape(to_dict(instance)),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=None,
        allow_unicode=True,
        width=100,
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Resolved detkit config (bases merged, overrides applied, paths absolute).\n")
        f.write(text)
