"""Tiny offline models for tests and benchmarks: random weights, 2 layers, hidden size 32, and a byte-level
BPE tokenizer trained in-process (well under a second) with a ChatML chat template. One builder per
architecture of LoRAX's supported-architecture table that transformers ships (Qwen v1 needs remote code and is left out).

    python -m webui.testing.tiny_models OUT_DIR     # writes OUT_DIR/tiny-<arch>/ for every architecture
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "LoRA adapters change a few low-rank matrices beside the frozen base weights.",
    "Hello! How can I help you today? Tell me a story about a small robot.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "user assistant system: what is the capital of France? Paris is the capital.",
    "Models, tokens, layers, heads, attention, projection, gate, up, down, output.",
]

H, FF, LAYERS, HEADS, KV_HEADS, CTX = 32, 64, 2, 4, 2, 256

# name -> (config class name, model-type specific keyword arguments)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CTX)),
    "mistral": ("MistralConfig", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=CTX, sliding_window=None)),
    "mixtral": ("MixtralConfig", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=CTX, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None)),
    "gemma": ("GemmaConfig", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=H // HEADS,
                                  max_position_embeddings=CTX)),
    "phi3": ("Phi3Config", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                max_position_embeddings=CTX, original_max_position_embeddings=CTX)),
    "phi": ("PhiConfig", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, max_position_embeddings=CTX)),
    "qwen2": ("Qwen2Config", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CTX)),
    "cohere": ("CohereConfig", dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                    max_position_embeddings=CTX)),
    "dbrx": ("DbrxConfig", dict(d_model=H, n_heads=HEADS, n_layers=LAYERS, max_seq_len=CTX,
                                attn_config={"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                ffn_config={"ffn_hidden_size": FF, "moe_num_experts": 4, "moe_top_k": 2})),
    "gpt2": ("GPT2Config", dict(n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=CTX, n_inner=FF)),
    "bloom": ("BloomConfig", dict(hidden_size=H, n_layer=LAYERS, n_head=HEADS)),
}


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (every byte is a token, so any text round-trips) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(arch: str, tokenizer, seed: int = 0):
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = ARCHITECTURES[arch]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = getattr(transformers, cls_name)(vocab_size=len(tokenizer), tie_word_embeddings=False, **ids, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves logits nearly flat; a larger spread makes greedy decoding decisive, so tests
    # that compare outputs compare real choices rather than near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    model.generation_config.update(**ids)
    return model


def write_model(arch: str, out_dir: Path, tokenizer=None) -> Path:
    tokenizer = tokenizer or build_tokenizer()
    path = Path(out_dir) / f"tiny-{arch}"
    model = build_model(arch, tokenizer)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def write_adapter(base: Path, out: Path, target_modules="all-linear", r: int = 4, alpha: float = 8, seed: int = 1,
                  **lora_kwargs) -> Path:
    """A PEFT LoRA with random, non-zero A and B (init_lora_weights=False) so its effect is visible,
    saved as PEFT saves it (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=False,
                     task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # larger than PEFT's default init, so even a tiny model's greedy text changes
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(out))
    return Path(out)


def write_all(out_dir: Path) -> dict[str, Path]:
    tokenizer = build_tokenizer()
    return {arch: write_model(arch, out_dir, tokenizer) for arch in ARCHITECTURES}


if __name__ == "__main__":
    for arch, path in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "models")).items():
        print(arch, path)
