"""What a sweep measures: every layer x format a layer can take, the uniform policies and K random
mixes, as content-addressed jobs (see ``analysis.engine.sweep.job_key``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.engine.sweep import Job, job_key, plan_jobs
from analysis.models.base import LayerInfo


@dataclass
class SweepPlan:
    """What a sweep will measure, and the content address of its settings."""

    layers: list[LayerInfo]
    skip: dict[tuple[str, str], str]
    layer_jobs: list[tuple[str, str]]
    policies: dict[str, dict[str, str]]
    kinds: dict[str, str]
    context_key: str
    jobs: list[Job]


def random_mixed_policies(layers, fmts, skip: dict, k: int, seed: int, exclude=()) -> list[dict[str, str]]:
    """Up to ``k`` distinct policies (none in ``exclude``) drawing each layer's format uniformly from
    fp32 and the formats it can take; small models may have fewer distinct mixes than ``k``."""
    rng = np.random.default_rng([seed, 7919])
    out, seen = [], set(exclude)
    for _ in range(k * 20):
        if len(out) == k:
            break
        pol = {}
        for l in layers:
            options = ["fp32"] + [f.name for f in fmts if (l.name, f.name) not in skip]
            choice = options[int(rng.integers(len(options)))]
            if choice != "fp32":
                pol[l.name] = choice
        key = tuple(sorted(pol.items()))
        if key not in seen and 0 < len(pol):
            seen.add(key)
            out.append(pol)
    return out


def plan_sweep(tm, t, metric_name: str, fmts, *, incremental: bool, random_policies: int, seed: int) -> SweepPlan:
    """Every layer x format a layer can take, the uniform policies and K random mixes, as keyed jobs."""
    layers = tm.layers()
    skip = {(l.name, f.name): r for l in layers for f in fmts if (r := tm.skip_reason(l.name, f))}
    layer_jobs = [(l.name, f.name) for l in layers for f in fmts if (l.name, f.name) not in skip]
    policies = {f"all-{f.name}": {l.name: f.name for l in layers if (l.name, f.name) not in skip} for f in fmts}
    kinds = {name: "uniform" for name in policies}
    uniform_keys = [tuple(sorted(p.items())) for p in policies.values()]
    for i, pol in enumerate(random_mixed_policies(layers, fmts, skip, random_policies, seed, uniform_keys), start=1):
        policies[f"random-{i}"] = pol
        kinds[f"random-{i}"] = "random"
    context = {"model": tm.sha256, "data": t.sha256, "formats": [f.to_dict() for f in fmts], "metric": metric_name,
               "n_calib": len(t.calib_inputs), "batch_size": t.batch_size, "incremental": incremental,
               "random_policies": random_policies, "seed": seed}
    return SweepPlan(layers, skip, layer_jobs, policies, kinds, job_key(context), plan_jobs(context, layer_jobs, policies))
