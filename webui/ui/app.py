"""Assembles the five tabs into one Gradio Blocks app. Tabs are built first and wired after, because
the Chat tab reads the Parameters tab's components and the Model tab updates the Chat tab's status."""
from __future__ import annotations

import gradio as gr

from webui.engine import Engine
from webui.extensions import Extensions
from webui.options.config import ServerConfig
from webui.training.runner import TrainingRunner
from webui.ui.chat.tab import ChatTab
from webui.ui.evaluate_tab import EvaluateTab
from webui.ui.extensions_area import extensions_area
from webui.ui.model_tab import ModelTab
from webui.ui.parameters_tab import ParametersTab
from webui.ui.training.tab import TrainingTab


def build_ui(engine: Engine, cfg: ServerConfig, extensions: Extensions) -> gr.Blocks:
    """The UI; `extensions`: the set the server loaded once, which the API's requests run too."""
    with gr.Blocks(title="LoRA Deck") as demo:
        gr.Markdown("## LoRA Deck")
        with gr.Tabs() as tabs:
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat = ChatTab(engine, cfg.paths["user"], extensions)
                extensions_area(extensions)
            with gr.Tab("Parameters", id="parameters"):
                params = ParametersTab(cfg.paths["presets"])
            with gr.Tab("Model", id="model"):
                model = ModelTab(engine, cfg.paths["models"])
            with gr.Tab("Training", id="training"):
                training = TrainingTab(engine, TrainingRunner(cfg.paths["runs"], cfg.paths["models"],
                                                              cfg.paths["loras"]), cfg.paths["user"])
            with gr.Tab("Evaluate", id="evaluate") as evaluate_tab:
                evaluate = EvaluateTab(engine, cfg.paths["user"])
        chat.wire(params)
        model.wire(on_change=chat.status, describe=chat.describe_model)
        model.load.click(lambda: params.visible_for(engine), outputs=params.inputs)
        demo.load(lambda: params.visible_for(engine), outputs=params.inputs)
        demo.load(chat.describe_model, outputs=chat.status)
        demo.load(model.describe, inputs=model.last, outputs=model.status)  # the page's status is built once
        training.on_load(demo)
        training.live.wire(training.notice, tabs)
        # the Chat tab's preference set becomes the Training tab's dataset (a method control where the tab has one)
        chat.ratings.send_to_training(tabs, training.data["path"], training.data["format"],
                                      getattr(training, "method", None))
        # the adapter pickers list what is there when the page or their tab is opened (a fetched adapter, a
        # finished or running training run), keeping what is ticked
        for opened, picker in ((chat_tab, chat.compare.adapters), (evaluate_tab, evaluate.adapters)):
            for event in (opened.select, demo.load):
                event(lambda: gr.update(choices=engine.adapter_choices()), outputs=picker, show_progress="hidden")
        # Model and adapter changes made by other users, the LoRA panel or the API's --lora show up in every tab.
        timer = gr.Timer(3.0)
        timer.tick(chat.describe_model, outputs=chat.status)
        timer.tick(model.describe, inputs=model.last, outputs=model.status)
    demo.queue(default_concurrency_limit=16)  # the Engine serializes model access itself
    return demo
