"""The Training tab's chart data and run history as plain functions: TensorBoard-style smoothing (checked
against the debiased moving average written out in the test), overlaid curves of several runs, the log scale,
the history table read from run folders written here, the ETA text, and every training option in one group."""
import dataclasses
import math

import pytest

from tests.helpers import write_run
from webui.options.training import DatasetConfig, LoraTrainConfig, TrainingParams
from webui.training.runner import TrainingRunner
from webui.ui.training import tab as training_tab
from webui.ui.training.charts import curves, ema, eta_text, history, history_row, live_curves


def tensorboard_smooth(values, weight):
    """TensorBoard's scalar smoothing, as its dashboard computes it: an EMA from 0, divided by 1 - weight^n."""
    last, out = 0.0, []
    for n, v in enumerate(values, start=1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return out


LOSSES = [3.0, 2.5, 2.8, 1.9, 2.2, 1.4, 1.6, 1.1]


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.6, 0.9, 0.99])
def test_smoothing_is_tensorboards_moving_average(weight):
    assert ema(LOSSES, weight) == pytest.approx(tensorboard_smooth(LOSSES, weight), rel=1e-12)


def test_no_smoothing_keeps_the_values_and_an_empty_curve_stays_empty():
    assert ema(LOSSES, 0.0) == LOSSES
    assert ema([], 0.9) == []


def test_curves_overlay_two_runs_train_and_eval_smoothed_then_logged():
    a = [{"step": i + 1, "loss": v} for i, v in enumerate(LOSSES)] + [{"step": 4, "eval_loss": 2.0},
                                                                      {"step": 8, "eval_loss": 1.5}]
    b = [{"step": i + 1, "loss": v / 2} for i, v in enumerate(LOSSES)]
    df = curves({"a": a, "b": b})
    assert set(df["series"]) == {"a · train", "a · eval", "b · train"}
    assert df[df.series == "b · train"]["loss"].tolist() == [v / 2 for v in LOSSES]
    assert df[df.series == "a · eval"][["step", "loss"]].values.tolist() == [[4, 2.0], [8, 1.5]]

    smooth = curves({"a": a}, smoothing=0.6)
    assert smooth[smooth.series == "a · train"]["loss"].tolist() == pytest.approx(tensorboard_smooth(LOSSES, 0.6))
    assert smooth[smooth.series == "a · eval"]["loss"].tolist() == pytest.approx(tensorboard_smooth([2.0, 1.5], 0.6))

    assert smooth[smooth.series == "a · train"]["log10(loss)"].tolist() == pytest.approx(
        [math.log10(v) for v in tensorboard_smooth(LOSSES, 0.6)])  # the log of the smoothed curve


def test_curves_of_a_resumed_run_keep_one_point_per_step_and_skip_bad_values():
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 2.5},  # resumed at 2
            {"step": 3, "loss": float("nan")}, {"step": 4, "loss": 0.0}]
    df = curves({"r": rows}, label_runs=False)
    assert df[["step", "loss"]].values.tolist() == [[1, 3.0], [2, 2.5], [4, 0.0]]
    assert set(df.series) == {"train"}
    assert math.isnan(df["log10(loss)"].iloc[-1])  # no log10(0) = -inf: a gap the chart leaves out


def test_curves_with_no_data_is_an_empty_typed_frame():
    df = curves({"empty": []})
    assert len(df) == 0 and list(df.columns) == ["step", "loss", "log10(loss)", "series"]
    assert str(df["loss"].dtype) == "float64" and str(df["log10(loss)"].dtype) == "float64"


def test_history_lists_every_run_with_its_state_base_steps_and_final_losses(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "first", [2.0, 1.5, 1.2], {3: 1.4}, base="tiny-llama", updated=1_700_000_000)
    write_run(runs, "second", [3.0, 2.0], base="tiny-gpt2", state="stopped", updated=1_700_000_500)
    (runs / "second").touch()  # newest folder first
    runner = TrainingRunner(runs, tmp_path / "models", tmp_path / "loras")
    table = history(runner)
    assert table["name"].tolist() == ["second", "first"]
    row = dict(zip(table.columns, history_row(runner, "first")))
    assert row["state"] == "done" and row["base"] == "tiny-llama" and row["steps"] == "3/3"
    assert row["final loss"] == 1.2 and row["final eval loss"] == 1.4
    assert row["date"].startswith("2023-11-1")  # 1_700_000_000 is 2023-11-14/15 depending on the time zone
    second = dict(zip(table.columns, history_row(runner, "second")))
    assert second["state"] == "stopped" and second["final eval loss"] is None


def test_restyle_gives_each_series_its_colour_and_says_when_nothing_is_plotted():
    """What the chart's restyle step (run after each data update) sends, from the data the page holds."""
    from gradio.components.native_plot import LinePlot

    from webui.ui.training.history import EMPTY_TITLE, restyled

    plot = LinePlot(x="step", y="loss", color="series")
    runs = {"a": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}], "b": [{"step": 1, "loss": 3.0}]}
    shown = plot.postprocess(curves(runs)).model_dump()
    update = restyled(shown, False)
    assert update["y"] == "loss" and update["y_title"] == "loss"
    assert list(update["color_map"]) == ["a · train", "a · eval", "b · train"]
    assert len(set(update["color_map"].values())) == 3
    assert restyled(shown, True)["y"] == "log10(loss)"
    assert restyled(plot.postprocess(live_curves(None)).model_dump(), False)["y_title"] == EMPTY_TITLE
    assert restyled(None, False)["y_title"] == EMPTY_TITLE


def test_eta_text():
    assert eta_text(None) == "" and eta_text(float("inf")) == ""
    assert eta_text(42.4) == "ETA 42 s"
    assert eta_text(185) == "ETA 3 min 05 s"
    assert eta_text(7800) == "ETA 2 h 10 min"


@pytest.mark.parametrize("cls", [TrainingParams, LoraTrainConfig, DatasetConfig])
def test_every_option_has_exactly_one_place_in_the_groups(cls):
    groups = {
        TrainingParams: [training_tab.QUANT, training_tab.DATA_TRAINING, training_tab.SAVING, training_tab.OPT_MAIN,
                         training_tab.OPT_MORE],
        LoraTrainConfig: [training_tab.LORA_MAIN, training_tab.LORA_VARIANT,
                          training_tab._rest(LoraTrainConfig, training_tab.LORA_MAIN, training_tab.LORA_VARIANT)],
        DatasetConfig: [training_tab.DATA_MAIN, training_tab._rest(DatasetConfig, training_tab.DATA_MAIN)],
    }[cls]
    placed = [n for g in groups for n in g]
    assert sorted(placed) == sorted(f.name for f in dataclasses.fields(cls))
