"""What a report says, shared by the HTML page, the Markdown summary and the figures."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.project.projection import Projection, Projector
from analysis.project.search import SearchError, SearchResult, best_policy, pareto_frontier
from analysis.store.policy import Policy, PolicyError, match_policy
from analysis.store.run import Run

DEFAULT_MAX_DROP = 0.01  # the best known policy: smallest projected within 1 % (relative) of FP32


@dataclass
class ReportContent:
    run: Run
    projector: Projector
    chosen: np.ndarray
    chosen_label: str
    chosen_notes: list[str]
    projection: Projection
    frontier: list[SearchResult]
    frontier_note: str


def _chosen(run: Run, p: Projector, policy: Policy | None, source: str | None) -> tuple[np.ndarray, str, list[str]]:
    if policy is not None:
        m = match_policy(policy, run)
        if m.model_mismatch:  # as apply and verify: another model's layers of the same name are not this one's
            raise PolicyError(f"field 'model.sha256': the policy is for model {m.model_mismatch[0][:12]}…, "
                              f"Run {run.path} holds {m.model_mismatch[1][:12]}…")
        codes, notes = p.sanitize(m.codes)
        return codes, f"from {source or 'the given policy file'}", [*m.messages(), *notes]
    drop = DEFAULT_MAX_DROP * abs(p.base_metric)
    try:
        r = best_policy(p, max_drop=drop)
    except SearchError as e:
        return np.zeros(len(p.names), dtype=np.int8), "FP32 (no quantized policy found)", [str(e)]
    return (np.asarray(r.codes, dtype=np.int8),
            f"the smallest projected within 1 % of FP32 {run.meta['metric']['name']} (search; no policy file given)", [])


def build_content(run: Run, policy: Policy | None = None, policy_source: str | None = None) -> ReportContent:
    p = Projector(run)
    chosen, label, notes = _chosen(run, p, policy, policy_source)
    try:
        front, fnote = pareto_frontier(p, axis="size"), ""
    except SearchError as e:
        front, fnote = [], str(e)
    return ReportContent(run, p, chosen, label, notes, p.project(chosen), front, fnote)
