"""Adapter surgery from the LoRA panel in a real browser: resize an adapter to a lower rank and the new adapter
is in the loras folder with that rank, its delta equal to torch's SVD truncation of the source's (computed here),
and in the list; a DoRA adapter converted to a plain LoRA; a missing source is refused in the panel, nothing
written."""
import json

import torch
from safetensors.torch import load_file

from tests.browser import open_app, tab, wait_text
from webui.testing.tiny_models import write_adapter


def _fill(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(text)


def _delta(folder, module: str) -> torch.Tensor:
    """s·B·A of one module, from the files (plain torch, not our code)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    w = load_file(str(folder / "adapter_model.safetensors"))
    a = next(v for k, v in w.items() if module in k and "lora_A" in k)
    b = next(v for k, v in w.items() if module in k and "lora_B" in k)
    return (cfg["lora_alpha"] / cfg["r"]) * b.double() @ a.double()


def test_resize_and_convert_from_the_lora_panel(browser, start_app, tiny_models, tmp_path):
    base = tiny_models["llama"]
    loras = tmp_path / "loras"
    write_adapter(base, loras / "wide", target_modules=["q_proj", "v_proj"], r=8, alpha=16, seed=4)
    write_adapter(base, loras / "dora", target_modules=["q_proj"], r=4, alpha=8, seed=6, use_dora=True)
    app = start_app("--model", "tiny-llama", "--models-dir", str(base.parent), "--loras-dir", str(loras),
                    "--runs-dir", str(tmp_path / "runs"), "--user-dir", str(tmp_path / "user"))
    page = open_app(browser, app.url)
    tab(page, "Model")
    page.get_by_text("Reshape an adapter: resize, DoRA → LoRA, extract from a fine-tune").click()

    # a source that does not exist: refused in the panel, nothing written
    _fill(page, "surgery-source", "no-such-adapter")
    _fill(page, "surgery-out", "never")
    page.click("#surgery-go")
    message = wait_text(lambda: page.inner_text("#surgery-message"), timeout=60)
    assert "no-such-adapter" in message and not (loras / "never").exists(), message

    # resize wide (r=8) to rank 2
    _fill(page, "surgery-source", "wide")
    _fill(page, "surgery-out", "wide-r2")
    rank = page.locator("#surgery-rank input[type=number]").first
    rank.fill("2")
    page.click("#surgery-go")
    message = wait_text(lambda: page.inner_text("#surgery-message"), timeout=120,
                        key=lambda t: t if "Saved" in t or "⚠" in t or "rror" in t else "")
    assert "Saved wide-r2" in message and "relative error" in message, message
    cfg = json.loads((loras / "wide-r2" / "adapter_config.json").read_text())
    assert cfg["r"] == 2
    for module in ("layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj"):
        u, s, vh = torch.linalg.svd(_delta(loras / "wide", module))
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(_delta(loras / "wide-r2", module), best, atol=1e-5, rtol=1e-4)
    assert wait_text(lambda: "wide-r2" if page.locator("#lora-on-wide-r2").count() else "", "wide-r2",
                     timeout=30) == "wide-r2"  # listed in the panel

    # a DoRA adapter rewritten as a plain LoRA at its own rank
    page.locator("#surgery-op input").first.click()
    page.get_by_role("option", name="convert DoRA → plain LoRA").click()
    _fill(page, "surgery-source", "dora")
    _fill(page, "surgery-out", "dora-lora")
    rank.fill("4")
    page.click("#surgery-go")
    message = wait_text(lambda: page.inner_text("#surgery-message"), timeout=120,
                        key=lambda t: t if "Saved dora-lora" in t or "⚠" in t else "")
    assert "Saved dora-lora" in message, message
    converted = json.loads((loras / "dora-lora" / "adapter_config.json").read_text())
    assert not converted.get("use_dora") and converted["r"] == 4
    hidden = [p.name for p in loras.iterdir() if p.name.startswith(".") and p.name not in (".cache", ".locks")]
    assert hidden == [], sorted(p.name for p in loras.iterdir())  # no staging folder left behind
