"""Training recipes as dataclasses that load from and write to TOML.

A recipe is a dataclass whose fields are *sections*, each itself a dataclass: ``train`` (the shared
schedule and optimiser, a :class:`linmix.training.TrainConfig`) and one section per trainer
(``sam``, ``lm``). A recipe file holds one TOML table per section::

    [train]
    out_dir = "runs/tiny-rwkv-10"
    max_steps = 1200
    lr = 2e-4

    [sam]
    dataset = "procedural:14"
    image_size = 384

Keys left out take the section dataclass's default (the defaults live only there, so Python and
the command line agree). An unknown table or key, or a value of the wrong type, raises a
``ValueError`` naming the key and the file. TOML has no null: a key whose value is None is left
out when a recipe is written, which round-trips because every field that may be None defaults
to None.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from os import PathLike
from pathlib import Path
from typing import Any, Mapping, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["Recipe", "option_overrides", "read_toml", "section_from_mapping", "to_toml"]

SectionT = TypeVar("SectionT")
RecipeT = TypeVar("RecipeT", bound="Recipe")


def read_toml(path: str | PathLike[str]) -> dict[str, Any]:
    """The parsed TOML file at ``path``; a missing file or bad syntax raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} not found")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None


_SINGULAR = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if hint is type(None):
        return "unset (leave the key out)"
    if origin in (tuple, list):
        item = _PLURAL.get(args[0], str(args[0])) if args else "values"
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {item}"
        return f"a list of {item}"
    return _SINGULAR.get(hint, str(hint))


class _WrongType(Exception):
    pass


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` checked against the type ``hint`` (ints widen to float, lists become tuples where the
    field is a tuple); raises _WrongType otherwise. Nothing else is converted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg)
            except _WrongType:
                continue
        raise _WrongType
    if hint is type(None):
        if value is None:
            return None
        raise _WrongType
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _WrongType
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _WrongType
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _WrongType
    if hint is str:
        if isinstance(value, str):
            return value
        raise _WrongType
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        if args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _WrongType
            return tuple(_coerce(item, arg) for item, arg in zip(value, args))
        return tuple(_coerce(item, args[0]) for item in value) if args else tuple(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        return [_coerce(item, args[0]) for item in value] if args else list(value)
    raise TypeError(f"recipe fields of type {hint!r} are not supported")


def _field_defaults(cls: type) -> dict[str, Any]:
    defaults = {}
    for item in dataclasses.fields(cls):
        if item.default is not dataclasses.MISSING:
            defaults[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            defaults[item.name] = item.default_factory()
    return defaults


def section_from_mapping(cls: type[SectionT], values: Mapping[str, Any], *, where: str) -> SectionT:
    """An instance of the dataclass ``cls`` from ``values`` over its defaults.

    ``where`` names the source in errors (e.g. ``"recipe.toml [train]"``): an unknown key, a value of
    the wrong type and a value the dataclass rejects all raise ``ValueError`` naming it.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a table of keys, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [item.name for item in dataclasses.fields(cls)]
    unknown = [key for key in values if key not in names]
    if unknown:
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"known keys: {', '.join(names)}")
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = _coerce(value, hints[key])
        except _WrongType:
            raise ValueError(f"{where}: key {key!r} must be {_describe(hints[key])}, got {value!r}") from None
    merged = {**_field_defaults(cls), **checked}
    missing = [name for name in names if name not in merged]
    if missing:
        raise ValueError(f"{where}: missing required key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    try:
        return cls(**merged)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) to TOML")


def to_toml(sections: Mapping[str, Mapping[str, Any]], *, header: str = "") -> str:
    """TOML text with one table per section; None values are left out (see the module docstring)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, values in sections.items():
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


class Recipe:
    """Mix-in for a dataclass whose fields are the sections of a recipe (each a dataclass).

    ``from_file`` / ``from_dict`` build it (type-checked, defaults from the section dataclasses),
    ``with_overrides`` applies values from another source (the command line) on top, ``to_dict`` /
    ``to_toml`` / ``save`` write it back.
    """

    @classmethod
    def section_types(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {item.name: hints[item.name] for item in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls: type[RecipeT], data: Mapping[str, Any], *, source: str = "recipe") -> RecipeT:
        sections = cls.section_types()
        unknown = [name for name in data if name not in sections]
        if unknown:
            raise ValueError(f"{source}: unknown table{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(f'[{name}]' for name in unknown)}; expected {', '.join(f'[{n}]' for n in sections)}")
        built = {name: section_from_mapping(section, data.get(name, {}), where=f"{source} [{name}]")
                 for name, section in sections.items()}
        return cls(**built)

    @classmethod
    def from_file(cls: type[RecipeT], path: str | PathLike[str]) -> RecipeT:
        return cls.from_dict(read_toml(path), source=str(path))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        result = {}
        for item in dataclasses.fields(self):
            section = getattr(self, item.name)
            values = section.to_dict() if hasattr(section, "to_dict") else dataclasses.asdict(section)
            result[item.name] = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
        return result

    def with_overrides(self: RecipeT, overrides: Mapping[str, Mapping[str, Any]], *, source: str = "command line") -> RecipeT:
        """A copy with ``overrides[section][key]`` replacing those values, all sections re-validated."""
        data = self.to_dict()
        for name, values in overrides.items():
            if name not in data:
                raise ValueError(f"{source}: unknown table [{name}]; expected {', '.join(f'[{n}]' for n in data)}")
            sections = self.section_types()
            known = {item.name for item in dataclasses.fields(sections[name])}
            for key in values:
                if key not in known:
                    raise ValueError(f"{source}: unknown key {key!r} in [{name}]")
            data[name] = {**data[name], **values}
        return type(self).from_dict(data, source=source)

    def to_toml(self, header: str = "") -> str:
        return to_toml(self.to_dict(), header=header)

    def save(self, path: str | PathLike[str], header: str = "") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_toml(header))
        return path


def option_overrides(
    params: Mapping[str, Any],
    table: Mapping[str, tuple[str, str]],
    convert: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The recipe values a command line sets: ``{section: {key: value}}`` for each option of ``table``
    (parameter name -> (section, key)) that the user gave. Unset options are None (or an empty
    repeatable option) and are left out, so they never replace a recipe file's value. ``convert``
    maps a parameter name to a function turning its text into the field's value; paths become str.
    """
    convert = convert or {}
    overrides: dict[str, dict[str, Any]] = {}
    for name, (section, key) in table.items():
        value = params.get(name)
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if name in convert:
            value = convert[name](value)
        elif isinstance(value, PathLike):
            value = str(value)
        overrides.setdefault(section, {})[key] = value
    return overrides
