"""The Evaluate tab: measure the model loaded on the Model tab alone and with each chosen adapter or weighted
stack on a dataset (training's formats and loss masking), optionally answer a list of prompts with each of them
side by side, and show the results table and the perplexity chart with links to the report files (a
self-contained HTML page and its JSON, kept in user_data/evals/). The run is webui.evaluate.run in a thread of
its own; the page polls its progress, and Stop cancels it between batches (nothing is written then).
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import gradio as gr

from webui.engine import Engine
from webui.errors import LoraDeckError, ui_message
from webui.evaluate import page
from webui.evaluate.run import evaluate, write_report
from webui.options.config import EvalConfig
from webui.paths import child
from webui.ui import forms

OPTIONS = ["general", "max_samples", "max_new_tokens", "cutoff_len", "overlap", "prompt_format", "batch_size",
           "bootstrap", "seed"]


class EvalJob:
    """One evaluation running in a thread; the tab reads `fraction`, `message` and, once `finished` is set,
    `report` (None when stopped), `files` or `error`."""

    def __init__(self, engine: Engine, cfg: EvalConfig):
        self.engine, self.cfg = engine, cfg
        self.cancel, self.finished = threading.Event(), threading.Event()
        self.fraction, self.message = 0.0, "checking the adapters, the dataset and the prompts"
        self.report, self.files, self.error = None, [], None
        self.started = time.perf_counter()
        threading.Thread(target=self._run, name="evaluate", daemon=True).start()

    def _progress(self, fraction, message) -> None:
        self.fraction, self.message = fraction or self.fraction, message

    def _run(self) -> None:
        try:
            self.report = evaluate(self.engine, self.cfg, self._progress, self.cancel)
            if self.report is not None:
                self.files = write_report(self.report, Path(self.cfg.out))
        except Exception as e:  # shown in the tab (ui_message words errors outside the family too)
            self.error = e
        finally:
            self.finished.set()


def result_html(report: dict) -> str:
    return (page.results_table(report) + page.perplexity_chart(report) + page.sweep_chart(report)
            + "<p>Per-sample losses and the settings are in the HTML report below.</p>"
            + (page.generations_table(report) if report["generations"] else ""))


def _served_copies(files: list[Path]) -> list[str]:
    """Copies in the temp dir: Gradio serves files only from the working directory or the temp dir, and the user
    folder may be elsewhere."""
    folder = Path(tempfile.mkdtemp(prefix="loradeck-eval-"))
    return [str(shutil.copy(f, folder / f.name)) for f in files]


class EvaluateTab:
    def __init__(self, engine: Engine, user_dir: Path):
        self.engine, self.user_dir = engine, Path(user_dir)
        self.job: EvalJob | None = None  # one evaluation at a time: it holds the model between batches
        gr.Markdown("Measure the model loaded on the Model tab, alone and with each adapter or stack, on your own "
                    "data: loss and perplexity over the tokens training would learn (lower is better), the "
                    "difference to the base with a 95% interval, and answers to your prompts side by side.")
        with gr.Row():
            self.adapters = gr.CheckboxGroup(engine.adapter_choices(), label="adapters (each on its own, weight 1)",
                                             elem_id="eval-adapters", scale=4)
            self.refresh = gr.Button("↻", scale=0, min_width=40, elem_id="eval-refresh")
        with gr.Row():
            self.stacks = gr.Textbox(label="weighted stacks, one per line", placeholder="A=1, B=0.5", lines=2,
                                     elem_id="eval-stacks")
            self.sweeps = gr.Textbox(label="strength sweeps, one per line: an adapter or stack = scales",
                                     placeholder="A=0,0.25,0.5,0.75,1", lines=2, elem_id="eval-sweeps")
        with gr.Row():
            self.dataset = forms.control(EvalConfig, "dataset", "eval")
            self.format = forms.control(EvalConfig, "format", "eval")
            self.dataset_upload = gr.File(label="or upload a dataset", file_types=[".txt", ".json", ".jsonl"],
                                          type="filepath", height=90)
        with gr.Row():
            self.prompts = forms.control(EvalConfig, "prompts", "eval")
            self.prompts_upload = gr.File(label="or upload prompts", file_types=[".txt", ".json", ".jsonl"],
                                          type="filepath", height=90)
        with gr.Accordion("More options", open=False):
            with gr.Row():
                self.options = {n: forms.control(EvalConfig, n, "eval") for n in OPTIONS}
        with gr.Row():
            self.run = gr.Button("Run evaluation", variant="primary", elem_id="eval-run")
            self.stop = gr.Button("Stop", elem_id="eval-stop")
        self.status = gr.Markdown(elem_id="eval-status")
        self.result = gr.HTML(elem_id="eval-result")
        self.files = gr.File(label="report files (HTML page, JSON)", file_count="multiple", interactive=False,
                             elem_id="eval-files")
        self._wire()

    def config_from(self, adapters, stacks, sweeps, dataset, fmt, prompts, values) -> EvalConfig:
        out = self.user_dir / "evals" / datetime.now().strftime("%Y%m%d-%H%M%S-%f") / "report.html"
        return EvalConfig(dataset=(dataset or "").strip(), format=fmt, out=str(out), lora=list(adapters or []),
                          stack=[line for line in (stacks or "").splitlines() if line.strip()],
                          sweep=[line for line in (sweeps or "").splitlines() if line.strip()],
                          prompts=(prompts or "").strip(), **forms.parse(EvalConfig, OPTIONS, values))

    def _wire(self) -> None:
        def run(adapters, stacks, sweeps, dataset, fmt, prompts, *values):
            if self.job is not None and not self.job.finished.is_set():
                yield "⚠️ An evaluation is running already: wait for it or stop it.", gr.update(), gr.update()
                return
            try:
                cfg = self.config_from(adapters, stacks, sweeps, dataset, fmt, prompts, values)
            except LoraDeckError as e:
                yield ui_message(e), "", None
                return
            job = self.job = EvalJob(self.engine, cfg)
            while not job.finished.wait(0.5):
                yield f"⏳ {job.fraction:.0%} · {job.message}", gr.update(), gr.update()
            seconds = time.perf_counter() - job.started
            if job.error is not None:
                yield ui_message(job.error), "", None
            elif job.report is None:
                yield "⏹ Stopped: nothing was written.", "", None
            else:
                yield (f"✅ Done in {seconds:.1f} s: {job.report['dataset']['samples']} samples, "
                       f"{len(job.report['results'])} configurations. Report: `{job.files[0]}`",
                       result_html(job.report), _served_copies(job.files))

        def stop():
            if self.job is None or self.job.finished.is_set():
                return "Nothing is running."
            self.job.cancel.set()
            return "⏹ Stopping after the current batch…"

        def keep_upload(path):
            if not path:
                return gr.update()
            folder = self.user_dir / "evals" / "inputs"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                target = child(folder, Path(path).name, "uploaded file")  # not through a link out of the folder
            except LoraDeckError as e:
                raise gr.Error(ui_message(e)) from None
            return str(shutil.copy(path, target))

        inputs = [self.adapters, self.stacks, self.sweeps, self.dataset, self.format, self.prompts,
                  *self.options.values()]
        self.run.click(run, inputs=inputs, outputs=[self.status, self.result, self.files])
        self.stop.click(stop, outputs=self.status)
        self.refresh.click(lambda: gr.update(choices=self.engine.adapter_choices()), outputs=self.adapters)
        self.dataset_upload.upload(keep_upload, inputs=self.dataset_upload, outputs=self.dataset)
        self.prompts_upload.upload(keep_upload, inputs=self.prompts_upload, outputs=self.prompts)
