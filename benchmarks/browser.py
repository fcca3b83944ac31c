"""Browser round trip of one toggle: a format change in the Layers table to the headline's new text.

Starts the real dashboard server (``streamlit run``) on each Run, drives Debian's Chromium through
Playwright, and switches one layer between FP32 and INT8 in the table's format cell, again and again.
Each toggle is timed in the page, from the pointer going down on the format option to the DOM change
after which the headline's "Projected size" shows the size the projection gives for the new policy (the
text a reader sees; Playwright's own overhead is outside the figure). Prints the median and p90 over the toggles per Run, and the load average beside them.

Targets (issue 16): median <= 200 ms on MiniLM, <= 400 ms on 1,000 layers.

Usage: python benchmarks/browser.py [--run RUN_DIR ...] [--layers 1000] [--toggles 20]
  --run: Runs to measure (e.g. a MiniLM Run from
         `quantlens analyze demo:minilm --out /tmp/minilm --no-latency --verify-policies 0`);
  --layers N: also a synthetic Run of N layers (0: none).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS_MS = {"minilm": 200.0, "large": 400.0}  # median; "large": a Run of 1,000 layers or more
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync"]
TIMEOUT = 60_000  # ms
HEADLINE_HAS = ("(want) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')]"
                ".some(m => m.innerText.includes(want))")
# timed in the page, not around Playwright's calls (its click waits for the element to be stable first):
# from the pointer going down on the option to the first DOM change after which the headline shows ``want``
ARM = """(want) => {
  window.__ql = {t0: null, t1: null};
  const has = () => [...document.querySelectorAll('[data-testid="stMetric"]')].some(m => m.innerText.includes(want));
  document.addEventListener('pointerdown', () => { window.__ql.t0 = performance.now(); }, {capture: true, once: true});
  const obs = new MutationObserver(() => {
    if (window.__ql.t0 !== null && has()) { window.__ql.t1 = performance.now(); obs.disconnect(); }
  });
  obs.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} logical CPUs"


def _pick(page, x: float, y: float, fmt: str) -> None:
    """Open the format cell at (x, y) of the grid (a canvas) and leave the option ``fmt`` ready to click."""
    page.mouse.dblclick(x, y)
    combo = page.locator('[id^="gdg-overlay"] [role="combobox"]')
    combo.wait_for(timeout=TIMEOUT)
    if combo.get_attribute("aria-expanded") != "true":  # a cell edited before opens with its menu closed
        combo.press("ArrowDown")
    page.get_by_role("option", name=fmt, exact=True).wait_for(timeout=TIMEOUT)


def measure(browser, url: str, run_dir: str, toggles: int, warmup: int = 2) -> tuple[list[float], str, int]:
    """(round trips in ms, the layer toggled, the Run's layer count) on the server at ``url``."""
    from analysis.api import FORMAT_CODE, Projector, load_run
    from dashboard.ui.layers import FORMAT_PX, LAYER_PX, ROW_PX

    run = load_run(run_dir)
    pj = Projector(run)
    row = int(np.flatnonzero(pj.allowed[:, FORMAT_CODE["int8"]])[0])  # the table opens in execution order
    codes = np.zeros(len(pj.names), dtype=np.int8)
    sizes = {"fp32": pj.project(codes).bytes}
    codes[row] = FORMAT_CODE["int8"]
    sizes["int8"] = pj.project(codes).bytes
    assert sizes["int8"] != sizes["fp32"], "the toggle must change the headline"

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/layers")
    page.get_by_role("heading", name="Layers", level=1).wait_for(timeout=TIMEOUT)
    page.wait_for_function(HEADLINE_HAS, arg=f"{sizes['fp32']:,} B", timeout=TIMEOUT)
    box = page.get_by_test_id("stDataFrame").bounding_box()
    x, y = box["x"] + LAYER_PX + FORMAT_PX / 2, box["y"] + ROW_PX * (row + 1) + ROW_PX / 2
    out = []
    for k in range(warmup + toggles):
        fmt = "int8" if k % 2 == 0 else "fp32"
        _pick(page, x, y, fmt)
        want = f"{sizes[fmt]:,} B"
        page.evaluate(ARM, want)
        page.get_by_role("option", name=fmt, exact=True).click(timeout=TIMEOUT)
        page.wait_for_function("() => window.__ql.t1 !== null", timeout=TIMEOUT)
        t0, t1 = page.evaluate("() => [window.__ql.t0, window.__ql.t1]")
        if k >= warmup:
            out.append(t1 - t0)
    page.context.close()
    return out, pj.names[row], len(pj.names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", default=[], help="a Run folder to measure (repeatable)")
    ap.add_argument("--layers", type=int, default=1000, help="also a synthetic Run of this many layers (0: none)")
    ap.add_argument("--toggles", type=int, default=20)
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("Debian's chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from analysis.store.synthetic import synthetic_run
    from dashboard.serve import start_server, stop_server

    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"QuantLens browser round trip: format change -> headline text, {args.toggles} toggles per Run "
          f"(after 2 unmeasured), 1400x1000 viewport; {version}; Python {sys.version.split()[0]}")
    print(f"  at start: {_load()}")
    with tempfile.TemporaryDirectory(prefix="quantlens-browser-bench-") as tmp:
        runs = [str(Path(r).resolve()) for r in args.run]
        if args.layers:
            runs.append(str(synthetic_run(Path(tmp) / f"synthetic{args.layers}", args.layers, seed=0).path))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
            for run_dir in runs:
                proc, url = start_server([run_dir])
                try:
                    ms, layer, n = measure(browser, url, run_dir, args.toggles)
                finally:
                    stop_server(proc)
                from analysis.api import load_run

                name = load_run(run_dir).meta["model"].get("name", Path(run_dir).name)
                med, p90 = statistics.median(ms), float(np.percentile(ms, 90))
                target = TARGETS_MS["large"] if n >= 1000 else TARGETS_MS["minilm"] if "minilm" in name else None
                verdict = "" if target is None else f"; target median <= {target:.0f} ms: " + (
                    "met" if med <= target else "NOT met")
                print(f"  {name} ({n} layers, toggling {layer}): median {med:6.1f} ms, p90 {p90:6.1f} ms, "
                      f"min {min(ms):6.1f} ms, max {max(ms):6.1f} ms{verdict}; {_load()}")
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
