"""The LoRA panel of the Model tab: every adapter in the loras folder with its compatibility badge for the
loaded base (reasons on demand), one click to apply or remove it, a weight slider per adapter that takes
effect at once (hot-swap, the base is never reloaded), merge/unmerge, export merged, blend into a new
adapter, reshape one (resize, DoRA → LoRA, extract from a fine-tune: webui/ui/surgery_area.py), and getting
an adapter from the hub, a local path, S3 or an upload (webui/ui/get_area.py). Each area answers in a message
under its own buttons, and the next action clears them all (webui/ui/messages.py). Every failure is shown there
and leaves the model and the active adapters as they were (the Engine guarantees it).
"""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from webui.adapters.exact_blend import RECORD
from webui.adapters.peft_stack import COMBINATIONS
from webui.engine import Engine
from webui.errors import NoModelLoaded
from webui.export import FORMATS
from webui.export.run import export_model
from webui.hub.publish import publish
from webui.paths import child
from webui.ui.get_area import GetArea
from webui.ui.lora_list import LoraList, slug  # noqa: F401  (slug: the rows' element ids)
from webui.ui.messages import PanelMessages
from webui.ui.surgery_area import SurgeryArea

# Gradio groups a row's tick and weight into one block that takes most of the width, which left the badge a word
# wide at 390 px (and a narrow column on a desktop). The badge gets half the row, and below 640 px a line of its
# own under the tick and the weight. In a <style> element of the panel's own, so the panel's look lives with the
# panel (Gradio applies a gr.HTML's <style> to the whole page).
STYLE = """<style>
.lora-row > .lora-badge { flex: 1 1 45% !important; overflow-wrap: anywhere; }
@media (max-width: 640px) {
  .lora-row { flex-wrap: wrap !important; }
  .lora-row > .lora-badge { flex: 1 1 100% !important; min-width: 0 !important; }
}
</style>"""


class LoraPanel:
    def __init__(self, engine: Engine, models_dir: Path):
        self.engine, self.models_dir = engine, Path(models_dir)
        self.messages = PanelMessages()
        gr.HTML(STYLE, padding=False, elem_id="lora-style")
        gr.Markdown("### LoRA adapters")
        # the list (filters, then the buttons that act on the active stack and their message, then the rows)
        self.list = LoraList(engine, self.messages)
        with gr.Row():
            self.refresh = gr.Button("↻ Refresh", size="sm", elem_id="lora-refresh")
            self.clear = gr.Button("Remove all", size="sm", elem_id="lora-clear")
            self.merge = gr.Button("Merge into base", size="sm", elem_id="lora-merge")
            self.unmerge = gr.Button("Unmerge", size="sm", elem_id="lora-unmerge")
        self.message = self.messages.add("lora-message")
        self.list.rows(self.message)
        self.get = GetArea(engine.loras_dir, self.messages)  # first below the list: where a newcomer starts
        self.list.manage_area()

        with gr.Accordion("Export merged model, or the adapters for llama.cpp / Ollama", open=False):
            with gr.Row():
                self.export_format = gr.Dropdown(list(FORMATS), value="safetensors", label="format",
                                                 elem_id="export-format", info="gguf-lora: the active stack as one GGUF LoRA (into the loras "
                                                      "folder); ollama: a folder for `ollama create`")
                self.export_name = gr.Textbox(label="output name (in the models folder)", elem_id="export-name")
                self.export_go = gr.Button("Export", elem_id="export-go")
            self.export_message = self.messages.add("export-message")
        with gr.Accordion("Blend active adapters into a new adapter", open=False):
            with gr.Row():
                self.blend_type = gr.Dropdown(list(COMBINATIONS), value="cat", label="combination",
                                              info="cat equals the stack for any ranks; the others approximate it "
                                                   "(linear/ties/dare need equal ranks)")
                self.blend_density = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="density (ties/dare)")
                self.blend_name = gr.Textbox(label="new adapter name", elem_id="blend-name")
                self.blend_go = gr.Button("Blend", elem_id="blend-go")
            self.blend_message = self.messages.add("blend-message")
        self._publish_area()
        self.surgery = SurgeryArea(engine.loras_dir, self.models_dir, self.messages)
        self._wire()
        self.messages.finish()

    def _publish_area(self) -> None:
        """Publish an adapter of the folder to a hub repo or S3, with its model card (webui/hub/publish.py)."""
        with gr.Accordion("Publish an adapter (Hugging Face hub, S3)", open=False), gr.Row():
            name = gr.Textbox(label="adapter name", elem_id="publish-name")
            dest = gr.Textbox(label="to", placeholder="hf:org/name · s3://bucket/prefix", elem_id="publish-to")
            token = gr.Textbox(label="hub token (empty: HF_TOKEN)", type="password", elem_id="publish-token")
            private = gr.Checkbox(label="private (a new hub repo)", elem_id="publish-private")
            go = gr.Button("Publish", elem_id="publish-go")
        message = self.messages.add("publish-message")  # under the accordion's row (a Row holds one line)

        def run(name, dest, token, private, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
            url = publish((name or "").strip(), (dest or "").strip(), loras_dir=self.engine.loras_dir,
                          token=(token or "").strip() or None, private=bool(private),
                          progress=lambda f, msg: progress(f if f is not None else 0, desc=msg))
            return f"Published **{name.strip()}** to {url} (with its model card, README.md)."

        self.messages.on(go, run, [name, dest, token, private], message)

    # -- actions ----------------------------------------------------------------------------------------
    def _wire(self) -> None:
        def clear():
            self.engine.clear_adapters()
            return "Removed all adapters: the plain base is answering."

        def merge():
            self.engine.merge_adapters()
            return "Merged the active adapters into the base weights (faster decoding; Unmerge restores)."

        def unmerge():
            self.engine.unmerge_adapters()
            return "Unmerged: the base weights are the original ones again."

        def export(fmt, name, progress=gr.Progress()):
            name = (name or "").strip()
            if not name or "/" in name or name.startswith("."):
                return "⚠️ give the export a plain name (no '/', not starting with '.')"
            spec, active = self.engine.spec, self.engine.active_adapters
            if spec is None:
                raise NoModelLoaded()
            folder = self.engine.loras_dir if fmt == "gguf-lora" else self.models_dir  # a GGUF LoRA is an adapter
            out = export_model(spec.model, list(active), list(active.values()), fmt, child(folder, name, "export name"),
                               self.models_dir, self.engine.loras_dir,
                               progress=lambda f, msg: progress(f if f is not None else 0, desc=msg))
            if fmt == "gguf-lora":
                return f"Exported `{out}`: load it next to the GGUF base (llama.cpp `--lora`, LM Studio, Ollama)."
            if fmt == "ollama":
                return f"Exported `{out}`: `ollama create NAME -f {out / 'Modelfile'}`."
            return f"Exported to `{out}` ({fmt}); it loads without adapters."

        def blend(kind, density, name):
            active = self.engine.active_adapters
            if not active:
                return "⚠️ activate the adapters to blend (with their weights) first"
            path = self.engine.blend_adapters(active, (name or "").strip(), kind, density)
            record = path / RECORD
            note = json.loads(record.read_text()).get("note", "") if record.is_file() else ""
            return f"Saved the blend as **{path.name}**{': ' + note if note else ''}."

        def act(button, fn, inputs=(), message=self.message):
            self.messages.on(button, fn, inputs, message, then=self.list.redraw)

        # Redraw when the adapters folder or the active stack changes elsewhere (a training run that
        # finished, another browser tab, the API's --lora), so every page shows the current state. The state the
        # page was drawn from is taken when the page loads (LoraList.seen), not at the first tick: Gradio does
        # not run the timer of a hidden tab, so that tick may come long after a change.
        gr.Timer(3.0).tick(self.list.watch, inputs=[self.list.seen, self.list.version],
                           outputs=[self.list.seen, self.list.version], show_progress="hidden")
        act(self.refresh, lambda: "")
        act(self.clear, clear)
        act(self.merge, merge)
        act(self.unmerge, unmerge)
        act(self.export_go, export, (self.export_format, self.export_name), self.export_message)
        self.export_format.change(  # a GGUF LoRA is an adapter: it is written into the loras folder
            lambda fmt: gr.update(label=f"output name (in the {'loras' if fmt == 'gguf-lora' else 'models'} folder)"),
            inputs=self.export_format, outputs=self.export_name)
        act(self.blend_go, blend, (self.blend_type, self.blend_density, self.blend_name), self.blend_message)
        act(self.get.fetch, self.get.get, (self.get.source_id,), self.get.message)
        act(self.get.add, self.get.upload, (self.get.files, self.get.name), self.get.message)
        act(self.surgery.go, self.surgery.run, self.surgery.inputs, self.surgery.message)
        self.messages.on(self.surgery.stop, self.surgery.cancel, (), self.surgery.message)
