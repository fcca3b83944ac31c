"""Apply a policy to the Run's model as a real quantized ONNX model, and verify it.

``apply`` builds the model (see ``analysis.runtime.onnx_quantize``); ``verify`` builds it, runs it in
onnxruntime on the task's evaluation data, measures the metric, size and end-to-end latency,
and stores a row in the Run's ``policies`` table beside the projection for the same policy.

Example:
    >>> from analysis.runtime.verify import verify_policy
    >>> verify_policy("runs/digits", "policy.json")["metric"]
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import torch

from analysis.store.atomic import atomic_path
from analysis.quant.sizes import policy_bytes
from analysis.runtime.onnx_quantize import QuantizedModel, quantize_model
from analysis.store.policy import POLICY_FORMATS, Policy, PolicyError, from_json, match_policy, parse_policy
from analysis.store.run import Run, load_run, merge_policy_rows
from analysis.runtime.session import RuntimeModel, resolve_model, resolve_task, run_formats
from analysis.data.tasks import MetricState, Task
from analysis.errors import InputError


class VerifyError(InputError):
    """A policy that does not fit the Run's model; the message names the field or layer."""


@dataclass
class AppliedPolicy:
    model: onnx.ModelProto
    formats: dict[str, str]  # Run layer -> format applied
    kernels: dict[str, str]  # Run layer -> kernel
    notes: list[str] = field(default_factory=list)
    path: Path | None = None
    file_bytes: int = 0


def read_policy(policy: Policy | dict | str | os.PathLike) -> Policy:
    """A Policy from an object, a decoded dict, or a JSON file path.

    Raises:
        PolicyError: unreadable file or a malformed field (the message names it).
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return parse_policy(policy)
    path = Path(policy)
    if not path.is_file():
        raise PolicyError(f"{path}: no such policy file")
    try:
        return from_json(path.read_bytes())
    except PolicyError as e:
        raise PolicyError(f"{path}: {e}") from None


def _policy_formats(run: Run, policy: Policy | dict | str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """``resolve_policy`` on a policy given any way; errors name the policy file when there is one."""
    try:
        return resolve_policy(run, read_policy(policy))
    except VerifyError as e:
        if isinstance(policy, (str, os.PathLike)):
            raise VerifyError(f"{policy}: {e}") from None
        raise


# Runs made before the engine requantized static int8 outputs as onnxruntime's kernels do project
# numbers the runtime does not reproduce: building or verifying their policies would mislead.
MIN_SWEEP_CODE = 2


def _check_run_is_current(run: Run) -> None:
    code = str(run.meta.get("sweep", {}).get("code", "sweep/1"))
    try:
        version = int(code.rsplit("/", 1)[-1])
    except ValueError:
        version = 0
    if version < MIN_SWEEP_CODE:
        m, d = run.meta.get("model", {}), run.meta.get("data", {})
        raise VerifyError(f"{run.path}/run.json: made by an older engine ({code}) whose numbers onnxruntime does not "
                          f"reproduce; re-run it: quantlens analyze {m.get('name', 'MODEL')} --task "
                          f"{d.get('spec') or d.get('task', 'TASK')} --out NEW_RUN")


def resolve_policy(run: Run, policy: Policy) -> tuple[dict[str, str], list[str]]:
    """``({layer: format} for every Run layer, notes)``; formats a layer was skipped for stay fp32.

    Raises:
        VerifyError: another model's hash, a layer the model lacks, or an unknown format.
    """
    _check_run_is_current(run)
    m = match_policy(policy, run)
    if m.model_mismatch:
        raise VerifyError(f"field 'model.sha256': the policy is for model {m.model_mismatch[0][:12]}…, "
                          f"Run {run.path} holds {m.model_mismatch[1][:12]}…")
    if m.unknown_layers:
        raise VerifyError(f"field 'layers': {len(m.unknown_layers)} layer(s) not in the model: "
                          f"{', '.join(m.unknown_layers[:5])}")
    if m.unknown_formats:
        k, v = next(iter(m.unknown_formats.items()))
        raise VerifyError(f"field 'layers.{k}': unknown format {v!r}; known: {', '.join(POLICY_FORMATS)}")
    measured = {"fp32", *run.formats}
    for layer, fmt in [*policy.layers.items(), ("default", policy.default)]:
        if fmt not in measured:
            raise VerifyError(f"field '{'default' if layer == 'default' else 'layers.' + layer}': format {fmt!r} was not "
                              f"measured in this Run (it measured {', '.join(sorted(measured))}); re-run analyze with "
                              f"--formats including it, or choose one of those")
    formats = {n: policy.format_of(n) for n in run.layer_names}
    formats = {n: ("fp32" if n in m.unavailable else f) for n, f in formats.items()}
    blocked = set(run.sensitivity.loc[run.sensitivity["status"] != "ok", ["layer", "format"]].itertuples(index=False, name=None))
    formats = {n: ("fp32" if (n, f) in blocked else f) for n, f in formats.items()}
    notes = [f"{k}: {v}; kept fp32" for k, v in m.unavailable.items()]
    return formats, notes


def _build(run: Run, formats: dict[str, str], rm: RuntimeModel, task: Task) -> AppliedPolicy:
    policy = {k: v for k, v in formats.items() if v != "fp32"}
    q: QuantizedModel = quantize_model(rm.model, rm.layers, rm.onnx_policy(policy), rm.binding, task.calib_inputs,
                                       rm.onnx_quantizers(run, policy), run_formats(run))
    back = {v: k for k, v in rm.to_onnx.items()}
    return AppliedPolicy(q.model, {back[k]: v for k, v in q.formats.items() if k in back},
                         {back[k]: v for k, v in q.kernels.items() if k in back}, rm.notes + q.notes)


def _save_atomic(model: onnx.ModelProto, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out.stat().st_size


def apply_policy(run: Run | str | os.PathLike, policy: Policy | dict | str | os.PathLike,
                 out: str | os.PathLike | None = None) -> AppliedPolicy:
    """The quantized ONNX model for ``policy`` on the Run's model; written to ``out`` if given.

    Raises:
        PolicyError / VerifyError: a malformed policy, or one that does not fit the model.
        RuntimeModelError: the model or its data are not at hand.
    """
    run = run if isinstance(run, Run) else load_run(run)
    formats, notes = _policy_formats(run, policy)
    task = resolve_task(run)
    rm = resolve_model(run, task)
    applied = _build(run, formats, rm, task)
    applied.notes = notes + applied.notes
    if out is not None:
        out = Path(out)
        if out.suffix.lower() != ".onnx":
            raise VerifyError(f"--out {out}: must end in .onnx")
        applied.path, applied.file_bytes = out, _save_atomic(applied.model, out)
    else:
        applied.file_bytes = applied.model.ByteSize()
    return applied


def _evaluate(model: onnx.ModelProto, rm: RuntimeModel, task: Task, metric: str, threads: int) -> MetricState:
    from analysis.runtime.latency import session

    ref, q = session(rm.model, threads), session(model, threads)
    state = MetricState(metric)
    for x, labels in task.eval_batches():
        y_ref, y = (rm.compared(s.run, x) for s in (ref, q))
        state.update(y, y_ref, labels)
    return state


def verify_policy(run: Run | str | os.PathLike, policy: Policy | dict | str | os.PathLike,
                  progress: Callable[[str], None] | None = None, *, name: str | None = None, kind: str = "user",
                  threads: int = 1, repeats: int = 50,
                  projected: Callable[[Run, dict[str, str]], dict] | None = None) -> dict:
    """Apply ``policy``, measure it in onnxruntime, and store a row in the Run's ``policies`` table.

    Args:
        run: a Run or its folder; its model and task data must be at hand.
        policy: a Policy, its dict, or a JSON file.
        progress: optional callable receiving one line per step.
        name: the row's name (default ``verified-<n>``); a row of the same name is replaced.
        kind: ``user``, ``search`` or ``verified`` (analyze's own check of the policies it measured).
        repeats: timed runs of each model end to end; 0 measures the metric only (latency NaN).
        projected: what the projection says for ``{layer: format}`` (``metric``, ``band``, ``latency_ms``),
            recorded beside the measurement; ``analysis.api.verify_policy`` passes the Run's projector.

    Returns:
        ``{"name", "metric", "loss", "bytes", "file_bytes", "latency_ms", "latency_spread_ms",
        "fp32_latency_ms", "measured_on", "projected_metric", "projected_band", "projected_latency_ms",
        "formats", "kernels", "notes"}``.
    """
    from analysis.runtime.latency import end_to_end

    say = progress or (lambda s: None)
    run = run if isinstance(run, Run) else load_run(run)
    formats, notes = _policy_formats(run, policy)
    say("loading model and data")
    task = resolve_task(run)
    rm = resolve_model(run, task)
    say("building the quantized model")
    applied = _build(run, formats, rm, task)
    say(f"evaluating on {len(task.eval_inputs)} samples")
    metric_name = run.meta["metric"]["name"]
    r = _evaluate(applied.model, rm, task, metric_name, threads).result()
    if repeats > 0:
        say("timing end to end")
        x = task.eval_inputs[: int(run.meta.get("latency", {}).get("batch", 32))]
        feed = rm.binding.first_feed(x)
        lat = end_to_end({"fp32": rm.model, "policy": applied.model}, feed, threads=threads, repeats=repeats)
    else:  # accuracy only (analyze's own check of its policies): latency stays unmeasured, NaN
        lat = {"fp32": (np.nan, np.nan), "policy": (np.nan, np.nan)}
    explicit = {n: f for n, f in formats.items()}
    proj = projected(run, explicit) if projected is not None else {}
    measured_on = f"onnxruntime {ort.__version__}, CPU, {threads} threads, {len(task.eval_inputs)} eval samples"
    row = {"name": name, "kind": kind, "layers_json": json.dumps(explicit, sort_keys=True), "metric": r["metric"],
           "loss": r["loss"], "bytes": policy_bytes(run.cost, explicit, int(run.meta["model"].get("other_bytes", 0))),
           "latency_ms": lat["policy"][0], "measured_on": measured_on,
           "projected_metric": proj.get("metric", np.nan), "projected_band": proj.get("band", np.nan),
           # the penalty a calibrated projection fits to, and the built file beside the size model's count
           "kl": r.get("kl", np.nan), "file_bytes": applied.model.ByteSize()}
    def named(on_disk: pd.DataFrame) -> pd.DataFrame:  # another verify may have taken a name since the Run was read
        row["name"] = name or _next_name(on_disk)
        return pd.DataFrame([row])

    merge_policy_rows(run, named)
    return {**row, "latency_spread_ms": lat["policy"][1],
            "fp32_latency_ms": lat["fp32"][0], "projected_latency_ms": proj.get("latency_ms"),
            "formats": applied.formats, "kernels": applied.kernels, "notes": notes + applied.notes}


def _next_name(policies: pd.DataFrame) -> str:
    taken = set(policies["name"].astype(str))
    i = 1
    while f"verified-{i}" in taken:
        i += 1
    return f"verified-{i}"
