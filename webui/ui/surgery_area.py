"""The LoRA panel's adapter surgery area: resize an adapter to another rank, rewrite a DoRA adapter as a plain
LoRA, or extract a LoRA from a fine-tuned model and its base (webui/adapters/surgery/ops.py, as `python -m webui
resize | convert | extract`), with progress and a Cancel that stops the operation between layers and writes
nothing. The result is a new adapter in the loras folder, listed at once; the message gives the error the
truncation made (per layer in its model card)."""
from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from webui.adapters.surgery import ops
from webui.errors import BadInput, LoraDeckError, ui_message
from webui.ui.messages import PanelMessages

OPERATIONS = {"resize": "resize an adapter (another rank)", "convert": "convert DoRA → plain LoRA",
              "extract": "extract from a fine-tune (tuned − base)"}


class SurgeryArea:
    """Built inside the LoRA panel; `run` and `cancel` answer in `message`, under the area's buttons (the panel wires
    them, with the list's redraw)."""

    def __init__(self, loras_dir: Path, models_dir: Path, messages: PanelMessages):
        self.loras_dir, self.models_dir = Path(loras_dir), Path(models_dir)
        self._cancels: dict[str, threading.Event] = {}  # per browser session: the running operation's cancel
        with gr.Accordion("Reshape an adapter: resize, DoRA → LoRA, extract from a fine-tune", open=False):
            with gr.Row():
                self.operation = gr.Dropdown([(v, k) for k, v in OPERATIONS.items()], value="resize",
                                             label="operation", elem_id="surgery-op")
                self.source = gr.Textbox(label="adapter (resize, convert) or fine-tuned model (extract)",
                                         elem_id="surgery-source")
                self.base = gr.Textbox(label="base model (extract; convert: default the adapter's base)",
                                       elem_id="surgery-base")
            with gr.Row():
                self.rank = gr.Number(value=8, precision=0, minimum=0, label="rank (0: use energy)",
                                      elem_id="surgery-rank")
                self.energy = gr.Number(value=0.99, minimum=0, maximum=1, label="energy kept (when rank is 0)",
                                        elem_id="surgery-energy")
                self.out = gr.Textbox(label="new adapter name (in the loras folder)", elem_id="surgery-out")
                self.go = gr.Button("Run", elem_id="surgery-go")
                self.stop = gr.Button("Cancel", elem_id="surgery-cancel", size="sm")
            self.message = messages.add("surgery-message")

    @property
    def inputs(self) -> list:
        return [self.operation, self.source, self.base, self.rank, self.energy, self.out]

    def run(self, operation, source, base, rank, energy, out, request: gr.Request,
            progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
        source, base, out = (source or "").strip(), (base or "").strip(), (out or "").strip()
        rank = int(rank or 0) or None
        energy = None if rank else float(energy or 0)
        key = request.session_hash if request else "default"
        cancel = self._cancels[key] = threading.Event()
        report = lambda f, msg: progress(f if f is not None else 0, desc=msg)  # noqa: E731
        try:
            if not source or not out:
                raise BadInput("name the source and the new adapter")
            if energy is not None and not 0 < energy <= 1:
                raise BadInput("energy: a fraction in (0, 1], or give a rank")
            if operation == "resize":
                result = ops.resize(source, self.loras_dir, out, rank, energy, progress=report, cancel=cancel)
            elif operation == "convert":
                result = ops.convert(source, self.loras_dir, out, self.models_dir, base or None, rank, energy,
                                     progress=report, cancel=cancel)
            else:
                if not base:
                    raise BadInput("extract needs the base model the fine-tune started from")
                result = ops.extract(base, source, self.models_dir, self.loras_dir, out, rank, energy,
                                     progress=report, cancel=cancel)
        except LoraDeckError as e:
            return ui_message(e)
        finally:
            self._cancels.pop(key, None)
        if result is None:
            return f"Cancelled: nothing was written (no **{out}**)."
        t = result.total
        notes = "".join(f" {n}" for n in result.notes)
        return (f"Saved **{result.path.name}**: {t['layers']} layers, energy kept {t['energy']:.4f}, relative "
                f"error {t['rel_error']:.2e} (per layer in its model card).{notes}")

    def cancel(self, request: gr.Request) -> str:
        event = self._cancels.get(request.session_hash if request else "default")
        if event is None:
            return "Nothing to cancel."
        event.set()
        return "Cancelling after the current layer…"
