"""Command-line flags derived from settings dataclasses, in one place for every CLI.

    add_flags(parser, WorkerConfig)        # --model, --max-num-seqs, --redis, ...
    config = from_args(WorkerConfig, parser.parse_args())

Each field of a frozen dataclass becomes `--field-name`, whose default is the environment
variable NPUSERVE_FIELD_NAME (read through common.config.env), else the field's default. Its
help is the docstring written under the field, followed by the default and the variable.
`bool` fields take --x / --no-x (the variable: 1/0, true/false, yes/no, on/off); `X | None`
fields are unset by default, and an empty variable leaves them unset; `Literal` types or
`choices` metadata restrict the values. A field whose type is itself a settings dataclass adds
that class's flags in place, without a prefix. `common.config.setting()` keeps an older flag
or variable name where deployments already use one; fields marked NO_FLAG are set by code.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any, Literal, TypeVar, Union

from common.config import CHOICES, ENV, FLAG, NO_FLAG, env
from common.errors import InvalidRequestError

T = TypeVar("T")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class Flag:
    """How one settings field appears on the command line and in the environment."""

    field: str
    flag: str
    """--name on the command line."""
    env: str
    """NAME of its NPUSERVE_NAME variable."""
    kind: type
    """bool, int, float or str: the field's type with `| None` removed."""
    optional: bool
    """The field's type admits None (unset)."""
    choices: tuple[Any, ...] | None
    help: str
    """The field's docstring, whitespace folded."""

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def variable(self) -> str:
        return f"NPUSERVE_{self.env}"


def flags(cls: type) -> list[Flag]:
    """The flags of cls's own fields (nested settings dataclasses and NO_FLAG fields excluded)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.metadata.get(NO_FLAG) or _settings_class(hint) is not None:
            continue
        kind, optional, choices = _unwrap(hint, f.name, cls)
        name = f.name.replace("_", "-")
        out.append(Flag(f.name, f.metadata.get(FLAG, f"--{name}"),
                        f.metadata.get(ENV, f.name.upper()), kind, optional,
                        f.metadata.get(CHOICES, choices), docs.get(f.name, f.name)))
    return out


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
              defaults: Any = None) -> None:
    """Add a flag for every field of cls (and of its nested settings), each defaulting to its
    NPUSERVE_* variable, else to the field's value in `defaults` (an instance of cls), else to
    the field's default. A field with no default is a required flag unless its variable is set."""
    hints = typing.get_type_hints(cls)
    own = {flag.field: flag for flag in flags(cls)}
    for f in dataclasses.fields(cls):
        nested = _settings_class(hints[f.name])
        if f.name in own:
            _add(parser, own[f.name], _default(f, defaults))
        elif nested is not None and not f.metadata.get(NO_FLAG):
            add_flags(parser, nested, _default(f, defaults))


def from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """The cls instance the parsed flags describe (validated on construction); `values`
    fill or replace fields, such as those without a flag."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        nested = _settings_class(hints[f.name])
        if nested is not None and not f.metadata.get(NO_FLAG) and f.name not in values:
            values[f.name] = from_args(nested, args)
    for flag in flags(cls):
        values.setdefault(flag.field, getattr(args, flag.dest))
    return cls(**values)


def env_names(cls: type) -> set[str]:
    """Every NPUSERVE_* variable cls and its nested settings read."""
    names = {flag.variable for flag in flags(cls)}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        nested = _settings_class(hints[f.name])
        if nested is not None and not f.metadata.get(NO_FLAG):
            names |= env_names(nested)
    return names


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: the string literal written under it in cls's source}, whitespace folded."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    docs = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def parse_bool(text: str, variable: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE or lowered in _FALSE:
        return lowered in _TRUE
    raise InvalidRequestError(variable, f"is {text!r}; use one of {', '.join(_TRUE + _FALSE)}")


def _add(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: Flag,
         default: Any) -> None:
    raw = env(flag.env, "")
    doc = flag.help.replace("%", "%%")
    value: Any
    if flag.kind is bool:
        value = parse_bool(raw, flag.variable) if raw else bool(default)
        parser.add_argument(flag.flag, dest=flag.dest, action=argparse.BooleanOptionalAction,
                            default=value, help=f"{doc} (default: {'on' if value else 'off'}) "
                                                f"[{flag.variable}]")
        return
    required = default is MISSING and not raw
    if raw:
        value, shown = raw, raw  # argparse converts a string default with `type`
    elif default is MISSING:
        value, shown = None, "required"
    else:
        value, shown = default, "unset" if default is None else str(default) or '""'
    parser.add_argument(flag.flag, dest=flag.dest, type=_converter(flag), default=value,
                        required=required, choices=flag.choices,
                        help=f"{doc} (default: {shown.replace('%', '%%')}) [{flag.variable}]")


def _converter(flag: Flag) -> Callable[[str], Any]:
    kind = flag.kind

    def convert(text: str) -> Any:
        return None if flag.optional and text == "" else kind(text)

    convert.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return convert


def _default(f: dataclasses.Field[Any], defaults: Any) -> Any:
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _settings_class(hint: Any) -> type | None:
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _unwrap(hint: Any, name: str, cls: type) -> tuple[type, bool, tuple[Any, ...] | None]:
    """A field's type -> (bool/int/float/str, admits None, Literal values or None)."""
    optional = False
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"{cls.__name__}.{name}: a flag needs one type, not {hint}")
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), optional, choices
    if hint not in (bool, int, float, str):
        raise TypeError(f"{cls.__name__}.{name}: no flag for a field of type {hint}; "
                        "mark it NO_FLAG")
    return hint, optional, None
