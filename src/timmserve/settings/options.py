"""Command-line options generated from settings fields (settings.py), so an option's name, type,
default and help are written once, on the field.

- `max_batch_size` is `--max-batch-size` (or the field's `flag`: `rates` is `--rate`).
- A bool off by default is a `--x` flag; any other (on, or None: decided later) a `--x/--no-x` pair.
- A Literal is a choice; a tuple is a comma-separated list (`--concurrency 1,8,32`); a path with
  metavar FILE may not be a directory, one with metavar DIR may not be a file.
- The default shown is the field's default, or its `default_text` where the default is None.

Ranges are not checked here: the settings' own validation does that, with the same one-line
errors as for a config file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from timmserve.settings.schema import cli_metadata, unwrap

F = TypeVar("F", bound=Callable[..., Any])


def options(model: type[BaseModel], names: Iterable[str] | None = None) -> Callable[[F], F]:
    """A decorator adding an option per field of `model` (or per field in `names`), in field order."""
    chosen = list(model.model_fields if names is None else names)

    def decorate(command: F) -> F:
        for name in reversed(chosen):  # decorators apply bottom-up; --help lists them top-down
            command = _option(name, model.model_fields[name])(command)
        return command

    return decorate


def command_line(settings: BaseModel) -> list[str]:
    """The options that reproduce `settings` (None values left out; a bool only off its default)."""
    args: list[str] = []
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if value is None or (isinstance(value, bool) and value == field.default):
            continue
        flag = _flag(name, field)
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, _text(value)]
    return args


def _option(name: str, field: FieldInfo) -> Callable[[F], F]:
    metadata = cli_metadata(field)
    flag = _flag(name, field)
    shown = {"help": field.description, "show_default": metadata.get("default_text", True)}
    kind = unwrap(field.annotation)[0]
    if kind is bool:
        declaration = flag if field.default is False else f"{flag}/--no-{flag[2:]}"
        return click.option(declaration, name, is_flag=True, default=field.default, **shown)
    default = None if field.default in (None, ()) else _text(field.default)
    metavar = metadata.get("metavar")
    return click.option(flag, name, type=_click_type(kind, metavar), default=default, metavar=metavar, **shown)


def _flag(name: str, field: FieldInfo) -> str:
    return "--" + cli_metadata(field).get("flag", name).replace("_", "-")


def _click_type(kind: Any, metavar: str | None) -> click.ParamType | type:
    if get_origin(kind) is Literal:
        return click.Choice(get_args(kind))
    if get_origin(kind) is tuple:
        return CommaList(unwrap(get_args(kind)[0])[0])
    if kind is Path:
        return click.Path(file_okay=metavar != "DIR", dir_okay=metavar != "FILE", path_type=Path)
    return kind  # int, float, str: click's own types


def _text(value: Any) -> str:
    """A value as the command line writes it: tuples comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


class CommaList(click.ParamType):
    """`1,8,32` → (1, 8, 32): comma-separated values of one type (int, float or str)."""

    def __init__(self, item: type) -> None:
        self.item = item
        self.name = f"{item.__name__},…"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple:
        try:
            return tuple(self.item(part.strip()) for part in value.split(",") if part.strip())
        except ValueError:
            self.fail(f"expected comma-separated {self.item.__name__} values, got {value!r}", param, ctx)
