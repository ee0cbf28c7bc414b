"""The Parameters tab: one control per GenerationParams field, built from the dataclass itself (label,
range, step and help text come from webui.options.config), plus presets loaded from and saved to presets/*.yaml.
The values live in each browser tab, so users on different tabs can sample differently.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from webui.errors import LoraDeckError, ui_message
from webui.options.config import GenerationParams
from webui.options.presets import list_presets, load_preset, save_preset
from webui.ui import forms

FIELDS = [f for f in dataclasses.fields(GenerationParams)]


def _label(name: str) -> str:
    return name.replace("_", " ")


def _component(f: dataclasses.Field, default) -> gr.components.Component:
    help_text = f.metadata.get("help", "")
    if f.name == "stop":
        return gr.Textbox(value="", label="stop strings", info=help_text + " One per line.", lines=2,
                          elem_id="param-stop")
    if f.name == "response_format":
        return gr.Textbox(value=default, label="response format", info=help_text, lines=2,
                          elem_id="param-response_format")
    if f.name in ("max_new_tokens", "seed"):
        box = gr.Number(value=default, label=_label(f.name), info=help_text, precision=0,
                        minimum=f.metadata.get("min"), maximum=f.metadata.get("max"), elem_id=f"param-{f.name}")
        forms.guard_range(box, f.name, f.metadata.get("min"), f.metadata.get("max"), int)
        return box
    return gr.Slider(value=default, label=_label(f.name), info=help_text, minimum=f.metadata["min"],
                     maximum=f.metadata["max"], step=f.metadata.get("step", 0.01), elem_id=f"param-{f.name}")


def _to_ui(name: str, value):
    return "\n".join(value) if name == "stop" else value


class ParametersTab:
    def __init__(self, presets_dir: Path):
        self.presets_dir = Path(presets_dir)
        start = self._initial_params()
        with gr.Row():
            self.preset = gr.Dropdown(choices=list_presets(self.presets_dir), value=self._initial_name,
                                      label="Preset", elem_id="preset", scale=3)
            self.refresh = gr.Button("↻", scale=0, min_width=40)
            self.preset_name = gr.Textbox(label="Save as", placeholder="preset name", scale=3, elem_id="preset-name")
            self.save = gr.Button("Save preset", scale=1, elem_id="preset-save")
        self.notice = gr.Markdown(elem_id="preset-notice")
        self.controls: dict[str, gr.components.Component] = {}
        with gr.Row():
            half = (len(FIELDS) + 1) // 2
            for column in (FIELDS[:half], FIELDS[half:]):
                with gr.Column():
                    for f in column:
                        self.controls[f.name] = _component(f, _to_ui(f.name, getattr(start, f.name)))
        self.inputs = [self.controls[f.name] for f in FIELDS]
        self._wire()

    def _initial_params(self) -> GenerationParams:
        self._initial_name = "Default" if "Default" in list_presets(self.presets_dir) else None
        if self._initial_name:
            try:
                return load_preset(self.presets_dir, self._initial_name)
            except LoraDeckError:
                self._initial_name = None
        return GenerationParams()

    def visible_for(self, engine) -> list:
        """Show only the samplers the loaded loader honours (all of them when nothing is loaded)."""
        caps = engine.capabilities
        return [gr.update(visible=caps is None or f.name in caps.samplers) for f in FIELDS]

    def params_from(self, values) -> GenerationParams:
        """The UI values (in FIELDS order) → GenerationParams; bad values raise BadInput naming the field."""
        data = {}
        for f, v in zip(FIELDS, values):
            if f.name == "stop":
                v = [line for line in (v or "").split("\n") if line]
            data[f.name] = v
        return GenerationParams.from_dict(data)

    def _wire(self) -> None:
        def apply(name):
            if not name:
                return [gr.update()] * len(FIELDS) + [""]
            try:
                p = load_preset(self.presets_dir, name)
            except LoraDeckError as e:
                return [gr.update()] * len(FIELDS) + [ui_message(e)]
            return [_to_ui(f.name, getattr(p, f.name)) for f in FIELDS] + [f"Loaded preset **{name}**."]

        def save(name, *values):
            try:
                path = save_preset(self.presets_dir, (name or "").strip(), self.params_from(values))
            except LoraDeckError as e:
                return gr.update(), ui_message(e)
            return gr.update(choices=list_presets(self.presets_dir), value=path.stem), f"Saved **{path.name}**."

        # input, not change: a preset picked by the user loads; the name Save puts in the box does not load it again
        # (which answered a save with "Loaded preset")
        self.preset.input(apply, inputs=self.preset, outputs=[*self.inputs, self.notice])
        self.refresh.click(lambda: gr.update(choices=list_presets(self.presets_dir)), outputs=self.preset)
        self.save.click(save, inputs=[self.preset_name, *self.inputs], outputs=[self.preset, self.notice])
