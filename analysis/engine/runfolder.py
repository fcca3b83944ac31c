"""Where a sweep writes its Run and its finished job records.

A new Run appears at ``out`` as soon as its static tables are known, so a Run opened mid-sweep
shows what is done. Overwriting an existing Run, the new one is built in a staging folder beside
it (``.NAME.staging-PID-*``, which ``store.run.clean_leftovers`` removes once PID is gone) and
swapped in when the sweep has persisted its first records: until then a failure (bad input found
late, workers that cannot load the model) or an interrupt leaves the previous Run exactly as it
was. From the swap on, the new Run is the one at ``out`` and ``--resume`` finishes it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from analysis.engine.jobstore import JobStore
from analysis.models.structure import without_dataflow
from analysis.store.run import (OPTIONAL_TABLES, Run, clean_leftovers, load_run, replace_table, write_optional_table,
                                write_run)


class RunFolder:
    """The Run a sweep writes (``create``), its job records (``save``) and, after a failure, what goes (``abandon``)."""

    def __init__(self, out: Path, *, resume: bool) -> None:
        self.out, self.resume = out, resume
        self.replacing = not resume and out.is_dir() and any(out.iterdir())
        self.stage: Path | None = None  # while replacing: the folder that holds the new Run until the swap
        self.run: Run | None = None

    def finished(self, keys: set[str]) -> dict[str, dict]:
        """Records a Run being resumed holds already; an interrupted writer's temporary files go first."""
        clean_leftovers(self.out)
        store = JobStore(self.out / "jobs")
        store.clean_temporaries()
        return store.load(keys)

    def create(self, meta: dict, tables: dict[str, pd.DataFrame]) -> Run:
        """The Run the sweep updates: the one at ``out`` when resuming (its metadata refreshed in memory),
        else a new one written whole, at ``out`` or, when it would replace a Run, staged beside it."""
        if self.resume:
            self.run = load_run(self.out)
            recorded = self.run.meta.get("structure")
            self.run.meta.update({k: v for k, v in meta.items() if k != "created"})
            for name in OPTIONAL_TABLES:  # a Run begun by a version without the table gets it now
                if name in tables and not (self.out / f"{name}.parquet").is_file():
                    write_optional_table(self.run, name, tables[name])
            self._resume_fed_by(tables["layers"], recorded)
        elif self.replacing:
            self.stage = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.staging-{os.getpid()}-"))
            self.run = write_run(self.stage / self.out.name, meta, tables)
        else:
            self.run = write_run(self.out, meta, tables)
        return self.run

    def _resume_fed_by(self, layers: pd.DataFrame, recorded: dict | None) -> None:
        """A resumed Run begun by a version that did not record ``fed_by`` gets the column now, when its layers
        are the ones this sweep found (same names, same order; nothing else in the table changes). Otherwise its
        layers table stays as it is, and run.json's ``structure`` keeps describing what that table holds."""
        have = self.run.layers
        if "fed_by" in have.columns:
            if "fed_by" not in layers.columns and recorded is not None:
                self.run.meta["structure"] = recorded  # the column stays: so does what it was read from
            return
        if "fed_by" in layers.columns and list(have["name"]) == list(layers["name"]):
            replace_table(self.run, "layers", have.assign(fed_by=layers["fed_by"].to_numpy()))
        elif "fed_by" in layers.columns:
            self.run.meta["structure"] = without_dataflow("the Run was begun before layers' fed_by was recorded, "
                                                          "and its layers differ from the model's now").to_meta()

    def save(self, records: list[dict]) -> None:
        """Persist finished job records (each file whole or absent); the first to arrive swap a staged Run in."""
        store = JobStore(self.run.path / "jobs")
        for r in records:
            store.save(r)
        self.commit()

    def commit(self) -> None:
        """Swap a staged Run into ``out``, in place of the previous one (a no-op when nothing is staged)."""
        if self.stage is None:
            return
        old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        os.replace(self.out, old)
        os.replace(self.run.path, self.out)
        self.run.path = self.out
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage = None
        clean_leftovers(self.out)  # staging folders of earlier writers that were killed

    def abandon(self, *, remove_new: bool) -> None:
        """After a failure: a staged Run goes, so the previous one stays as it was; a Run this sweep
        created at ``out`` goes too when ``remove_new`` (bad input, no job finished): nothing half-written."""
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
        elif remove_new and not self.resume and not self.replacing:
            shutil.rmtree(self.out, ignore_errors=True)
