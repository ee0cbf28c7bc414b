"""What the Training tab's charts and run history show, as plain data: loss curves (train and eval, one run or
several overlaid) smoothed like TensorBoard's slider and optionally on a log scale, the history table of every
run folder, and the ETA text. No gradio here, so the tests can check each function on its own.
"""
from __future__ import annotations

import math
import time

import pandas as pd

from webui.training.run_folder import read_status
from webui.training.runner import TrainingRunner

HISTORY_COLUMNS = ["name", "state", "base", "steps", "final loss", "final eval loss", "date"]
LOSS, LOG_LOSS = "loss", "log10(loss)"
# (metric, series): the losses, and a preference run's reward margin and accuracy (chosen over rejected) beside them
SERIES = (("loss", "train"), ("eval_loss", "eval"), ("margin", "margin"), ("accuracy", "accuracy"),
          ("eval_margin", "eval margin"), ("eval_accuracy", "eval accuracy"))
# Tableau 10, the palette Vega itself uses for categories: distinct, and readable by most colour-blind users
PALETTE = ["#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d",
           "#bab0ac"]


def series_colors(series: list[str]) -> dict[str, str]:
    """A colour per series of a chart (given a row's series each), in order of appearance."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(dict.fromkeys(series))}


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with the start-up bias removed (its current
    slider, not the older one that starts at the first value): pandas' `ewm(alpha=1 - weight, adjust=True)`
    is exactly that. weight 0 gives the values back; 0.99 averages over roughly the last hundred points."""
    if not values or weight <= 0:
        return [float(v) for v in values]
    weight = min(float(weight), 0.999)  # alpha = 0 would freeze the curve at its first point
    return pd.Series(values, dtype="float64").ewm(alpha=1 - weight, adjust=True).mean().tolist()


def _points(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in step order; a resumed run logs some steps twice: the later row wins."""
    by_step = {}
    for m in metrics:
        value = m.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in m:
            by_step[int(m["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def curves(runs: dict[str, list[dict]], smoothing: float = 0.0, label_runs: bool = True) -> pd.DataFrame:
    """One chart's data: a row per (series, step) with columns step, loss, log10(loss) and series. Each run
    gives a `train` and (when it evaluated) an `eval` series, named `RUN · train` when `label_runs`. Smoothing
    is applied per series, before the log (as TensorBoard does). gradio's LinePlot (6.x) has no log axis (no
    scale option, only y_lim), so the log scale plots the log10(loss) column, whose name titles the y axis.
    Both columns are always there: when the toggle switches the plot's y column, the plot may rebuild itself
    with the data it already holds, and that data must have the new column (else Vega draws it as categories)."""
    rows = []
    for name, metrics in runs.items():
        for key, kind in SERIES:
            steps, values = _points(metrics, key)
            series = f"{name} · {kind}" if label_runs else kind
            for step, value in zip(steps, ema(values, smoothing)):
                # no logarithm of 0: NaN, which the chart leaves out rather than drawing -inf
                rows.append({"step": step, LOSS: value, LOG_LOSS: math.log10(value) if value > 0 else math.nan,
                             "series": series})
    if not rows:  # typed empty columns: an empty chart (a placeholder row of None was drawn as a "null" label)
        return pd.DataFrame({"step": pd.Series(dtype="int64"), LOSS: pd.Series(dtype="float64"),
                             LOG_LOSS: pd.Series(dtype="float64"), "series": pd.Series(dtype="object")})
    return pd.DataFrame(rows)


def live_curves(metrics: list[dict] | None, smoothing: float = 0.0) -> pd.DataFrame:
    """One run's chart data (series `train` and `eval`), with a row of no value for a series that has no point
    yet. Gradio's LinePlot fixes its colour scale when it is first drawn: a chart first drawn with no series kept
    drawing every later line with no stroke (axes, no line) until the page was reloaded, so both series are
    always named; a row of NaN draws nothing."""
    df = curves({"run": metrics or []}, smoothing, label_runs=False)
    missing = [kind for kind in ("train", "eval") if kind not in set(df["series"])]
    if not missing:
        return df
    blank = pd.DataFrame({"step": [0] * len(missing), LOSS: [math.nan] * len(missing),
                          LOG_LOSS: [math.nan] * len(missing), "series": missing})
    return pd.concat([df, blank], ignore_index=True) if len(df) else blank


def _last(metrics: list[dict], key: str) -> float | None:
    _, values = _points(metrics, key)
    return round(values[-1], 4) if values else None


def history_row(runner: TrainingRunner, name: str) -> list:
    """One line of the history table: name, state, base model, steps done (of planned), final train and eval
    loss, and when the run last wrote its status (its end, for a finished run)."""
    view = runner.view(name)
    status = read_status(runner.runs_dir / name)
    when = status.get("updated") or (runner.runs_dir / name).stat().st_mtime
    steps = f"{view.step}/{view.max_steps}" if view.max_steps else str(view.step)
    return [name, view.state, status.get("base") or "(embedded)", steps, _last(view.metrics, "loss"),
            _last(view.metrics, "eval_loss"), time.strftime("%Y-%m-%d %H:%M", time.localtime(when))]


def history(runner: TrainingRunner) -> pd.DataFrame:
    """Every run in the runs folder, newest first."""
    return pd.DataFrame([history_row(runner, n) for n in runner.runs()], columns=HISTORY_COLUMNS)


def eta_text(seconds: float | None) -> str:
    """`ETA 42 s`, `ETA 3 min 05 s`, `ETA 2 h 10 min`; empty when there is no estimate."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    s = max(0, round(seconds))
    if s < 60:
        return f"ETA {s} s"
    if s < 3600:
        return f"ETA {s // 60} min {s % 60:02d} s"
    return f"ETA {s // 3600} h {s % 3600 // 60:02d} min"
