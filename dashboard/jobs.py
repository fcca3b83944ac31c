"""Background verify jobs: ``analysis.runtime.verify.verify_policy`` in a thread, watched by the page.

Plain Python (no Streamlit): the page polls a job from an ``st.fragment(run_every=...)``.
One job per Run at a time, across sessions, because a verify rewrites the Run's policies table.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)
_ids = itertools.count(1)


@dataclass
class VerifyJob:
    """One verify of one policy on one Run folder."""

    path: str
    codes: np.ndarray  # the policy verified, one format code per layer (execution order)
    id: int = field(default_factory=lambda: next(_ids))
    started: float = field(default_factory=time.monotonic)
    steps: list[str] = field(default_factory=list)
    result: dict | None = None
    error: str | None = None
    finished: float | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def _run(self, policy) -> None:
        from analysis.api import verify_policy

        try:
            # the folder, not the dashboard's cached Run: verify rewrites the table of the Run it is given
            self.result = verify_policy(self.path, policy, progress=self.steps.append, kind="user")
        except ValueError as e:  # model / data not at hand, policy does not fit: the engine's message
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - a failed job is a message on the page; the log keeps the trace
            log.exception("verify of %s failed", self.path)
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.finished = time.monotonic()

    def wait(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.done


class VerifyJobs:
    """The latest verify job per Run folder."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, VerifyJob] = {}

    def get(self, path: str) -> VerifyJob | None:
        return self._jobs.get(path)

    def start(self, path: str, codes: np.ndarray, policy) -> VerifyJob:
        """Start verifying ``policy`` (whose codes are ``codes``) on the Run at ``path``.

        Raises:
            RuntimeError: a verify of this Run is still running.
        """
        with self._lock:
            old = self._jobs.get(path)
            if old is not None and not old.done:
                raise RuntimeError(f"a verify of this Run is still running ({old.seconds:.0f} s so far)")
            job = VerifyJob(path, np.asarray(codes, dtype=np.int8).copy())
            job.thread = threading.Thread(target=job._run, args=(policy,), name=f"quantlens-verify-{job.id}",
                                          daemon=True)
            self._jobs[path] = job
            job.thread.start()
            return job
