"""Command-line flags derived from the option dataclasses of webui/options/config.py: a --flag per field (underscores
become dashes) with its help, choices and default, and the dataclass back from the parsed flags, so a new
option appears on the command line without a line of its own here.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from webui.options.config import choices_of

_LIST_ITEM_TYPES = {"lora": str, "lora_weights": float, "extensions": str}


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add a --flag per dataclass field (underscores become dashes), with its help, choices and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # argparse formats help with %: a literal one (95% interval) is written %%
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "").replace("%", "%%"),
                                  "default": default}
        hint = hints[f.name]
        if choices_of(cls, f.name) is not None:
            kwargs["choices"] = choices_of(cls, f.name)
        elif hint is bool:
            kwargs["action"] = "store_true"
        elif hint is list:
            # extend: `--lora A --lora B` and `--lora A B` both give [A, B] (with nargs alone argparse keeps only
            # the last of a repeated flag, silently); a copy of the default, which extend appends to
            kwargs.update(action="extend", nargs="*", type=_LIST_ITEM_TYPES.get(f.name, str), default=list(default))
        else:
            kwargs["type"] = hint
        if f.metadata.get("required"):  # the command line must give it (the UI fills it in itself)
            kwargs["required"] = True
        parser.add_argument(flag, **kwargs)


def from_namespace(cls, ns: argparse.Namespace):
    """Build a dataclass from the parsed flags that add_arguments made."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})
