"""One LoRA training run on PEFT + transformers' Trainer (what `python -m webui train --config FILE.yaml`
runs, in its own process when started from the UI).

The run folder `runs/NAME/` holds the config, `metrics.jsonl` (one JSON object per logged step: step,
loss, eval_loss, learning_rate, tokens_per_s), `status.json` (state, step, max_steps, message) and
`checkpoints/checkpoint-N/` every `save_steps` (adapter weights + optimizer state). A `STOP` file asks
the run to save a checkpoint and stop; running the same output again resumes from the newest complete
checkpoint (also after kill -9). When the run ends, the adapter is written to `loras/NAME/` (atomically)
with its training config and the base model's id. A GPTQ base trains as QLoRA through GPTQModel's
trainable kernel with float32 activations; `training.quantization` trains as QLoRA on a base that bitsandbytes
quantizes while loading (the loader provides the model: Backend.training_model).

`method: dpo | orpo | kto` trains the same PEFT model on preference data with TRL's trainers
(webui/training/methods.py), through the same run folder, callbacks, stop and resume.

PiSSA and OLoRA initializations rewrite the base weights the adapter trains against; the adapter PEFT built at
the start is kept in the run folder (`initial-adapter/`) and the finished adapter is converted against it
(PEFT's `path_initial_model_for_weight_conversion`), so that it works on the original base (at twice the rank).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml
from peft import get_peft_model
from peft.optimizers import create_loraplus_optimizer
from transformers import (
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from webui.adapters.files import check_adapter_name
from webui.adapters.model_card import write_adapter_card
from webui.atomic import write_into_place
from webui.backends import embedded
from webui.backends.models import resolve_model_path
from webui.backends.registry import backend_class, detect
from webui.errors import BadInput, NotFound, Unsupported, first_line
from webui.options import lora_options
from webui.options.training import TrainConfig
from webui.training import chunked_loss, methods, packing, precision, preference
from webui.training.data import load_files, split, warnings_for
from webui.training.run_folder import CONFIG, METRICS, STOP, latest_checkpoint, pid_fields, read_status, write_status


def resolve_base(base_model: str, models_dir: Path, progress=None) -> tuple[Path, str]:
    """(folder, id to record in the adapter) for the config's base_model; `progress` hears about the embedded
    model's one-time conversion to a transformers folder (tens of seconds on a CPU)."""
    if not base_model:
        return embedded.ensure_transformers_folder(models_dir, progress), f"HuggingFaceTB/{embedded.NAME}"
    try:
        path = resolve_model_path(base_model, models_dir)
    except NotFound:
        if "/" in base_model and (models_dir / base_model.replace("/", "_")).is_dir():  # a downloaded hub id
            return models_dir / base_model.replace("/", "_"), base_model
        raise
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise BadInput(f"base_model {base_model}: training needs a transformers or GPTQ model folder")
    return path, base_model


INITIAL_ADAPTER = "initial-adapter"  # PiSSA/OLoRA: the adapter as initialized, for the conversion when saving


def _load_model(path: Path, quantization: str = "none", precision_name: str = "auto"):
    """The base to train on, as the loader that claims it provides one (a GPTQ folder: QLoRA on GPTQModel's
    trainable kernel; `quantization`: QLoRA on bitsandbytes), on CUDA when present; and its tokenizer."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cuda = torch.cuda.is_available()
    dtype = precision.resolve(precision_name).dtype  # training.precision (auto: bf16 where the hardware has it)
    loader = backend_class(detect(path))
    return loader, loader.training_model(path, "cuda" if cuda else "cpu", dtype, quantization), tok


def prepare(cfg: TrainConfig, models_dir: Path, loras_dir: Path, runs_dir: Path):
    """Everything that can fail fast, before any training: output name, base, dataset. Returns
    (run_dir, base_path, base_id, tokenizer-free sample loader) or raises BadInput."""
    try:
        check_adapter_name(cfg.output, loras_dir)
    except BadInput as e:
        raise BadInput(f"output: {e}") from None
    run_dir = runs_dir / cfg.output
    resuming = run_dir.is_dir() and (run_dir / CONFIG).is_file()
    if (loras_dir / cfg.output).exists() and not resuming:
        raise BadInput(f"output: an adapter named {cfg.output!r} already exists in {loras_dir}; "
                            "pick another name (re-running a run of ours resumes it)")
    if resuming:
        previous = TrainConfig.from_dict(yaml.safe_load((run_dir / CONFIG).read_text()))
        if previous.lora != cfg.lora or previous.base_model != cfg.base_model or previous.method != cfg.method:
            raise BadInput(f"runs/{cfg.output} holds a run with other LoRA settings, base or method; "
                                "pick another output name or delete that run folder")
    if cfg.lora.rewrites_base and cfg.training.quantization != "none":
        raise BadInput(f"lora.init_lora_weights {cfg.lora.init_lora_weights} rewrites the base weights, which "
                       f"training.quantization {cfg.training.quantization} keeps quantized and frozen; use "
                       "init_lora_weights true (or gaussian / orthogonal) for QLoRA")
    precision.resolve(cfg.training.precision)  # refuse now a precision this machine cannot run
    base_path, base_id = resolve_base(cfg.base_model, models_dir)
    return run_dir, base_path, base_id


def _any_rank(flag: bool) -> bool:
    """`flag` from every process of a multi-process run OR-ed, so that all of them act on it together (a rank
    that stopped alone would leave the others waiting in the next all-reduce)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _callback(run_dir: Path):
    """Status, metrics and the STOP request; in a multi-process run only the main process writes, and every
    process sees the same stop decision."""

    class Progress(TrainerCallback):
        def __init__(self):
            self.last_time, self.last_tokens = time.time(), 0
            self.stopped = False

        def on_train_begin(self, args, state, control, **kw):
            self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen  # a resumed run's count

        def on_step_end(self, args, state, control, **kw):
            if state.is_world_process_zero:
                write_status(run_dir, state="running", step=state.global_step, max_steps=state.max_steps)
            if _any_rank((run_dir / STOP).exists()):
                self.stopped = True
                control.should_save = True  # stop = checkpoint, then end
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs and "eval_loss" not in logs:
                return
            if not state.is_world_process_zero:
                return
            now = time.time()
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "time": now}
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if key in logs:
                    row[key] = float(logs[key])
            for key, name in methods.LOGGED.items():  # a preference run's reward margin and accuracy
                if key in logs:
                    row[name] = float(logs[key])
            if "loss" in logs and state.num_input_tokens_seen:
                # trained so far by all processes (the Trainer's count of non-padding input tokens, gathered)
                tokens = state.num_input_tokens_seen
                row["tokens"] = tokens
                row["tokens_per_s"] = (tokens - self.last_tokens) / max(now - self.last_time, 1e-6)
                self.last_time, self.last_tokens = now, tokens
            with open(run_dir / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")

    return Progress()


def launched(cfg: TrainConfig, models_dir: Path, loras_dir: Path, runs_dir: Path, run_launcher, num_processes: int,
             log=print) -> int:
    """A multi-process run (webui.training.launch): checks the config here first (fast errors; the embedded
    model is prepared once, not by every process), then runs `run_launcher()`; its exit status. The run's pid
    is this process (the launcher's parent), which a stop request kills with its whole process group."""
    run_dir, _, base_id = prepare(cfg, Path(models_dir), Path(loras_dir), Path(runs_dir))
    if (Path(loras_dir) / cfg.output).exists() and read_status(run_dir).get("state") == "done":
        log(f"{cfg.output} is already trained: {Path(loras_dir) / cfg.output}")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    write_status(run_dir, state="starting", **pid_fields(os.getpid()), num_processes=num_processes, base=base_id,
                 message=f"starting {num_processes} processes…")
    log(f"training {cfg.output} in {num_processes} processes (accelerate launch)")
    rc = run_launcher()
    if rc and read_status(run_dir).get("state") in ("starting", "running"):
        write_status(run_dir, state="failed", message=f"error: a training process failed (exit status {rc}); "
                                                      "see the log above; start again to resume")
    return 1 if rc else 0


def train(cfg: TrainConfig, models_dir: Path = Path("models"), loras_dir: Path = Path("loras"),
          runs_dir: Path = Path("runs"), log=print) -> Path | None:
    """Run (or resume) training; returns the adapter folder when finished, None when stopped."""
    models_dir, loras_dir, runs_dir = Path(models_dir), Path(loras_dir), Path(runs_dir)
    run_dir, base_path, base_id = prepare(cfg, models_dir, loras_dir, runs_dir)
    if (loras_dir / cfg.output).exists() and read_status(run_dir).get("state") == "done":
        log(f"{cfg.output} is already trained: {loras_dir / cfg.output}")
        return loras_dir / cfg.output
    loader, model, tok = _load_model(base_path, cfg.training.quantization, cfg.training.precision)
    # Training never reads a KV cache, but a model with use_cache on builds one in every forward pass: memory for
    # nothing (and with packing it would turn off the packed attention mask)
    model.config.use_cache = False
    if cfg.training.packing:
        packing.prepare_model(model)  # position ids, no cache: the samples of a packed row stay apart
    try:
        samples, notes = _data(cfg, tok)
    except BadInput as e:
        raise BadInput(f"dataset: {e}") from None
    for note in notes:
        log(f"warning: {note}")
    train_set, eval_set = split(samples, cfg.dataset.eval_fraction, cfg.training.seed)
    try:
        lora_config = loader.training_lora_config(lora_options.peft_config(cfg.lora, model, log), model)
        set_seed(cfg.training.seed)  # the initial adapter (and pissa_niter_N's random SVD) repeats on resume
        peft_model = get_peft_model(model, lora_config)
        precision.upcast_trainable(peft_model)  # trained weights in float32 under bf16/fp16
    except (ValueError, TypeError) as e:  # BadInput is a ValueError too
        raise BadInput(f"lora: {e}") from None

    # WORLD_SIZE and RANK are set by a multi-process launcher (webui.training.launch); only rank 0 writes files
    world, main = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0
    resume = latest_checkpoint(run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.lora.rewrites_base and not (run_dir / INITIAL_ADAPTER).is_dir():
            _save_initial_adapter(peft_model, run_dir / INITIAL_ADAPTER)
        (run_dir / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run_dir / STOP).unlink(missing_ok=True)
        write_status(run_dir, state="running", step=0, message="", base=base_id, num_processes=world,
                     quantization=cfg.training.quantization, samples=len(train_set), eval_samples=len(eval_set),
                     resumed_from=resume.name if resume else None, **(pid_fields(os.getpid()) if world == 1 else {}))
        log(f"training {cfg.output} on {base_id}: {len(train_set)} samples (+{len(eval_set)} eval)"
            + (f" in {world} processes" if world > 1 else "") + (f", resuming from {resume.name}" if resume else ""))

    t = cfg.training
    arguments = training_kwargs(t, run_dir, bool(eval_set))
    args = TrainingArguments(**arguments)
    progress = _callback(run_dir)
    as_dicts = lambda rows: [{"input_ids": s.input_ids, "labels": s.labels} for s in rows]  # noqa: E731
    try:
        optimizer = loraplus_optimizer(peft_model, args, t.loraplus_lr_ratio)
        if cfg.method != "sft":
            trainer = methods.trainer(cfg.method, peft_model, tok, arguments, t, train_set, eval_set, [progress],
                                      optimizer, starts_as_base=lora_options.starts_as_base(cfg.lora))
        else:
            trainer = LossInSlices(model=peft_model, args=args, train_dataset=as_dicts(train_set),
                                   eval_dataset=as_dicts(eval_set) or None,
                                   data_collator=packing.collator(tok, t.packing), callbacks=[progress],
                                   optimizers=(optimizer, None))
            if chunked_loss.fits(peft_model, train_set[0].input_ids if train_set else []):
                trainer.head = peft_model.get_output_embeddings()
                trainer.vocab_size = peft_model.config.get_text_config().vocab_size
    except (ValueError, TypeError) as e:  # e.g. a base whose quantization cannot be trained
        if main:
            write_status(run_dir, state="failed", message=first_line(e))
        raise Unsupported(first_line(e)) from None
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as e:
        if main:
            write_status(run_dir, state="failed", message=first_line(e))
        raise
    if not main:
        return None if progress.stopped else loras_dir / cfg.output
    if progress.stopped:
        (run_dir / STOP).unlink(missing_ok=True)
        write_status(run_dir, state="stopped", step=trainer.state.global_step,
                     message=f"stopped at step {trainer.state.global_step}, checkpoint saved; start again to resume")
        log(f"stopped at step {trainer.state.global_step} (checkpoint saved)")
        return None
    out = _save_adapter(peft_model, cfg, base_id, loras_dir, trainer.state.global_step,
                        initial=run_dir / INITIAL_ADAPTER if cfg.lora.rewrites_base else None)
    # README.md, the hub's card format (webui/adapters/model_card.py); it counts the tokens of tokenized samples, so a
    # preference run's counts come from its status
    sft = cfg.method == "sft"
    write_adapter_card(out, run_dir, train_set if sft else None, eval_set if sft else None)
    write_status(run_dir, state="done", step=trainer.state.global_step, adapter=str(out),
                 message=f"done: adapter {cfg.output} is in {loras_dir}")
    log(f"done: {out}")
    return out


class LossInSlices(Trainer):
    """transformers' Trainer with the loss made a slice of tokens at a time from the last hidden state
    (webui/training/chunked_loss.py) once `head` is set: the same value, without the whole logits in memory."""
    head = None
    vocab_size = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.head is None or "labels" not in inputs or "shift_labels" in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs, logits_to_keep=1, output_hidden_states=chunked_loss.LAST)
        with self.accelerator.autocast():  # the output layer under the mixed precision the model's forward runs in
            loss = chunked_loss.causal_lm_loss(self.head, self.vocab_size, outputs.hidden_states[-1], labels,
                                               num_items_in_batch)
        # as Trainer.compute_loss: a loss divided by the items of every process is scaled back for DDP's average
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                           else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss


def _data(cfg: TrainConfig, tok) -> tuple[list, list[str]]:
    """The run's samples (tokenized for sft; preference rows, checked against cutoff_len, for the other methods)
    and warnings about them."""
    t = cfg.training
    if cfg.method != "sft":
        rows, note = preference.load(cfg.dataset.paths, cfg.method)
        preference.check_lengths(rows, tok, t.cutoff_len)
        return rows, [note] if note else []
    samples = load_files(cfg.dataset.paths, cfg.dataset.format, tok, t.cutoff_len, cfg.dataset.overlap,
                         cfg.dataset.train_on_prompt)
    return samples, warnings_for(samples, t.cutoff_len)


def training_arguments(t, run_dir: Path, has_eval: bool) -> TrainingArguments:
    """transformers' TrainingArguments for the `training:` section `t` (TrainingParams)."""
    return TrainingArguments(**training_kwargs(t, run_dir, has_eval))


def training_kwargs(t, run_dir: Path, has_eval: bool) -> dict:
    """The keyword arguments of `training_arguments` (TRL's configs take them too)."""
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(run_dir / "checkpoints"), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate, num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio or t.warmup_steps, logging_steps=t.logging_steps,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=3,
        eval_strategy="steps" if has_eval else "no", eval_steps=t.eval_steps, seed=t.seed,
        report_to=[], use_cpu=not cuda, **precision.resolve(t.precision).trainer_flags(),
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        prediction_loss_only=True,  # evaluation reports eval_loss only: no logits gathered
        # (transformers 5's name for gradient checkpointing) non-reentrant: gradients reach the adapter without
        # PEFT's input-grad hook
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": t.checkpoint_every},
        optim=t.optim, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        # packed rows have no padding (and no attention mask to count it by)
        include_num_input_tokens_seen="all" if t.packing else "non_padding",
        neftune_noise_alpha=t.neftune_noise_alpha or None)


def loraplus_optimizer(peft_model, args: TrainingArguments, ratio: float):
    """LoRA+ (PEFT's create_loraplus_optimizer): the optimizer `args.optim` names, with the B matrices' learning
    rate `ratio` times the A matrices'. None (the Trainer builds its own) when ratio is 0."""
    if not ratio:
        return None
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, peft_model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(peft_model, optimizer_cls, lr=args.learning_rate, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=args.weight_decay, **kwargs)


def _save_initial_adapter(peft_model, folder: Path) -> None:
    """The adapter as PiSSA/OLoRA initialized it, saved the way PEFT's conversion reads it (init_lora_weights
    true: loading it must not run the initialization again)."""
    config = peft_model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        peft_model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        config.init_lora_weights = init


def _save_adapter(peft_model, cfg: TrainConfig, base_id: str, loras_dir: Path, steps: int,
                  initial: Path | None = None) -> Path:
    """Write loras/NAME atomically, with the training config and the base model's id; `initial`: the adapter
    as initialized, to convert a PiSSA/OLoRA adapter into one for the original base."""
    target = loras_dir / cfg.output
    # replace: a resumed run of ours that finished again replaces its own adapter, in one step
    with write_into_place(target, replace=True) as tmp:
        # the trained adapter only (a preference run also holds TRL's frozen reference copy)
        peft_model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=["default"],
                                   path_initial_model_for_weight_conversion=str(initial) if initial else None)
        config_file = tmp / "adapter_config.json"
        adapter_cfg = json.loads(config_file.read_text())
        adapter_cfg["base_model_name_or_path"] = base_id
        config_file.write_text(json.dumps(adapter_cfg, indent=2))
        (tmp / "training_config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "steps": steps}, sort_keys=False))
    return target
