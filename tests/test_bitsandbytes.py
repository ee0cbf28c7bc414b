"""bitsandbytes on the transformers loader (`--quantization nf4|fp4|int8`) and QLoRA training on it, on a
128-wide tiny Llama (bitsandbytes' CPU 4-bit kernel works in blocks of 64 inputs) on the CPU backend of
bitsandbytes 0.50. The nf4 row of tests/test_loader_contract.py runs the whole adapter contract (one adapter,
weighted stacks, hot-swap, a misfit refused, merge refused); here: every quantization against plain PEFT on
the same bitsandbytes model loaded by transformers directly, mixed batches, what the Model tab and the
adapter checks see, the refusals, and QLoRA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import BNB_REL_TOL, GREEDY, PROMPT, bnb_load_kwargs, hf_logits, peft_reference, rel_err
from webui.engine import Engine
from webui.errors import BadInput, Unsupported
from webui.options.config import ModelSpec, ServerConfig
from webui.options.training import TrainConfig

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module", params=["nf4", "fp4", "int8"])
def engine(request, bnb_dirs):
    models, loras = bnb_dirs
    engine = Engine(models, loras)
    engine.load(ModelSpec(model="tiny-float", loader="transformers", quantization=request.param))
    engine.quantization = request.param  # for the references below
    yield engine
    engine.unload()


def reference(engine, weights: dict):
    models, loras = engine.models_dir, engine.loras_dir
    return peft_reference(Path(models) / "tiny-float", {n: (Path(loras) / n, w) for n, w in weights.items()},
                          **bnb_load_kwargs(engine.quantization))


def test_adapters_equal_peft_on_the_same_quantized_model(engine):
    """Base first (bitsandbytes' CPU weight repacking on a first inference corrupted later adapter loads),
    then one adapter, a weighted stack (= PEFT's add_weighted_adapter cat) and back to the base."""
    base = engine.generate(PROMPT, GREEDY)
    for weights in ({"A": 1.0}, {"B": 1.0}, {"A": 1.0, "B": 0.5}, {"A": 0.3, "B": -0.7}):
        engine.set_adapters(weights)
        text, logits = reference(engine, weights)
        err = rel_err(hf_logits(engine), logits)
        print(f"{engine.quantization} {weights}: relative L2 distance to PEFT {err:.4f}")
        assert engine.generate(PROMPT, GREEDY) == text != base
        assert err < BNB_REL_TOL
    engine.clear_adapters()
    assert engine.generate(PROMPT, GREEDY) == base


def test_mixed_batch_each_row_its_adapter(engine):
    """One batched pass where each row has its own adapter gives each row's own single-request text."""
    prompts, names = [PROMPT, "Hello! How can I", "One, two, three"], ["A", None, "B"]
    single = []
    for prompt, name in zip(prompts, names):
        engine.set_adapters({name: 1.0} if name else {})
        single.append(engine.generate(prompt, GREEDY))
    engine.set_adapters({"B": 0.5})
    # queued together through the one door: the rows share the running batch, each with its own adapter
    handles = [engine.submit(p, GREEDY, {n: 1.0} if n else {}) for p, n in zip(prompts, names)]
    texts = [h.text() for h in handles]
    assert texts == single and len(set(single)) == 3
    assert engine.active_adapters == {"B": 0.5}  # the batch restored the active stack
    engine.clear_adapters()


def test_merge_refused_and_nothing_changes(engine, tmp_path):
    caps = engine.capabilities
    assert caps.settings == ("dtype", "device", "quantization") and caps.adapters and caps.mixed_batch
    assert not caps.merge and caps.extra["quantization"] == engine.quantization
    assert engine.loaded.dtype == f"bitsandbytes {engine.quantization} (float32 compute)"
    engine.set_adapters({"A": 1.0})
    before = (engine.generate(PROMPT, GREEDY), hf_logits(engine))
    with pytest.raises(Unsupported, match="Merge on a float copy"):
        engine.merge_adapters()
    with pytest.raises(Unsupported, match="--format safetensors"):  # (Engine.save_merged would also unload)
        engine._backend.save_merged(tmp_path / "merged")
    assert not engine.merged and engine.active_adapters == {"A": 1.0}
    assert engine.generate(PROMPT, GREEDY) == before[0] and torch.equal(hf_logits(engine), before[1])
    engine.clear_adapters()


def test_adapter_checks_see_quantized_layers_with_float_sizes(engine):
    import bitsandbytes as bnb

    kind = bnb.nn.Linear8bitLt if engine.quantization == "int8" else bnb.nn.Linear4bit
    q_proj = engine._backend.model.model.layers[0].self_attn.q_proj
    assert isinstance(getattr(q_proj, "base_layer", q_proj), kind)  # (PEFT's wrapper once an adapter was loaded)
    layers = engine._backend.describe_base().layers
    assert (layers["model.layers.0.self_attn.k_proj"].in_features,
            layers["model.layers.0.self_attn.k_proj"].out_features) == (128, 64)  # 2 of 4 heads for k/v
    assert (layers["model.layers.1.mlp.down_proj"].in_features, layers["model.layers.1.mlp.down_proj"].out_features) \
        == (256, 128)
    assert engine.adapter_report("other").verdict == "incompatible"  # a 64-wide adapter: shapes checked
    # the parameter count is the float model's, not the packed 4-bit storage's
    float_model = AutoModelForCausalLM.from_pretrained(str(Path(engine.models_dir) / "tiny-float"))
    assert engine.loaded.parameters == sum(p.numel() for p in float_model.parameters())


def test_quantization_is_a_transformers_option(bnb_dirs, gguf_models, gptq_dirs):
    """ServerConfig carries it to the ModelSpec; `auto` picks a loader that takes it; other loaders refuse it;
    a GGUF or an already quantized folder is refused with what to do."""
    assert ServerConfig(spec=ModelSpec(quantization="nf4")).spec.quantization == "nf4"
    with pytest.raises(BadInput, match="quantization"):
        ModelSpec(quantization="q4")
    models, loras = bnb_dirs
    with pytest.raises(BadInput, match="llamacpp loader does not take.*transformers loader"):
        Engine(gguf_models, loras).load(ModelSpec(model="tiny-llama.gguf", loader="llamacpp", quantization="nf4"))
    with pytest.raises(BadInput, match="GGUF file.*--loader llamacpp"):  # auto: transformers, which refuses a GGUF
        Engine(gguf_models, loras).load(ModelSpec(model="tiny-llama.gguf", quantization="nf4"))
    gptq_models, _ = gptq_dirs
    with pytest.raises(BadInput, match="already quantized \\(gptq\\)"):
        Engine(gptq_models, loras).load(ModelSpec(model="tiny-gptq", quantization="nf4"))
    with pytest.raises(BadInput, match="gptq loader does not take"):
        Engine(gptq_models, loras).load(ModelSpec(model="tiny-gptq", loader="gptq", quantization="int8"))


def test_cli_flag(capsys):
    import argparse

    from webui.options.flags import add_arguments, from_namespace

    parser = argparse.ArgumentParser()
    add_arguments(parser, ServerConfig)
    cfg = from_namespace(ServerConfig, parser.parse_args(["--quantization", "nf4", "--loader", "transformers"]))
    assert cfg.spec == ModelSpec(loader="transformers", quantization="nf4")
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "q4_k"])
    assert "{none,nf4,fp4,int8}" in capsys.readouterr().err


# -- QLoRA -------------------------------------------------------------------------------------------------
MARKER = "ZEBRA ZEBRA"


def marker_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "marker.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question number {i}?"},
                                                       {"role": "assistant", "content": MARKER}]})
                              for i in range(24)))
    return path


def chat_reply(tok, model, question: str) -> str:
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_qlora_nf4_teaches_a_marker_reply(checkpointing, bnb_dirs, tmp_path):
    """QLoRA on an nf4 base, with an eval split, with and without gradient checkpointing: the loss falls below
    half, every LoRA matrix still moves between step 10 and the end, and the adapter answers with the marker on
    the float base and on the nf4 base (plain PEFT both)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from webui.training.trainer import train

    models, _ = bnb_dirs
    cfg = TrainConfig.from_dict({
        "base_model": "tiny-float", "output": "qlora",
        "dataset": {"path": str(marker_data(tmp_path / "data")), "format": "chat", "eval_fraction": 0.2},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
        "training": {"quantization": "nf4", "max_steps": 30, "learning_rate": 0.01, "batch_size": 4,
                     "eval_steps": 5, "save_steps": 10, "cutoff_len": 64, "gradient_checkpointing": checkpointing}})
    out = train(cfg, models, tmp_path / "loras", tmp_path / "runs", log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "qlora" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"QLoRA nf4 (checkpointing={checkpointing}): loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 30 and losses[-1] < losses[0] / 2 and any("eval_loss" in r for r in rows)
    assert json.loads((tmp_path / "runs" / "qlora" / "status.json").read_text())["quantization"] == "nf4"
    final = load_file(str(out / "adapter_model.safetensors"))
    step10 = load_file(str(tmp_path / "runs" / "qlora" / "checkpoints" / "checkpoint-10" / "adapter_model.safetensors"))
    assert len(final) == 28  # 2 layers x 7 projections x (A, B)
    frozen = [k for k in final if torch.equal(final[k], step10[k])]
    assert not frozen, f"no gradient reached {frozen[:3]}... after the evaluations"
    base = models / "tiny-float"
    tok = AutoTokenizer.from_pretrained(str(base))
    for load_kwargs in ({}, bnb_load_kwargs("nf4")):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, device_map={"": "cpu"},
                                                     **load_kwargs)
        assert not chat_reply(tok, model, "Question number 99?").startswith(MARKER)
        assert chat_reply(tok, PeftModel.from_pretrained(model, str(out)), "Question number 99?").startswith(MARKER)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_every_lora_matrix_gets_a_gradient_after_an_evaluation(quantization, checkpointing, bnb_dirs):
    """The training model the loader provides, after an evaluation pass (eval mode, no grad: where bitsandbytes
    0.50 repacks 4-bit weights for a kernel without backward), in a training step with and without
    (non-reentrant) gradient checkpointing: every LoRA B gets a gradient. With PEFT's usual start (B = 0) a
    gradient for the q/k/v and gate/up B's must pass back through the quantized o_proj / down_proj themselves;
    with the repacked kernel only the 4 o_proj / down_proj B's got one."""
    from peft import LoraConfig, get_peft_model

    from webui.backends.registry import backend_class

    models, _ = bnb_dirs
    model = backend_class("transformers").training_model(models / "tiny-float", "cpu", torch.float32, quantization)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    if checkpointing:
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]] * 2)
    peft.eval()
    with torch.no_grad():
        peft(input_ids=ids)
    peft.train()
    peft(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft.named_parameters() if "lora_B" in n}
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not g.abs().sum()]


def test_qlora_refusals(gptq_dirs, tmp_path):
    gptq_models, _ = gptq_dirs
    data = marker_data(tmp_path / "data")
    from webui.training.trainer import train

    pissa = TrainConfig.from_dict({"output": "x", "dataset": {"path": str(data), "format": "chat"},
                                   "lora": {"init_lora_weights": "pissa"}, "training": {"quantization": "nf4"}})
    with pytest.raises(BadInput, match="rewrites the base weights"):
        train(pissa, gptq_models, tmp_path / "loras", tmp_path / "runs", log=lambda m: None)

    cfg = TrainConfig.from_dict({"base_model": "tiny-gptq", "output": "x",
                                 "dataset": {"path": str(data), "format": "chat"},
                                 "training": {"quantization": "nf4", "max_steps": 1}})
    with pytest.raises(BadInput, match="GPTQ-quantized already"):
        train(cfg, gptq_models, tmp_path / "loras", tmp_path / "runs", log=lambda m: None)
