"""Compare mode of the Chat tab: one prompt answered side by side by the plain base and each chosen
adapter. The answers are requested together through Engine.fan_out (as the API's `compare` field is), so on
loaders that mix adapters in one batch (transformers, GPTQ) they come from a single batched pass."""
from __future__ import annotations

import html

import gradio as gr

from webui.engine import Engine
from webui.errors import LoraDeckError, ui_message


def _cards(results: dict[str, str | None]) -> str:
    cards = []
    for name, text in results.items():
        body = "<em>…</em>" if text is None else html.escape(text)
        cards.append(f'<div class="compare-card" data-name="{html.escape(name)}" style="flex:1;min-width:220px;'
                     f'border:1px solid #ccc;border-radius:8px;padding:8px"><h4>{html.escape(name)}</h4>'
                     f'<pre class="compare-answer" style="white-space:pre-wrap">{body}</pre></div>')
    return f'<div class="compare-grid" style="display:flex;gap:12px;flex-wrap:wrap">{"".join(cards)}</div>'


def answer_cards(engine: Engine, text: str, params, stacks: dict[str, dict]):
    """Answer one prompt with several stacks at once (Engine.fan_out: queued together, so they share a batch where
    the loader can) and yield the cards as each answer comes in; a failed one shows its error in its card."""
    handles = dict(zip(stacks, engine.fan_out(text, params, list(stacks.values()))))
    results: dict[str, str | None] = {name: None for name in handles}
    yield _cards(results)
    try:
        for name, handle in handles.items():
            try:
                results[name] = handle.text()
            except Exception as e:  # shown in its card; the others still answer
                results[name] = f"⚠️ {e}"
            yield _cards(results)
    finally:  # a page closed mid-way must not leave answers generating for nobody
        for handle in handles.values():
            handle.close()


class CompareBox:
    def __init__(self, engine: Engine):
        self.engine = engine
        with gr.Accordion("Compare: base vs adapters", open=False, elem_id="compare"):
            with gr.Row():
                self.prompt = gr.Textbox(label="prompt", scale=4, elem_id="compare-prompt")
                self.go = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-go")
            with gr.Row():
                self.adapters = gr.CheckboxGroup(choices=engine.adapter_choices(), elem_id="compare-adapters",
                                                 label="adapters to compare with the base", scale=4)
                self.refresh = gr.Button("↻", scale=0, min_width=40, elem_id="compare-refresh")
            self.result = gr.HTML(elem_id="compare-result")

    def wire(self, params_tab, system: gr.components.Component) -> None:
        def compare(prompt, chosen, system_prompt, *values):
            if not (prompt or "").strip():
                yield "<p>Type a prompt to compare.</p>"
                return
            try:
                params = params_tab.params_from(values)
                messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
                    [{"role": "user", "content": prompt}]
                text = self.engine.chat_prompt(messages)
                self.engine.prepare_adapters(list(chosen or []))
            except LoraDeckError as e:
                yield f"<p>{html.escape(ui_message(e))}</p>"
                return
            yield from answer_cards(self.engine, text, params, {"base": {}, **{n: {n: 1.0} for n in chosen or []}})

        self.go.click(compare, inputs=[self.prompt, self.adapters, system, *params_tab.inputs], outputs=self.result)
        self.prompt.submit(compare, inputs=[self.prompt, self.adapters, system, *params_tab.inputs],
                           outputs=self.result)
        self.refresh.click(lambda: gr.update(choices=self.engine.adapter_choices()), outputs=self.adapters)
