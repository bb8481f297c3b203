"""Command-line options declared once, on the configuration dataclasses.

A configuration field that a user sets from the command line is declared with :func:`option`
(its default and its help); :func:`add_options` makes the argparse options of a dataclass from
those declarations and :func:`from_args` builds the dataclass back from the parsed arguments. The
flag is the field's name with dashes (``box_px`` -> ``--box-px``); booleans get ``--x`` and
``--no-x``; tuples take several values; a field whose type admits ``None`` may be left out (its
help says what ``None`` means). Fields declared without :func:`option` are not on the command line.

Light on purpose (no torch): the CLI's help and the Scipion side can read it.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing

__all__ = ["option", "add_options", "from_args"]


def option(default=dataclasses.MISSING, help: str = "", *, choices=None, flag: str | None = None,
           none_means: str | None = None, metavar: str | None = None):
    """A dataclass field that is also a command-line option. ``none_means`` says what leaving an
    option of default ``None`` out does (shown as its default); ``flag`` overrides ``--field-name``."""
    return dataclasses.field(default=default, metadata={"cli": True, "help": help, "choices": choices, "flag": flag,
                                                        "none_means": none_means, "metavar": metavar})


def _base_type(hint):
    """``int | None`` -> ``(int, True)``; ``tuple`` -> ``(tuple, False)``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return hint, False


def _cli_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def add_options(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """Add an option to ``parser`` for each :func:`option` field of the dataclass ``cls`` (but
    ``skip``), with its default and help."""
    hints = typing.get_type_hints(cls)
    for f in _cli_fields(cls):
        if f.name in skip:
            continue
        md = f.metadata
        flag = md["flag"] or "--" + f.name.replace("_", "-")
        kind, optional = _base_type(hints[f.name])
        default_text = md["none_means"] if f.default is None and md["none_means"] else "%(default)s"
        help_text = f"{md['help']} (default: {default_text})".strip() if md["help"] else f"(default: {default_text})"
        kw = {"dest": f.name, "default": f.default, "help": help_text}
        if md["metavar"]:
            kw["metavar"] = md["metavar"]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if kind is tuple or typing.get_origin(kind) is tuple:
            sample = f.default[0] if f.default else ""
            kw.update(nargs="+", type=type(sample))
            kw["default"] = None if f.default is None else list(f.default)
        else:
            kw["type"] = kind if kind in (int, float, str) else str
        if md["choices"] is not None:
            kw["choices"] = list(md["choices"])
        parser.add_argument(flag, **kw)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass ``cls`` from parsed ``args`` (its :func:`option` fields), then ``overrides``."""
    values = {}
    for f in _cli_fields(cls):
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
    values.update(overrides)
    return cls(**values)
