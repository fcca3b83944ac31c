"""How fast the Model view draws a 1,000-layer Run (synthetic numbers, real figures and app).

Prints, all measured in this one run, the median of ``--repeats`` builds of:

* the layout (once per Run and session: blocks, levels, edges),
* the blocks overview, one block with its neighbours (what a 1,000-layer Run opens on), and every
  layer at once (what "Draw: every layer" asks for),
* the whole Model page rerun in Streamlit's AppTest after one click on a layer (headline, figures,
  serialisation; AppTest runs the whole script, a browser reruns the page's fragment only),

and the load average before and after. Target: each figure well under 200 ms.

Usage: python benchmarks/model_view.py [--layers 1000] [--repeats 9]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    from analysis.api import POLICY_FORMATS, load_run
    from analysis.store.synthetic import synthetic_run
    from dashboard import state
    from dashboard.ui.model_chart import LayerData, blocks_figure, layers_figure
    from dashboard.ui.model_layout import band_window, model_layout
    from streamlit.testing.v1 import AppTest

    print(f"load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    path = Path(tempfile.mkdtemp()) / "syn"
    synthetic_run(path, a.layers)
    run = load_run(path)
    names = run.layer_names
    sens, lay_t = run.sensitivity, run.layers.set_index("name").reindex(names)
    by = {f: sens[sens.format == f].set_index("layer").reindex(names) for f in run.formats}
    data = LayerData(lay_t["type"].to_numpy(), lay_t["params"].to_numpy(), by["int4"]["loss_delta"].to_numpy(float),
                     {f: t["metric_delta"].to_numpy(float) for f, t in by.items()}, list(POLICY_FORMATS))
    codes = np.zeros(len(names), dtype=np.int8)
    codes[::3] = 1
    layers_figure(model_layout(names[:3], None), data, codes, "Δ loss", np.arange(3))  # plotly's first-figure imports
    lay = model_layout(names, run.fed_by())
    r = a.repeats
    print(f"{len(names)} layers in {len(lay.bands)} blocks, {len(lay.edges)} edges ({int(lay.skip.sum())} skips); "
          f"median of {r} builds:")
    win = band_window(lay, 39, 41)
    builds = {"layout (once per Run)": lambda: model_layout(names, run.fed_by()),
              "blocks overview": lambda: blocks_figure(lay, data, codes, "x", picked=40),
              "one block and its neighbours": lambda: layers_figure(lay, data, codes, "x", win),
              "every layer": lambda: layers_figure(lay, data, codes, "x", labels=False)}
    for what, fn in builds.items():
        print(f"  {what:<32}{median_ms(fn, r):7.1f} ms")

    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.session_state[state.RUN_DIRS] = [str(path.resolve())]
    at.run()
    page = next(h for h, info in at._registered_pages.items() if info.get("url_pathname") == "model")
    at._page_hash = page
    t = time.perf_counter()
    at.run()
    cold = (time.perf_counter() - t) * 1e3
    times = []
    for k in range(r):
        rows = at.session_state[state.MODEL_ROWS]["layers"]
        trace, pts = next(iter(rows.items()))
        el = next(e for e in at.get("plotly_chart") if "model_chart_layers::" in e.proto.id)
        ws = at._tree.get_widget_states()
        w = ws.widgets.add()
        w.id = el.proto.id
        i = k % len(pts)
        w.string_value = json.dumps({"selection": {"points": [{"curve_number": trace, "point_index": i}],
                                                   "point_indices": [i], "box": [], "lasso": []}})
        t = time.perf_counter()
        at._run(ws)
        times.append((time.perf_counter() - t) * 1e3)
        assert not at.exception, at.exception
    print(f"  Model page, first load (AppTest) {cold:6.1f} ms; rerun after one layer click: median "
          f"{statistics.median(times):.1f} ms")
    print(f"load average {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
