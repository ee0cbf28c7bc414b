"""In-app LoRA training: datasets (data), one run on PEFT + transformers' Trainer (trainer), and the
job runner that starts runs as child processes and reads their progress (runner)."""
