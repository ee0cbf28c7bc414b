"""Command-line flags derived from the option dataclasses of webui/options/config.py: a --flag per field (underscores
become dashes) with its help, choices and default, and the dataclass back from the parsed flags, so a new
option appears on the command line without a line of its own here.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from webui.options.config import choices_of

_LIST_ITEM_TYPES = {"lora": str, "lora_weights": float, "extensions": str}


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add a --flag per dataclass field (underscores become dashes), with its help, choices and default. A field
    that is itself an options dataclass (ServerConfig's ModelSpec) gives its own fields' flags. Metadata:
    `positional` (an argument, not a flag), `required`, `item` (a list's item type), `metavar`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            add_arguments(parser, hint)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # argparse formats help with %: a literal one (95% interval) is written %%
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", "").replace("%", "%%")}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if not f.metadata.get("positional"):
            kwargs.update(dest=f.name, default=default)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `int | None`: the value's own type
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if choices_of(cls, f.name) is not None:
            kwargs["choices"] = choices_of(cls, f.name)
            kwargs["type"] = type(kwargs["choices"][0])
        elif hint is bool:  # on by default: --X / --no-X
            kwargs["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
        elif hint is list:
            # extend: `--lora A --lora B` and `--lora A B` both give [A, B] (with nargs alone argparse keeps only
            # the last of a repeated flag, silently); a copy of the default, which extend appends to
            item = f.metadata.get("item") or _LIST_ITEM_TYPES.get(f.name, str)
            kwargs.update(action="extend", nargs="+" if f.metadata.get("required") else "*", type=item,
                          default=list(default))
        else:
            kwargs["type"] = hint
        if f.metadata.get("required"):  # the command line must give it (the UI fills it in itself)
            kwargs["required"] = True
        if f.metadata.get("positional"):
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def from_namespace(cls, ns: argparse.Namespace):
    """Build a dataclass (and the options dataclasses it composes) from the parsed flags that add_arguments made."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = from_namespace(hints[f.name], ns)
        elif hasattr(ns, f.name):
            values[f.name] = getattr(ns, f.name)
    return cls(**values)
