"""The LoRA panel's adapter list, built to stay instant with hundreds of adapters, and the library's management.

The list is drawn from a cheap scan of the loras folder (webui.adapters.library: names, sizes, dates, config
fields, notes and tags; no tensor read), so it appears at once; each row's compatibility badge starts as
"checking…" and fills in as the background worker (webui.adapters.report_cache) delivers reports, through
a Timer that runs only while some shown row is still pending. Search (name, tags, notes), filters (base,
status) and sort narrow the list; at most `PAGE` rows are drawn at a time ("show more" draws the next
ones), since drawing a few hundred sliders is what a browser finds slow.

The "Manage the library" area renames, duplicates, deletes into the trash and restores, and edits notes and
tags; renaming or deleting an adapter the loaded model is using is refused with the reason (the Engine).
"""
from __future__ import annotations

import datetime
import html
import re

import gradio as gr

from webui.adapters import library
from webui.adapters.inspect import Report
from webui.adapters.report_cache import ReportService, status_of
from webui.adapters.surgery.runtimes import runtime_line
from webui.engine import Engine
from webui.errors import BadInput, LoraDeckError, ui_message
from webui.ui.messages import PanelMessages

PAGE = 25  # rows drawn at once: a browser draws 25 rows of sliders in a fraction of a second
ANY = "(any)"
BADGES = {"ok": '<b style="color:#15803d">● ok</b>', "warnings": '<b style="color:#b45309">● warnings</b>',
          "incompatible": '<b style="color:#b91c1c">● incompatible</b>',
          "pending": '<b style="color:#6b7280">◌ checking…</b>'}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def badge(entry: library.Entry, record: dict | None) -> str:
    """The row's HTML: status, rank/alpha, targets, size, tags and notes (reasons once known), and the full report
    in a <details> element (one component per row instead of an accordion and a Markdown: fewer to draw)."""
    facts = [f"r={entry.rank} α={entry.alpha:g}" if entry.rank else entry.kind,
             ", ".join(entry.targets[:6]) + (" …" if len(entry.targets) > 6 else ""), f"{entry.size / 1e6:.2f} MB"]
    line = " · ".join(html.escape(f) for f in facts if f)
    if entry.tags:
        line += " · " + " ".join(f"<code>#{html.escape(t)}</code>" for t in entry.tags)
    if record is None:
        head, more = BADGES["pending"], "The compatibility report is being computed…"
    elif record.get("error"):
        head = f"{BADGES['incompatible']} (broken) — {html.escape(record['error'])}"
        more = record["error"]
    else:
        r = record["report"]
        head = BADGES[r["verdict"]]
        why = r["reasons"][:1] if r["verdict"] == "incompatible" else r["warnings"][:1]
        line += "".join(f" — {html.escape(w)}" for w in why)
        more = Report(**r).text()
        runs, where = runtime_line(r["path"])  # the serving runtimes it runs on as it stands (inspect --target)
        line, more = line + (f" — {html.escape(runs)}" if runs else ""), "\n\n".join(filter(None, [more, where]))
    notes = f"<br><small>{html.escape(entry.notes.splitlines()[0][:200])}</small>" if entry.notes else ""
    return (f"<div>{head} · {line}{notes}<details><summary>details</summary>"
            f"<pre style='white-space:pre-wrap'>{html.escape(more)}</pre></details></div>")


def count_line(shown: int, matching: int, total: int, pending: int) -> str:
    """'3 of 3 adapters · compatibility checked': the badges' state (the reports), never the ticks."""
    return (f"{matching} of {total} adapters" + (f" · showing {shown}" if shown < matching else "")
            + (f" · checking compatibility of {pending}" if pending else " · compatibility checked"))


class LoraList:
    """Filters, the list and the management area of the LoRA panel. Whoever changes the folder or the active
    stack from the page follows it with `.then(**redraw)`. Built in two steps so the panel's buttons and their
    message sit between the filters and the rows: `LoraList(...)` draws the filters, `rows(message)` the rows,
    whose ticks and weights answer in `message`."""

    def __init__(self, engine: Engine, messages: PanelMessages):
        self.engine, self.messages = engine, messages
        self.version = gr.State(0)  # bumped to redraw the list
        # What the page was last drawn from (a callable value: taken when the page loads). The panel's watch
        # redraws when the server's state differs: a change made elsewhere (another tab, the API, a finished run).
        # A change made on this page records the state it leaves, so the watch does not redraw the rows after it:
        # a redraw replaces every row's event handlers, and a click or an Enter already on its way to the old
        # rows then fails in Gradio (KeyError on its fn_index: a red "Error", the adapter not applied).
        self.seen = gr.State(lambda: self.state())  # (a bound method cannot be deep-copied, as State does)
        # `.then(**redraw)` after any action that changes the list: redraw it once, and record what it shows
        self.redraw = {"fn": lambda v: (self.state(), v + 1), "inputs": self.version,
                       "outputs": [self.seen, self.version], "show_progress": "hidden"}
        self.reports = ReportService(engine.loras_dir, engine.adapter_report, engine.base_key)
        with gr.Row():
            self.search = gr.Textbox(label="search", placeholder="name, tag or note words", elem_id="lora-search",
                                     scale=3, max_lines=1)
            self.base = gr.Dropdown(self.bases(), value=ANY, label="trained on", elem_id="lora-filter-base", scale=2,
                                    allow_custom_value=True)
            self.status = gr.Dropdown([ANY, *library.STATUSES], value=ANY, label="status",
                                      elem_id="lora-filter-status", scale=1)
            self.sort = gr.Dropdown(list(library.SORTS), value="name", label="sort", elem_id="lora-sort", scale=1,
                                    info="date, rank, size: largest first")
        self.limit = gr.State(PAGE)

    def rows(self, message: gr.Markdown) -> None:
        """The count line and the rows (redrawn on a filter change or `version` bump); ticks answer in `message`."""
        self.message = message

        @gr.render(inputs=[self.version, self.search, self.base, self.status, self.sort, self.limit],
                   show_progress="hidden")
        def adapter_list(_version, search, base, status, sort, limit):
            self._render(search, base, status, sort, limit)

    # -- the list ---------------------------------------------------------------------------------------
    def _render(self, search, base, status, sort, limit) -> None:
        entries = library.scan(self.engine.loras_dir)
        live = self._live()
        if not entries and not live:
            gr.Markdown(f"No adapters in `{self.engine.loras_dir}` yet: put PEFT adapter folders there, "
                        "or get one below.", elem_id="lora-list-empty")
            return
        records = self.reports.lookup(entries)
        statuses = {n: status_of(r) for n, r in records.items()}
        rows = library.select(entries, search, "" if base in (None, ANY) else base,
                              "" if status in (None, ANY) else status, sort or "name", statuses)
        shown = rows[:limit]
        pending = sum(s == "pending" for s in statuses.values())
        count = gr.Markdown(count_line(len(shown), len(rows), len(entries), pending), elem_id="lora-count")
        active = self.engine.active_adapters
        names = [e.name for e in shown]
        boxes, sliders, badges = [], [], []
        for e in shown:
            row, (box, slider) = self._row(e.name, active)
            with row:
                badges.append(gr.HTML(badge(e, records[e.name]), elem_id=f"lora-badge-{slug(e.name)}", scale=5,
                                      padding=False, elem_classes="lora-badge"))
            boxes.append(box)
            sliders.append(slider)
        if len(shown) < len(rows):
            more = gr.Button(f"Show {min(PAGE, len(rows) - len(shown))} more", size="sm", elem_id="lora-more")
            more.click(lambda n: n + PAGE, self.limit, self.limit)
        if live:  # the checkpoints of running training runs (webui.training.live): usable like any adapter
            gr.Markdown("**Live checkpoints** of running training runs: `RUN@latest` follows each new save (each "
                        "`RUN@step-N` is in the API and compare mode)", elem_id="lora-live")
            for name in live:
                row, (box, slider) = self._row(name, active)
                with row:
                    gr.HTML(self._live_badge(name), elem_id=f"lora-badge-{slug(name)}", scale=5, padding=False,
                            elem_classes="lora-badge")
                boxes.append(box)
                sliders.append(slider)
        every = names + live

        def apply(*values):
            n = len(every)
            # rows filtered out of view keep their state: only the shown rows are read from the page
            wanted = {k: v for k, v in self.engine.active_adapters.items() if k not in every}
            wanted.update({nm: float(w) for nm, on, w in zip(every, values[:n], values[n:]) if on})
            try:
                now = self.engine.set_adapters(wanted)
                msg = "Active: " + (", ".join(f"**{k}** × {v:g}" for k, v in now.items()) or "none (plain base)")
            except LoraDeckError as err:
                now = self.engine.active_adapters
                msg = ui_message(err)
            # the other messages of the panel answered earlier clicks: cleared, as every action clears them
            return [msg, self.state(), *[""] * len(others), *[gr.update(value=nm in now) for nm in every]]

        others = self.messages.others(self.message)
        io = {"inputs": [*boxes, *sliders], "outputs": [self.message, self.seen, *others, *boxes]}
        for box in boxes:
            box.input(apply, **io)
        for slider in sliders:
            slider.input(apply, **io)

        if pending:
            # Fill the badges in as reports arrive: each tick sends only the rows whose report is new, and the
            # timer switches itself off once every adapter in the folder has one.
            timer = gr.Timer(1.0)
            filled = gr.State([nm for nm in names if records[nm] is not None])

            def arrived(done):
                now = library.scan(self.engine.loras_dir)
                got = self.reports.lookup(now)
                by_name = {e.name: e for e in now}
                left = sum(r is None for r in got.values())
                fresh = [nm for nm in names if nm not in done and got.get(nm) is not None]
                updates = [gr.update(value=badge(by_name[nm], got[nm])) if nm in fresh else gr.skip() for nm in names]
                return [gr.Timer(active=left > 0), done + fresh,
                        count_line(len(shown), len(rows), len(now), left), *updates]

            timer.tick(arrived, inputs=filled, outputs=[timer, filled, count, *badges], show_progress="hidden")

    def _row(self, name: str, active: dict):
        """An adapter's row, its tick box and weight slider: (the row, to add the badge in; (box, slider))."""
        row = gr.Row(equal_height=True, elem_classes="lora-row")
        with row:
            box = gr.Checkbox(value=name in active, label=name, elem_id=f"lora-on-{slug(name)}", key=f"on-{name}",
                              scale=2, min_width=120, interactive=True)
            slider = gr.Slider(-2.0, 2.0, value=active.get(name, 1.0), step=0.05, label="weight", interactive=True,
                               elem_id=f"lora-weight-{slug(name)}", key=f"w-{name}", scale=3)
        return row, (box, slider)

    def _live(self) -> list[str]:
        """`RUN@latest` of each running run: one row per run, which does not move while the run saves (a row per
        step would redraw the panel at every save, under the user's pointer)."""
        return [n for n in self.engine.live_adapters() if n.endswith("@latest")]

    def _live_badge(self, name: str) -> str:
        """A live checkpoint's line: its compatibility with the loaded base (the reason when it does not fit)."""
        try:
            path = self.engine.adapter_path(name)
            report = self.engine.adapter_report(name, path)
        except LoraDeckError as e:
            return f"{BADGES['incompatible']} — {html.escape(ui_message(e))}"
        why = report.reasons[:1] if report.verdict == "incompatible" else report.warnings[:1]
        return BADGES[report.verdict] + "".join(f" — {html.escape(w)}" for w in why) + f" · {html.escape(str(path))}"

    def state(self) -> str:
        """Changes when the rows would look different: the list, the active stack, merged or not."""
        return f"{self.signature()}|{self.engine.active_adapters}|{self.engine.merged}"

    def watch(self, seen, version):
        """Redraw the rows only when the server's state is not what this page last drew or did itself. Not while the
        model works: a request's own adapters (the API, compare mode, an evaluation) are active for a moment then,
        and redrawing for them would replace the rows under the user's next click for nothing."""
        if self.engine.in_use:
            return gr.update(), gr.update()
        now = self.state()
        return (gr.update(), gr.update()) if now == seen else (now, version + 1)

    def signature(self) -> str:
        """Changes when the list would look different (adapters, their files, notes, tags, the live checkpoints of
        running runs)."""
        return "|".join([*(f"{e.name}:{e.signature}:{e.notes}:{e.tags}" for e in library.scan(self.engine.loras_dir)),
                         *self._live()])

    def bases(self) -> list[str]:
        return [ANY, *sorted({e.base for e in library.scan(self.engine.loras_dir) if e.base})]

    # -- managing the library ---------------------------------------------------------------------------
    def manage_area(self) -> None:
        with gr.Accordion("Manage the library: rename, duplicate, delete, notes and tags", open=False):
            with gr.Row():
                self.pick = gr.Dropdown(self.engine.list_adapters(), value=None, label="adapter",
                                        elem_id="lora-pick", scale=3)
                self.new_name = gr.Textbox(label="new name (rename / duplicate)", elem_id="lora-new-name", scale=3)
            with gr.Row():
                self.rename = gr.Button("Rename", size="sm", elem_id="lora-rename")
                self.duplicate = gr.Button("Duplicate", size="sm", elem_id="lora-duplicate")
                self.delete = gr.Button("Delete (to the trash)", size="sm", variant="stop", elem_id="lora-delete")
            with gr.Row():
                self.notes = gr.Textbox(label="notes", lines=2, elem_id="lora-notes", scale=4)
                self.tags = gr.Textbox(label="tags", placeholder="style, chat, v2", elem_id="lora-tags", scale=2)
            self.save_meta = gr.Button("Save notes and tags", size="sm", elem_id="lora-save-meta")
            with gr.Row():
                self.trash_pick = gr.Dropdown(self._trash_choices(), value=None, label="trash",
                                              elem_id="lora-trash-pick", scale=4)
                self.restore = gr.Button("Restore", size="sm", elem_id="lora-restore", scale=1)
            self.manage_message = self.messages.add("lora-manage-message")
        self._wire_manage()

    def _trash_choices(self) -> list[tuple[str, str]]:
        return [(f"{t.name} (deleted {datetime.datetime.fromtimestamp(t.deleted):%Y-%m-%d %H:%M:%S})", t.id)
                for t in library.trash(self.engine.loras_dir)]

    def _wire_manage(self) -> None:
        d = self.engine.loras_dir

        def need(name):
            if not name:
                raise BadInput("pick an adapter first")
            return name

        def rename(name, new):
            with self.engine.adapter_released(need(name)):
                new = library.rename(d, name, (new or "").strip())
            return f"Renamed **{name}** to **{new}**."

        def duplicate(name, new):
            new = library.duplicate(d, need(name), (new or "").strip())
            return f"Copied **{name}** to **{new}**."

        def delete(name):
            with self.engine.adapter_released(need(name)):
                t = library.delete(d, name)
            return f"Moved **{name}** to the trash (`{d}/{library.TRASH}/{t.id}`): Restore brings it back."

        def restore(item):
            if not item:
                raise BadInput("pick an item of the trash first")
            return f"Restored **{library.restore(d, item)}**."

        def save_meta(name, notes, tags):
            library.set_notes(d, need(name), notes)
            tags = library.set_tags(d, name, tags)
            return f"Saved the notes and tags of **{name}**" + (f": {' '.join('#' + t for t in tags)}." if tags else ".")

        def show_meta(name):
            if not name:
                return "", ""
            try:
                e = library.get(d, name)
            except LoraDeckError:
                return "", ""
            return e.notes, ", ".join(e.tags)

        def choices(picked):  # after any change: the pickers and the base filter list what is there now
            names = self.engine.list_adapters()
            return (gr.update(choices=names, value=picked if picked in names else None),
                    gr.update(choices=self._trash_choices(), value=None),
                    gr.update(choices=self.bases()))

        for button, fn, inputs in ((self.rename, rename, [self.pick, self.new_name]),
                                   (self.duplicate, duplicate, [self.pick, self.new_name]),
                                   (self.delete, delete, [self.pick]), (self.restore, restore, [self.trash_pick]),
                                   (self.save_meta, save_meta, [self.pick, self.notes, self.tags])):
            self.messages.on(button, fn, inputs, self.manage_message, then=self.redraw)
        self.pick.change(show_meta, self.pick, [self.notes, self.tags])
        self.version.change(choices, inputs=self.pick, outputs=[self.pick, self.trash_pick, self.base], show_progress="hidden")
