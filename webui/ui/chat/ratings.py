"""The Chat tab's ratings and preference pairs: users shape a model's voice by regenerating until a reply feels
right, and this box keeps that judgement as training data (webui.preferences writes it).

- 👍/👎 on a reply (the Chatbot's own like buttons) writes a single rating: the chat up to the reply, the reply,
  and the label (KTO's rows).
- Regenerate keeps the reply it replaces, with the prompt it answered (per browser session, in a gr.State); then
  "Which reply is better?" shows the one just before and the newest, and choosing writes a pair (DPO's rows).
  Sending a message, Clear, Remove last or loading a conversation forgets the alternatives.
- The set's name, a counter of what it holds, and a button that opens the Training tab with the set filled in
  (wired in webui.ui.app, which knows both tabs).
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from webui.errors import LoraDeckError, ui_message
from webui.preferences import append_pair, append_rating, counts, ratings_path, set_path
from webui.ui.chat.messages import to_messages

DEFAULT_SET = "chat-preferences"


def _many(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


class RatingsBox:
    def __init__(self, user_dir: Path):
        self.folder = Path(user_dir) / "preferences"
        # per browser session: {"prompt": messages, "replies": [oldest, ..., newest]} while one prompt is regenerated
        self.alternatives = gr.State(None)
        with gr.Group(visible=False, elem_id="chat-pref-pair") as self.pair:
            gr.Markdown("**Which reply is better?** Your choice is kept as a training pair (the better one chosen, "
                        "the other rejected).")
            with gr.Row():
                with gr.Column():
                    self.earlier = gr.Textbox(label="the reply before", interactive=False, lines=3, max_lines=12,
                                              elem_id="chat-pref-earlier")
                    self.pick_earlier = gr.Button("The earlier one", size="sm", elem_id="chat-pref-pick-earlier")
                with gr.Column():
                    self.newer = gr.Textbox(label="the new reply (in the chat)", interactive=False, lines=3,
                                            max_lines=12, elem_id="chat-pref-newer")
                    self.pick_newer = gr.Button("This one", size="sm", elem_id="chat-pref-pick-newer")
            self.pair_status = gr.Markdown(elem_id="chat-pref-pair-status")
        with gr.Accordion("Preference data: ratings of replies and pairs from Regenerate", open=True,
                          elem_id="chat-pref"):
            with gr.Row():
                self.name = gr.Textbox(value=DEFAULT_SET, label="preference set", scale=2, elem_id="chat-pref-name")
                self.train = gr.Button("Train on these in the Training tab", scale=1, elem_id="chat-pref-train")
            self.counts = gr.Markdown(self.describe(DEFAULT_SET), elem_id="chat-pref-counts")
            self.status = gr.Markdown(elem_id="chat-pref-status")

    def describe(self, name: str) -> str:
        """The counter line: what set `name` holds, and where."""
        try:
            pairs, ratings = counts(self.folder, name)
            return (f"**{_many(pairs, 'pair')}** in `{set_path(self.folder, name)}`; **{_many(ratings, 'rating')}** "
                    f"beside it in `{ratings_path(self.folder, name).name}`")
        except LoraDeckError as e:
            return ui_message(e)

    # -- the alternatives of one prompt ---------------------------------------------------------------
    def remember(self, history, system, alternatives):
        """Before a regenerate: keep the reply about to be replaced, with the prompt it answered. Hides the box
        while the new reply comes."""
        history = list(history or [])
        msgs = to_messages(history, system)
        if not msgs or msgs[-1]["role"] != "assistant":
            return None, gr.update(visible=False)
        reply = msgs.pop()["content"]
        while msgs and msgs[-1]["role"] == "assistant":  # regenerate replaces every reply after the user's turn
            msgs.pop()
        if alternatives and alternatives["prompt"] == msgs:
            replies = alternatives["replies"]
            replies = replies if replies[-1] == reply else [*replies, reply]  # Continue may have grown it
        else:
            replies = [reply]
        return {"prompt": msgs, "replies": replies}, gr.update(visible=False)

    def offer(self, history, alternatives):
        """After a regenerate: add the new reply and show it beside the one just before."""
        msgs = to_messages(list(history or []), "")
        if not alternatives or not msgs or msgs[-1]["role"] != "assistant":
            return alternatives, gr.update(visible=False), gr.update(), gr.update(), gr.update(), gr.update(), ""
        replies = [*alternatives["replies"], msgs[-1]["content"]]
        earlier, newer = replies[-2], replies[-1]
        note = ("" if earlier.strip() != newer.strip() else
                "The two replies are the same: regenerate again for a different one (a temperature above 0 on the "
                "Parameters tab varies them).")
        pick = gr.update(interactive=True)
        return ({**alternatives, "replies": replies}, gr.update(visible=True), earlier, newer, pick, pick, note)

    def pick(self, newer_is_better: bool, alternatives, name):
        """Write the pair: the better of the two shown replies chosen, the other rejected."""
        if not alternatives or len(alternatives["replies"]) < 2:
            return "Regenerate a reply first: there is nothing to compare.", gr.update(), gr.update(), gr.update()
        earlier, newer = alternatives["replies"][-2:]
        chosen, rejected = (newer, earlier) if newer_is_better else (earlier, newer)
        try:
            path = append_pair(self.folder, name, alternatives["prompt"], chosen, rejected)
        except LoraDeckError as e:
            return ui_message(e), gr.update(), gr.update(), gr.update()
        which = "the new one" if newer_is_better else "the earlier one"
        done = gr.update(interactive=False)  # one pair per comparison; the next regenerate asks again
        return f"Kept: {which} is better — a pair added to `{path.name}`.", done, done, self.describe(name)

    def forget(self):
        return None, gr.update(visible=False)

    # -- single ratings -------------------------------------------------------------------------------
    def rate(self, history, system, name, data: gr.LikeData):
        """👍/👎 on a reply: the chat up to it is the prompt."""
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        if data.liked not in (True, False):  # the thumb clicked again: taken back in the page
            return ("Rating taken back in the chat; what was written stays in the file (the file is only ever "
                    "appended to)."), gr.update()
        msgs = to_messages(list(history or [])[: index + 1], system)
        if not msgs or msgs[-1]["role"] != "assistant":
            return "Only the model's replies can be rated.", gr.update()
        reply = msgs.pop()
        try:
            path = append_rating(self.folder, name, msgs, reply["content"], data.liked)
        except LoraDeckError as e:
            return ui_message(e), gr.update()
        return f"Rated {'good' if data.liked else 'bad'}: added to `{path.name}`.", self.describe(name)

    # -- wiring ---------------------------------------------------------------------------------------
    def wire(self, chatbot: gr.Chatbot, system: gr.Textbox) -> None:
        chatbot.like(self.rate, inputs=[chatbot, system, self.name], outputs=[self.status, self.counts])
        pick_outputs = [self.pair_status, self.pick_earlier, self.pick_newer, self.counts]
        self.pick_earlier.click(lambda alts, name: self.pick(False, alts, name), inputs=[self.alternatives, self.name],
                                outputs=pick_outputs)
        self.pick_newer.click(lambda alts, name: self.pick(True, alts, name), inputs=[self.alternatives, self.name],
                              outputs=pick_outputs)
        for event in (self.name.change, self.name.submit):
            event(self.describe, inputs=self.name, outputs=self.counts, show_progress="hidden")

    @property
    def offer_outputs(self) -> list:
        return [self.alternatives, self.pair, self.earlier, self.newer, self.pick_earlier, self.pick_newer,
                self.pair_status]

    def send_to_training(self, tabs: gr.Tabs, path_box, format_box, method_box=None) -> None:
        """The "Train on these" button: open the Training tab with the set's files as its dataset, format
        `preference`, and (where the tab has a method control) dpo when there are pairs, else kto. Both files go
        in: dpo and orpo learn from the pairs (the Training tab says the ratings are left out), kto from both."""
        outputs = [self.status, tabs, path_box, format_box] + ([method_box] if method_box is not None else [])

        def go(name):
            unchanged = [gr.update()] * (len(outputs) - 1)
            try:
                pairs, ratings = counts(self.folder, name)
                files = [path for path, n in ((set_path(self.folder, name), pairs),
                                              (ratings_path(self.folder, name), ratings)) if n]
            except LoraDeckError as e:
                return [ui_message(e), *unchanged]
            if not files:
                return ["Nothing to train on yet: rate replies 👍/👎, or regenerate one and choose the better.",
                        *unchanged]
            # absolute: training runs in a child process with the app's folder as its working directory
            filled = [", ".join(str(path.resolve()) for path in files), gr.update(value="preference")]
            shown = " and ".join(f"`{path}`" for path in files)
            note = f"The Training tab has {shown} as its dataset (format preference"
            if method_box is not None:
                filled.append(gr.update(value="dpo" if pairs else "kto"))
                note += f", method {'dpo' if pairs else 'kto'}"
            return [note + "): name the adapter and start.", gr.Tabs(selected="training"), *filled]

        self.train.click(go, inputs=self.name, outputs=outputs)
