"""The evaluation report as one self-contained HTML page: the results table, a bar chart of perplexity per
configuration (inline SVG), the per-sample view (which samples each adapter helps or hurts), the side-by-side
answers and the settings. No script, font or image is fetched: it opens offline and can be mailed as one
file. The fragments carry inline styles, so the Evaluate tab shows the same table and chart as the page.
"""
from __future__ import annotations

import html
import json
import math

SAMPLE_ROWS = 200  # per-sample rows on the page; the JSON keeps every sample
COLORS = {"base": "#9ca3af", "better than base": "#16a34a", "worse than base": "#dc2626",
          "no clear difference": "#3b82f6"}
TABLE = 'style="border-collapse:collapse;margin:8px 0;font-size:14px"'
TH = 'style="text-align:left;padding:4px 10px;border-bottom:2px solid #d1d5db;background:#f3f4f6"'
TD = 'style="padding:4px 10px;border-bottom:1px solid #e5e7eb;vertical-align:top"'
NUM = ('style="padding:4px 10px;border-bottom:1px solid #e5e7eb;text-align:right;white-space:nowrap;'
       'font-variant-numeric:tabular-nums"')

HOW_TO_READ = """Loss is the mean negative log-likelihood (in nats) of the tokens training would learn (the
assistant's turns of instruction and chat data, every token of raw text); perplexity is exp(loss), the number of
equally likely choices the model is as unsure as. Lower is better for both. Δ is an adapter's loss minus the
base's on the same samples; the 95% interval comes from a paired bootstrap over samples: when it lies below 0
the adapter fits this data better than the base, above 0 worse, and when it contains 0 the data cannot tell them
apart (an adapter that changes nothing — "LoRA not applying" — shows Δ ≈ 0). Measure on held-out data: on its
own training samples an adapter always looks good. The general-text columns score the same targets on a built-in
sample of general English (public domain: the Declaration of Independence and two speeches of Abraham Lincoln):
red there means the adapter made the base worse at ordinary text."""


def _e(x) -> str:
    return html.escape(str(x))


def _num(x, fmt: str = ".4f") -> str:
    return "—" if x is None else format(x, fmt)


def _color(r: dict) -> str:
    return COLORS["base"] if r["name"] == "base" else COLORS.get(r["verdict"], COLORS["no clear difference"])


def _stack(adapters: dict) -> str:
    return ", ".join(f"{n} × {w:g}" for n, w in adapters.items()) or "(none)"


def _general_cells(r: dict) -> str:
    """General English text: Δ loss vs the base, its interval, in the verdict's colour (red: the adapter hurts)."""
    if r["name"] == "base":
        return f'<td {NUM}>{_num(r.get("general_loss"))}</td><td {NUM}></td>'
    color = COLORS.get(r.get("general_verdict", ""), COLORS["no clear difference"])
    ci = r.get("general_ci95") or [0, 0]
    cell = NUM[:-1] + f';color:{color};font-weight:600"'  # NUM's style, in the verdict's colour
    return (f'<td {cell} class="general">{_num(r.get("general_delta_vs_base"), "+.4f")}</td>'
            f'<td {cell}>[{ci[0]:+.4f}, {ci[1]:+.4f}]</td>')


def _preference_cells(r: dict) -> str:
    """A preference dataset: the mean margin of chosen over rejected (summed log-probabilities), its interval and
    the win rate."""
    return (f'<td {NUM} class="pref-margin">{_num(r.get("pref_margin"), "+.3f")}</td>'
            f'<td {NUM}>[{r["pref_ci95"][0]:+.3f}, {r["pref_ci95"][1]:+.3f}]</td>'
            f'<td {NUM} class="pref-win">{_num(100 * r["pref_win_rate"], ".0f")}%</td>')


def results_table(report: dict) -> str:
    general = bool(report.get("general_text"))
    pref = any("pref_margin" in r for r in report["results"])
    titles = ("name", "adapters", "loss", "perplexity", "tokens", "tokens/s", "Δ loss vs base", "95% interval of Δ",
              "reading") + (("general text: loss / Δ vs base", "its 95% interval") if general else ()) + (
              ("margin: log-prob chosen − rejected", "its 95% interval", "win rate") if pref else ())
    head = "".join(f"<th {TH}>{h}</th>" for h in titles)
    rows = []
    for r in report["results"]:
        base = r["name"] == "base"
        ci = "" if base else f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
        rows.append(
            f'<tr class="result" data-name="{_e(r["name"])}"><td {TD}><b>{_e(r["name"])}</b></td>'
            f'<td {TD}>{_e(_stack(r["adapters"]))}</td><td {NUM}>{_num(r["loss"])}</td>'
            f'<td {NUM}>{_num(r["perplexity"], ".3f")}</td><td {NUM}>{r["tokens"]}</td>'
            f'<td {NUM}>{_num(r.get("tokens_per_s"), ".0f")}</td>'
            f'<td {NUM}>{"" if base else _num(r["delta_loss_vs_base"], "+.4f")}</td><td {NUM}>{ci}</td>'
            f'<td {TD}><span style="color:{_color(r)};font-weight:600;white-space:nowrap">{_e(r["verdict"])}</span>'
            f'</td>{_general_cells(r) if general else ""}{_preference_cells(r) if pref else ""}</tr>')
    return f'<table class="results" {TABLE}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def perplexity_chart(report: dict) -> str:
    """Horizontal bars, one per configuration, length proportional to perplexity (base in grey; green, red or
    blue by the reading of its difference to the base). When perplexities span more than a factor of 10 the
    scale is logarithmic (length proportional to the loss), or the small ones would not show at all."""
    results = report["results"]
    label_w, bar_w, row_h, top = 190, 430, 30, 28
    width, height = label_w + bar_w + 90, top + row_h * len(results) + 10
    finite = [r["perplexity"] for r in results if r["perplexity"] is not None]
    log = bool(finite) and max(finite) > 10 * min(finite)
    scaled = math.log if log else float
    peak = max((scaled(p) for p in finite), default=1.0) or 1.0
    scale = "log scale, " if log else ""
    parts = [f'<svg id="perplexity-chart" class="ppl-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="perplexity per configuration" '
             f'style="font-family:system-ui,sans-serif;font-size:13px">',
             f'<text x="0" y="16" font-weight="600">Perplexity ({scale}lower is better)</text>']
    for i, r in enumerate(results):
        y = top + i * row_h
        ppl = r["perplexity"]
        length = bar_w if ppl is None else max(2.0, bar_w * scaled(ppl) / peak)
        name = r["name"] if len(r["name"]) <= 26 else r["name"][:25] + "…"
        parts.append(f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">{_e(name)}</text>')
        parts.append(f'<rect class="bar" data-name="{_e(r["name"])}" x="{label_w}" y="{y + 3}" width="{length:.1f}" '
                     f'height="{row_h - 8}" rx="3" fill="{_color(r)}"><title>{_e(r["name"])}: '
                     f'{_num(ppl, ".3f")}</title></rect>')
        parts.append(f'<text x="{label_w + length + 6:.1f}" y="{y + 17}">{_num(ppl, ".3f") if ppl else "∞"}</text>')
    parts.append("</svg>")
    return "".join(parts)


def sweep_chart(report: dict) -> str:
    """Loss against scale, one line per swept adapter or stack (inline SVG), the base's loss dashed: where the
    curve dips below the line, that strength fits the data better than the base."""
    sweeps = report.get("sweeps") or []
    if not sweeps:
        return ""
    w, h, left, top, bottom = 640, 300, 60, 30, 40
    scales = [p["scale"] for sw in sweeps for p in sw["points"]]
    losses = [p["loss"] for sw in sweeps for p in sw["points"] if p["loss"] is not None]
    base = next((r["loss"] for r in report["results"] if r["name"] == "base"), None)
    if base is not None:
        losses.append(base)
    x0, x1 = min(scales), max(scales)
    y0, y1 = min(losses, default=0.0), max(losses, default=1.0)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    px = (lambda x: left + (w - left - 20) * (x - x0) / (x1 - x0))  # noqa: E731
    py = (lambda y: top + (h - top - bottom) * (1 - (y - y0) / (y1 - y0)))  # noqa: E731
    palette = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c")
    parts = [f'<svg id="sweep-chart" class="sweep-chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" role="img" aria-label="loss against adapter scale" '
             f'style="font-family:system-ui,sans-serif;font-size:12px">',
             '<text x="0" y="16" font-weight="600">Loss against scale (lower is better)</text>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - 20}" y2="{h - bottom}" stroke="#9ca3af"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#9ca3af"/>',
             *(f'<text x="{px(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{x:g}</text>'
               for x in sorted(set(scales))),
             f'<text x="{(left + w - 20) / 2}" y="{h - 6}" text-anchor="middle">scale</text>',
             f'<text x="{left - 6}" y="{py(y1) + 4:.1f}" text-anchor="end">{y1:.3f}</text>',
             f'<text x="{left - 6}" y="{py(y0) + 4:.1f}" text-anchor="end">{y0:.3f}</text>']
    if base is not None:
        parts.append(f'<line class="base-loss" x1="{left}" y1="{py(base):.1f}" x2="{w - 20}" y2="{py(base):.1f}" '
                     f'stroke="#9ca3af" stroke-dasharray="5,4"><title>base: {base:.4f}</title></line>')
    for i, sw in enumerate(sweeps):
        color = palette[i % len(palette)]
        pts = [(px(p["scale"]), py(p["loss"])) for p in sw["points"] if p["loss"] is not None]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                     f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
        for p, (x, y) in zip([p for p in sw["points"] if p["loss"] is not None], pts):
            parts.append(f'<circle class="sweep-point" data-target="{_e(sw["target"])}" data-scale="{p["scale"]:g}" '
                         f'cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"><title>{_e(sw["target"])} × {p["scale"]:g}: '
                         f'{p["loss"]:.4f}</title></circle>')
        parts.append(f'<text x="{w - 20}" y="{top + 14 * i}" text-anchor="end" fill="{color}">'
                     f'{_e(sw["target"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _delta_cell(loss, base) -> str:
    if loss is None or base is None:
        return f"<td {NUM}>—</td>"
    d = loss - base
    # the stronger the change, the stronger the tint (a difference of 1 nat is a large one)
    alpha = min(abs(d), 1.0) * 0.55 + (0.08 if abs(d) > 1e-9 else 0)
    tint = f"rgba(22,163,74,{alpha:.2f})" if d < 0 else f"rgba(220,38,38,{alpha:.2f})"
    return (f'<td style="padding:4px 10px;border-bottom:1px solid #e5e7eb;text-align:right;white-space:nowrap;'
            f'background:{tint}">'
            f'{loss:.3f} <small>({d:+.3f})</small></td>')


def samples_table(report: dict, limit: int = SAMPLE_ROWS) -> str:
    results = report["results"]
    base = results[0]["per_sample_loss"]
    n = len(base)
    notes = []
    for r in results[1:]:
        wins = sum(1 for a, b in zip(r["per_sample_loss"], base) if a is not None and b is not None and a < b)
        notes.append(f"<li><b>{_e(r['name'])}</b>: lower loss than the base on {wins} of {n} samples</li>")
    head = "".join(f"<th {TH}>{_e(h)}</th>" for h in
                   ["#", "from", "tokens", "trained text", *(r["name"] for r in results)])
    rows = []
    for i, s in enumerate(report["samples"][:limit]):
        cells = [f"<td {NUM}>{i + 1}</td>", f"<td {NUM}>{s['record']}</td>", f"<td {NUM}>{s['tokens']}</td>",
                 f'<td {TD}><span style="font-size:12px">{_e(s["text"])}</span></td>',
                 f"<td {NUM}>{_num(base[i], '.3f')}</td>"]
        cells += [_delta_cell(r["per_sample_loss"][i], base[i]) for r in results[1:]]
        rows.append(f'<tr class="sample">{"".join(cells)}</tr>')
    more = (f"<p>The first {limit} of {n} samples; the JSON report has them all.</p>" if n > limit else "")
    unit = "chunk of the text" if report["dataset"]["format"] == "raw" else "record of the file"
    return (f'<ul>{"".join(notes)}</ul><p>Each row: one sample (“from” = its {unit}), its loss under the base and '
            f'under each adapter, with the difference to the base (green: the adapter predicts it better).</p>'
            f'<table class="samples" {TABLE}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'{more}')


def generations_table(report: dict) -> str:
    if not report["generations"]:
        return "<p>No prompts were given.</p>"
    names = [r["name"] for r in report["results"]]
    head = "".join(f"<th {TH}>{_e(h)}</th>" for h in ["prompt", *names])
    pre = 'style="white-space:pre-wrap;margin:0;font-family:inherit"'
    rows = []
    for g in report["generations"]:
        cells = [f'<td {TD}><pre {pre}><b>{_e(g["prompt"])}</b></pre></td>']
        cells += [f'<td {TD}><pre {pre}>{_e(g["outputs"].get(n, ""))}</pre></td>' for n in names]
        rows.append(f'<tr class="generation">{"".join(cells)}</tr>')
    return f'<table class="generations" {TABLE}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _settings(report: dict) -> str:
    s = report.get("settings", {})
    keep = ["dataset", "format", "max_samples", "cutoff_len", "overlap", "prompts", "prompt_format",
            "max_new_tokens", "batch_size", "bootstrap", "seed", "context_length", "device", "dtype"]
    rows = "".join(f"<tr><td {TD}>{_e(k)}</td><td {TD}>{_e(s.get(k))}</td></tr>" for k in keep if k in s)
    return f'<table class="settings" {TABLE}>{rows}</table>'


def render(report: dict) -> str:
    d = report["dataset"]
    title = f"LoRA Deck evaluation: {report['model']} on {d['path'].replace(chr(92), '/').rsplit('/', 1)[-1]}"
    data = json.dumps(report, ensure_ascii=False).replace("</", "<\\/")  # the numbers, for anyone who saves the page
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;
padding:0 16px;color:#111827}} h1{{font-size:22px}} h2{{font-size:18px;margin-top:28px}}
.meta{{color:#4b5563}}
.read{{background:#f9fafb;border-left:4px solid #3b82f6;padding:8px 12px;max-width:900px}}</style>
</head><body>
<h1>{_e(title)}</h1>
<p class="meta">Model <b>{_e(report['model'])}</b> on the {_e(report['loader'])} loader · dataset
<b>{_e(d['path'])}</b> ({_e(d['format'])}, {d['samples']} samples, {d['tokens']} scored tokens) ·
{_e(report.get('created', ''))}</p>
<h2>Results</h2>
{results_table(report)}
{perplexity_chart(report)}
{sweep_chart(report)}
<p class="read">{HOW_TO_READ}</p>
<h2>Per sample</h2>
{samples_table(report)}
<h2>Answers side by side (greedy)</h2>
{generations_table(report)}
<h2>Settings</h2>
{_settings(report)}
<script type="application/json" id="report-data">{data}</script>
</body></html>
"""
