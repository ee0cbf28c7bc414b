"""The LoRA panel of the Model tab: every adapter in the loras folder with its compatibility badge for the
loaded base (reasons on demand), one click to apply or remove it, a weight slider per adapter that takes
effect at once (hot-swap, the base is never reloaded), merge/unmerge, export merged, blend into a new
adapter, and fetching an adapter from the hub, a local path or S3. Every failure is shown in the panel
and leaves the model and the active adapters as they were (the Engine guarantees it).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import gradio as gr

from webui.adapters.peft_stack import COMBINATIONS
from webui.engine import Engine
from webui.errors import LoraDeckError, NoModelLoaded, ui_message
from webui.export.run import export_model
from webui.hub.fetch import download, fetch_adapter

log = logging.getLogger(__name__)
BADGES = {"ok": '<b style="color:#15803d">● ok</b>', "warnings": '<b style="color:#b45309">● warnings</b>',
          "incompatible": '<b style="color:#b91c1c">● incompatible</b>'}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _summary(engine: Engine, name: str) -> tuple[str, str]:
    """(badge line, details markdown) for one adapter."""
    try:
        r = engine.adapter_report(name)
    except LoraDeckError as e:
        return f"{BADGES['incompatible']} (broken) — {e}", f"`{e}`"
    leaves = sorted({t.rsplit(".", 1)[-1] for t in r.targets})  # PEFT may save full module paths
    line = f"{BADGES[r.verdict]} · r={r.rank} α={r.alpha:g} · {', '.join(leaves)} · {r.size_bytes / 1e6:.2f} MB"
    if r.verdict == "incompatible":
        line += f" — {r.reasons[0]}"
    elif r.warnings:
        line += f" — {r.warnings[0]}"
    return line, f"```\n{r.text()}\n```"


class LoraPanel:
    def __init__(self, engine: Engine, models_dir: Path):
        self.engine, self.models_dir = engine, Path(models_dir)
        self.version = gr.State(0)  # bumped to redraw the adapter list
        gr.Markdown("### LoRA adapters")
        self.message = gr.Markdown(elem_id="lora-message")
        with gr.Row():
            self.refresh = gr.Button("↻ Refresh", size="sm", elem_id="lora-refresh")
            self.clear = gr.Button("Remove all", size="sm", elem_id="lora-clear")
            self.merge = gr.Button("Merge into base", size="sm", elem_id="lora-merge")
            self.unmerge = gr.Button("Unmerge", size="sm", elem_id="lora-unmerge")

        @gr.render(inputs=self.version)
        def adapter_list(_version):
            self._render_list()

        with gr.Accordion("Export merged model", open=False):
            with gr.Row():
                self.export_format = gr.Dropdown(["safetensors", "gguf", "gptq"], value="safetensors", label="format")
                self.export_name = gr.Textbox(label="output name (in the models folder)", elem_id="export-name")
                self.export_go = gr.Button("Export", elem_id="export-go")
        with gr.Accordion("Blend active adapters into a new adapter", open=False):
            with gr.Row():
                self.blend_type = gr.Dropdown(list(COMBINATIONS), value="cat", label="combination",
                                              info="cat is exact for any ranks; linear/ties/dare need equal ranks")
                self.blend_density = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="density (ties/dare)")
                self.blend_name = gr.Textbox(label="new adapter name", elem_id="blend-name")
                self.blend_go = gr.Button("Blend", elem_id="blend-go")
        with gr.Accordion("Get an adapter (hub, local path, S3)", open=False):
            with gr.Row():
                self.source = gr.Dropdown(["hub", "local", "s3"], value="hub", label="source")
                self.source_id = gr.Textbox(label="id", placeholder="org/name · /path/to/adapter · s3://bucket/prefix",
                                            elem_id="lora-source-id")
                self.fetch = gr.Button("Get", elem_id="lora-fetch")
        self._wire()

    # -- the list ---------------------------------------------------------------------------------------
    def _render_list(self) -> None:
        names = self.engine.list_adapters()
        if not names:
            gr.Markdown(f"No adapters in `{self.engine.loras_dir}` yet: put PEFT adapter folders there, "
                        "or get one below.")
            return
        active = self.engine.active_adapters
        boxes, sliders = [], []
        for name in names:
            badge, details = _summary(self.engine, name)
            with gr.Row(equal_height=True):
                boxes.append(gr.Checkbox(value=name in active, label=name, elem_id=f"lora-on-{slug(name)}",
                                         key=f"on-{name}", scale=2, min_width=120, interactive=True))
                sliders.append(gr.Slider(-2.0, 2.0, value=active.get(name, 1.0), step=0.05, label="weight",
                                         elem_id=f"lora-weight-{slug(name)}", key=f"w-{name}", scale=3,
                                         interactive=True))
                with gr.Column(scale=5):
                    gr.Markdown(badge, elem_id=f"lora-badge-{slug(name)}")
                    with gr.Accordion("details", open=False):
                        gr.Markdown(details)

        def apply(*values):
            n = len(names)
            wanted = {nm: float(w) for nm, on, w in zip(names, values[:n], values[n:]) if on}
            try:
                active = self.engine.set_adapters(wanted)
                msg = "Active: " + (", ".join(f"**{k}** × {v:g}" for k, v in active.items()) or "none (plain base)")
            except LoraDeckError as e:
                active = self.engine.active_adapters
                msg = ui_message(e)
            return [msg, *[gr.update(value=nm in active) for nm in names]]

        io = dict(inputs=[*boxes, *sliders], outputs=[self.message, *boxes])
        for box in boxes:
            box.input(apply, **io)
        for slider in sliders:
            slider.input(apply, **io)

    # -- actions ----------------------------------------------------------------------------------------
    def _wire(self) -> None:
        bump = lambda v: v + 1  # noqa: E731

        def guarded(fn):
            def run(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except LoraDeckError as e:
                    return ui_message(e)
                except Exception as e:  # unexpected: logged, still shown, the app goes on
                    log.exception("LoRA panel action failed")
                    return ui_message(e)
            return run

        @guarded
        def clear():
            self.engine.clear_adapters()
            return "Removed all adapters: the plain base is answering."

        @guarded
        def merge():
            self.engine.merge_adapters()
            return "Merged the active adapters into the base weights (faster decoding; Unmerge restores)."

        @guarded
        def unmerge():
            self.engine.unmerge_adapters()
            return "Unmerged: the base weights are the original ones again."

        @guarded
        def export(fmt, name, progress=gr.Progress()):
            name = (name or "").strip()
            if not name or "/" in name or name.startswith("."):
                return "⚠️ give the export a plain name (it is written into the models folder)"
            spec, active = self.engine.spec, self.engine.active_adapters
            if spec is None:
                raise NoModelLoaded()
            out = export_model(spec.model, list(active), list(active.values()), fmt, self.models_dir / name,
                               self.models_dir, self.engine.loras_dir,
                               progress=lambda f, msg: progress(f if f is not None else 0, desc=msg))
            return f"Exported to `{out}` ({fmt}); it loads without adapters."

        @guarded
        def blend(kind, density, name):
            active = self.engine.active_adapters
            if not active:
                return "⚠️ activate the adapters to blend (with their weights) first"
            path = self.engine.blend_adapters(active, (name or "").strip(), kind, density)
            return f"Saved the blend as **{path.name}**."

        @guarded
        def fetch(source, adapter_id, progress=gr.Progress()):
            adapter_id = (adapter_id or "").strip()
            report = lambda f, msg: progress(f if f is not None else 0, desc=msg)  # noqa: E731
            if source == "local":  # copied into the adapters folder, so it is listed and kept
                path = download(adapter_id, lora_dir=self.engine.loras_dir, model_dir=self.models_dir,
                                require_lora=True, progress=report)
            else:
                path = fetch_adapter(adapter_id, source, self.engine.loras_dir, report)
            return f"Got **{path.name}**: it is in the list now."

        def act(button, fn, inputs=()):
            button.click(fn, inputs=list(inputs), outputs=self.message).then(bump, self.version, self.version)

        # Redraw when the adapters folder or the active stack changes elsewhere (a training run that
        # finished, another browser tab, the API's --lora), so every page shows the current state.
        def watch(seen, version):
            sig = f"{self.engine.list_adapters()}|{self.engine.active_adapters}|{self.engine.merged}"
            return (gr.update(), gr.update()) if sig == seen else (sig, version + 1)

        self.seen = gr.State("")
        gr.Timer(3.0).tick(watch, inputs=[self.seen, self.version], outputs=[self.seen, self.version],
                           show_progress="hidden")
        act(self.refresh, lambda: "")
        act(self.clear, clear)
        act(self.merge, merge)
        act(self.unmerge, unmerge)
        act(self.export_go, export, (self.export_format, self.export_name))
        act(self.blend_go, blend, (self.blend_type, self.blend_density, self.blend_name))
        act(self.fetch, fetch, (self.source, self.source_id))
