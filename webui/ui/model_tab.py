"""The Model tab: pick a model from the models folder (or the embedded SmolLM2), a loader and its
settings, and load or unload it, with a progress indicator and the time it took. A failed load shows
the reason and leaves the previous model answering. (The LoRA panel and downloads plug in here.)
"""
from __future__ import annotations

import gradio as gr

from webui.backends import available_loaders
from webui.backends.base import ModelLoadError
from webui.config import ModelSpec, choices_of
from webui.engine import Engine
from webui.ui.status import adapters_text

EMBEDDED = "(embedded) SmolLM2-135M-Instruct"


class ModelTab:
    def __init__(self, engine: Engine):
        self.engine = engine
        with gr.Row():
            self.model = gr.Dropdown(choices=self._choices(), value=self._current(), label="Model",
                                     elem_id="model-select", scale=4, allow_custom_value=True)
            self.refresh = gr.Button("↻", scale=0, min_width=40, elem_id="model-refresh")
        with gr.Row():
            self.loader = gr.Dropdown(choices=["auto", *available_loaders()], value="auto", label="Loader",
                                      info=ModelSpec.__dataclass_fields__["loader"].metadata["help"])
            self.dtype = gr.Dropdown(choices=list(choices_of(ModelSpec, "dtype")), value="auto", label="dtype",
                                     info=ModelSpec.__dataclass_fields__["dtype"].metadata["help"])
            self.device = gr.Dropdown(choices=list(choices_of(ModelSpec, "device")), value="auto", label="device",
                                      info=ModelSpec.__dataclass_fields__["device"].metadata["help"])
        with gr.Row():
            self.load = gr.Button("Load", variant="primary", elem_id="model-load")
            self.unload = gr.Button("Unload", elem_id="model-unload")
        self.status = gr.Markdown(self._describe(), elem_id="model-status")

    def _choices(self) -> list[str]:
        return [EMBEDDED, *self.engine.list_models()]

    def _current(self) -> str:
        spec = self.engine.spec
        return (spec.model or EMBEDDED) if spec else EMBEDDED

    def _describe(self, extra: str = "") -> str:
        info = self.engine.loaded
        if info is None:
            text = "No model loaded."
        else:
            text = (f"Loaded **{info.name}** on **{info.loader}** · {info.device} · {info.dtype} · "
                    f"{info.architecture} · {info.parameters / 1e6:.1f} M parameters · {adapters_text(self.engine)}")
        return f"{extra}\n\n{text}" if extra else text

    def wire(self, on_change: gr.components.Component, describe) -> None:
        """After each model change, `describe()` refreshes `on_change` (the Chat tab's status line)."""

        def load(model, loader, dtype, device, progress=gr.Progress()):
            spec = ModelSpec(model="" if model == EMBEDDED else (model or ""), loader=loader, dtype=dtype, device=device)
            try:
                result = self.engine.load(spec, progress=lambda f, msg: progress(f, desc=msg))
            except ModelLoadError as e:
                return self._describe(f"⚠️ **Load failed:** {e}")
            return self._describe(f"✅ Loaded in {result.seconds:.1f} s.")

        def unload():
            self.engine.unload()
            return self._describe()

        self.refresh.click(lambda: gr.update(choices=self._choices()), outputs=self.model)
        self.load.click(load, inputs=[self.model, self.loader, self.dtype, self.device],
                        outputs=self.status).then(describe, outputs=on_change)
        self.unload.click(unload, outputs=self.status).then(describe, outputs=on_change)

