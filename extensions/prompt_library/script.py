"""prompt_library: a library of system prompts (personas and instructions) to pick from.

Pick a prompt in its panel and every chat message is answered with that system prompt (placed before
yours, if you wrote one). The library lives in user_data/prompt_library.yaml (name: text) and starts
with a few useful entries; add or overwrite one from the panel.
"""
from pathlib import Path

import yaml

params = {
    "active": "",                                   # name of the prompt in use ("" = none)
    "library_file": "user_data/prompt_library.yaml",
}

STARTER = {
    "Concise": "Answer in as few words as the question allows. No preamble.",
    "Teacher": "Explain step by step, as to a curious student, and end with one question that checks understanding.",
    "Code reviewer": "You review code. List bugs first, then risks, then style; quote the lines you mean.",
    "Translator (EN→FR)": "Translate the user's text into natural French. Output only the translation.",
}


def library() -> dict:
    path = Path(params["library_file"])
    if path.is_file():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    return dict(STARTER)


def save_library(entries: dict) -> None:
    path = Path(params["library_file"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(entries, allow_unicode=True, sort_keys=True), encoding="utf-8")


def state_modifier(state):
    prompt = library().get(params["active"]) if params["active"] else None
    if prompt:
        own = (state.get("system") or "").strip()
        state["system"] = f"{prompt}\n\n{own}" if own else prompt
    return state


def ui():
    import gradio as gr

    pick = gr.Dropdown(choices=["", *library()], value=params["active"], label="system prompt in use",
                       elem_id="prompt-library-pick")
    name = gr.Textbox(label="name", elem_id="prompt-library-name")
    text = gr.Textbox(label="prompt", lines=3, elem_id="prompt-library-text")
    add = gr.Button("Add / overwrite", size="sm")

    def choose(value):
        params["active"] = value or ""
        return library().get(params["active"], "")

    def store(n, t):
        entries = library()
        if (n or "").strip() and (t or "").strip():
            entries[n.strip()] = t.strip()
            save_library(entries)
        return gr.update(choices=["", *entries])

    pick.change(choose, inputs=pick, outputs=text)
    add.click(store, inputs=[name, text], outputs=pick)
