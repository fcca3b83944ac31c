"""What file tasks share: their ``--task-option KEY=VALUE`` options, checked and typed, and the
seeded calibration/evaluation split (the same one ``npz_task`` draws)."""
from __future__ import annotations

import numpy as np

from analysis.data.tasks import TaskError


class Options:
    """A task's options as strings: unknown keys are refused at once, each value is read with its type."""

    def __init__(self, options: dict | None, where: str, known: tuple[str, ...]) -> None:
        self.values = {str(k): str(v) for k, v in (options or {}).items()}
        self.where, self.known = where, known
        unknown = sorted(set(self.values) - set(known))
        if unknown:
            raise TaskError(f"--task-option {unknown[0]}: unknown for {where}; known: {', '.join(known)}")

    def str(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def int(self, key: str, default: int | None, *, minimum: int = 1) -> int | None:
        if key not in self.values:
            return default
        try:
            v = int(self.values[key])
        except ValueError:
            raise TaskError(f"--task-option {key}={self.values[key]}: not an integer ({self.where})") from None
        if v < minimum:
            raise TaskError(f"--task-option {key}={v}: must be at least {minimum} ({self.where})")
        return v

    def floats(self, key: str, default: tuple[float, ...], n: int) -> tuple[float, ...]:
        if key not in self.values:
            return default
        try:
            v = tuple(float(s) for s in self.values[key].split(","))
        except ValueError:
            v = ()
        if len(v) != n:
            raise TaskError(f"--task-option {key}={self.values[key]}: expected {n} comma-separated numbers "
                                  f"({self.where})")
        return v

    def calib(self, calib: int | None) -> int | None:
        """``--calib`` or the ``calib`` option (not both)."""
        opt = self.int("calib", None)
        if opt is not None and calib is not None and opt != calib:
            raise TaskError(f"--task-option calib={opt} and --calib {calib} disagree ({self.where})")
        return calib if calib is not None else opt


def split_calib_eval(n: int, calib: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (each sorted) of ``calib`` samples (default: a quarter, at most 128) drawn with ``seed``
    for calibration, and of the rest for evaluation: the split ``npz_task`` makes."""
    n_calib = calib if calib is not None else max(1, min(128, n // 4))
    if not 1 <= n_calib < n:
        raise TaskError(f"--calib {n_calib}: must be between 1 and {n - 1} for {n} samples")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_calib]), np.sort(order[n_calib:])
