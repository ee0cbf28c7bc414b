"""LoRA adapters: their shared shapes (types), reading PEFT adapter folders safely (files), which layers an
architecture lets a LoRA target (targets), the compatibility report for a base (inspect), GGUF LoRAs for
llama.cpp (gguf_lora), and PEFT operations on a loaded transformers-family model (peft_stack)."""
