"""One evaluation on a loaded Engine: check everything first (adapters, dataset, prompts, output path: a bad
one stops the run before any work, naming the file, line or adapter), then score every sample under the base
and each adapter or stack (`Engine.score`, batched; the active stack is left as it was), answer the prompts
with each of them through Engine.submit (greedy; one batched pass where the loader mixes adapters),
and build the report: `evaluate` returns it as a dict (None when cancelled), `write_report` writes it as JSON
and, for a `.html` path, as a self-contained page with the JSON beside it. `run_cli` is `python -m webui eval`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from webui.atomic import write_text_into_place
from webui.engine import Engine
from webui.errors import BadInput, LoraDeckError, NoModelLoaded, first_line
from webui.evaluate import page
from webui.evaluate.inputs import load_dataset, load_pairs, render_prompts
from webui.evaluate.stats import (
    SampleNll,
    mean_loss,
    paired_bootstrap,
    perplexity,
    preference_margins,
    sample_nll,
    verdict,
)
from webui.options.config import EvalConfig, GenerationParams, ModelSpec
from webui.progress import Progress, no_progress
from webui.training.data import IGNORE, Sample

SNIPPET_CHARS = 160  # of each sample's trained text, kept in the report for the per-sample view


def _check_adapters(engine: Engine, configs: list[tuple[str, dict]]) -> None:
    """Each adapter read, checked against the loaded base and cached (not activated), one by one so that an
    error names the adapter."""
    for name in dict.fromkeys(n for _, stack in configs for n in stack):
        try:
            engine.prepare_adapters([name])
        except LoraDeckError as e:
            if name in str(e):
                raise
            raise type(e)(f"adapter {name!r}: {e}") from None


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise BadInput(f"out: {out} is a folder; give a file name ending in .json or .html")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"out: cannot write to {out.parent}: {first_line(e)}") from None


def _snippet(engine: Engine, s: Sample) -> str:
    """The text of a sample's trained tokens (where its loss comes from), shortened."""
    text = "".join(engine.token_texts([t for t, label in zip(s.input_ids, s.labels) if label != IGNORE]))
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS - 1] + "…"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf/nan


GENERAL_TEXT = Path(__file__).resolve().parent.parent / "data" / "general_text.txt"


def _key(stack: dict) -> tuple:
    return tuple(sorted((n, w) for n, w in stack.items() if w != 0))


def _sweep_stacks(cfg: EvalConfig) -> list[tuple[str, float, dict]]:
    """(target, scale, stack) of every sweep point; scale 0 is the plain base itself."""
    return [(target, scale, {n: w * scale for n, w in stack.items()} if scale else {})
            for target, stack, scales in cfg.sweeps() for scale in scales]


def evaluate(engine: Engine, cfg: EvalConfig, progress: Progress = no_progress,
             cancel: threading.Event | None = None) -> dict | None:
    """The report of `cfg` on the loaded model, or None when `cancel` was set (nothing is written either way)."""
    cancel = cancel or threading.Event()
    info = engine.loaded
    if info is None:
        raise NoModelLoaded()
    configs = cfg.configurations()
    points = _sweep_stacks(cfg)
    _check_adapters(engine, configs + [(t, st) for t, _, st in points])
    # a preference dataset: the loss columns are the chosen replies', and the rejected ones give the margins
    samples, rejected = load_pairs(engine, cfg) if cfg.format == "preference" else (load_dataset(engine, cfg), [])
    general = load_dataset(engine, dataclasses.replace(cfg, dataset=str(GENERAL_TEXT), format="raw", max_samples=0,
                                                       overlap=0)) if cfg.general else []
    prompts = render_prompts(engine, cfg)
    _check_out(Path(cfg.out))

    # every distinct stack is scored once: a sweep's scale 0 is the base's own row, its scale 1 the adapter's
    stacks = {_key(st): st for st in [st for _, st in configs] + [st for _, _, st in points]}
    batches = sum(math.ceil(len(d) / cfg.batch_size) for d in (samples, general, rejected))
    steps = len(stacks) * batches + len(prompts) * len(stacks)
    done = 0
    scored: dict[tuple, list[SampleNll]] = {}
    general_scored: dict[tuple, list[SampleNll]] = {}
    rejected_scored: dict[tuple, list[SampleNll]] = {}
    timing: dict[tuple, tuple[float, int]] = {}
    rows_of = {_key(s) for _, s in configs}  # the general text and the margins are reported for these
    for key, stack in stacks.items():
        name = ",".join(f"{n}={w:g}" for n, w in key) or "base"
        for target, data in ((scored, samples), (general_scored, general if key in rows_of else []),
                             (rejected_scored, rejected if key in rows_of else [])):
            start, fed, nll = time.perf_counter(), 0, []
            for b in range(0, len(data), cfg.batch_size):
                if cancel.is_set():
                    return None
                batch = data[b:b + cfg.batch_size]
                scores = engine.score([s.input_ids for s in batch], adapters=stack)
                nll += [sample_nll(s.labels, sc.logprobs) for s, sc in zip(batch, scores)]
                fed += sum(len(s.input_ids) for s in batch)
                done += 1
                what = {id(general_scored): "general text", id(rejected_scored): "rejected replies"}.get(
                    id(target), "samples")
                progress(done / steps, f"scoring {name}: {min(b + cfg.batch_size, len(data))}/{len(data)} {what}")
            target[key] = nll
            if target is scored:
                timing[key] = (time.perf_counter() - start, fed)

    # answers at each scale of a sweep, except where a configuration already answers with that stack
    known = {_key(st) for _, st in configs}
    sweep_configs = [(f"{t}@{scale:g}", st) for t, scale, st in points if _key(st) not in known]
    generations = _generate(engine, cfg, configs + sweep_configs, prompts, cancel,
                            lambda k, msg: progress((done + k) / steps, msg))
    if generations is None:
        return None

    base = scored[()]
    base_loss = mean_loss(base)

    def row(stack: dict, name: str) -> dict:
        nll = scored[_key(stack)]
        loss = mean_loss(nll)
        ci = (0.0, 0.0) if not _key(stack) else paired_bootstrap(base, nll, cfg.bootstrap, cfg.seed)
        return {"loss": _finite(loss), "perplexity": _finite(perplexity(loss)),
                "delta_loss_vs_base": _finite(loss - base_loss), "ci95": [ci[0], ci[1]],
                "verdict": "" if name == "base" else verdict(ci)}

    results = []
    for name, stack in configs:
        nll, (seconds, fed) = scored[_key(stack)], timing[_key(stack)]
        result = {"name": name, "adapters": stack, **row(stack, name), "tokens": sum(s.tokens for s in nll),
                  "tokens_per_s": fed / seconds if seconds > 0 else None, "seconds": seconds,
                  "per_sample_loss": [s.loss for s in nll]}
        if cfg.general:
            g, g_base = general_scored[_key(stack)], general_scored[()]
            g_ci = (0.0, 0.0) if not _key(stack) else paired_bootstrap(g_base, g, cfg.bootstrap, cfg.seed)
            result.update(general_loss=_finite(mean_loss(g)),
                          general_delta_vs_base=_finite(mean_loss(g) - mean_loss(g_base)),
                          general_ci95=[g_ci[0], g_ci[1]], general_verdict="" if name == "base" else verdict(g_ci))
        if rejected:
            margin, wins, ci = preference_margins(nll, rejected_scored[_key(stack)], cfg.bootstrap, cfg.seed)
            result.update(pref_margin=margin, pref_win_rate=wins, pref_ci95=[ci[0], ci[1]])
        results.append(result)
    sweeps = [{"target": target, "adapters": stack,
               "points": [{"scale": scale, **{k: v for k, v in row({n: w * scale for n, w in stack.items()}
                                                                    if scale else {}, target).items()
                                              if k != "verdict"}} for scale in scales]}
              for target, stack, scales in cfg.sweeps()]
    progress(1.0, "done")
    return {
        "model": info.name, "loader": info.loader,
        "dataset": {"path": str(cfg.dataset), "format": cfg.format, "samples": len(samples),
                    "tokens": results[0]["tokens"]},
        "general_text": {"path": GENERAL_TEXT.name, "samples": len(general),
                         "tokens": sum(s.tokens for s in general_scored.get((), []))} if cfg.general else None,
        "results": results,
        "sweeps": sweeps,
        "generations": generations,
        "samples": [{"record": s.record, "tokens": n.tokens, "length": len(s.input_ids), "text": _snippet(engine, s)}
                    for s, n in zip(samples, base)],
        "settings": {**dataclasses.asdict(cfg), "model_spec": dataclasses.asdict(engine.spec) if engine.spec else None,
                     "context_length": info.context_length, "device": info.device, "dtype": info.dtype},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _generate(engine: Engine, cfg: EvalConfig, configs, prompts, cancel: threading.Event, progress) -> list | None:
    """Every prompt answered greedily under every configuration. All requests are queued at once, so the
    scheduler batches them (base and single adapters share a pass on loaders with mixed batches)."""
    if not prompts:
        return []
    params = GenerationParams(temperature=0, max_new_tokens=cfg.max_new_tokens)
    handles = [[engine.submit(text, params, stack) for _, stack in configs] for _, text in prompts]
    out, k = [], 0
    try:
        for (prompt, _), row in zip(prompts, handles):
            outputs = {}
            for (name, _), handle in zip(configs, row):
                text = ""
                try:
                    for delta in handle:
                        text += delta
                        if cancel.is_set():
                            return None
                except LoraDeckError as e:
                    text = f"[error: {e}]"
                if cancel.is_set():
                    return None
                outputs[name] = text
                k += 1
                progress(k, f"answering prompt {len(out) + 1}/{len(prompts)} with {name}")
            out.append({"prompt": prompt, "outputs": outputs})
    finally:  # a cancelled run must not leave answers generating for nobody
        for row in handles:
            for handle in row:
                handle.close()
    return out




def write_report(report: dict, out: Path) -> list[Path]:
    """The JSON report, and for a .html path the page too (the JSON beside it). Returns the files written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    write_text_into_place(json_path, json.dumps(report, indent=2, ensure_ascii=False))
    if out.suffix.lower() != ".html":
        return [json_path]
    write_text_into_place(out, page.render(report))
    return [out, json_path]


def summary_text(report: dict) -> str:
    """The results as a plain-text table (what the CLI prints)."""
    lines = [f"{'name':<24} {'loss':>8} {'perplexity':>11} {'tokens':>7} {'Δ vs base':>10} {'95% CI':>19}  verdict"]
    for r in report["results"]:
        ci = "" if r["name"] == "base" else f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
        delta = "" if r["name"] == "base" else f"{r['delta_loss_vs_base']:+.4f}"
        ppl = f"{r['perplexity']:.3f}" if r["perplexity"] is not None else "inf"
        lines.append(f"{r['name']:<24} {r['loss']:>8.4f} {ppl:>11} {r['tokens']:>7} {delta:>10} {ci:>19}  "
                     f"{r['verdict']}")
    if report.get("general_text"):
        lines.append(f"\ngeneral English text ({report['general_text']['tokens']} tokens): loss, Δ vs base, 95% CI")
        for r in report["results"]:
            ci = "" if r["name"] == "base" else f"[{r['general_ci95'][0]:+.4f}, {r['general_ci95'][1]:+.4f}]  " \
                                                 f"{r['general_verdict']}"
            lines.append(f"{r['name']:<24} {r['general_loss']:>8.4f} {r['general_delta_vs_base']:>+10.4f} {ci}")
    if any("pref_margin" in r for r in report["results"]):
        lines.append("\npreference pairs: margin (log-prob of chosen - rejected), win rate, 95% CI of the margin")
        for r in report["results"]:
            lines.append(f"{r['name']:<24} {r['pref_margin']:>+10.4f} {r['pref_win_rate']:>8.1%} "
                         f"[{r['pref_ci95'][0]:+.4f}, {r['pref_ci95'][1]:+.4f}]")
    for sweep in report.get("sweeps") or []:
        lines.append(f"\nsweep of {sweep['target']}: scale, loss, Δ vs base, 95% CI")
        for p in sweep["points"]:
            lines.append(f"{p['scale']:>8g} {p['loss']:>8.4f} {p['delta_loss_vs_base']:>+10.4f} "
                         f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]")
    return "\n".join(lines)


def run_cli(spec: ModelSpec, cfg: EvalConfig, log=print) -> list[Path]:
    """Load the model, evaluate, write the report; what `python -m webui eval` does."""
    engine = Engine(cfg.models_dir, cfg.loras_dir)
    engine.load(spec, progress=lambda f, msg: log(f"[load] {msg}"))
    try:
        report = evaluate(engine, cfg, progress=lambda f, msg: log(f"[eval] {100 * (f or 0):3.0f}% {msg}"))
        paths = write_report(report, Path(cfg.out))
    finally:
        engine.unload()
    print(summary_text(report))
    return paths
