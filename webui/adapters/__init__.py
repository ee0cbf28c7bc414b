"""LoRA adapters: reading PEFT adapter folders safely (files), which layers an architecture lets a LoRA
target (targets), the compatibility report for a base (inspect), and PEFT operations on a loaded
transformers-family model (peft_stack)."""
from webui.adapters.files import AdapterError

__all__ = ["AdapterError"]
