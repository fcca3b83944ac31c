"""QuantLens analysis engine: per-layer quantization sensitivity written to a Run.

Public API:
    analyze(model, task, out, ...) -> Run     measure a model (see analysis.api)
    load_run(path) -> Run                     read a Run folder back
"""
from analysis.run import Run, RunError, load_run

__all__ = ["Run", "RunError", "analyze", "load_run"]


def analyze(*args, **kwargs):
    """Measure per-layer sensitivity and write a Run; see ``analysis.api.analyze``."""
    from analysis.api import analyze as _analyze

    return _analyze(*args, **kwargs)
