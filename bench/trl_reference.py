"""The reference for the training benchmark: a plain TRL SFTTrainer + PEFT LoRA script, the way a user
would write it, on the same base, text and settings as our trainer. Prints one JSON line with tokens/s.

    python bench/trl_reference.py BASE_DIR TEXT_FILE STEPS BATCH CUTOFF OUT_DIR
"""
import json
import sys
import time

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


def main():
    base, text_file, steps, batch, cutoff, out = sys.argv[1:7]
    steps, batch, cutoff = int(steps), int(batch), int(cutoff)
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(open(text_file).read(), add_special_tokens=False)["input_ids"]
    chunks = [tok.decode(ids[i:i + cutoff]) for i in range(0, len(ids), cutoff - 32)]
    model = AutoModelForCausalLM.from_pretrained(base)
    counted = {"tokens": 0, "marks": []}

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            counted["marks"].append((time.time(), counted["tokens"]))

    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
                     logging_steps=1, save_strategy="no", report_to=[], max_length=cutoff, packing=False,
                     dataset_text_field="text", use_cpu=True, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": chunks}),
                         processing_class=tok, peft_config=lora, callbacks=[Count()])
    inner = trainer.data_collator

    def collate(features):
        batch_ = inner(features)
        counted["tokens"] += int(batch_["attention_mask"].sum()) if "attention_mask" in batch_ else batch_["input_ids"].numel()
        return batch_

    trainer.data_collator = collate
    trainer.train()
    (t0, n0), (t1, n1) = counted["marks"][0], counted["marks"][-1]
    print(json.dumps({"tokens_per_s": (n1 - n0) / (t1 - t0)}))


if __name__ == "__main__":
    main()
