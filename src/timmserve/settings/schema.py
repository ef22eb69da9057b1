"""Typed settings: the base that ServeConfig and BenchConfig share, built on pydantic.

A setting is declared once (`setting`): type, range, default and a description. Validation, the
one-line errors, the `timmserve` command-line options (options.py) and the JSON written to /info
and results files all come from that declaration.

Types are strict where a loose reading would be wrong: a string is never a bool or a number, and a
number with a fraction (or any float) is never an int. An int is a fine float, a string a fine
path (`AnyPath`), and a list a fine tuple (`ListOf`), as TOML writes them.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, Strict, ValidationError, model_validator
from pydantic.fields import FieldInfo

from timmserve.errors import ConfigError

T = TypeVar("T")
S = TypeVar("S", bound="Settings")

AnyPath = Annotated[Path, Strict(False)]  # a path, or the string of one
ListOf = Annotated[tuple[T, ...], Strict(False)]  # a tuple, or a list (TOML's arrays)


def setting(
    default: Any,
    description: str,
    *,
    default_text: str | None = None,
    metavar: str | None = None,
    flag: str | None = None,
    **constraints: Any,
) -> Any:
    """A settings field. `description` is also its --help; `default_text` says in words what a None
    default means ("cores ÷ workers"); `metavar` FILE or DIR makes the option refuse a directory or a
    file; `flag` names the option when the field's name does not fit ("rate" for `rates`).
    `constraints`: pydantic's (ge=1, gt=0, le=…, min_length=…)."""
    cli = {"default_text": default_text, "metavar": metavar, "flag": flag}
    extra = {key: value for key, value in cli.items() if value is not None}
    return Field(default, description=description, json_schema_extra=extra or None, **constraints)


def cli_metadata(field: FieldInfo) -> dict[str, Any]:
    """The command-line details `setting` stored on a field: default_text, metavar, flag."""
    extra = field.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


class Settings(BaseModel):
    """Immutable, validated settings. Every invalid value raises ConfigError with one line per
    setting at fault, naming it and what it accepts; rules over several settings (a model
    validator in the subclass) raise ConfigError with their own line."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    @model_validator(mode="wrap")
    @classmethod
    def _one_line_per_setting(cls, values: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        try:
            return handler(values)
        except ValidationError as exc:
            given = values if isinstance(values, Mapping) else {}
            raise ConfigError(_explain(cls, exc, given)) from None

    @classmethod
    def from_mapping(cls: type[S], values: Mapping[str, Any]) -> S:
        """Build from a mapping of field names (dashes allowed, as a TOML file may write them).

        Raises ConfigError: an unknown name, a value of the wrong type or out of range, or
        settings that contradict each other."""
        return cls(**{key.replace("-", "_"): value for key, value in values.items()})

    def replace(self: S, **changes: Any) -> S:
        """A copy with some settings changed, validated again (ConfigError as `from_mapping`)."""
        return self.from_mapping({**dict(self), **changes})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view: paths as strings, tuples as lists (for /info and results files)."""
        return self.model_dump(mode="json")


def _explain(model: type[BaseModel], error: ValidationError, given: Mapping[str, Any]) -> str:
    """One line per setting at fault: "top_k must be an integer ≥ 1 (got 2.5)"."""
    lines: dict[str, str] = {}  # by setting: a bad list item and the list's length are one problem
    for detail in error.errors():
        name = str(detail["loc"][0]) if detail["loc"] else ""
        if detail["type"] == "extra_forbidden":
            lines[name] = f"unknown setting {name!r}; known: {', '.join(sorted(model.model_fields))}"
        elif name in model.model_fields:
            value = given.get(name, detail["input"])
            lines.setdefault(name, f"{name} must be {_allowed(model.model_fields[name])} (got {value!r})")
        else:  # not about one setting, e.g. values that are not a mapping at all
            lines[name] = detail["msg"]
    return "\n".join(lines.values())


def _allowed(field: FieldInfo) -> str:
    """What a setting accepts, in words: "an integer ≥ 1", "one of fp32, fp16, bf16"."""
    return _describe(field.annotation, field.metadata)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _describe(annotation: Any, metadata: list[Any]) -> str:
    kind, more = unwrap(annotation)
    metadata = [*metadata, *more]
    if get_origin(kind) is Literal:
        return "one of " + ", ".join(map(str, get_args(kind)))
    if get_origin(kind) is tuple:
        non_empty = any(getattr(m, "min_length", 0) for m in metadata)
        return f"a {'non-empty ' if non_empty else ''}list, each {_describe(get_args(kind)[0], [])}"
    words = _KINDS.get(kind, "a table")
    bounds = [f"{sign} {getattr(m, key)}" for m in metadata for key, sign in _BOUNDS.items() if hasattr(m, key)]
    return f"{words} {' and '.join(bounds)}" if bounds else words


def unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """A field's type without Optional (None is a default, never a value written in a file) and
    without Annotated, and the Annotated metadata (constraints, strictness) taken off it."""
    metadata: list[Any] = []
    while get_origin(annotation) in (Union, types.UnionType, Annotated):
        if get_origin(annotation) is Annotated:
            annotation, *more = get_args(annotation)
            metadata += more
        else:
            annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    return annotation, metadata


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless `condition`: a rule over several settings."""
    if not condition:
        raise ConfigError(message)
