"""glibc's default malloc vs keeping freed memory (``analysis.engine.allocator``) on the MiniLM sweep's
work: one FP32 forward keeping every intermediate value, and 12 single-layer jobs, on one batch
of 32 x 128 tokens. Each setting runs in its own fresh process, side by side in this one run.

    .venv/bin/python benchmarks/allocator.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from analysis.engine.allocator import keep_freed_memory
    assert keep_freed_memory(), "mallopt unavailable here"
from analysis.quant.formats import get_format
from analysis.data.minilm import minilm_arrays
from analysis.models.loading import load_model
from analysis.engine.sweep import SweepRunner, plan_jobs
from analysis.data.tasks import Task

a = minilm_arrays(n_calib=2, n_eval=32)
task = Task("minilm", "bench", a["calib_inputs"], a["eval_inputs"], None, batch_size=32)
tm = load_model("demo:minilm", torch.from_numpy(a["eval_inputs"][:2]))
tm.formats["int4"] = get_format("int4")
runner = SweepRunner(tm, task, "cosine")
x = torch.from_numpy(a["eval_inputs"])
jobs = plan_jobs({}, [(l.name, "int4") for l in tm.layers()[-12:]], {})
fwd, sweep = [], []
with torch.no_grad():
    for _ in range(int(sys.argv[2])):
        t0 = time.perf_counter(); env = runner.recompute.forward_all(x); fwd.append(time.perf_counter() - t0); del env
        t0 = time.perf_counter(); runner.run(jobs); sweep.append(time.perf_counter() - t0)
print(json.dumps({"forward_all": statistics.median(fwd), "jobs": statistics.median(sweep)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    res = {}
    for mode in ("default", "keep"):
        p = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.repeats)], capture_output=True, text=True,
                           env={**os.environ})
        if p.returncode != 0:
            raise SystemExit(p.stderr.strip().splitlines()[-1])
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for k, label in (("forward_all", "FP32 forward keeping all values"), ("jobs", "12 int4 layer jobs (one chunk)")):
        d, kp = res["default"][k], res["keep"][k]
        print(f"{label:<34} default malloc {d:6.2f} s   freed memory kept {kp:6.2f} s   x{d / kp:.2f}")


if __name__ == "__main__":
    main()
