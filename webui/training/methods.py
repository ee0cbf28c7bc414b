"""The preference methods' trainers: `method: dpo | orpo | kto` runs TRL's DPOTrainer, ORPOTrainer or KTOTrainer
on the same PEFT model, options, callbacks and run folder as supervised training (webui/training/trainer.py), so
resume, stop, checkpoints, live checkpoints and the run history work the same.

The reference of DPO and KTO is the base with the adapter switched off: no second model in memory. TRL keeps a
frozen copy of the adapter as the reference when it is handed a PEFT model (right for an adapter that starts
from the base's own weights, PiSSA/OLoRA); an adapter that starts as no change at all is dropped from that copy,
so the reference pass runs the plain base, without the adapter's extra products.
"""
from __future__ import annotations

from datasets import Dataset

from webui.training import precision
from webui.training.preference import trl_rows

# what each method's logs are called in the run's metrics.jsonl (the charts and the status line read these)
LOGGED = {"rewards/margins": "margin", "rewards/accuracies": "accuracy",
          "eval_rewards/margins": "eval_margin", "eval_rewards/accuracies": "eval_accuracy"}


def _classes(method: str):
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer
        return DPOConfig, DPOTrainer
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # TRL 1.x keeps ORPO among its experimental trainers
        return ORPOConfig, ORPOTrainer
    from trl import KTOConfig, KTOTrainer
    return KTOConfig, KTOTrainer


def trainer(method: str, peft_model, tokenizer, arguments: dict, t, train_rows: list[dict], eval_rows: list[dict],
            callbacks: list, optimizer, starts_as_base: bool):
    """TRL's trainer for `method`; `arguments` are the TrainingArguments the supervised run would use, `t` the
    `training:` options (beta, cutoff_len, gradient checkpointing)."""
    config_cls, trainer_cls = _classes(method)
    # TRL prepares its own columns and reports its own metrics at evaluation. (`activation_checkpointing` set
    # here wins over the older name TRL's configs default to on, which transformers then mirrors from it.)
    arguments = {k: v for k, v in arguments.items() if k not in ("remove_unused_columns", "prediction_loss_only")}
    arguments.update(beta=t.beta, max_length=t.cutoff_len)
    if method != "dpo":  # ORPO's and KTO's batches hold no `input_ids` for the Trainer to count tokens by
        arguments["include_num_input_tokens_seen"] = "no"
    if method == "orpo":
        arguments["max_completion_length"] = t.cutoff_len
    args = config_cls(**arguments)
    trainer = trainer_cls(model=peft_model, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(trl_rows(train_rows)),
                          eval_dataset=Dataset.from_list(trl_rows(eval_rows)) if eval_rows else None,
                          callbacks=callbacks, optimizers=(optimizer, None))
    # TRL casts a quantized base's trained weights to bf16 (QLoRA's paper); ours stay float32 as in SFT runs, where
    # bf16 optimizer steps on the adapter would lose the small updates
    precision.upcast_trainable(peft_model)
    if starts_as_base and "ref" in getattr(peft_model, "peft_config", {}):
        peft_model.delete_adapter("ref")  # the adapter switched off is the base itself
        peft_model.set_adapter("default")
    return trainer
