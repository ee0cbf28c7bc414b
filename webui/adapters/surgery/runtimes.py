"""Will this adapter run on that serving runtime as it stands? `inspect NAME --target RUNTIME` answers from the
adapter's files alone: every reason it would not, each with the command that fixes it where one exists.

The rules, and where each comes from (nothing here talks to a running engine; `docs/adapter-surgery.md` says
which were tried on a real one):
- vLLM: `vllm/lora/peft_helper.py` (PEFTHelper._validate_features / validate_legal) refuses DoRA, lora_bias, a
  `bias` other than "none", modules_to_save other than a classifier head, inits that rewrite the base weights
  (PiSSA, OLoRA, CorDA, LoftQ), aLoRA, layer_replication, and a rank above `--max-lora-rank`. That flag takes only
  the values of `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]` (`vllm/config/lora.py`; the same
  list on docs.vllm.ai's API page for v0.14 and in v0.26's source), default 16. A LoRA on lm_head / embed_tokens is
  an "unsupported LoRA weight" for most models (vllm#9280, vllm#32599). Releases before its rank_pattern /
  alpha_pattern support apply one alpha/r to every layer.
- SGLang: refuses DoRA ("LoRA serving currently doesn't support DoRA adapters", sglang#22125); its loader reads
  lora_A / lora_B weights, so whole saved modules are not applied.
- llama.cpp and Ollama (which runs llama.cpp): llama.cpp's `convert_lora_to_gguf.py` stops at any tensor that is
  not lora_A / lora_B (DoRA magnitudes: llama.cpp#6536; modules_to_save: llama.cpp#11554; LoRA biases) and
  writes `lora_alpha` as it is, which llama.cpp divides by each tensor's rank: an rsLoRA or alpha_pattern adapter
  gets the wrong scale from that converter (LoRA Deck's `export --format gguf-lora` folds the right scale in).
- LoRAX: reads lora_A / lora_B per target (rsLoRA honoured since predibase/lorax#299); DoRA magnitudes and
  saved modules are not applied, targets outside its table are ignored with a warning.
- LoRA Deck: the transformers loader runs whatever PEFT runs; its llama.cpp loader has llama.cpp's limits.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

from webui.adapters.types import CONFIG, AdapterFiles, split_key
from webui.options.commands import Runtime

RUNTIMES = get_args(Runtime)  # the choices of `inspect --target` (webui/options/commands.py)
# vllm/config/lora.py: MaxLoRARanks (see the module docstring); 16 is LoRAConfig.max_lora_rank's default
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
_HEAD = ("lm_head", "embed_out")
_EMBED = ("embed_tokens", "wte", "word_embeddings", "embed_in")
# init_lora_weights values after which the saved adapter assumes rewritten base weights (vLLM refuses them)
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
_NAMES = {"vllm": "vLLM", "sglang": "SGLang", "llamacpp": "llama.cpp", "ollama": "Ollama", "lorax": "LoRAX",
          "loradeck": "LoRA Deck"}


@dataclass
class Facts:
    """What the rules look at, read once from the config and the tensors."""

    dora: bool = False
    saved_modules: list = field(default_factory=list)   # whole modules (modules_to_save)
    head_targets: list = field(default_factory=list)    # LoRA on lm_head
    embed_targets: list = field(default_factory=list)   # LoRA on the token embeddings
    max_rank: int = 0
    lora_bias: bool = False
    bias: str = "none"
    rslora: bool = False
    patterns: bool = False   # rank_pattern / alpha_pattern give some layer another scale than alpha/r
    init: str = ""
    gguf: bool = False
    extra: list = field(default_factory=list)  # other PEFT features some engines refuse


def facts_of(files: AdapterFiles, state: dict | None) -> Facts:
    cfg = files.config
    f = Facts(gguf=files.format == "gguf", bias=str(cfg.get("bias") or "none"), rslora=bool(cfg.get("use_rslora")),
              lora_bias=bool(cfg.get("lora_bias")), dora=bool(cfg.get("use_dora")), max_rank=int(cfg.get("r") or 0))
    init = cfg.get("init_lora_weights")
    f.init = init.lower() if isinstance(init, str) else ""
    saved = set(cfg.get("modules_to_save") or [])
    ranks = [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    for key, tensor in (state or {}).items():
        module, part = split_key(key)
        leaf = module.rsplit(".", 1)[-1]
        if part == "lora_magnitude_vector":
            f.dora = True
        elif not part and not (key.endswith(".bias") and f.bias != "none"):  # trained base biases: see `bias`
            saved.add(leaf)
        elif key.endswith(".bias") and part == "lora_B":
            f.lora_bias = True
        if part in ("lora_embedding_A", "lora_embedding_B") or (part and leaf in _EMBED):
            f.embed_targets.append(module)
        elif part and leaf in _HEAD:
            f.head_targets.append(module)
        if part in ("lora_A", "lora_embedding_A") and tensor.dim() == 2:
            ranks.append(int(tensor.shape[0]))
    f.saved_modules = sorted(m for m in saved if m not in ("classifier", "score"))
    f.embed_targets, f.head_targets = sorted(set(f.embed_targets)), sorted(set(f.head_targets))
    f.max_rank = max([f.max_rank, *ranks])
    r, alpha = cfg.get("r") or 1, cfg.get("lora_alpha", cfg.get("r") or 1)
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    # per-layer scales equal to alpha/r everywhere (as `resize` writes them: alpha_pattern = rank_pattern) are
    # read the same by an engine that ignores the patterns
    f.patterns = any(ap.get(k, alpha) / v != alpha / r for k, v in rp.items()) or any(
        k not in rp and v != alpha for k, v in ap.items())
    f.extra = [k for k in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora") if cfg.get(k)]
    return f


@dataclass
class TargetReport:
    adapter: str
    runtime: str
    runs: bool = True
    reasons: list = field(default_factory=list)   # [{"problem", "fix"}]
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        name = _NAMES[self.runtime]
        lines = [f"target:         {name}", f"runs there:     {'YES' if self.runs else 'NO'}"]
        for r in self.reasons:
            lines.append(f"  ✗ {r['problem']}")
            lines.append(f"      fix: {r['fix']}" if r["fix"] else "      fix: none as an adapter")
        return "\n".join(lines + [f"  ! {w}" for w in self.warnings] + [f"  · {n}" for n in self.notes])


def check_runtime(files: AdapterFiles, state: dict | None, runtime: str,
                  max_lora_rank: int | None = None) -> TargetReport:
    """The verdict for one runtime. `max_lora_rank`: the vLLM server's --max-lora-rank (default: vLLM's, 16)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
    f, name, rep = facts_of(files, state), files.name, TargetReport(files.name, runtime)
    who = _NAMES[runtime]

    def refuse(problem: str, fix: str = "") -> None:
        rep.reasons.append({"problem": problem, "fix": fix})

    convert = f"python -m webui convert {name} --to lora --out {name}-lora"
    merge = (f"merge it into the base instead: python -m webui export --model BASE --lora {name} "
             "--format safetensors --out DIR (or --format gguf)")
    if runtime == "loradeck":
        _loradeck(f, rep, convert)
        return rep
    if f.gguf and runtime in ("vllm", "sglang", "lorax"):
        refuse(f"a GGUF LoRA file; {who} loads PEFT adapter folders", "use the PEFT folder it was converted from")
    if f.dora:
        refuse(f"a DoRA adapter (lora_magnitude_vector): {who} runs plain LoRA only", convert)
    if f.saved_modules:
        refuse(f"saves whole modules ({', '.join(f.saved_modules)}: modules_to_save), which {who} does not load "
               "from an adapter", merge)
    if f.lora_bias:
        refuse(f"has LoRA biases (lora_bias=True), which {who} does not support", merge)
    if runtime in ("vllm", "sglang") and f.bias != "none":
        refuse(f"trains base biases (bias={f.bias!r}), which {who} does not load from an adapter", merge)
    if runtime == "vllm":
        _vllm(f, rep, name, refuse, max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK, merge)
    elif runtime == "sglang":
        if f.head_targets or f.embed_targets:
            rep.warnings.append(f"LoRA on {', '.join(f.head_targets + f.embed_targets)}: SGLang supports it only for "
                                "some model families; check your version")
        rep.notes.append(f"start SGLang with --max-lora-rank ≥ {f.max_rank} (or let it infer the rank from "
                         "--lora-paths) when adapters are loaded after start")
    elif runtime in ("llamacpp", "ollama"):
        _llamacpp(f, rep, name, runtime)
    elif runtime == "lorax" and f.embed_targets:
        rep.warnings.append(f"LoRA on {', '.join(f.embed_targets)}: not a target in LoRAX's table; ignored there")
    if f.init in _BASE_REWRITING_INITS and runtime != "vllm":
        rep.warnings.append(f"init_lora_weights={f.init!r}: the adapter may assume base weights rewritten by that "
                            "init; it matches the original base only if it was saved converted")
    rep.runs = not rep.reasons
    return rep


def _vllm(f: Facts, rep: TargetReport, name: str, refuse, max_rank: int, merge: str) -> None:
    if f.head_targets or f.embed_targets:
        refuse(f"LoRA on {', '.join(f.head_targets + f.embed_targets)}: an \"unsupported LoRA weight\" for vLLM on "
               "most models", merge)
    if f.init in _BASE_REWRITING_INITS:
        refuse(f"init_lora_weights={f.init!r} (its adapters assume rewritten base weights): vLLM refuses it",
               "save it converted with PEFT's path_initial_model_for_weight_conversion")
    for extra in f.extra:
        refuse(f"uses {extra}, which vLLM does not support")
    largest = VLLM_MAX_LORA_RANKS[-1]
    fits = [c for c in VLLM_MAX_LORA_RANKS if c >= f.max_rank]

    def lower(rank: int) -> str:  # a DoRA adapter changes rank through convert (resize refuses it)
        how = f"convert {name} --to lora" if f.dora else f"resize {name}"
        return f"python -m webui {how} --rank {rank} --out {name}-r{rank}"

    if f.max_rank > largest:
        refuse(f"rank {f.max_rank} is above the largest --max-lora-rank vLLM accepts ({largest})", lower(largest))
    elif f.max_rank > max_rank:
        down = max(c for c in VLLM_MAX_LORA_RANKS if c <= max_rank)
        refuse(f"rank {f.max_rank} is above --max-lora-rank {max_rank} (vLLM's default is "
               f"{VLLM_DEFAULT_MAX_LORA_RANK}; allowed values: {', '.join(map(str, VLLM_MAX_LORA_RANKS))})",
               f"start vLLM with --max-lora-rank {fits[0]}, or {lower(down)}")
    if max_rank not in VLLM_MAX_LORA_RANKS:
        rep.warnings.append(f"--max-lora-rank {max_rank} is not one of the values vLLM accepts "
                            f"({', '.join(map(str, VLLM_MAX_LORA_RANKS))})")
    if f.patterns:
        rep.warnings.append("rank_pattern/alpha_pattern give some layers another scale than lora_alpha/r: vLLM "
                            "releases before their support apply one scale to every layer (python -m webui resize "
                            f"{name} --rank R --out ... writes an adapter without that difference)")
    if f.rslora:
        rep.notes.append("rsLoRA: vLLM scales by lora_alpha/√r (vllm#6909)")


def _llamacpp(f: Facts, rep: TargetReport, name: str, runtime: str) -> None:
    export = (f"python -m webui export --model BASE.gguf --lora {name} --format "
              f"{'ollama' if runtime == 'ollama' else 'gguf-lora'} --out OUT")
    if f.embed_targets:
        rep.warnings.append(f"LoRA on {', '.join(f.embed_targets)}: llama.cpp's converter takes it, LoRA Deck's "
                            "GGUF LoRA export does not")
    if f.head_targets:
        rep.warnings.append("LoRA on lm_head: llama.cpp refuses it when the base ties lm_head to the embeddings")
    if f.rslora or f.patterns:
        rep.warnings.append("rsLoRA / alpha_pattern scales: llama.cpp's convert_lora_to_gguf.py writes lora_alpha as "
                            f"it is and gets them wrong; convert with LoRA Deck ({export}), which folds them in")
    if not f.gguf:
        rep.notes.append(f"{_NAMES[runtime]} takes a GGUF LoRA: {export}")


def _loradeck(f: Facts, rep: TargetReport, convert: str) -> None:
    if f.gguf:
        rep.notes.append("a GGUF LoRA: runs on the llama.cpp loader only")
        return
    limits = [what for what, on in (("DoRA", f.dora), ("modules_to_save", f.saved_modules),
                                    ("LoRA biases", f.lora_bias), ("embedding LoRA", f.embed_targets)) if on]
    if limits:
        rep.warnings.append(f"{', '.join(limits)}: runs on the transformers loader; the llama.cpp loader refuses it"
                            + (f" (for llama.cpp: {convert})" if f.dora else ""))


def runtime_line(path: str | Path) -> tuple[str, str]:
    """For the LoRA panel's badge: (one line "runs on: … · not on: …", the full per-runtime text), from the
    adapter's config alone (no tensor read: the panel draws many rows; `inspect --target` also reads the tensors,
    which finds the rare DoRA or saved module a config does not declare). ("", "") for what cannot be read."""
    try:
        files = _read_cached(str(path), Path(path, CONFIG).stat().st_mtime_ns)
    except (OSError, ValueError):
        return "", ""
    reports = [check_runtime(files, None, rt) for rt in RUNTIMES]
    yes = [_NAMES[r.runtime] for r in reports if r.runs]
    no = [_NAMES[r.runtime] for r in reports if not r.runs]
    line = f"runs on: {', '.join(yes) or 'none'}" + (f" · not on: {', '.join(no)}" if no else "")
    return line, "\n\n".join(r.text() for r in reports)


@functools.lru_cache(maxsize=512)
def _read_cached(path: str, mtime_ns: int) -> AdapterFiles:
    from webui.adapters.files import read_adapter  # files.py pulls in the GGUF reader; the CLI's import stays light

    return read_adapter(Path(path))
