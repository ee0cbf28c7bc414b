"""lora_router: pick the adapter for each chat message from trigger words.

Map trigger words to adapters (folder names in loras/) in `params["routes"]`, in the settings file
(user_data/settings.yaml → extension_params: {lora_router: {routes: {...}}}) or in its panel: one line
per adapter, `word, other word -> adapter`. A message containing a trigger word (whole word, any case) is
answered by that adapter at weight 1; the first route that matches wins; a message with no trigger word
gets `params["default"]` (an adapter name, or "" for the app's active adapters). The line under the chat
says which adapter answered and why.
"""
import re

params = {
    "routes": {},          # adapter name -> list of trigger words
    "default": "",         # adapter for messages without a trigger word ("" = the app's active adapters)
    "strip_triggers": False,  # remove the trigger word from the message the model sees
}


def parse_routes(text: str) -> dict:
    """'word, other -> adapter' lines → {adapter: [words]}; lines without '->' are ignored."""
    routes = {}
    for line in (text or "").splitlines():
        if "->" not in line:
            continue
        words, adapter = line.rsplit("->", 1)
        adapter = adapter.strip()
        triggers = [w.strip() for w in words.split(",") if w.strip()]
        if adapter and triggers:
            routes.setdefault(adapter, []).extend(triggers)
    return routes


def format_routes(routes: dict) -> str:
    return "\n".join(f"{', '.join(words)} -> {adapter}" for adapter, words in routes.items())


def route(text: str):
    """(adapter, trigger word) for a message, or (None, None)."""
    for adapter, words in params["routes"].items():
        for word in words:
            if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE):
                return adapter, word
    return None, None


def chat_input_modifier(text, visible_text, state):
    adapter, word = route(text)
    if adapter:
        state["adapters"] = {adapter: 1.0}
        state["note"] = f"lora_router picked {adapter} (trigger “{word}”)"
        if params["strip_triggers"]:
            text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", "", text, flags=re.IGNORECASE).strip()
    elif params["default"]:
        state["adapters"] = {params["default"]: 1.0}
        state["note"] = f"lora_router default: {params['default']}"
    return text, visible_text


def ui():
    import gradio as gr

    box = gr.Textbox(value=format_routes(params["routes"]), lines=4, label="routes: word, word -> adapter",
                     elem_id="lora-router-routes")
    default = gr.Textbox(value=params["default"], label="default adapter (empty: the app's active adapters)",
                         elem_id="lora-router-default")
    strip = gr.Checkbox(value=params["strip_triggers"], label="remove the trigger word from the message")

    def save(routes_text, default_name, strip_value):
        params["routes"] = parse_routes(routes_text)
        params["default"] = (default_name or "").strip()
        params["strip_triggers"] = bool(strip_value)

    for component in (box, default, strip):
        component.change(save, inputs=[box, default, strip])
