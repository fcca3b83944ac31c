"""Where a sweep writes its Run and its finished job records.

A new Run appears at ``out`` as soon as its static tables are known, so a Run opened mid-sweep
shows what is done; ``--resume`` finishes the one at ``out``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from analysis.engine.jobstore import JobStore
from analysis.store.run import Run, clean_leftovers, load_run, write_run


class RunFolder:
    """The Run a sweep writes (``create``), its job records (``save``) and, after a failure, what goes (``abandon``)."""

    def __init__(self, out: Path, *, resume: bool, overwrite: bool) -> None:
        self.out, self.resume, self.overwrite = out, resume, overwrite
        self.run: Run | None = None

    def finished(self, keys: set[str]) -> dict[str, dict]:
        """Records a Run being resumed holds already; an interrupted writer's temporary files go first."""
        clean_leftovers(self.out)
        store = JobStore(self.out / "jobs")
        store.clean_temporaries()
        return store.load(keys)

    def create(self, meta: dict, tables: dict[str, pd.DataFrame]) -> Run:
        """The Run the sweep updates: the one at ``out`` when resuming (its metadata refreshed in memory),
        else a new one written whole at ``out``."""
        if self.resume:
            self.run = load_run(self.out)
            self.run.meta.update({k: v for k, v in meta.items() if k != "created"})
        else:
            self.run = write_run(self.out, meta, tables, overwrite=self.overwrite)
        return self.run

    def save(self, records: list[dict]) -> None:
        """Persist finished job records (each file whole or absent)."""
        store = JobStore(self.run.path / "jobs")
        for r in records:
            store.save(r)

    def commit(self) -> None:
        """Nothing to do: the Run is written at ``out`` directly."""

    def abandon(self, *, remove_new: bool) -> None:
        """After a failure: a Run this sweep created goes when ``remove_new`` (bad input, no job finished)."""
        if remove_new and not self.resume:
            shutil.rmtree(self.out, ignore_errors=True)
