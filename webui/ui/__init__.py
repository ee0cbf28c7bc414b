"""The Gradio web UI: one file per tab (Chat, Parameters, Model, Training), each building its own
components and wiring them to the Engine it is handed. No model code lives here."""
from webui.ui.app import build_ui

__all__ = ["build_ui"]
