"""Adapter surgery (`resize`, `convert --to lora`, `extract`, `inspect --target`), checked against references
computed here with plain torch (SVD, s·B·A from the files) and plain PEFT / transformers (logits), never with
the code under test. A 2-layer Llama 32 wide keeps each test to seconds."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, rel_err, write_llama
from webui.cli import main
from webui.testing.tiny_models import write_adapter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINE = re.compile(r"^(\S+)  rank (\d+) → (\d+)  energy ([\d.]+)  error ([\d.e+-]+)$", re.MULTILINE)
TOTAL = re.compile(r"^total: (\d+) layers, energy kept ([\d.]+), relative error ([\d.e+-]+)", re.MULTILINE)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("surgery")
    models, loras = root / "models", root / "loras"
    base = write_llama(models / "base", 32, spread=0.1)
    write_adapter(base, loras / "plain8", target_modules="all-linear", r=8, alpha=16, seed=2)
    write_adapter(base, loras / "rs8", target_modules=["q_proj", "v_proj", "down_proj"], r=8, alpha=4, seed=3,
                  use_rslora=True)
    return {"root": root, "models": models, "loras": loras, "base": base}


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _run(*args) -> subprocess.CompletedProcess:
    """`python -m webui ...` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "webui", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _deltas(folder) -> dict[str, torch.Tensor]:
    """Each layer's s·B·A from an adapter's files, with PEFT's scale (alpha/r, alpha/√r with rsLoRA, patterns
    matched as PEFT matches them: full module name suffix)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = state[key.replace(".lora_A.", ".lora_B.")].double()
        r = a.shape[0]
        alpha = next((v for k, v in (cfg.get("alpha_pattern") or {}).items()
                      if re.match(rf"(.*\.)?({k})$", module)), cfg["lora_alpha"])
        scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        out[module] = scale * b @ a.double()
    return out


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0]


def _base_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _with_adapter(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base_model(base), str(adapter)).eval()


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])


# -- resize -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["plain8", "rs8"])
def test_resize_at_or_above_the_rank_reproduces_the_adapter(world, capsys, source):
    code, _out, err = _cli(capsys, "resize", source, "--rank", "12", "--out", f"{source}-same",
                          "--loras-dir", str(world["loras"]))
    assert code == 0, err
    src, new = _deltas(world["loras"] / source), _deltas(world["loras"] / f"{source}-same")
    assert src.keys() == new.keys()
    for module in src:
        assert torch.allclose(new[module], src[module], rtol=0, atol=1e-5 * src[module].abs().max()), module
    cfg = json.loads((world["loras"] / f"{source}-same" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and not cfg["use_rslora"]  # capped at the source's rank: nothing to keep beyond it
    # and plain PEFT runs it like the source
    assert rel_err(_logits(_with_adapter(world["base"], world["loras"] / f"{source}-same"), IDS),
                   _logits(_with_adapter(world["base"], world["loras"] / source), IDS)) < 1e-5
    assert "README.md" in {p.name for p in (world["loras"] / f"{source}-same").iterdir()}
    assert not [p for p in world["loras"].iterdir() if p.name.startswith(".") and "surgery" in p.name]


def test_resize_lower_rank_is_torch_svd_truncation_and_prints_its_energy(world, capsys):
    code, out, err = _cli(capsys, "resize", "rs8", "--rank", "3", "--out", "rs8-r3", "--loras-dir", str(world["loras"]))
    assert code == 0, err
    src, new = _deltas(world["loras"] / "rs8"), _deltas(world["loras"] / "rs8-r3")
    printed = {m.group(1): float(m.group(4)) for m in LINE.finditer(out)}
    assert printed.keys() == src.keys()
    kept_total, all_total = 0.0, 0.0
    for module, delta in src.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        reference = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        assert rel_err(new[module], reference) < 1e-5, module
        energy = float((s[:3] ** 2).sum() / (s ** 2).sum())
        assert printed[module] == pytest.approx(energy, abs=2e-6), module
        kept_total, all_total = kept_total + float((s[:3] ** 2).sum()), all_total + float((s ** 2).sum())
    assert float(TOTAL.search(out).group(2)) == pytest.approx(kept_total / all_total, abs=2e-6)
    card = (world["loras"] / "rs8-r3" / "README.md").read_text()
    assert "resize rs8 --rank 3" in card and "Relative error" in card


def test_resize_by_energy_gives_per_layer_ranks_that_peft_loads(world, capsys):
    code, _out, err = _cli(capsys, "resize", "plain8", "--energy", "0.9", "--out", "plain8-e90",
                          "--loras-dir", str(world["loras"]))
    assert code == 0, err
    src, new = _deltas(world["loras"] / "plain8"), _deltas(world["loras"] / "plain8-e90")
    for module, delta in src.items():
        s = torch.linalg.svdvals(delta)
        share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        k = int((share < 0.9 - 1e-12).sum()) + 1  # the fewest singular values reaching 90%
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        assert rel_err(new[module], u[:, :k] @ torch.diag(s[:k]) @ vh[:k]) < 1e-5, module
    # PEFT applies the per-layer ranks and scales as written (its logits = base + the deltas we just checked)
    peft = _with_adapter(world["base"], world["loras"] / "plain8-e90")
    merged = _base_model(world["base"])
    with torch.no_grad():
        for module, delta in new.items():
            merged.get_submodule(module).weight += delta.float()
    assert rel_err(_logits(peft, IDS), _logits(merged, IDS)) < 1e-5


def test_resize_refuses_what_it_cannot_do(world, capsys):
    code, _, err = _cli(capsys, "resize", "plain8", "--rank", "2", "--out", "plain8", "--loras-dir",
                        str(world["loras"]))
    assert code == 1 and "already exists" in err
    code, _, err = _cli(capsys, "resize", "plain8", "--rank", "0", "--out", "x", "--loras-dir", str(world["loras"]))
    assert code == 2 and "rank" in err
    code, _, err = _cli(capsys, "resize", "plain8", "--rank", "2", "--energy", "0.9", "--out", "x",
                        "--loras-dir", str(world["loras"]))
    assert code == 2 and "not both" in err


# -- extract ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(world):
    """The base plus a known rank-8 change on every targeted layer, saved as transformers saves it."""
    model = _base_model(world["base"])
    gen = torch.Generator().manual_seed(7)
    known = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                out_f, in_f = module.weight.shape
                delta = (torch.randn(out_f, 8, generator=gen) @ torch.randn(8, in_f, generator=gen)) * 0.02
                module.weight += delta
                known[name] = delta
    path = world["models"] / "tuned"
    # in shards, as larger checkpoints come: extract must follow model.safetensors.index.json
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path, model, known


def test_extract_at_the_change_rank_reproduces_the_tuned_logits(world, tuned):
    _path, model, known = tuned
    proc = _run("extract", "--base", "base", "--tuned", "tuned", "--rank", "8", "--out", "ex8",
                "--models-dir", str(world["models"]), "--loras-dir", str(world["loras"]))
    assert proc.returncode == 0, proc.stderr
    layers = {m.group(1): float(m.group(5)) for m in LINE.finditer(proc.stdout)}
    assert layers.keys() == known.keys()
    assert max(layers.values()) < 1e-5
    cfg = json.loads((world["loras"] / "ex8" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(TARGETS) and cfg["base_model_name_or_path"] == "base"
    peft = _with_adapter(world["base"], world["loras"] / "ex8")
    tuned_logits = _logits(model, IDS)
    assert rel_err(_logits(peft, IDS), tuned_logits) < 1e-5
    assert rel_err(_logits(_base_model(world["base"]), IDS), tuned_logits) > 1e-2  # the change is visible


def test_extract_below_the_change_rank_prints_the_svd_error(world, tuned, capsys):
    path, _model, known = tuned
    code, out, err = _cli(capsys, "extract", "--base", "base", "--tuned", str(path), "--rank", "2", "--out", "ex2",
                          "--models-dir", str(world["models"]), "--loras-dir", str(world["loras"]))
    assert code == 0, err
    printed = {m.group(1): float(m.group(5)) for m in LINE.finditer(out)}
    lost, total = 0.0, 0.0
    for module, delta in known.items():
        s = torch.linalg.svdvals(delta.double())
        # the tuned file holds base + delta in float32: its own difference is the reference's input
        assert printed[module] == pytest.approx(float((s[2:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), rel=1e-3)
        lost, total = lost + float((s[2:] ** 2).sum()), total + float((s ** 2).sum())
    assert float(TOTAL.search(out).group(3)) == pytest.approx((lost / total) ** 0.5, rel=1e-3)
    card = (world["loras"] / "ex2" / "README.md").read_text()
    assert "extract --base base" in card and "Relative error" in card and card.count("| model.layers.") == len(known)


def test_extract_by_energy_finds_the_change_rank(world, tuned, capsys):
    path, model, known = tuned
    code, out, err = _cli(capsys, "extract", "--base", "base", "--tuned", "tuned", "--energy", "1", "--out", "ex-e1",
                          "--models-dir", str(world["models"]), "--loras-dir", str(world["loras"]))
    assert code == 0, err
    assert {int(m.group(3)) for m in LINE.finditer(out)} == {8}  # every layer's change has rank 8, no more kept
    assert rel_err(_logits(_with_adapter(world["base"], world["loras"] / "ex-e1"), IDS), _logits(model, IDS)) < 1e-5


def test_extract_names_changes_a_lora_cannot_carry(world, tuned, capsys):
    path, _model, _known = tuned
    other = _base_model(path)
    with torch.no_grad():
        other.lm_head.weight[0] += 1.0
    other.save_pretrained(str(world["models"] / "tuned-head"), safe_serialization=True)
    code, out, err = _cli(capsys, "extract", "--base", "base", "--tuned", "tuned-head", "--rank", "8", "--out",
                          "ex-head", "--models-dir", str(world["models"]), "--loras-dir", str(world["loras"]))
    assert code == 0, err
    assert "lm_head.weight" in out and "NOT in this LoRA" in out


# -- convert ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dora(world):
    """A DoRA adapter made with plain PEFT: random non-zero B, magnitudes moved off their initial norms."""
    from peft import LoraConfig, get_peft_model

    model = _base_model(world["base"])
    torch.manual_seed(5)
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft = get_peft_model(model, cfg)
    _logits(peft, IDS)  # PEFT sets the magnitudes on the first forward
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    out = world["loras"] / "dora4"
    peft.save_pretrained(str(out))
    return out


def test_convert_dora_at_full_rank_matches_peft_dora(world, dora, capsys):
    code, _out, err = _cli(capsys, "convert", "dora4", "--to", "lora", "--rank", "64", "--out", "dora4-full",
                          "--models-dir", str(world["models"]), "--loras-dir", str(world["loras"]))
    assert code == 0, err
    dora_logits = _logits(_with_adapter(world["base"], dora), IDS)
    converted = _logits(_with_adapter(world["base"], world["loras"] / "dora4-full"), IDS)
    base_logits = _logits(_base_model(world["base"]), IDS)
    assert rel_err(converted, dora_logits) < 1e-5
    assert rel_err(base_logits, dora_logits) > 1e-2


def test_convert_dora_at_its_rank_prints_the_error_of_peft_merged_delta(world, dora, capsys):
    code, out, err = _cli(capsys, "convert", "dora4", "--to", "lora", "--out", "dora4-r4",
                          "--models-dir", str(world["models"]), "--loras-dir", str(world["loras"]))
    assert code == 0, err
    printed = {m.group(1): float(m.group(5)) for m in LINE.finditer(out)}
    base = _base_model(world["base"])
    merged = _with_adapter(world["base"], dora).merge_and_unload()  # PEFT's own DoRA merge: W'
    assert printed
    for module, error in printed.items():
        delta = (merged.get_submodule(module).weight - base.get_submodule(module).weight).double()
        s = torch.linalg.svdvals(delta)
        assert error == pytest.approx(float((s[4:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), rel=1e-3), module
        assert error > 1e-3  # the magnitude rescaled W itself: rank 4 cannot hold it all


def test_convert_refuses_a_plain_lora(world, capsys):
    code, _, err = _cli(capsys, "convert", "plain8", "--to", "lora", "--out", "x", "--models-dir",
                        str(world["models"]), "--loras-dir", str(world["loras"]))
    assert code == 1 and "already a plain LoRA" in err


# -- inspect --target ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd(world):
    """An adapter that saves lm_head whole, and one of rank 24 (not one of vLLM's --max-lora-rank values)."""
    write_adapter(world["base"], world["loras"] / "saves-head", target_modules=["q_proj"], r=8, alpha=16,
                  modules_to_save=["lm_head"])
    write_adapter(world["base"], world["loras"] / "r24", target_modules=["q_proj", "v_proj"], r=24, alpha=24)


def test_inspect_target_vllm(world, dora, odd):
    loras = world["loras"]
    expected = {"dora4": "DoRA", "saves-head": "modules_to_save", "r24": "rank 24 is above --max-lora-rank 16"}
    for name, reason in expected.items():
        proc = _run("inspect", name, "--target", "vllm", "--loras-dir", str(loras))
        assert proc.returncode == 3, (name, proc.stdout, proc.stderr)
        assert reason in proc.stdout and "runs there:     NO" in proc.stdout, proc.stdout
    assert "python -m webui convert dora4 --to lora" in _run("inspect", "dora4", "--target", "vllm",
                                                             "--loras-dir", str(loras)).stdout
    proc = _run("inspect", "r24", "--target", "vllm", "--json", "--loras-dir", str(loras))
    target = json.loads(proc.stdout)["target"]
    assert proc.returncode == 3 and not target["runs"]
    assert "--max-lora-rank 32" in target["reasons"][0]["fix"] and "resize r24 --rank 16" in target["reasons"][0]["fix"]
    proc = _run("inspect", "plain8", "--target", "vllm", "--loras-dir", str(loras))
    assert proc.returncode == 0 and "runs there:     YES" in proc.stdout, proc.stdout


def test_inspect_target_other_runtimes(world, dora, odd, capsys):
    loras = str(world["loras"])
    code, out, _ = _cli(capsys, "inspect", "dora4", "--target", "llamacpp", "--loras-dir", loras)
    assert code == 3 and "DoRA" in out
    code, out, _ = _cli(capsys, "inspect", "dora4", "--target", "loradeck", "--loras-dir", loras)
    assert code == 0 and "llama.cpp loader refuses" in out
    code, out, _ = _cli(capsys, "inspect", "r24", "--target", "vllm", "--max-lora-rank", "32", "--loras-dir", loras)
    assert code == 0, out
    code, out, _ = _cli(capsys, "inspect", "plain8", "--target", "sglang", "--loras-dir", loras)
    assert code == 0, out
    code, out, _ = _cli(capsys, "inspect", "saves-head", "--target", "llamacpp", "--loras-dir", loras)
    assert code == 3 and "modules_to_save" in out


def test_a_cancelled_operation_leaves_nothing(world):
    import threading

    from webui.adapters.surgery.ops import resize

    cancel, seen = threading.Event(), []

    def progress(fraction, message):
        seen.append(message)
        cancel.set()  # cancel after the first layer

    assert resize("plain8", world["loras"], "cancelled", rank=2, progress=progress, cancel=cancel) is None
    assert len(seen) == 1
    assert not [p for p in world["loras"].iterdir() if "cancelled" in p.name and p.name != ".locks"]


def test_converted_dora_runs_on_llama_cpp_as_peft_dora(world, dora, capsys):
    """The issue's end-to-end case: DoRA → convert → `export --format gguf-lora` → plain llama-cpp-python next to the
    GGUF base gives PEFT's DoRA greedy text (full rank: exact, so the same text on every prompt)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tests.helpers import _greedy, _load
    from webui.export.hf_to_gguf import hf_to_gguf

    models, loras = world["models"], world["loras"]
    hf_to_gguf(world["base"], models / "base.gguf")
    code, _, err = _cli(capsys, "convert", "dora4", "--to", "lora", "--rank", "64", "--out", "dora4-gguf",
                        "--models-dir", str(models), "--loras-dir", str(loras))
    assert code == 0, err
    out = world["root"] / "dora4.gguf"
    code, _, err = _cli(capsys, "export", "--format", "gguf-lora", "--model", "base.gguf", "--lora", "dora4-gguf",
                        "--models-dir", str(models), "--loras-dir", str(loras), "--out", str(out))
    assert code == 0, err
    tok, model = _load(world["base"])
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, str(dora)).eval()
    llm = llama_cpp.Llama(model_path=str(models / "base.gguf"), lora_path=str(out), n_ctx=256, n_threads=1,
                          verbose=False)
    changed = 0
    for prompt in ("The quick brown fox", "Once upon a time", "Hello, how are"):
        expected = _greedy(tok, peft, prompt, 12)
        with peft.disable_adapter():
            changed += _greedy(tok, peft, prompt, 12) != expected
        ids = []
        for token in llm.generate(llm.tokenize(prompt.encode()), temp=0.0):
            if token == llm.token_eos() or len(ids) == 12:
                break
            ids.append(token)
        llm.reset()
        assert llm.detokenize(ids, special=True).decode("utf-8", "replace") == expected, prompt
    llm.close()
    assert changed  # the adapter changes the text: the comparison means something


def test_lora_panel_badges_match_inspect_target(world, dora, odd, capsys):
    from webui.adapters import library
    from webui.adapters.files import read_adapter
    from webui.adapters.inspect import inspect_adapter
    from webui.adapters.surgery.runtimes import _NAMES, RUNTIMES
    from webui.ui.lora_list import badge

    loras = world["loras"]
    for name in ("dora4", "saves-head", "r24", "plain8"):
        report = inspect_adapter(read_adapter(loras / name)).to_dict()
        shown = badge(library.get(loras, name), {"report": report})
        runs_on = re.search(r"runs on: ([^·<]*)", shown).group(1)
        for runtime in RUNTIMES:
            code, _, _ = _cli(capsys, "inspect", name, "--target", runtime, "--loras-dir", str(loras))
            assert (code == 0) == (_NAMES[runtime] in runs_on), (name, runtime, shown)
    assert "not on: vLLM" in badge(library.get(loras, "dora4"),
                                   {"report": inspect_adapter(read_adapter(loras / "dora4")).to_dict()})
