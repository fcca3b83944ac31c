"""Undo, redo and the policies tried in a session: pure functions on policy code arrays (no Streamlit).

A policy is one int8 code per layer in execution order (``fp32=0, int8=1, int4=2, int8-dyn=3``, see
``analysis.api.POLICY_FORMATS``). Here it is held as its bytes: one byte per layer and step, immutable,
compared by value. ``dashboard/state.py`` keeps one :class:`Timeline` and one tuple of :class:`Tried` per
open Run and calls :func:`record` and :func:`remember` on every change of the current policy.

Example:
    >>> tl = record(Timeline(), np.zeros(3, np.int8), np.array([0, 2, 0], np.int8))
    >>> tl, back = undo(tl, np.array([0, 2, 0], np.int8))
    >>> back.tolist(), tl.can_redo
    ([0, 0, 0], True)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from analysis.api import POLICY_FORMATS

UNDO_DEPTH = 200  # undo steps kept per Run (one byte per layer each)
TRIED_MAX = 20  # distinct policies kept in a session's history per Run


def _key(codes: np.ndarray) -> bytes:
    return np.asarray(codes, dtype=np.int8).tobytes()


def codes_of(key: bytes) -> np.ndarray:
    """The code array a history entry holds (a fresh, writable copy)."""
    return np.frombuffer(key, dtype=np.int8).copy()


@dataclass(frozen=True)
class Timeline:
    """Undo and redo stacks of one Run's policy: Undo brings back ``past[-1]``, Redo ``future[-1]``."""

    past: tuple[bytes, ...] = ()
    future: tuple[bytes, ...] = ()

    @property
    def can_undo(self) -> bool:
        return bool(self.past)

    @property
    def can_redo(self) -> bool:
        return bool(self.future)


def record(tl: Timeline, before: np.ndarray, after: np.ndarray, depth: int = UNDO_DEPTH) -> Timeline:
    """``tl`` after a change from ``before`` to ``after``: one undo step, and nothing left to redo.

    A change that changes nothing is no step.
    """
    b = _key(before)
    if b == _key(after):
        return tl
    return Timeline(past=(*tl.past, b)[-depth:], future=())


def undo(tl: Timeline, current: np.ndarray) -> tuple[Timeline, np.ndarray | None]:
    """(the timeline after one Undo, the policy it brings back), or ``(tl, None)`` when there is nothing to undo."""
    if not tl.past:
        return tl, None
    return Timeline(past=tl.past[:-1], future=(*tl.future, _key(current))), codes_of(tl.past[-1])


def redo(tl: Timeline, current: np.ndarray) -> tuple[Timeline, np.ndarray | None]:
    """(the timeline after one Redo, the policy it brings back), or ``(tl, None)`` when there is nothing to redo."""
    if not tl.future:
        return tl, None
    return Timeline(past=(*tl.past, _key(current)), future=tl.future[:-1]), codes_of(tl.future[-1])


@dataclass(frozen=True)
class Tried:
    """One policy tried in this session: its codes, the order it was first tried in (1, 2, ...), a name given to it."""

    key: bytes
    number: int
    name: str = ""  # empty: named by :func:`auto_name`

    @property
    def codes(self) -> np.ndarray:
        return codes_of(self.key)

    def label(self) -> str:
        """How lists show it: ``#3 · 3 × int4, 2 × int8`` (or the name given to it)."""
        return f"#{self.number} · {self.name or auto_name(self.codes)}"


def auto_name(codes: np.ndarray) -> str:
    """A policy named by its counts: ``all fp32``, ``all int8``, or ``3 × int4, 2 × int8`` (most used first).

    Example:
        >>> auto_name(np.array([2, 2, 1, 0, 2], np.int8))
        '3 × int4, 1 × int8'
    """
    c = np.asarray(codes, dtype=np.intp)
    counts = np.bincount(c, minlength=len(POLICY_FORMATS)) if len(c) else np.zeros(len(POLICY_FORMATS), np.intp)
    used = [(int(counts[f]), POLICY_FORMATS[f]) for f in range(1, len(POLICY_FORMATS)) if counts[f]]
    if not used:
        return "all fp32"
    if len(used) == 1 and used[0][0] == len(c):
        return f"all {used[0][1]}"
    return ", ".join(f"{n} × {fmt}" for n, fmt in sorted(used, key=lambda x: (-x[0], x[1])))


def remember(tried: tuple[Tried, ...], codes: np.ndarray, keep: int = TRIED_MAX) -> tuple[Tried, ...]:
    """``tried`` with ``codes`` as its most recent entry (oldest first).

    A policy tried before moves to the end with its number and name; a new one gets the next number.
    Past ``keep`` entries the least recently current unnamed one goes first (a named one is kept while
    an unnamed one can go).
    """
    k = _key(codes)
    old = next((t for t in tried if t.key == k), None)
    rest = tuple(t for t in tried if t.key != k)
    entry = old or Tried(k, max((t.number for t in tried), default=0) + 1)
    out = (*rest, entry)
    while len(out) > keep:
        drop = next((t for t in out[:-1] if not t.name), out[0])
        out = tuple(t for t in out if t is not drop)
    return out


def rename(tried: tuple[Tried, ...], number: int, name: str) -> tuple[Tried, ...]:
    """``tried`` with entry ``number`` named ``name`` (blank: back to its automatic name)."""
    return tuple(replace(t, name=name.strip()[:80]) if t.number == number else t for t in tried)


def find(tried: tuple[Tried, ...], number: int) -> Tried | None:
    return next((t for t in tried if t.number == number), None)


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Indices of the layers whose format differs between policies ``a`` and ``b`` (same layers, same order)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"policies of {len(a)} and {len(b)} layers cannot be compared (another Run?)")
    return np.flatnonzero(a != b)


def next_code(allowed: np.ndarray, order: list[int], code: int) -> int:
    """The format a click gives a layer now at ``code``: fp32 → the Run's formats in ``order`` → fp32.

    ``allowed``: which codes this layer can take (``Projector.allowed[i]``); ones it cannot are skipped,
    so a layer that can take none stays at fp32 (returns ``code``).

    Example:
        >>> next_code(np.array([True, True, False, True]), [1, 2, 3], 1)
        3
    """
    cycle = [0, *(c for c in order if c != 0)]
    start = cycle.index(code) if code in cycle else 0
    for step in range(1, len(cycle) + 1):
        c = cycle[(start + step) % len(cycle)]
        if allowed[c]:
            return c
    return code
