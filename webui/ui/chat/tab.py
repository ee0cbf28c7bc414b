"""The Chat tab: streaming replies from the loaded model with its own chat template, a system prompt,
and send / stop / regenerate / remove last / clear; 👍/👎 on replies and the better of two regenerated ones kept
as preference data (ratings.py). Each browser tab has its own history (the Chatbot's value lives in the page);
the Engine makes concurrent users wait their turn instead of interleaving.
"""
from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from webui.conversations import list_conversations, load_conversation, save_conversation
from webui.engine import UI_STACK, AdapterStack, Engine, Stack
from webui.errors import LoraDeckError, ui_message
from webui.extensions import Extensions
from webui.ui.chat.compare import CompareBox
from webui.ui.chat.messages import message_text, to_messages
from webui.ui.chat.ratings import RatingsBox
from webui.ui.status import model_line

log = logging.getLogger(__name__)


class ChatTab:
    def __init__(self, engine: Engine, user_dir: Path, extensions: Extensions | None = None):
        self.engine = engine
        self.conversations_dir = Path(user_dir) / "conversations"
        self.extensions = extensions or Extensions(Path("extensions"))
        self._handles: dict = {}  # per browser session: its running generation (a scheduler JobHandle)
        self.status = gr.Markdown(model_line(engine), elem_id="chat-status")
        self.chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=480)
        self.answered = gr.Markdown(elem_id="chat-answered")
        with gr.Row():
            self.message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                      scale=8, elem_id="chat-input", autofocus=True)
            self.send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            self.stop = gr.Button("Stop", scale=1, elem_id="chat-stop")
        with gr.Row():
            self.regenerate = gr.Button("Regenerate", size="sm", elem_id="chat-regenerate")
            self.continue_ = gr.Button("Continue", size="sm", elem_id="chat-continue")
            self.remove_last = gr.Button("Remove last", size="sm", elem_id="chat-remove-last")
            self.clear = gr.Button("Clear", size="sm", elem_id="chat-clear")
        self.ratings = RatingsBox(user_dir)
        with gr.Accordion("System prompt", open=False):
            self.system = gr.Textbox(value="", lines=3, show_label=False, elem_id="chat-system",
                                     placeholder="Optional instructions given to the model before the chat")
        with gr.Accordion("Saved conversations", open=False):
            with gr.Row():
                self.save_name = gr.Textbox(label="name", scale=3, elem_id="conv-name")
                self.save = gr.Button("Save", scale=1, elem_id="conv-save")
                self.saved = gr.Dropdown(choices=list_conversations(self.conversations_dir), label="saved",
                                         scale=3, elem_id="conv-list", allow_custom_value=True)
                self.load = gr.Button("Load", scale=1, elem_id="conv-load")
            self.conv_status = gr.Markdown(elem_id="conv-status")
        self.compare = CompareBox(engine)

    def describe_model(self) -> str:
        return model_line(self.engine)

    # -- handlers ------------------------------------------------------------------------------------
    def _answered(self, stack: Stack, state: dict) -> str:
        info = self.engine.loaded
        who = AdapterStack(self.engine.active_adapters if stack is UI_STACK else stack).describe()
        note = f" — {state['note']}" if state.get("note") else ""
        return f"Last reply: **{info.name if info else '?'}** with {who}{note}"

    def _stream(self, history: list, prompt: str, params, adapters, request: gr.Request, state: dict):
        """Stream a reply to `prompt` into history[-1] through Engine.submit (which batches
        concurrent users); yields (history, answered-by line)."""
        key = request.session_hash if request else "default"
        text = message_text(history[-1]["content"])
        try:
            handle = self._handles[key] = self.engine.submit(prompt, params, adapters)
            for delta in handle:
                text += delta
                history[-1]["content"] = text
                yield history, gr.update()
            history[-1]["content"] = self.extensions.output(text, state)
            yield history, self._answered(adapters, state)
        except Exception as e:  # shown in the page; the chat and the model stay usable
            if not isinstance(e, LoraDeckError):
                log.exception("generation failed")
            gr.Warning(str(e))
            if not message_text(history[-1]["content"]):
                history[-1]["content"] = f"*{e}*"
            yield history, gr.update()
        finally:
            self._handles.pop(key, None)

    def _reply(self, history: list, user_text: str, system: str, params, request):
        """history ends with [user, empty assistant]; fill the assistant turn."""
        try:
            messages, params, adapters, state = self.extensions.chat_turn(
                to_messages(history[:-2], ""), user_text, system, params)
            # an extension that picked no adapters (None, as in text-generation-webui's hooks): the UI's stack answers
            adapters = UI_STACK if adapters is None else AdapterStack(adapters)
            prompt = self.engine.chat_prompt(messages)
            if adapters is not UI_STACK and adapters:
                self.engine.prepare_adapters(list(adapters))
        except LoraDeckError as e:
            gr.Warning(str(e))
            history[-1]["content"] = f"*{e}*"
            yield history, gr.update()
            return
        yield from self._stream(history, prompt, params, adapters, request, state)

    def wire(self, params_tab) -> None:
        param_inputs = params_tab.inputs
        outputs = [self.message, self.chatbot, self.answered]

        def submit(request: gr.Request, message, history, system, *values):
            history = list(history or [])
            if not (message or "").strip():
                yield gr.update(), history, gr.update()
                return
            try:
                params = params_tab.params_from(values)
            except LoraDeckError as e:
                gr.Warning(str(e))
                yield message, history, gr.update()
                return
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            yield "", history, ""  # the "Last reply" line comes back with the finished reply
            for h, answered in self._reply(history, message, system, params, request):
                yield "", h, answered

        def regenerate(request: gr.Request, history, system, *values):
            history = list(history or [])
            while history and history[-1]["role"] == "assistant":
                history.pop()
            if not history:
                yield history, gr.update()
                return
            try:
                params = params_tab.params_from(values)
            except LoraDeckError as e:
                gr.Warning(str(e))
                yield gr.update(), gr.update()
                return
            user_text = message_text(history[-1]["content"])
            history.append({"role": "assistant", "content": ""})
            yield history, ""
            yield from self._reply(history, user_text, system, params, request)

        def continue_(request: gr.Request, history, system, *values):
            history = list(history or [])
            if not history or history[-1]["role"] != "assistant":
                yield history, gr.update()
                return
            try:
                prompt = self.engine.chat_prompt(to_messages(history, system), add_generation_prompt=False)
            except LoraDeckError as e:
                gr.Warning(str(e))
                yield history, gr.update()
                return
            # Templates close the turn after the last message; continue inside it instead.
            last = message_text(history[-1]["content"])
            prompt = prompt[:prompt.rfind(last) + len(last)] if last and last in prompt else prompt
            yield from self._stream(history, prompt, params_tab.params_from(values), None, request, {})

        def remove_last(history):
            history = list(history or [])
            if history and history[-1]["role"] == "assistant":
                history.pop()
            if history and history[-1]["role"] == "user":
                history.pop()
            return history

        def stop(request: gr.Request):
            handle = self._handles.get(request.session_hash if request else "default")
            if handle:
                handle.close()

        # gr.Request is injected only into positional parameters before *values (gradio's rule).
        io = dict(inputs=[self.message, self.chatbot, self.system, *param_inputs], outputs=outputs)
        self.message.submit(submit, **io)
        self.send.click(submit, **io)
        hist_io = dict(inputs=[self.chatbot, self.system, *param_inputs], outputs=[self.chatbot, self.answered])
        # the reply a regenerate replaces is kept, and the new one offered beside it ("which is better?")
        alternatives, pair = self.ratings.alternatives, self.ratings.pair
        self.regenerate.click(self.ratings.remember, inputs=[self.chatbot, self.system, alternatives],
                              outputs=[alternatives, pair]).then(regenerate, **hist_io).then(
            self.ratings.offer, inputs=[self.chatbot, alternatives], outputs=self.ratings.offer_outputs)
        # Continue grows the reply the box shows: hidden until the next regenerate, which keeps the grown one
        self.continue_.click(lambda: gr.update(visible=False), outputs=pair).then(continue_, **hist_io)
        self.remove_last.click(remove_last, inputs=self.chatbot, outputs=self.chatbot)
        self.clear.click(lambda: [], outputs=self.chatbot)
        self.stop.click(stop)
        # another prompt: the alternatives kept answered one that is gone
        for event in (self.message.submit, self.send.click, self.remove_last.click, self.clear.click, self.load.click):
            event(self.ratings.forget, outputs=[alternatives, pair], show_progress="hidden")
        self.ratings.wire(self.chatbot, self.system)

        def save(name, history, system):
            try:
                path = save_conversation(self.conversations_dir, name, to_messages(history or [], ""), system,
                                         model=(self.engine.loaded.name if self.engine.loaded else ""),
                                         adapters=self.engine.active_adapters)
            except LoraDeckError as e:
                return ui_message(e), gr.update()
            return f"Saved **{path.stem}**.", gr.update(choices=list_conversations(self.conversations_dir), value=path.stem)

        def load(name):
            try:
                data = load_conversation(self.conversations_dir, name or "")
            except LoraDeckError as e:
                return ui_message(e), gr.update(), gr.update()
            note = f"Loaded **{data['name']}** (answered by {data.get('model') or '?'}"
            note += f" with {', '.join(data['adapters'])})." if data.get("adapters") else ")."
            return note, data["messages"], data.get("system", "")

        self.save.click(save, inputs=[self.save_name, self.chatbot, self.system], outputs=[self.conv_status, self.saved])
        self.load.click(load, inputs=self.saved, outputs=[self.conv_status, self.chatbot, self.system])
        self.compare.wire(params_tab, self.system)
