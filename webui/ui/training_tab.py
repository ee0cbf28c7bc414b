"""The Training tab. In-app LoRA training (datasets, every LoRA option, live loss chart, stop and
resume) is built by its own issue; until then the tab says so and points to what works today."""
from __future__ import annotations

import gradio as gr


class TrainingTab:
    def __init__(self):
        gr.Markdown(
            "### Training\n"
            "In-app LoRA training is not available in this version yet. "
            "Adapters trained elsewhere (PEFT format) go in the `loras/` folder.",
            elem_id="training-status")
