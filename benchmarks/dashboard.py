"""How fast the dashboard answers one toggle on a 1,000-layer Run (synthetic numbers, real app).

Builds a synthetic 1,000-layer Run, opens the Layers page in Streamlit's AppTest, then
clicks one layer's format cell per rerun (the trigger the browser sends for a click) and times each rerun.
Prints, all measured in this one run:

* the median AppTest rerun after one toggle (the whole page script: AppTest does not run
  fragments alone; in a browser a toggle reruns only the fragment),
* the median server time of the Layers fragment (the toggle path in a browser),
* the median time of one ``Projector.project`` call, and the first (cold) page load.

Target: the rerun after one toggle in <= 50 ms.

Usage: python benchmarks/dashboard.py [--layers 1000] [--toggles 31]
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
TARGET_MS = 50.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--toggles", type=int, default=31)
    args = ap.parse_args()
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    from streamlit.testing.v1 import AppTest

    from analysis.project.projection import Projector
    from analysis.store.synthetic import synthetic_run
    from dashboard import state

    with tempfile.TemporaryDirectory(prefix="quantlens-bench-") as tmp:
        t = time.perf_counter()
        run = synthetic_run(Path(tmp) / "run", args.layers, seed=0)
        build_s = time.perf_counter() - t
        path = str(run.path.resolve())

        at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
        at.session_state[state.RUN_DIRS] = [path]
        at.run()
        t = time.perf_counter()
        # the pages are functions: AppTest.switch_page() finds file pages only, so ask for Layers by its hash
        at._page_hash = next(h for h, p in at._registered_pages.items() if p.get("url_pathname") == "layers")
        at.run()
        cold_ms = (time.perf_counter() - t) * 1e3
        if at.exception:
            print(f"page failed: {at.exception}", file=sys.stderr)
            return 1
        for _ in range(3):  # warm the caches of the page itself
            at.run()

        rng = np.random.default_rng(0)
        rerun_ms, fragment_ms = [], []
        for _ in range(args.toggles):
            row = int(rng.integers(0, args.layers))  # the table opens in execution order: row = layer
            table = next(df for df in at.dataframe if (df.key or "").startswith("ql.table::"))
            ws = at._tree.get_widget_states()
            w = ws.widgets.add()
            w.id = table.proto.button_click_widgets["format"]
            w.string_trigger_value.data = json.dumps({"row": row, "label": str(table.value["format"].iloc[row])})
            t = time.perf_counter()
            at._run(ws)
            rerun_ms.append((time.perf_counter() - t) * 1e3)
            fragment_ms.append(float(at.session_state[state.FRAGMENT_MS]))
            if at.exception:
                print(f"toggle failed: {at.exception}", file=sys.stderr)
                return 1

        pj = Projector(run)
        codes = rng.integers(0, 2, args.layers).astype(np.int8)
        proj_us = []
        for _ in range(200):
            t = time.perf_counter()
            pj.project(codes)
            proj_us.append((time.perf_counter() - t) * 1e6)

    med = statistics.median(rerun_ms)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"QuantLens dashboard benchmark — synthetic Run, {args.layers} layers (built in {build_s:.1f} s); "
          f"{os.cpu_count()} logical CPUs, load average {load:.1f} (other work on the machine slows every figure); "
          f"Python {sys.version.split()[0]}")
    print(f"  cold Layers page load (AppTest):              {cold_ms:8.1f} ms")
    print(f"  rerun after one toggle (AppTest, whole page): median {med:6.1f} ms, "
          f"p90 {np.percentile(rerun_ms, 90):6.1f} ms over {len(rerun_ms)} toggles")
    print(f"  Layers fragment on the server (browser path): median {statistics.median(fragment_ms):6.1f} ms")
    print(f"  Projector.project, one policy:                median {statistics.median(proj_us):6.1f} µs")
    print(f"  target <= {TARGET_MS:.0f} ms per toggle rerun: {'met' if med <= TARGET_MS else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
