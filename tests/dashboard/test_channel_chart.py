"""The per-output-channel weight-range chart: the figure alone, then on the Activations page."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboard import state
from dashboard.ui.channel_chart import channel_figure, channel_frame, channel_summary

QMAX = 127


def _rows(n: int = 8, outlier: int = 5) -> pd.DataFrame:
    """Channel c spans [-(c+1)/10, (c+1)/10], except ``outlier`` which reaches 10 (it sets the per-tensor step)."""
    hi = (np.arange(n) + 1) / 10.0
    hi[outlier] = 10.0
    return pd.DataFrame({"layer": "fc", "channel": np.arange(n), "n_channels": 1, "min": -hi, "max": hi,
                         "absmax": hi, "mean": 0.0, "std": hi / 2, "step[int8]": hi / QMAX})


def _top_bars(fig):
    """(x, min, max) of the top panel's bars, whichever trace (normal, outlier) holds them, by x."""
    rows = sorted((float(xx), float(b), float(b) + float(h)) for t in fig.data if t.type == "bar" and t.yaxis == "y"
                  for xx, b, h in zip(t.x, t.base, t.y))
    return tuple(np.array(c) for c in zip(*rows))


def test_frame_steps_spans_and_outliers():
    df = channel_frame(_rows(), QMAX, "step[int8]")
    assert df.attrs["tensor_step"] == pytest.approx(10.0 / QMAX)
    np.testing.assert_allclose(df["span_channel"], 2 * QMAX)  # symmetric: each channel spans its own 254 steps
    np.testing.assert_allclose(df["span_tensor"], 2 * df["absmax"] / (10.0 / QMAX))
    assert df["outlier"].tolist() == [c == 5 for c in range(8)]
    s = channel_summary(df)
    assert (s.channels, s.outliers, s.summarised) == (8, 1, False)
    assert s.median_span_tensor == pytest.approx(np.median(2 * df["absmax"] * QMAX / 10.0))
    # without a step column (a Run that did not measure int8) the step is |max| / qmax
    np.testing.assert_allclose(channel_frame(_rows().drop(columns="step[int8]"), QMAX, None)["step"],
                               _rows()["absmax"] / QMAX)


def test_figure_bars_grid_band_and_titles():
    df = channel_frame(_rows(), QMAX, "step[int8]")
    fig = channel_figure(df, QMAX)
    by_name = {t.name: t for t in fig.data}
    x, base, top = _top_bars(fig)
    assert list(x) == list(range(8))  # one bar per channel, in channel order
    np.testing.assert_allclose(base, df["min"])
    np.testing.assert_allclose(top, df["max"])
    outlier = next(t for n, t in by_name.items() if n.startswith("outlier channel"))
    assert list(outlier.x) == [5] and outlier.marker.color == "#D62728"  # the outlier is drawn red
    assert fig.layout.barmode == "overlay"  # two bar traces on one axis must not be offset side by side
    bars = by_name["channel range (min..max)"]
    grid = next(t for n, t in by_name.items() if n.startswith("per-tensor INT8 grid"))
    levels = sorted({y for y in grid.y if y is not None and np.isfinite(y)})
    assert len(levels) == 2 * QMAX + 1 and levels[1] - levels[0] == pytest.approx(10.0 / QMAX)
    band = next(t for n, t in by_name.items() if n.startswith("per-tensor INT8 range"))
    assert max(y for y in band.y if y is not None) == pytest.approx(10.0)
    spans = [t for t in fig.data if t.type == "bar" and t.yaxis == "y2"]
    got = sorted((int(xx), float(yy)) for t in spans for xx, yy in zip(t.x, t.y))
    np.testing.assert_allclose([y for _, y in got], df["span_tensor"])
    assert fig.layout.xaxis2.title.text == "output channel"
    assert fig.layout.yaxis.title.text == "weight value (FP32)"
    assert fig.layout.yaxis2.title.text == "INT8 steps spanned"
    assert "channel %{customdata[0]}" in bars.hovertemplate and "step" in bars.hovertemplate


def test_sort_by_range_puts_the_widest_first():
    fig = channel_figure(channel_frame(_rows(), QMAX, "step[int8]"), QMAX, sort_by_range=True)
    ranked = sorted((int(xx), row[0]) for t in fig.data if t.type == "bar" and t.yaxis == "y"
                    for xx, row in zip(t.x, t.customdata))
    assert [label for _, label in ranked][:3] == ["5", "7", "6"]
    assert fig.layout.xaxis2.title.text.startswith("output channels, widest range first")


def test_summarised_rows_say_how_many_channels():
    rows = _rows(4, outlier=2).assign(channel=[0, 3, 6, 9], n_channels=[3, 3, 3, 1])
    df = channel_frame(rows, QMAX, "step[int8]")
    assert df["label"].tolist()[0] == "0–2 (3 channels)" and df["label"].tolist()[3] == "9"
    assert channel_summary(df).channels == 10 and channel_summary(df).summarised


def test_activations_page_shows_channel_ranges(app, digits_run):
    at = app([str(digits_run.path)], "activations")
    assert not at.exception
    assert state.ACT_CHANNEL_CHART in [e.key for e in at.get("plotly_chart")]
    caption = next(c.value for c in at.caption if c.value.startswith("What to look for"))
    assert "per-tensor INT8 step" in caption and "of 254 steps" in caption
    n_charts = len(at.get("plotly_chart"))
    at.toggle(key=state.ACT_CHANNEL_SORT).set_value(True).run()
    assert not at.exception and len(at.get("plotly_chart")) == n_charts


def test_activations_page_on_a_run_without_channels(app, syn_dir):
    at = app([syn_dir], "activations")
    assert not at.exception
    assert any("this Run has no channels.parquet" in c.value for c in at.caption)
    assert state.ACT_CHANNEL_CHART not in [e.key for e in at.get("plotly_chart")]


def test_a_summarised_row_covers_its_own_channels():
    """Plotly centres a bar on x: a row for channels 0-2 drawn at x=0 with width 2.4 started at channel -1.2."""
    rows = _rows(4, outlier=2).assign(channel=[0, 3, 6, 9], n_channels=[3, 3, 3, 1])
    fig = channel_figure(channel_frame(rows, QMAX, "step[int8]"), QMAX)
    for t in (t for t in fig.data if t.type == "bar" and t.yaxis == "y"):
        for x, w, c in zip(t.x, t.width, t.customdata):
            first = int(str(c[0]).split("–")[0].split(" ")[0])
            n = 1 if "–" not in str(c[0]) else int(str(c[0]).split("–")[1].split(" ")[0]) - first + 1
            assert x - w / 2 >= first - 0.5 and x + w / 2 <= first + n - 0.5 + 1e-9, (c[0], x, w)


def test_a_layer_skipped_at_int8_is_not_said_to_span_zero_steps():
    """A layer int8 leaves at FP32 has an empty step[int8]: its steps come from |max|, and the caption says why."""
    from types import SimpleNamespace

    from dashboard.ui.activations import _grid_format

    rows = _rows().assign(**{"step[int8]": np.nan})
    lo = SimpleNamespace(run=SimpleNamespace(formats=["int8", "int4"]))
    fmt, qmax, why = _grid_format(lo, rows)
    assert (fmt, qmax) == ("int8", QMAX) and "not quantized at int8" in why
    s = channel_summary(channel_frame(rows, qmax, None))
    assert s.median_span_channel == pytest.approx(2 * QMAX)  # symmetric ranges span every per-channel step
    assert _grid_format(SimpleNamespace(run=SimpleNamespace(formats=["int8"])), _rows())[2] == ""
