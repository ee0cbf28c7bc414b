"""The LoRA panel's messages: each area (the list's buttons, managing the library, export, blend, get, publish,
reshape) shows its result in a message of its own right under its buttons, and the next action anywhere in the
panel clears every message first, so what is on the page is always the answer to the last click, next to it.

Events are wired by `finish()` once every area has made its message: a clearing step must name them all.
"""
from __future__ import annotations

import functools
import logging

import gradio as gr

from webui.errors import LoraDeckError, ui_message

log = logging.getLogger(__name__)


def guarded(fn):
    """`fn`'s message, or the error's (a LoraDeckError as it is; anything else logged and shown, the app goes on)."""
    @functools.wraps(fn)  # Gradio reads the signature (gr.Progress, gr.Request) through __wrapped__
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoraDeckError as e:
            return ui_message(e)
        except Exception as e:  # noqa: BLE001 (unexpected: logged, still shown)
            log.exception("LoRA panel action failed")
            return ui_message(e)
    return run


class PanelMessages:
    def __init__(self):
        self.all: list[gr.Markdown] = []
        self._events: list[tuple] = []

    def add(self, elem_id: str) -> gr.Markdown:
        """A message, placed where it is made (under the buttons it answers)."""
        message = gr.Markdown(elem_id=elem_id, elem_classes="panel-message")
        self.all.append(message)
        return message

    def on(self, button, fn, inputs=(), message: gr.Markdown | None = None, then: dict | None = None) -> None:
        """When `button` is clicked: clear every message, run `fn` (guarded) into `message`, then `then`
        (e.g. the list's redraw)."""
        self._events.append((button, fn, list(inputs), message, then))

    def others(self, message: gr.Markdown) -> list[gr.Markdown]:
        return [m for m in self.all if m is not message]

    def finish(self) -> None:
        for button, fn, inputs, message, then in self._events:
            event = button.click(lambda: [""] * len(self.all), outputs=self.all, show_progress="hidden") \
                .then(guarded(fn), inputs=inputs, outputs=message)
            if then:
                event.then(**then)
        self._events.clear()
