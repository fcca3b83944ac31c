"""Finished sweep jobs on disk: one small JSON file per job, written atomically.

A job's file name is its content-addressed key, so a resumed sweep knows exactly what
is done; a file is either whole or absent (written to a temporary name, fsynced, renamed).
Plain JSON only: nothing here ever unpickles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from analysis.store.atomic import write_text_atomic

MAX_RECORD_BYTES = 1 << 20


class JobStore:
    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def save(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.folder / f"{record['key']}.json", json.dumps(record, sort_keys=True))

    def load(self, keys: set[str] | None = None) -> dict[str, dict]:
        """Finished records by key (only ``keys`` when given); unreadable files are ignored
        (they will be recomputed), temporary files of an interrupted write too."""
        out: dict[str, dict] = {}
        if not self.folder.is_dir():
            return out
        for p in self.folder.glob("*.json"):
            key = p.stem
            if keys is not None and key not in keys:
                continue
            try:
                if p.stat().st_size > MAX_RECORD_BYTES:
                    continue
                rec = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(rec, dict) and rec.get("key") == key and isinstance(rec.get("result"), dict):
                out[key] = rec
        return out

    def clean_temporaries(self) -> None:
        if self.folder.is_dir():
            for p in self.folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
