"""Form controls generated from the option dataclasses of webui.options.config: a field with choices (a Literal, or
choices in its metadata such as the registered loaders) becomes a dropdown, a bool a checkbox, a number a number box with its range, anything else a text box — labels, defaults and
help texts all come from the dataclass, and `parse` turns the UI values back into dataclass fields by name.
"""
from __future__ import annotations

import dataclasses
import typing

import gradio as gr

from webui.options.config import choices_of


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def control(cls, name: str, elem_prefix: str, value=None):
    f = cls.__dataclass_fields__[name]
    hint = typing.get_type_hints(cls)[name]
    value = _default(f) if value is None else value
    common = dict(label=name, info=f.metadata.get("help", ""), elem_id=f"{elem_prefix}-{name}")
    if choices_of(cls, name) is not None:
        return gr.Dropdown(list(choices_of(cls, name)), value=value, **common)
    if hint is bool:
        return gr.Checkbox(value=bool(value), **common)
    if hint in (int, float):
        box = gr.Number(value=value, minimum=f.metadata.get("min"), maximum=f.metadata.get("max"),
                        precision=0 if hint is int else None, **common)
        guard_range(box, name, f.metadata.get("min"), f.metadata.get("max"), hint)
        return box
    if f.metadata.get("secret"):  # API keys: typed, never shown
        return gr.Textbox(value=_text(value), type="password", **common)
    return gr.Textbox(value=_text(value), **common)


def guard_range(box, name: str, low, high, kind) -> None:
    """A number typed outside the field's range is brought inside it when the field is left, with a warning that
    names the field and the range. Gradio would otherwise reject it only when a later action sends it, with an
    error that names neither. The raw value is read (preprocess=False): Gradio's own check would refuse it first."""
    if low is None and high is None:
        return

    def clamp(raw):
        try:
            value = kind(float(raw))
        except (TypeError, ValueError):
            return gr.update()
        fixed = max(low, value) if low is not None else value
        fixed = min(high, fixed) if high is not None else fixed
        if fixed == value:
            return gr.update()
        side = f"at most {high}" if value > fixed else f"at least {low}"
        gr.Warning(f"{name}: {value} is out of range; it must be {side}, so it is set to {fixed}")
        return gr.update(value=fixed)

    for event in (box.blur, box.submit):
        event(clamp, inputs=box, outputs=box, preprocess=False, show_progress="hidden")


def update(cls, name: str, value):
    """A gr.update that shows `value` in the control made by `control`."""
    hint = typing.get_type_hints(cls)[name]
    if choices_of(cls, name) is not None or hint in (bool, int, float):
        return gr.update(value=value)
    return gr.update(value=_text(value))


def _parse_text(name: str, text: str):
    """Text box → value: '' is None, 'a, b' a list, '3' an int; all-linear and plain words stay strings."""
    text = (text or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all(p.lstrip("-").isdigit() for p in parts):
        ints = [int(p) for p in parts]
        return ints[0] if len(ints) == 1 and "," not in text else ints
    if name in ("target_modules", "modules_to_save") and not (name == "target_modules" and text == "all-linear"):
        return parts
    if name == "path" and len(parts) > 1:  # several dataset files
        return parts
    return text


def parse(cls, names: list[str], values) -> dict:
    """UI values (in `names` order) → keyword arguments for `cls` (validation stays in the dataclass)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in zip(names, values):
        hint = hints[name]
        if choices_of(cls, name) is not None or hint is bool:
            out[name] = value
        elif hint is int:
            out[name] = int(value) if value is not None else _default(cls.__dataclass_fields__[name])
        elif hint is float:
            out[name] = float(value) if value is not None else _default(cls.__dataclass_fields__[name])
        else:
            parsed = _parse_text(name, value)
            if parsed is None and hint is str:  # an empty box is the field's default, not "unset"
                parsed = _default(cls.__dataclass_fields__[name])
            out[name] = parsed if parsed is not None or name != "target_modules" else "all-linear"
    return out
