"""Measure more whole-model policies on a Run's own model, data and calibration (torch fake-quant),
the same way the sweep measured its policies: used to validate projections on held-out policies."""
from __future__ import annotations

from analysis.quant.formats import QuantFormat
from analysis.models.loading import load_model
from analysis.store.run import Run
from analysis.engine.stats import calibrate
from analysis.engine.sweep import SweepRunner, plan_jobs
from analysis.data.tasks import load_task
from analysis.errors import InputError


class RemeasureError(InputError):
    """The Run's model or data is not at hand, or has changed since the Run was made."""


def runner_for_run(run: Run) -> SweepRunner:
    """A ``SweepRunner`` rebuilt from the Run's provenance; refuses if the model's hash differs."""
    meta = run.meta
    data = meta["data"]
    spec = data.get("spec") or data["task"]
    task = load_task(spec, metric=data.get("metric_arg"), calib=data.get("calib_arg"), seed=meta.get("seed", 0),
                     model=meta["model"]["source"] if meta["model"].get("kind") in ("onnx", "torchscript")
                     else meta["model"]["name"], options=data.get("options"))
    if task.sha256 != data["sha256"]:
        raise RemeasureError(f"task '{spec}': its data changed since the Run was made (sha256 differs)")
    m = meta["model"]
    spec = m["source"] if m.get("kind") in ("onnx", "torchscript") else m["name"]  # a file's name is its stem
    model = load_model(spec, task.eval_inputs[:3], weights=m.get("weights"), output=m.get("output_arg"))
    if model.sha256 != meta["model"]["sha256"]:
        raise RemeasureError(f"model '{meta['model']['name']}': its weights changed since the Run was made")
    fmts = [QuantFormat.from_dict(d) for name, d in meta["format_specs"].items() if name != "fp32"]
    for f in fmts:
        model.formats[f.name] = f
    calibrate(model, model.activation_stats(task.calib_batches), fmts)
    return SweepRunner(model, task, meta["metric"]["name"], incremental=False)


def measure_policies(run: Run, policies: dict[str, dict[str, str]], progress=None) -> dict[str, dict]:
    """``{name: {"metric", "loss", "kl", ...}}`` for each ``{layer: format}`` policy."""
    runner = runner_for_run(run)
    records = runner.run(plan_jobs({}, [], policies), progress)
    return {r["policy_name"]: r["result"] for r in records}
