"""The Model tab: pick a model from the models folder (folders and .gguf files, or the embedded SmolLM2), a
loader and that loader's settings (each loader declares which ModelSpec fields matter to it; with `auto`, those of
the loader auto picks for the chosen model), load or unload with progress and the time it took, download a base
model from the hub/S3 into the models folder, and the LoRA panel (where adapters are got). A failed load shows
the reason and leaves the previous model answering.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from webui.backends import embedded, machine, models, registry
from webui.engine import Engine
from webui.errors import LoraDeckError, ui_message
from webui.hub.download import plan
from webui.hub.fetch import download as fetch
from webui.options.config import ModelSpec
from webui.ui import forms
from webui.ui.lora_panel import LoraPanel
from webui.ui.status import adapters_text

EMBEDDED = f"(embedded) {embedded.NAME}"


def setting_fields() -> tuple[str, ...]:
    """Every installed loader's settings, in registry order, each once."""
    return tuple(dict.fromkeys(s for name in registry.available() for s in registry.backend_class(name).settings))


def settings_for(loader: str) -> set[str]:
    """Which settings a loader uses."""
    return set(registry.backend_class(loader).settings)


def auto_settings(model: str, loader: str, fields: dict, models_dir: Path) -> tuple[set[str], str]:
    """(the settings to show, a line saying which loader `auto` picks) for the chosen model: the loader the
    registry detects, as a load would (the settings already set count: they can rule loaders out). Without a
    model to look at, no settings and the reason."""
    if loader != "auto":
        return settings_for(loader), ""
    try:
        spec = ModelSpec(model="" if model == EMBEDDED else (model or ""), loader=loader, **fields)
        picked = models.loader_for(spec.model, "auto", models_dir, registry.loader_options(spec))
    except LoraDeckError as e:
        return set(), f"auto picks the loader once the model is found ({ui_message(e)})"
    return settings_for(picked), f"auto → **{picked}** for this model: its settings are shown"


def remote_text(status: dict, adapters: str) -> str:
    """The status line of a remote engine (Backend.engine_status): its base, context, and which of our adapters
    it can serve. An engine LoRA Deck runs itself (the vllm and llama-server loaders) adds its process line
    (running with its pid, being restarted, or stopped with the end of its log): the line is redrawn every few
    seconds, so a dead engine shows there, not only in the error of the next chat."""
    served = ", ".join(status["served"]) or "none"
    if status["error"]:
        served = f"unknown ({status['error']})"
    elif status["loads_on_request"]:
        served += " (the others in the adapters folder are loaded on the engine when picked)"
    context = f"{status['context_length']} tokens" if status["context_length"] else "not reported"
    where = "managed" if "process" in status else "remote"
    process = f" · {status['process']}" if status.get("process") else ""
    return (f"Loaded **{status['base']}** on the {where} **{status['engine']}** engine at {status['url']}{process} · "
            f"context {context} · our adapters it serves: {served} · {adapters}")


class ModelTab:
    def __init__(self, engine: Engine, models_dir: Path):
        self.engine, self.models_dir = engine, Path(models_dir)
        with gr.Row():
            self.model = gr.Dropdown(choices=self._choices(), value=self._current(), label="Model",
                                     info="a model in the models folder, a path, or a serving engine's URL "
                                          "(http://HOST:PORT: the remote loader)",
                                     elem_id="model-select", scale=4, allow_custom_value=True)
            self.refresh = gr.Button("↻", scale=0, min_width=40, elem_id="model-refresh")
        with gr.Row():
            self.loader = gr.Dropdown(choices=["auto", *registry.available()], value="auto", label="Loader",
                                      info=ModelSpec.__dataclass_fields__["loader"].metadata["help"],
                                      elem_id="model-loader")
            self.settings = {name: forms.control(ModelSpec, name, "setting") for name in setting_fields()}
        shown, note = auto_settings(self._current(), "auto", {}, self.models_dir)
        for name, control in self.settings.items():  # the page opens with auto's choice for the current model
            control.visible = name in shown
        self.auto_note = gr.Markdown(note, elem_id="model-auto-loader")
        self.fit = gr.Markdown(elem_id="model-fit")  # the memory a load needs, shown before it starts
        with gr.Row():
            self.load = gr.Button("Load", variant="primary", elem_id="model-load")
            self.unload = gr.Button("Unload", elem_id="model-unload")
        self.status = gr.Markdown(self.describe(), elem_id="model-status")
        # the last load's or unload's message in this browser tab, kept above the state when the state is redrawn
        self.last = gr.State("")
        with gr.Accordion("Download a base model (hub, S3)", open=False, elem_id="download-model"):
            with gr.Row():
                self.repo = gr.Textbox(label="repo", placeholder="org/name[:branch] or s3://bucket/prefix",
                                       info="adapters: Get an adapter, in the LoRA panel below",
                                       elem_id="download-repo", scale=3)
                self.file = gr.Textbox(label="file (optional)", placeholder="e.g. model.Q4_K_M.gguf", scale=2)
            with gr.Row():
                self.list_files = gr.Button("List files", elem_id="download-list")
                self.download = gr.Button("Download", variant="primary", elem_id="download-go")
            self.download_status = gr.Markdown(elem_id="download-status")
        with gr.Column(elem_id="lora-panel"):
            self.lora = LoraPanel(engine, models_dir)

    def _choices(self) -> list[str]:
        return [EMBEDDED, *self.engine.list_models()]

    def _current(self) -> str:
        spec = self.engine.spec
        return (spec.model or EMBEDDED) if spec else EMBEDDED

    def describe(self, extra: str = "") -> str:
        info = self.engine.loaded
        remote = self.engine.engine_status() if info is not None else None
        if info is None:
            text = "No model loaded."
        elif remote is not None:
            text = remote_text(remote, adapters_text(self.engine))
        else:
            text = (f"Loaded **{info.name}** on **{info.loader}** · {info.device} · {info.dtype} · "
                    f"{info.architecture} · {info.parameters / 1e6:.1f} M parameters · {adapters_text(self.engine)}")
        return f"{extra}\n\n{text}" if extra else text

    def wire(self, on_change: gr.components.Component, describe) -> None:
        """After each model change, `describe()` refreshes `on_change` (the Chat tab's status line)."""
        settings = list(self.settings.values())

        def load(model, loader, *values, progress=gr.Progress()):
            try:
                fields = forms.parse(ModelSpec, list(self.settings), values)
                spec = ModelSpec(model="" if model == EMBEDDED else (model or ""), loader=loader, **fields)
                result = self.engine.load(spec, progress=lambda f, msg: progress(f if f is not None else 0, desc=msg))
            except LoraDeckError as e:
                return self.describe(ui_message(e)), ui_message(e)
            message = f"✅ Loaded in {result.seconds:.1f} s."
            if result.kept:
                message += " Adapters kept: " + ", ".join(f"{n} × {w:g}" for n, w in result.kept.items()) + "."
            elif result.dropped:
                message += f" The active adapters were not kept: {result.dropped}."
            return self.describe(message), message

        def unload():
            self.engine.unload()
            return self.describe(), ""

        def fit(model, loader, *values):
            try:
                fields = forms.parse(ModelSpec, list(self.settings), values)
                spec = ModelSpec(model="" if model == EMBEDDED else (model or ""), loader=loader, **fields)
            except LoraDeckError:
                return ""
            found = self.engine.memory_estimate(spec)
            if found is None:
                return ""
            need, free = found
            verdict = "it fits" if need <= free else "**it does not fit**: the load will be refused"
            return f"Memory: loading needs about **{machine.gb(need)}**, and {machine.gb(free)} is free ({verdict})."

        def show_settings(model, loader, *values):
            try:
                fields = forms.parse(ModelSpec, list(self.settings), values)
            except LoraDeckError:
                fields = {}
            shown, note = auto_settings(model, loader, fields, self.models_dir)
            return [note, *[gr.update(visible=name in shown) for name in self.settings]]

        def list_files(repo, file):
            try:
                p = plan(repo.strip(), specific_files=[file.strip()] if file and file.strip() else (),
                         model_dir=self.models_dir, lora_dir=self.engine.loras_dir)
            except LoraDeckError as e:
                return ui_message(e)
            rows = "\n".join(f"| `{f.path}` | {f.size / 1e6:.1f} MB |" for f in p.files)
            kind = "LoRA adapter" if p.is_lora else "model"
            notes = "".join(f"\n\n{n}" for n in p.notes)
            return f"**{p.repo}** @ {p.branch} ({kind}) → `{p.dest}`\n\n| file | size |\n|---|---|\n{rows}{notes}"

        def download(repo, file, progress=gr.Progress()):
            try:
                path = fetch(repo.strip(), specific_files=[file.strip()] if file and file.strip() else (),
                             model_dir=self.models_dir, lora_dir=self.engine.loras_dir,
                             progress=lambda f, msg: progress(f if f is not None else 0, desc=msg))
            except LoraDeckError as e:
                return ui_message(e), gr.update()
            if Path(path).parent == Path(self.engine.loras_dir):  # an adapter repository: download() put it there
                return (f"✅ Downloaded `{path}`: it is an adapter, so it went to the loras folder and is in the "
                        "LoRA panel's list below.", gr.update())
            return f"✅ Downloaded to `{path}`.", gr.update(choices=self._choices())

        self.refresh.click(lambda: gr.update(choices=self._choices()), outputs=self.model)
        for control in (self.model, self.loader):  # auto shows the settings of the loader it picks for the model
            control.change(show_settings, inputs=[self.model, self.loader, *settings],
                           outputs=[self.auto_note, *settings], show_progress="hidden")
        for control in (self.model, self.loader, *settings):
            control.change(fit, inputs=[self.model, self.loader, *settings], outputs=self.fit)
        self.unload.click(fit, inputs=[self.model, self.loader, *settings], outputs=self.fit)
        redraw = self.lora.list.redraw  # the LoRA list's verdicts depend on the base
        self.load.click(load, inputs=[self.model, self.loader, *settings], outputs=[self.status, self.last]) \
            .then(describe, outputs=on_change).then(**redraw)
        self.unload.click(unload, outputs=[self.status, self.last]).then(describe, outputs=on_change) \
            .then(**redraw)
        self.list_files.click(list_files, inputs=[self.repo, self.file], outputs=self.download_status)
        self.download.click(download, inputs=[self.repo, self.file], outputs=[self.download_status, self.model]) \
            .then(**redraw)

