"""The LoRA panel's one place to get an adapter: type where it is (a hub id, a folder or .zip on this machine, an
s3:// URL: the source is told from its shape, webui.hub.fetch.source_of) or upload a .zip of an adapter folder or
its files from the browser. Whatever arrives lands in the loras folder, checked as a PEFT LoRA, and is listed at
once; the message under the buttons says what happened (webui/hub/install.py, webui/hub/fetch.py). Base models are
downloaded in the Model tab's own box above the panel.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from webui.errors import BadInput
from webui.hub.fetch import fetch_adapter, source_of
from webui.hub.install import install_local, install_upload
from webui.ui.messages import PanelMessages

UPLOAD_TYPES = [".zip", ".json", ".safetensors", ".bin"]  # .bin: accepted by the picker so the refusal says why


class GetArea:
    """Built inside the LoRA panel; `get` and `upload` are wired by the panel (its message clearing, the redraw)."""

    def __init__(self, loras_dir: Path, messages: PanelMessages):
        self.loras_dir = Path(loras_dir)
        with gr.Accordion("Get an adapter: hub, a folder on this machine, S3, or upload", open=False,
                          elem_id="lora-get"):
            with gr.Row(equal_height=True):
                self.source_id = gr.Textbox(label="where it is", elem_id="lora-source-id", scale=4, max_lines=1,
                                            placeholder="org/name · /path/to/adapter (or .zip) · s3://bucket/prefix",
                                            info="a hub id, a path on this machine or an S3 URL: told apart by "
                                                 "their shape")
                self.fetch = gr.Button("Get", elem_id="lora-fetch", scale=1, min_width=80)
            with gr.Row(equal_height=True):
                self.files = gr.File(label="or upload: a .zip of the adapter's folder, or its files "
                                           "(adapter_config.json + adapter_model.safetensors)",
                                     file_count="multiple", file_types=UPLOAD_TYPES, type="filepath",
                                     elem_id="lora-upload", scale=4)
                with gr.Column(scale=1, min_width=160):
                    self.name = gr.Textbox(label="name (empty: the zip's)", elem_id="lora-upload-name", max_lines=1)
                    self.add = gr.Button("Add to the loras folder", elem_id="lora-upload-go")
            self.message = messages.add("lora-get-message")

    def get(self, adapter_id, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
        adapter_id = (adapter_id or "").strip()
        if not adapter_id:
            raise BadInput("type a hub id (org/name), a folder path or an s3:// URL first")
        report = lambda f, msg: progress(f if f is not None else 0, desc=msg)  # noqa: E731
        source = source_of(adapter_id)
        if source == "local":  # copied into the adapters folder, so it is listed and kept
            path = install_local(adapter_id, self.loras_dir, report)
        else:
            path = fetch_adapter(adapter_id, source, self.loras_dir, report)
        return f"Got **{path.name}** ({source}): it is in the list now."

    def upload(self, files, name, progress=gr.Progress()):  # noqa: B008
        report = lambda f, msg: progress(f if f is not None else 0, desc=msg)  # noqa: E731
        paths = [f if isinstance(f, str) else getattr(f, "name", f) for f in files or []]
        path = install_upload(paths, self.loras_dir, (name or "").strip(), report)
        return f"Added **{path.name}** to the loras folder: it is in the list now."
