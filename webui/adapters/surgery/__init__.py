"""Adapter surgery and where an adapter runs: `extract`, `resize` and `convert --to lora` write a plain PEFT LoRA
with the error they made (svd.py: the factoring; folders.py: reading model weights a tensor at a time and writing
the new adapter in one step; ops.py: the three operations; cli.py: their command line), and runtimes.py says
whether an adapter runs on vLLM, SGLang, llama.cpp, Ollama, LoRAX or LoRA Deck as it stands (`inspect --target`,
the LoRA panel's badges). See docs/adapter-surgery.md."""
