"""QuantLens analysis engine: per-layer quantization sensitivity written to a Run.

Public API (``analysis.api`` holds the rest: projection, search, verify, reports, bundles):
    analyze(model, task, out, ...) -> Run     measure a model
    load_run(path) -> Run                     read a Run folder back
    Projector(run), best_policy(projector, ...), Policy
"""
from analysis.store.run import Run, RunError, load_run

__all__ = ["Policy", "Projector", "Run", "RunError", "analyze", "best_policy", "load_run"]

_LAZY = {"analyze": "analysis.api", "Projector": "analysis.api", "best_policy": "analysis.api", "Policy": "analysis.api"}


def __getattr__(name: str):
    """The heavier names load on first use, so ``import analysis`` stays cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute '{name}'")
