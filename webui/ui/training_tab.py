"""The Training tab: a short form (base, dataset with a preview, the main LoRA and training options;
every other option one fold away), Start / Stop, live progress (step, ETA, tokens/s), a loss
chart (train and eval) and the run's log, import/export of the YAML config, and — when the run is done —
one click to apply the new adapter in the chat (a hot-swap: the base is not reloaded). Runs are child
processes (webui.training.runner); a reloaded page re-attaches to the run that is going on.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd
import yaml
from transformers import AutoTokenizer

from webui.config import DatasetConfig, LoraTrainConfig, TrainConfig, TrainingParams
from webui.engine import Engine
from webui.errors import BadInput, LoraDeckError, ui_message
from webui.training.data import load_files, warnings_for
from webui.training.data import preview as preview_samples
from webui.training.lora_options import yaml_hint
from webui.training.runner import TrainingRunner
from webui.training.trainer import resolve_base
from webui.ui import forms

EMBEDDED = "(embedded) SmolLM2-135M-Instruct"
LORA_MAIN = ["r", "lora_alpha", "lora_dropout", "target_modules"]
TRAIN_MAIN = ["epochs", "max_steps", "learning_rate", "cutoff_len"]
LORA_MORE = [f.name for f in dataclasses.fields(LoraTrainConfig) if f.name not in LORA_MAIN]
TRAIN_MORE = [f.name for f in dataclasses.fields(TrainingParams) if f.name not in TRAIN_MAIN]
DATA_FIELDS = ["path", "format", "eval_fraction", "overlap"]


def _chart(metrics: list[dict]):
    rows = [{"step": m["step"], "loss": m["loss"], "series": "train"} for m in metrics if "loss" in m]
    rows += [{"step": m["step"], "loss": m["eval_loss"], "series": "eval"} for m in metrics if "eval_loss" in m]
    if not rows:  # typed empty columns: an empty chart (a placeholder row of None was drawn as a "null" label)
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64"),
                             "series": pd.Series(dtype="object")})
    return pd.DataFrame(rows)


class TrainingTab:
    def __init__(self, engine: Engine, runner: TrainingRunner, user_dir: Path):
        self.engine, self.runner, self.user_dir = engine, runner, Path(user_dir)
        self.run_name = gr.State("")  # the run this page follows
        with gr.Row():
            self.output = gr.Textbox(label="adapter name", placeholder="my-lora", elem_id="train-output")
            self.base = gr.Dropdown([EMBEDDED, *engine.list_models()], value=EMBEDDED, label="base model",
                                    allow_custom_value=True, elem_id="train-base")
        with gr.Row():
            self.data = {n: forms.control(DatasetConfig, n, "train-data",
                                          value="" if n == "path" else None) for n in DATA_FIELDS}
            self.upload = gr.File(label="or upload a dataset", file_types=[".txt", ".json", ".jsonl"],
                                  type="filepath", elem_id="train-upload")  # Gradio's own height: 90 px cut its text
        self.preview_go = gr.Button("Preview the first samples", size="sm", elem_id="train-preview-go")
        self.preview = gr.Textbox(label="as the model sees them (trained part in ⟦ ⟧)", lines=6, max_lines=14,
                                  interactive=False, elem_id="train-preview")
        with gr.Row():
            self.lora = {n: forms.control(LoraTrainConfig, n, "train-lora") for n in LORA_MAIN}
        with gr.Row():
            self.train = {n: forms.control(TrainingParams, n, "train-opt") for n in TRAIN_MAIN}
        with gr.Accordion("More LoRA and training options", open=False):
            with gr.Row():
                self.lora.update({n: forms.control(LoraTrainConfig, n, "train-lora") for n in LORA_MORE})
            with gr.Row():
                self.train.update({n: forms.control(TrainingParams, n, "train-opt") for n in TRAIN_MORE})
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
        self.chart = gr.LinePlot(_chart([]), x="step", y="loss", color="series", label="loss", height=260,
                                 elem_id="train-chart")
        self.log = gr.Textbox(label="log", lines=8, max_lines=8, interactive=False, elem_id="train-log")
        self.timer = gr.Timer(1.0)
        self._wire()

    # -- form <-> config ----------------------------------------------------------------------------
    @property
    def inputs(self) -> list:
        return [self.output, self.base, *self.data.values(), *self.lora.values(), *self.train.values()]

    def config_from(self, values) -> TrainConfig:
        output, base, rest = values[0], values[1], list(values[2:])
        nd, nl = len(self.data), len(self.lora)
        data = forms.parse(DatasetConfig, list(self.data), rest[:nd])
        data["path"] = data["path"] or ""
        return TrainConfig.from_dict({
            "output": (output or "").strip(), "base_model": "" if base == EMBEDDED else (base or ""),
            "dataset": data, "lora": forms.parse(LoraTrainConfig, list(self.lora), rest[nd:nd + nl]),
            "training": forms.parse(TrainingParams, list(self.train), rest[nd + nl:])})

    def form_from(self, cfg: TrainConfig) -> list:
        ups = [gr.update(value=cfg.output), gr.update(value=cfg.base_model or EMBEDDED)]
        ups += [forms.update(DatasetConfig, n, getattr(cfg.dataset, n)) for n in self.data]
        ups += [forms.update(LoraTrainConfig, n, getattr(cfg.lora, n)) for n in self.lora]
        ups += [forms.update(TrainingParams, n, getattr(cfg.training, n)) for n in self.train]
        return ups

    # -- progress -------------------------------------------------------------------------------------
    def progress(self, name: str):
        if not name:
            return "No training run yet.", _chart([]), ""
        v = self.runner.view(name)
        losses = [m for m in v.metrics if "loss" in m]
        parts = [f"**{name}** · {v.state}", f"step {v.step}/{v.max_steps or '?'}"]
        if v.eta_s is not None:
            parts.append(f"ETA {v.eta_s:.0f} s")
        if losses:
            parts.append(f"loss {losses[-1]['loss']:.4f}")
            if losses[-1].get("tokens_per_s"):
                parts.append(f"{losses[-1]['tokens_per_s']:.0f} tokens/s")
        evals = [m for m in v.metrics if "eval_loss" in m]
        if evals:
            parts.append(f"eval loss {evals[-1]['eval_loss']:.4f}")
        text = " · ".join(parts) + (f"\n\n{v.message}" if v.message else "")
        return text, _chart(v.metrics), v.log_tail

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
            self.runner.stop(name)
            return f"Stopped **{name}** (checkpoint saved): Start again with the same name to resume."

        def preview(*values):
            try:
                cfg = self.config_from(values)
                base, _ = resolve_base(cfg.base_model, self.engine.models_dir)
                tok = AutoTokenizer.from_pretrained(str(base))
                samples = load_files(cfg.dataset.paths, cfg.dataset.format, tok, cfg.training.cutoff_len,
                                     cfg.dataset.overlap)
            except LoraDeckError as e:
                return ui_message(e)
            notes = "".join(f"⚠️ {n}\n" for n in warnings_for(samples, cfg.training.cutoff_len))
            return f"{len(samples)} samples.\n{notes}\n{preview_samples(tok, samples)}"

        def upload(path):
            if not path:
                return gr.update()
            folder = self.user_dir / "datasets"
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / Path(path).name
            shutil.copy(path, target)
            return str(target)

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

        def attach(current):
            return current or self.runner.active() or (self.runner.runs() or [""])[0]

        self.start.click(start, inputs=self.inputs, outputs=[self.run_name, self.notice])
        self.stop.click(stop, inputs=self.run_name, outputs=self.notice)
        self.preview_go.click(preview, inputs=self.inputs, outputs=self.preview)
        self.upload.upload(upload, inputs=self.upload, outputs=self.data["path"])
        self.to_yaml.click(to_yaml, inputs=self.inputs, outputs=self.yaml)
        self.from_yaml.click(from_yaml, inputs=self.yaml, outputs=[*self.inputs, self.notice])
        self.apply.click(apply, inputs=self.run_name, outputs=self.notice)
        self.timer.tick(self.progress, inputs=self.run_name, outputs=[self.status, self.chart, self.log])
        self._attach = attach

    def on_load(self, demo: gr.Blocks) -> None:
        demo.load(self._attach, inputs=self.run_name, outputs=self.run_name)
