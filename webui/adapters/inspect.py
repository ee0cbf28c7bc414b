"""The compatibility report: does this adapter fit this base, and if not, why — in plain words.

It compares the base the adapter names (`base_model_name_or_path`) with the loaded one, lists rank,
alpha and targets, checks every LoRA tensor's shape against the base's layer, and sorts the targets
into documented (LoRAX's table of supported targets), adaptable (any other Linear/Conv1D/Embedding layer) and
unsupported (no such layer: ignored with a warning). The verdict is `ok`, `warnings` (usable; read the
warnings) or `incompatible` (refused, with the reasons).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from webui.adapters.targets import BaseDescription
from webui.adapters.types import AdapterFiles, split_key


@dataclass
class Report:
    adapter: str
    path: str
    base_named: str
    base_loaded: str | None
    rank: int
    alpha: float
    targets: list
    weights_format: str
    size_bytes: int
    documented_targets: list = field(default_factory=list)
    ignored_targets: list = field(default_factory=list)
    layers_checked: int = 0
    verdict: str = "ok"
    reasons: list = field(default_factory=list)   # why incompatible
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return self.verdict != "incompatible"

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for error messages: the verdict and its reasons."""
        if self.verdict == "incompatible":
            return f"{self.adapter} does not fit {self.base_loaded}: " + "; ".join(self.reasons)
        return f"{self.adapter}: {self.verdict}" + ("; " + "; ".join(self.warnings) if self.warnings else "")

    def text(self) -> str:
        lines = [
            f"adapter:        {self.adapter}  ({self.path})",
            f"trained on:     {self.base_named or '(not recorded)'}",
            f"checked against:{' ' + self.base_loaded if self.base_loaded else ' (no base given: files only)'}",
            f"rank / alpha:   {self.rank} / {self.alpha:g}",
            f"targets:        {', '.join(self.targets)}",
            f"weights:        {self.weights_format}, {self.size_bytes / 1e6:.2f} MB",
        ]
        if self.base_loaded:
            lines.append(f"supported here: {', '.join(self.documented_targets) or '(any linear layer)'}")
            lines.append(f"layers checked: {self.layers_checked}")
        lines.append(f"verdict:        {self.verdict.upper()}")
        lines += [f"  ✗ {r}" for r in self.reasons] + [f"  ! {w}" for w in self.warnings] + [f"  · {n}" for n in self.notes]
        return "\n".join(lines)


def _targets(config: dict) -> list[str]:
    t = config.get("target_modules") or []
    return [t] if isinstance(t, str) else list(t)


_QUANT_SUFFIX = re.compile(r"([-_.](gptq|awq|gguf|exl2|int4|int8|4bit|8bit|[qf]\d+(_[a-z0-9]+)*|bf16|fp16))+$")


def _same_base(named: str, loaded: str) -> bool:
    """Same model up to org prefix, case, punctuation and a quantization suffix (-GPTQ, .Q4_K_M, ...)."""
    def norm(s):
        s = s.rsplit("/", 1)[-1].lower().removesuffix(".gguf")
        return re.sub(r"[^a-z0-9]", "", _QUANT_SUFFIX.sub("", s))
    return norm(named) == norm(loaded)


def inspect_adapter(files: AdapterFiles, state: dict | None = None, base: BaseDescription | None = None) -> Report:
    """Build the report. `state` (the loaded tensors) enables the shape check; `base` the fit check."""
    cfg = files.config
    report = Report(adapter=files.name, path=str(files.path), base_named=str(cfg.get("base_model_name_or_path") or ""),
                    base_loaded=base.name if base else None, rank=cfg["r"], alpha=cfg.get("lora_alpha", cfg["r"]),
                    targets=_targets(cfg), weights_format=files.format, size_bytes=files.size)
    if state is None or base is None:
        return _finish(report)

    report.documented_targets = list(base.documented)
    if report.base_named and not _same_base(report.base_named, base.name):
        report.warnings.append(f"trained on {report.base_named}, but the loaded base is {base.name}")
    rank_pattern = cfg.get("rank_pattern") or {}
    leaf_names = base.leaf_names
    modules: dict[str, dict[str, tuple]] = {}
    for key, tensor in state.items():
        module, part = split_key(key)
        modules.setdefault(module, {})[part or key] = tuple(tensor.shape)

    target_params = cfg.get("target_parameters") or []
    ignored, applied, by_parameter = set(), 0, set()
    for module, parts in sorted(modules.items()):
        leaf = module.rsplit(".", 1)[-1]
        if module in base.params and target_params:
            # a parameter target (MoE experts, routers): PEFT checks these shapes when it loads them
            applied += 1
            by_parameter.add(leaf)
            continue
        if not any(p in parts for p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
            if module not in base.layers and not any(n.startswith(module + ".") for n in base.layers):
                report.reasons.append(f"saves module {module}, which this base does not have")
            continue
        if leaf not in leaf_names:
            ignored.add(leaf)
            continue
        layer = base.layers.get(module)
        if layer is None:
            report.reasons.append(f"targets {module}, which this base does not have"
                                  + (f" (it has {base.num_layers} layers)" if base.num_layers else ""))
            continue
        a = parts.get("lora_A") or parts.get("lora_embedding_A")
        b = parts.get("lora_B") or parts.get("lora_embedding_B")
        if a is None or b is None:
            report.reasons.append(f"{module}: lora_A or lora_B weights are missing")
            continue
        applied += 1
        in_a, out_b = a[1], b[0]
        if in_a != layer.in_features or out_b != layer.out_features:
            report.reasons.append(
                f"{module}: adapter expects a {in_a}→{out_b} layer, the base has {layer.in_features}→{layer.out_features}")
        expected_r = next((v for pat, v in rank_pattern.items() if re.search(pat, module)), cfg["r"])
        if a[0] != b[1] or a[0] != expected_r:
            report.reasons.append(f"{module}: weights have rank {a[0]}/{b[1]} but the config says r={expected_r}")
    report.layers_checked = applied
    if ignored:
        report.ignored_targets = sorted(ignored)
        report.warnings.append(f"target(s) {', '.join(sorted(ignored))} are not layers of this "
                               f"{base.model_type or 'model'} base and will be ignored")
    if by_parameter:
        report.notes.append(f"{', '.join(sorted(by_parameter))}: parameters targeted through PEFT's "
                            "target_parameters (shapes are checked when PEFT loads them)")
    if applied == 0 and not report.reasons:
        report.reasons.append("none of the adapter's targets exist in this base")
    extra = sorted({m.rsplit('.', 1)[-1] for m in modules if m.rsplit('.', 1)[-1] in leaf_names} - set(base.documented))
    if base.documented and extra:
        report.notes.append(f"{', '.join(extra)}: not in the usual target list for {base.model_type}; "
                            "applied as any linear layer")
    return _finish(report)


def _finish(report: Report) -> Report:
    report.verdict = "incompatible" if report.reasons else ("warnings" if report.warnings else "ok")
    return report
