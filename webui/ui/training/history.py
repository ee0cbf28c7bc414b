"""The Training tab's run history: a table of every run in the runs folder (name, state, base, steps, final
losses, date), a picker of runs whose train and eval loss curves are overlaid on one chart, with the tab's
smoothing slider and log-scale toggle. It reads run folders only (through the TrainingRunner), never a model.
"""
from __future__ import annotations

import gradio as gr

from webui.training.runner import TrainingRunner
from webui.ui.training.charts import HISTORY_COLUMNS, LOG_LOSS, LOSS, curves, history

EMPTY_TITLE = f"{LOSS} (no points yet)"


def y_title(df, column: str) -> str:
    """The y axis title, which says when there is nothing to plot. It also makes the chart draw its lines: Gradio's
    LinePlot builds its Vega spec once, from the data it is created with, and a chart created empty kept drawing
    every later line with no stroke (axes, no line) until the page was reloaded; a changed title rebuilds the spec,
    and the first points always change it."""
    return column if df[column].notna().any() else EMPTY_TITLE


def chart_update(df, log_scale: bool):
    """The chart's value with its y column: loss, or log10(loss) on the log scale."""
    column = LOG_LOSS if log_scale else LOSS
    return gr.update(value=df, y=column, y_title=y_title(df, column))


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
                                     y_title=EMPTY_TITLE,
 elem_id="train-history-chart")
        self.timer = gr.Timer(5.0)  # a running run's curve grows, and new runs appear, without a click
        self._wire()

    def overlay(self, picked, smoothing, log_scale):
        known = set(self.runner.runs())
        runs = {n: self.runner.metrics(n) for n in picked or [] if n in known}
        return chart_update(curves(runs, smoothing or 0.0), bool(log_scale))

    def refreshed(self, shown, picked, smoothing, log_scale):
        names = self.runner.runs()
        # re-offer the choices only when the list changed: an update races with a click in progress
        pick = gr.update() if names == shown else gr.update(choices=names,
                                                            value=[n for n in picked or [] if n in names])
        return history(self.runner), names, pick, self.overlay(picked, smoothing, log_scale)

    def _wire(self) -> None:
        chart_inputs = [self.pick, self.smoothing, self.log_scale]
        for event in (self.pick.change, self.smoothing.change, self.log_scale.change):
            event(self.overlay, inputs=chart_inputs, outputs=self.chart)
        refresh_io = {"inputs": [self.names, *chart_inputs], "outputs": [self.table, self.names, self.pick, self.chart]}
        self.refresh.click(self.refreshed, **refresh_io)
        self.timer.tick(self.refreshed, **refresh_io)
        self._refresh_io = refresh_io

    def on_load(self, demo: gr.Blocks) -> None:
        demo.load(self.refreshed, **self._refresh_io)
