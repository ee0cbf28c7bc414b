"""The Training tab's run history: a table of every run in the runs folder (name, state, base, steps, final
losses, date), a picker of runs whose train and eval loss curves are overlaid on one chart, with the tab's
smoothing slider and log-scale toggle. It reads run folders only (through the TrainingRunner), never a model.
"""
from __future__ import annotations

import math

import gradio as gr

from webui.training.runner import TrainingRunner
from webui.ui.training.charts import HISTORY_COLUMNS, LOG_LOSS, LOSS, curves, history, series_colors

EMPTY_TITLE = f"{LOSS} (no points yet)"


def _has_value(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def restyled(plot, log_scale: bool):
    """The chart's look for the data it now shows: its y column (loss, or log10(loss) on the log scale), a y title
    that says when there is nothing to plot, and a colour per series.

    Why a step of its own, after the data: Gradio's LinePlot (6.x) draws new data into its Vega view but builds
    the colour scale only when it rebuilds the view, which a change of title, y column or colour map does; and
    when such a change comes in the same update as the data, the view is rebuilt from the data it held before.
    So a series added later (a second run picked, an eval curve's first point) was drawn with no stroke at all.
    Sent after the data, the colour map changes exactly when the set of series does, and the rebuild sees it."""
    column = LOG_LOSS if log_scale else LOSS
    plot = plot.model_dump() if hasattr(plot, "model_dump") else plot or {}  # Gradio passes it on as a dict
    columns, rows = plot.get("columns") or [], plot.get("data") or []
    if "series" not in columns:
        return gr.update(y=column, y_title=EMPTY_TITLE)
    series, at = columns.index("series"), columns.index(column) if column in columns else None
    points = at is not None and any(_has_value(row[at]) for row in rows)
    return gr.update(y=column, y_title=column if points else EMPTY_TITLE,
                     color_map=series_colors([row[series] for row in rows]))


def then_restyle(event, chart: gr.LinePlot, log_scale: gr.Checkbox) -> None:
    """Follow an event that sets the chart's data with `restyled`."""
    event.then(restyled, inputs=[chart, log_scale], outputs=chart, show_progress="hidden")


class RunHistory:
    def __init__(self, runner: TrainingRunner, smoothing: gr.Slider, log_scale: gr.Checkbox):
        self.runner, self.smoothing, self.log_scale = runner, smoothing, log_scale
        names = runner.runs()
        self.names = gr.State(names)  # what the picker offers: its choices change only when this does
        with gr.Accordion("Run history", open=True, elem_id="train-history-group"):
            self.table = gr.Dataframe(history(runner), headers=HISTORY_COLUMNS, interactive=False, wrap=True,
                                      elem_id="train-history")
            with gr.Row():
                self.pick = gr.CheckboxGroup(names, value=names[:1], label="overlay the loss curves of",
                                         elem_id="train-compare", scale=4)
                self.refresh = gr.Button("Refresh", size="sm", scale=1, elem_id="train-history-refresh")
            self.chart = gr.LinePlot(curves({}), x="step", y=LOSS, color="series", label="loss of the picked runs",
                                     y_title=EMPTY_TITLE, elem_id="train-history-chart")
        self.timer = gr.Timer(5.0)  # a running run's curve grows, and new runs appear, without a click
        self._wire()

    def overlay(self, picked, smoothing, log_scale=None):  # log_scale: the chart's restyle step applies it
        known = set(self.runner.runs())
        runs = {n: self.runner.metrics(n) for n in picked or [] if n in known}
        return curves(runs, smoothing or 0.0)

    def refreshed(self, shown, picked, smoothing, log_scale):
        names = self.runner.runs()
        # re-offer the choices only when the list changed: an update races with a click in progress
        pick = gr.update() if names == shown else gr.update(choices=names,
                                                            value=[n for n in picked or [] if n in names])
        return history(self.runner), names, pick, self.overlay(picked, smoothing, log_scale)

    def _wire(self) -> None:
        chart_inputs = [self.pick, self.smoothing, self.log_scale]
        for event in (self.pick.change, self.smoothing.change, self.log_scale.change):
            then_restyle(event(self.overlay, inputs=chart_inputs, outputs=self.chart), self.chart, self.log_scale)
        refresh_io = {"inputs": [self.names, *chart_inputs], "outputs": [self.table, self.names, self.pick, self.chart]}
        then_restyle(self.refresh.click(self.refreshed, **refresh_io), self.chart, self.log_scale)
        then_restyle(self.timer.tick(self.refreshed, **refresh_io), self.chart, self.log_scale)
        self._refresh_io = refresh_io

    def on_load(self, demo: gr.Blocks) -> None:
        then_restyle(demo.load(self.refreshed, **self._refresh_io), self.chart, self.log_scale)
