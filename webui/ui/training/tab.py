"""The Training tab: the options in groups (data with a preview, LoRA variant, optimisation, quantization,
checkpoints; the main ones shown, every other one a fold away), Start / Stop, live progress (step, ETA,
tokens/s), a loss chart (train and eval) and the run's log, the history of past runs with their curves
overlaid (webui.ui.training.history; smoothing and log scale apply to both charts), import/export of the YAML
config, and — when the run is done — one click to apply the new adapter in the chat (a hot-swap: the base is
not reloaded). Runs are child processes (webui.training.runner); a reloaded page re-attaches to the run that
is going on. The controls are built from the config dataclasses' fields, so a new option appears by itself
(in the group its section maps to).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import gradio as gr
import yaml
from transformers import AutoTokenizer

from webui.engine import Engine
from webui.errors import BadInput, LoraDeckError, ui_message
from webui.options.lora_options import yaml_hint
from webui.options.training import DatasetConfig, LoraTrainConfig, TrainConfig, TrainingParams
from webui.paths import child
from webui.training import preference
from webui.training.data import detect_format, load_files, warnings_for
from webui.training.data import preview as preview_samples
from webui.training.runner import TrainingRunner
from webui.training.trainer import resolve_base
from webui.ui import forms
from webui.ui.training.charts import LOSS, eta_text, live_curves
from webui.ui.training.history import EMPTY_TITLE, RunHistory, then_restyle
from webui.ui.training.live import LiveTry

EMBEDDED = "(embedded) SmolLM2-135M-Instruct"


def _names(cls, wanted=None) -> list[str]:
    """The fields of `cls` (those of `wanted` that exist, in its order): a field another change has not added
    yet is skipped, and one it adds lands in its section's group."""
    have = [f.name for f in dataclasses.fields(cls)]
    return have if wanted is None else [n for n in wanted if n in have]


def _rest(cls, *taken) -> list[str]:
    return [n for n in _names(cls) if not any(n in t for t in taken)]


# The groups. Every dataset field is a data option, every LoRA field a LoRA one; the training section is split
# by name, and whatever it gains later that is not named here is an optimisation option.
DATA_MAIN = ["path", "format", "eval_fraction"]
DATA_TRAINING = _names(TrainingParams, ["cutoff_len", "packing", "train_on_prompt"])
LORA_MAIN = ["r", "lora_alpha", "lora_dropout", "target_modules"]
LORA_VARIANT = _names(LoraTrainConfig, ["init_lora_weights", "use_rslora", "use_dora"])
QUANT = _names(TrainingParams, ["quantization", "precision"])  # how the base is held and computed
SAVING = _names(TrainingParams, ["save_steps", "eval_steps", "logging_steps", "seed"])
OPT_MAIN = ["epochs", "max_steps", "learning_rate", "batch_size"]
OPT_MORE = _rest(TrainingParams, OPT_MAIN, QUANT, DATA_TRAINING, SAVING)


FORM_KEY = "loradeck-training-form"
_KEEP_JS = f"(...values) => {{ localStorage.setItem('{FORM_KEY}', JSON.stringify(values)); return []; }}"
_RESTORE_JS = (f"(...values) => {{ let kept = null; try {{ kept = JSON.parse(localStorage.getItem('{FORM_KEY}')); }} "
               "catch (e) {} return Array.isArray(kept) && kept.length === values.length ? kept : values; }")


class TrainingTab:
    def __init__(self, engine: Engine, runner: TrainingRunner, user_dir: Path):
        self.engine, self.runner, self.user_dir = engine, runner, Path(user_dir)
        self.run_name = gr.State("")  # the run this page follows
        with gr.Row():
            self.output = gr.Textbox(label="adapter name", placeholder="my-lora", elem_id="train-output")
            self.base = gr.Dropdown([EMBEDDED, *engine.list_models()], value=EMBEDDED, label="base model",
                                    allow_custom_value=True, elem_id="train-base")
            self.method = forms.control(TrainConfig, "method", "train")
        with gr.Accordion("Quantization (QLoRA) and precision", open=True, elem_id="train-group-quantization"), \
                gr.Row():
            self.train = {n: forms.control(TrainingParams, n, "train-opt") for n in QUANT}
        with gr.Accordion("Data", open=True, elem_id="train-group-data"):
            with gr.Row():
                self.data = {n: forms.control(DatasetConfig, n, "train-data", value="" if n == "path" else None)
                             for n in DATA_MAIN}
                self.upload = gr.File(label="or upload a dataset", file_types=[".txt", ".json", ".jsonl"],
                                      type="filepath", elem_id="train-upload")  # Gradio's own height: 90 px cut its text
                self.train["cutoff_len"] = forms.control(TrainingParams, "cutoff_len", "train-opt")
            with gr.Accordion("more data options", open=False), gr.Row():
                self.data.update({n: forms.control(DatasetConfig, n, "train-data")
                                  for n in _rest(DatasetConfig, DATA_MAIN)})
                self.train.update({n: forms.control(TrainingParams, n, "train-opt")
                                   for n in DATA_TRAINING if n != "cutoff_len"})
            self.preview_go = gr.Button("Preview the first samples", size="sm", elem_id="train-preview-go")
            self.preview = gr.Textbox(label="as the model sees them (trained part in ⟦ ⟧)", lines=6, max_lines=14,
                                      interactive=False, elem_id="train-preview")
        with gr.Accordion("LoRA variant", open=True, elem_id="train-group-lora"):
            with gr.Row():
                self.lora = {n: forms.control(LoraTrainConfig, n, "train-lora") for n in LORA_MAIN + LORA_VARIANT}
            with gr.Accordion("more LoRA options", open=False), gr.Row():
                self.lora.update({n: forms.control(LoraTrainConfig, n, "train-lora")
                                  for n in _rest(LoraTrainConfig, LORA_MAIN, LORA_VARIANT)})
        with gr.Accordion("Optimisation", open=True, elem_id="train-group-optimisation"):
            with gr.Row():
                self.train.update({n: forms.control(TrainingParams, n, "train-opt") for n in OPT_MAIN})
            with gr.Accordion("more optimisation options", open=False), gr.Row():
                self.train.update({n: forms.control(TrainingParams, n, "train-opt") for n in OPT_MORE})
        with gr.Accordion("Checkpoints and logging", open=False, elem_id="train-group-saving"), gr.Row():
            self.train.update({n: forms.control(TrainingParams, n, "train-opt") for n in SAVING})
        with gr.Accordion("YAML config (import / export)", open=False):
            self.yaml = gr.Code(language="yaml", label="config", elem_id="train-yaml")
            with gr.Row():
                self.to_yaml = gr.Button("Show the form as YAML", size="sm")
                self.from_yaml = gr.Button("Fill the form from YAML", size="sm")
        with gr.Row():
            self.start = gr.Button("Start training", variant="primary", elem_id="train-start")
            self.stop = gr.Button("Stop (saves a checkpoint)", elem_id="train-stop")
            self.apply = gr.Button("Apply the trained adapter in the chat", elem_id="train-apply")
        self.notice = gr.Markdown(elem_id="train-notice")  # answers to clicks
        self.status = gr.Markdown(elem_id="train-status")  # live progress
        self.live = LiveTry(engine, self.run_name)
        with gr.Row():  # for both charts: this run's and the history's
            self.smoothing = gr.Slider(0.0, 0.99, value=0.0, step=0.01, label="smoothing",
                                       info="Exponential moving average, as TensorBoard's slider (0 = raw).",
                                       elem_id="train-smoothing")
            self.log_scale = gr.Checkbox(False, label="log scale (plots log10 of the loss)", elem_id="train-log-scale")
        self.chart = gr.LinePlot(live_curves(None), x="step", y=LOSS, color="series", label="loss", y_title=EMPTY_TITLE,
                                 elem_id="train-chart")
        self.log = gr.Textbox(label="log", lines=8, max_lines=8, interactive=False, elem_id="train-log")
        self.history = RunHistory(runner, self.smoothing, self.log_scale)
        with gr.Row():
            self.load_run = gr.Button("Load the first ticked run's settings into the form", size="sm",
                                      elem_id="train-history-load")
        self.timer = gr.Timer(1.0)
        self._wire()

    # -- form <-> config ----------------------------------------------------------------------------
    @property
    def inputs(self) -> list:
        return [self.output, self.base, self.method, *self.data.values(), *self.lora.values(), *self.train.values()]

    def config_from(self, values) -> TrainConfig:
        output, base, method, rest = values[0], values[1], values[2], list(values[3:])
        nd, nl = len(self.data), len(self.lora)
        data = forms.parse(DatasetConfig, list(self.data), rest[:nd])
        data["path"] = data["path"] or ""
        return TrainConfig.from_dict({
            "output": (output or "").strip(), "base_model": "" if base == EMBEDDED else (base or ""), "method": method,
            "dataset": data, "lora": forms.parse(LoraTrainConfig, list(self.lora), rest[nd:nd + nl]),
            "training": forms.parse(TrainingParams, list(self.train), rest[nd + nl:])})

    def form_from(self, cfg: TrainConfig) -> list:
        ups = [gr.update(value=cfg.output), gr.update(value=cfg.base_model or EMBEDDED), gr.update(value=cfg.method)]
        ups += [forms.update(DatasetConfig, n, getattr(cfg.dataset, n)) for n in self.data]
        ups += [forms.update(LoraTrainConfig, n, getattr(cfg.lora, n)) for n in self.lora]
        ups += [forms.update(TrainingParams, n, getattr(cfg.training, n)) for n in self.train]
        return ups

    # -- progress -------------------------------------------------------------------------------------
    def progress(self, name: str, smoothing: float = 0.0):
        if not name:
            return "No training run yet.", live_curves(None), ""
        v = self.runner.view(name)
        losses = [m for m in v.metrics if "loss" in m]
        parts = [f"**{name}** · {v.state}", f"step {v.step}/{v.max_steps or '?'}"]
        if eta_text(v.eta_s):
            parts.append(eta_text(v.eta_s))
        if losses:
            parts.append(f"loss {losses[-1]['loss']:.4f}")
            if losses[-1].get("tokens_per_s"):
                parts.append(f"{losses[-1]['tokens_per_s']:.0f} tokens/s")
        evals = [m for m in v.metrics if "eval_loss" in m]
        if evals:
            parts.append(f"eval loss {evals[-1]['eval_loss']:.4f}")
        margins = [m for m in v.metrics if "margin" in m]
        if margins:  # a preference run: how far the chosen replies lead the rejected ones
            parts.append(f"margin {margins[-1]['margin']:+.3f} · accuracy {margins[-1].get('accuracy', 0):.0%}")
        text = " · ".join(parts) + (f"\n\n{v.message}" if v.message else "")
        return text, live_curves(v.metrics, smoothing or 0.0), v.log_tail

    def _wire(self) -> None:
        def start(*values):
            try:
                cfg = self.config_from(values)
                if cfg.output in self.engine.active_adapters:
                    raise BadInput(f"{cfg.output} is in use in the chat; remove it there or pick another name")
                self.runner.start(cfg)
            except LoraDeckError as e:
                return gr.update(), ui_message(e)
            return cfg.output, f"Started **{cfg.output}**…"

        def stop(name):
            if not name:
                return "Nothing to stop."
            view = self.runner.view(name)
            if view.state == "stopping":  # asked twice: the user will not wait for the step to end
                self.runner.kill(name)
                return f"Killed **{name}** without saving: {self.runner.view(name).message}."
            if view.state not in ("starting", "running"):
                return f"**{name}** is not running ({view.state})."
            self.runner.stop(name, timeout=0)
            return (f"Stopping **{name}**: it saves a checkpoint at the end of the current step, and the status line "
                    "says so when it has (click Stop again to kill it now, without saving).")

        def preview(*values, progress=gr.Progress()):
            try:
                # a preview needs no adapter name yet: the output name only names the run
                cfg = self.config_from([values[0] or "preview", *values[1:]])
                base, _ = resolve_base(cfg.base_model, self.engine.models_dir,
                                       lambda f, msg: progress(f if f is not None else 0, desc=msg))
                tok = AutoTokenizer.from_pretrained(str(base))
                if cfg.method != "sft":  # preference rows: each reply after its prompt, chosen then rejected
                    rows, note = preference.load(cfg.dataset.paths, cfg.method)
                    preference.check_lengths(rows, tok, cfg.training.cutoff_len)
                    shown = preference.preview_samples(tok, rows, cfg.training.cutoff_len)
                    return (f"{len(rows)} rows for {cfg.method}." + (f"\n⚠️ {note}" if note else "")
                            + f"\n\n{preview_samples(tok, shown, n=len(shown))}")
                samples = load_files(cfg.dataset.paths, cfg.dataset.format, tok, cfg.training.cutoff_len,
                                     cfg.dataset.overlap, cfg.dataset.train_on_prompt)
            except LoraDeckError as e:
                return ui_message(e)
            notes = "".join(f"⚠️ {n}\n" for n in warnings_for(samples, cfg.training.cutoff_len))
            return f"{len(samples)} samples.\n{notes}\n{preview_samples(tok, samples)}"

        def detected(path):
            """The format the file shows (a chat .jsonl is chat, not the default raw), else the form's as it is."""
            found = detect_format(Path((path or "").split(",")[0].strip())) if path else None
            return gr.update(value=found) if found else gr.update()

        def upload(path):
            if not path:
                return gr.update(), gr.update()
            folder = self.user_dir / "datasets"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                target = child(folder, Path(path).name, "uploaded file")  # not through a link out of the folder
            except LoraDeckError as e:
                raise gr.Error(ui_message(e)) from None
            shutil.copy(path, target)
            return str(target), detected(str(target))

        def method_for(fmt, method):
            """Preference data goes with a preference method (DPO first), other data with sft."""
            if fmt == "preference" and method == "sft":
                return "dpo"
            return "sft" if fmt != "preference" and method != "sft" else gr.update()

        def to_yaml(*values):
            try:
                return yaml.safe_dump(self.config_from(values).to_dict(), sort_keys=False)
            except LoraDeckError as e:
                return f"# {ui_message(e)}"

        def from_yaml(text):
            try:
                cfg = TrainConfig.from_dict(yaml.safe_load(text or ""))
            except (LoraDeckError, yaml.YAMLError) as e:
                return [gr.update()] * len(self.inputs) + [ui_message(e) + yaml_hint(e)]
            return self.form_from(cfg) + ["Form filled from the YAML."]

        def apply(name):
            v = self.runner.view(name) if name else None
            if not v or v.state != "done":
                return "⚠️ no finished run to apply yet"
            try:
                active = self.engine.set_adapters({name: 1.0})
            except LoraDeckError as e:
                return ui_message(e)
            return f"**{name}** is answering in the Chat tab now ({', '.join(active)})."

        def load_run(picked):
            name = (picked or [None])[0]
            if not name:
                return [gr.update()] * len(self.inputs) + ["Tick a run in the history first."]
            run = self.runner.runs_dir / name
            source = next((f for f in (run / "config.yaml", run / "requested.yaml") if f.is_file()), None)
            try:
                cfg = TrainConfig.from_dict(yaml.safe_load(source.read_text()) if source else None)
            except (LoraDeckError, yaml.YAMLError, OSError) as e:
                return [gr.update()] * len(self.inputs) + [f"{name}: its settings cannot be read ({e})"]
            return self.form_from(cfg) + [f"Form filled with the settings of **{name}**: Start resumes it from its "
                                          "last checkpoint, or give another output name for a new run."]

        def attach(current):
            return current or self.runner.active() or (self.runner.runs() or [""])[0]

        self.start.click(start, inputs=self.inputs, outputs=[self.run_name, self.notice])
        # the form as this browser left it, kept across reloads in the browser's localStorage (never on the server),
        # by small client-side functions: gr.BrowserState came back empty at page load here (Gradio 6)
        keep = {"fn": None, "inputs": self.inputs, "outputs": None, "js": _KEEP_JS, "show_progress": "hidden"}
        for control in self.inputs:  # each edit by the user
            control.input(**keep)
        self.load_run.click(load_run, inputs=self.history.pick, outputs=[*self.inputs, self.notice]).then(**keep)
        self.stop.click(stop, inputs=self.run_name, outputs=self.notice)
        self.preview_go.click(preview, inputs=self.inputs, outputs=self.preview)
        self.upload.upload(upload, inputs=self.upload, outputs=[self.data["path"], self.data["format"]]).then(**keep)
        for event in (self.data["path"].blur, self.data["path"].submit):
            event(detected, inputs=self.data["path"], outputs=self.data["format"], show_progress="hidden")
        self.data["format"].change(method_for, inputs=[self.data["format"], self.method], outputs=self.method,
                                   show_progress="hidden").then(**keep)
        self.to_yaml.click(to_yaml, inputs=self.inputs, outputs=self.yaml)
        self.from_yaml.click(from_yaml, inputs=self.yaml, outputs=[*self.inputs, self.notice]).then(**keep)
        self.apply.click(apply, inputs=self.run_name, outputs=self.notice)
        progress_io = {"inputs": [self.run_name, self.smoothing],
                       "outputs": [self.status, self.chart, self.log]}
        for event in (self.timer.tick, self.smoothing.change, self.log_scale.change):
            then_restyle(event(self.progress, **progress_io), self.chart, self.log_scale)
        self._progress_io = progress_io
        self._attach = attach

    def on_load(self, demo: gr.Blocks) -> None:
        # the form this browser left (see _KEEP_JS); the form as built when nothing was kept or the form changed
        demo.load(None, inputs=self.inputs, outputs=self.inputs, js=_RESTORE_JS)
        # the status line and chart at once, not at the timer's first tick
        then_restyle(demo.load(self._attach, inputs=self.run_name, outputs=self.run_name).then(
            self.progress, **self._progress_io), self.chart, self.log_scale)
        self.history.on_load(demo)
