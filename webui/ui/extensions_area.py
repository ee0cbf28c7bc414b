"""The Extensions area at the bottom of the Chat tab: tick extensions on or off (saved in
user_data/settings.yaml and loaded at once), see which ones were disabled and why, and the controls each
loaded extension builds with its `ui()` hook. (An extension ticked on while the app runs works at once;
its own controls appear after a restart, because a Gradio page's layout is fixed when it is built.)"""
from __future__ import annotations

import gradio as gr

from webui.extensions import Extensions


def _messages(extensions: Extensions) -> str:
    return "\n".join(f"⚠️ {m}" for m in extensions.messages)


def extensions_area(extensions: Extensions) -> None:
    with gr.Accordion("Extensions", open=bool(extensions.loaded), elem_id="extensions"):
        enabled = gr.CheckboxGroup(choices=extensions.available(), label="enabled extensions",
                                   value=[e.name for e in extensions.loaded if e.enabled], elem_id="extensions-enabled")
        messages = gr.Markdown(_messages(extensions), elem_id="extensions-messages")
        for ext in list(extensions.loaded):
            if ext.enabled and getattr(ext.module, "ui", None):
                with gr.Accordion(ext.name, open=False):
                    extensions.call(ext, "ui")
        messages.value = _messages(extensions)  # ui() hooks that raised are reported too

        def toggle(names):
            for ext in list(extensions.loaded):
                if ext.name not in names:
                    extensions.unload(ext.name)
            extensions.load_all(names)
            extensions.save_enabled(names)
            return _messages(extensions)

        enabled.input(toggle, inputs=enabled, outputs=messages)
        gr.Timer(5.0).tick(lambda: _messages(extensions), outputs=messages, show_progress="hidden")
