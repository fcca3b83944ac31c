"""Browser round trip of one toggle: a click on a format cell of the Layers table to the headline's new text.

Starts the real dashboard server (``streamlit run``) on each Run, drives Debian's Chromium through
Playwright, and clicks one layer's format cell again and again: each click moves the layer one format
along its cycle (fp32 → the Run's formats → fp32). Each click is timed in the page, from the pointer
going down on the cell to the DOM change after which the headline shows the new policy: "Projected
size" with the size the projection gives and "Layers quantized" with the new count per format (the text
a reader sees; Playwright's own overhead is outside the figure). The next click waits until the rerun
the last one started has ended (the table shows the new format), as a reader's would. Prints the median
and p90 over the clicks per Run, and the load average beside them.

Targets (issue 16): median <= 200 ms on MiniLM, <= 400 ms on 1,000 layers.

Usage: python benchmarks/browser.py [--run RUN_DIR ...] [--layers 1000] [--toggles 20]
  --toggles: clicks measured per Run (after 2 unmeasured);
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
MISSED_MS = 15_000  # a click whose policy the headline has not shown by then is counted as missed, not timed
MAX_MISSED = 5
HEADLINE_HAS = ("(want) => { const t = [...document.querySelectorAll('[data-testid=\"stMetric\"]')]"
                ".map(m => m.innerText).join(' '); return want.every(w => t.includes(w)); }")
# timed in the page, not around Playwright's calls: from the pointer going down on the cell to the first
# DOM change after which the headline shows every text in ``want``
ARM = """(want) => {
  window.__ql = {t0: null, t1: null};
  const has = () => {
    const t = [...document.querySelectorAll('[data-testid="stMetric"]')].map(m => m.innerText).join(' ');
    return want.every(w => t.includes(w));
  };
  document.addEventListener('pointerdown', () => { window.__ql.t0 = performance.now(); }, {capture: true, once: true});
  const obs = new MutationObserver(() => {
    if (window.__ql.t0 !== null && has()) { window.__ql.t1 = performance.now(); obs.disconnect(); }
  });
  obs.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


# the rerun a click started has ended: the table shows the new format and the app runs no script
IDLE = ("([row, fmt]) => { const c = document.querySelector(`[data-testid=\"glide-cell-2-${row}\"]`);"
        " return c && c.textContent === fmt && !document.querySelector('[data-testid=\"stStatusWidget\"]'); }")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} logical CPUs"


def _headline(pj, codes: np.ndarray) -> list[str]:
    """The headline texts of ``codes``: its exact size and its count per format."""
    from analysis.api import POLICY_FORMATS

    counts = np.bincount(codes.astype(np.intp), minlength=len(POLICY_FORMATS))
    per = " · ".join(f"{f.upper()} {int(counts[POLICY_FORMATS.index(f)])}" for f in pj.formats)
    return [f"{pj.project(codes).bytes:,} B", per]


def measure(browser, url: str, run_dir: str, toggles: int, warmup: int = 2) -> tuple[list[float], str, int, list[str]]:
    """(round trips in ms, the layer clicked, the Run's layer count, clicks whose policy the headline never showed)
    on the server at ``url``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    from analysis.api import FORMAT_CODE, POLICY_FORMATS, Projector, load_run
    from dashboard.history import next_code
    from dashboard.ui.layers import FORMAT_PX, LAYER_PX, ROW_PX, marker_px

    run = load_run(run_dir)
    pj = Projector(run)
    row = int(np.flatnonzero(pj.allowed[:, FORMAT_CODE["int8"]])[0])  # the table opens in execution order
    order = [FORMAT_CODE[f] for f in run.formats if f in FORMAT_CODE]
    codes = np.zeros(len(pj.names), dtype=np.int8)

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/layers")
    page.get_by_role("heading", name="Layers", level=1).wait_for(timeout=TIMEOUT)
    page.wait_for_function(HEADLINE_HAS, arg=_headline(pj, codes), timeout=TIMEOUT)
    page.get_by_test_id(f"glide-cell-2-{row}").first.wait_for(state="attached", timeout=TIMEOUT)  # the grid is drawn
    out, missed = [], []
    while len(out) < toggles:
        if len(missed) > MAX_MISSED:
            raise RuntimeError(f"{len(missed)} clicks missed: {missed}")
        codes[row] = next_code(pj.allowed[row], order, int(codes[row]))
        # where the cell is now: the headline's metrics wrap by the width of their text, moving the table
        box = page.get_by_test_id("stDataFrame").bounding_box()
        x = box["x"] + marker_px(len(pj.names)) + LAYER_PX + FORMAT_PX / 2
        y = box["y"] + ROW_PX * (row + 1) + ROW_PX / 2
        page.evaluate(ARM, _headline(pj, codes))
        page.mouse.click(x, y)
        try:
            page.wait_for_function("() => window.__ql.t1 !== null", timeout=MISSED_MS)
        except PlaywrightTimeout:  # the headline never showed this policy: say so, carry on from what the table shows
            shown = page.get_by_test_id(f"glide-cell-2-{row}").first.text_content(timeout=TIMEOUT)
            missed.append(f"{POLICY_FORMATS[codes[row]]} expected, the table shows {shown}")
            codes[row] = FORMAT_CODE[shown]
            continue
        t0, t1 = page.evaluate("() => [window.__ql.t0, window.__ql.t1]")
        page.wait_for_function(IDLE, arg=[row, POLICY_FORMATS[codes[row]]], timeout=TIMEOUT)
        if warmup:
            warmup -= 1
        else:
            out.append(t1 - t0)
    page.context.close()
    return out, pj.names[row], len(pj.names), missed


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
    print(f"QuantLens browser round trip: a click on a format cell -> headline text, {args.toggles} clicks per Run "
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
                    ms, layer, n, missed = measure(browser, url, run_dir, args.toggles)
                finally:
                    stop_server(proc)
                from analysis.api import load_run

                name = load_run(run_dir).meta["model"].get("name", Path(run_dir).name)
                med, p90 = statistics.median(ms), float(np.percentile(ms, 90))
                target = TARGETS_MS["large"] if n >= 1000 else TARGETS_MS["minilm"] if "minilm" in name else None
                verdict = "" if target is None else f"; target median <= {target:.0f} ms: " + (
                    "met" if med <= target else "NOT met")
                print(f"  {name} ({n} layers, clicking {layer}): median {med:6.1f} ms, p90 {p90:6.1f} ms, "
                      f"min {min(ms):6.1f} ms, max {max(ms):6.1f} ms{verdict}; {_load()}")
                for m in missed:  # not timed: a click whose policy never reached the headline within MISSED_MS
                    print(f"    missed click: {m}")
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
