"""Reading and writing Run folders: every failure names the file and field."""
import json
import shutil

import pytest

from analysis.store.run import RunError, load_run, write_run


def _copy(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run.path, dst)
    return dst


def test_not_a_folder(tmp_path):
    with pytest.raises(RunError, match="not a folder"):
        load_run(tmp_path / "missing")


def test_folder_without_run_json(tmp_path):
    with pytest.raises(RunError, match=r"not a Run \(no run.json\)"):
        load_run(tmp_path)


def test_unknown_schema_version(digits_run, tmp_path):
    dst = _copy(digits_run, tmp_path)
    meta = json.loads((dst / "run.json").read_text())
    meta["schema"] = "quantlens.run/99"
    (dst / "run.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match=r"run.json: field 'schema' is 'quantlens.run/99'"):
        load_run(dst)


def test_corrupt_table(digits_run, tmp_path):
    dst = _copy(digits_run, tmp_path)
    data = (dst / "cost.parquet").read_bytes()
    (dst / "cost.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match=r"cost.parquet: unreadable Parquet"):
        load_run(dst)


def test_missing_table_and_bad_json(digits_run, tmp_path):
    dst = _copy(digits_run, tmp_path)
    (dst / "layers.parquet").unlink()
    with pytest.raises(RunError, match=r"layers.parquet: missing"):
        load_run(dst)
    (dst / "run.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(RunError, match="run.json: not valid JSON"):
        load_run(dst)


def test_write_refuses_incomplete_tables_and_leaves_nothing(digits_run, tmp_path):
    tables = dict(digits_run.tables)
    tables.pop("cost")
    with pytest.raises(RunError, match="table 'cost' is missing"):
        write_run(tmp_path / "r", digits_run.meta, tables)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(digits_run, tmp_path):
    dst = tmp_path / "r"
    write_run(dst, digits_run.meta, digits_run.tables)
    with pytest.raises(RunError, match="not empty"):
        write_run(dst, digits_run.meta, digits_run.tables)
    write_run(dst, {**digits_run.meta, "seed": 7}, digits_run.tables, overwrite=True)
    assert load_run(dst).meta["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(digits_run, tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    for name in (f".r.staging-{pid}-x1_y", f".r.old-{pid}", f".r.staging-{os.getpid()}-live", ".rr.old-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text("{}")
    write_run(tmp_path / "r", digits_run.meta, digits_run.tables)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".r.staging-%d-live" % os.getpid(), ".rr.old-1", "r"]  # ours is alive; .rr is another Run
