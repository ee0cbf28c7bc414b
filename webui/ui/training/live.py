"""The Training tab's "try the run while it trains" area: the run's newest checkpoint (`RUN@latest`, see
webui.training.live) answers a prompt beside the base, or becomes the Chat tab's adapter, while training goes on.
Each answer after a newer save uses the newer weights (a hot-swap; the base is never reloaded). A checkpoint
that does not fit the loaded base (a run on another base) says so, with the reason, instead of answering.
"""
from __future__ import annotations

import html

import gradio as gr

from webui.engine import Engine
from webui.errors import BadInput, LoraDeckError, NotFound, ui_message
from webui.options.config import GenerationParams
from webui.ui.chat.compare import answer_cards

# greedy and short: the point is to see how the adapter's answer moves from save to save, not to sample
TRY_PARAMS = GenerationParams(max_new_tokens=96, temperature=0.0)


def latest(run: str) -> str:
    return f"{run}@latest"


class LiveTry:
    def __init__(self, engine: Engine, run_name: gr.State):
        self.engine, self.run_name = engine, run_name
        with gr.Accordion("Try the run while it trains", open=True, elem_id="train-live"):
            self.line = gr.Markdown("No checkpoint yet: one is saved every `save_steps` steps.",
                                    elem_id="train-live-status")
            with gr.Row():
                self.prompt = gr.Textbox(label="prompt", placeholder="Ask the newest checkpoint and the base",
                                         scale=4, elem_id="train-live-prompt")
                self.compare = gr.Button("Compare with the base", scale=1, elem_id="train-live-compare")
                self.chat = gr.Button("Chat with the latest checkpoint", scale=1, elem_id="train-live-chat")
            self.result = gr.HTML(elem_id="train-live-result")
            self.timer = gr.Timer(3.0)  # the newest checkpoint changes as the run saves
        self.chatting = gr.State(False)  # the Chat button worked: go to the Chat tab

    def describe(self, run: str) -> str:
        """Which checkpoint `RUN@latest` is now, and whether it fits the loaded base (the reason when not)."""
        if not run:
            return "No run yet."
        try:
            path = self.engine.adapter_path(latest(run))
            report = self.engine.adapter_report(latest(run), path)
        except NotFound:  # the usual state of a run's first steps, not an error
            return f"No checkpoint of **{run}** yet: one is saved every `save_steps` steps."
        except LoraDeckError as e:
            return ui_message(e)
        where = f"step {path.name.split('-')[-1]}" if path.name.startswith("checkpoint-") else "the finished adapter"
        if not report.compatible:
            return f"`{latest(run)}` ({where}) is **incompatible** with the loaded base: " + \
                "; ".join(report.reasons[:2])
        return f"`{latest(run)}` is {where} of **{run}**; it fits the loaded base."

    def answer(self, run: str, prompt: str):
        if not (prompt or "").strip():
            yield "<p>Type a prompt to compare.</p>"
            return
        try:
            if not run:
                raise BadInput("start a run first: its checkpoints answer here as it trains")
            self.engine.prepare_adapters([latest(run)])  # a newer save is hot-swapped in here
            text = self.engine.chat_prompt([{"role": "user", "content": prompt}])
        except LoraDeckError as e:
            yield f"<p>{html.escape(ui_message(e))}</p>"
            return
        yield from answer_cards(self.engine, text, TRY_PARAMS, {"base": {}, latest(run): {latest(run): 1.0}})

    def use_in_chat(self, run: str):
        if not run:
            return "Start a run first.", False
        try:
            self.engine.set_adapters({latest(run): 1.0})
        except LoraDeckError as e:
            return ui_message(e), False
        return (f"The Chat tab answers with `{latest(run)}` now, and follows the run's newer saves; untick it in "
                "the Model tab's LoRA panel to chat with the base again."), True

    def wire(self, notice: gr.Markdown, tabs: gr.Tabs) -> None:
        """`notice`: the tab's line for answers to clicks; `tabs`: the app's tabs, to open the Chat tab."""
        self.compare.click(self.answer, inputs=[self.run_name, self.prompt], outputs=self.result)
        self.prompt.submit(self.answer, inputs=[self.run_name, self.prompt], outputs=self.result)
        self.chat.click(self.use_in_chat, inputs=self.run_name, outputs=[notice, self.chatting]).then(
            lambda ok: gr.Tabs(selected="chat") if ok else gr.update(), inputs=self.chatting, outputs=tabs)
        for event in (self.timer.tick, self.run_name.change):
            event(self.describe, inputs=self.run_name, outputs=self.line, show_progress="hidden")
