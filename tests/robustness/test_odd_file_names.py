"""File names that are not UTF-8 (bytes decoded with surrogateescape) go through every verb."""
from __future__ import annotations

import os

import numpy as np
import pytest

from analysis.store.bundle import open_bundle
from analysis.cli.main import main
from analysis.store.run import load_run

ODD = os.fsdecode(b"caf\xe9-\xff")  # Latin-1 bytes: not valid UTF-8


@pytest.fixture
def odd_dir(tmp_path):
    d = tmp_path / ODD
    try:
        d.mkdir()
    except (UnicodeEncodeError, OSError):
        pytest.fail("this file system cannot hold non-UTF-8 names; the test needs one")
    rng = np.random.default_rng(1)
    np.savez(d / f"{ODD}.npz", inputs=rng.normal(size=(40, 64)).astype(np.float32), labels=rng.integers(0, 10, 40))
    return d


def test_analyze_search_report_bundle_with_non_utf8_names(odd_dir, capsys):
    run_dir, pol, html, md, bundle = (odd_dir / f"{ODD}-{x}" for x in ("run", "policy.json", "r.html", "r.md", "b.qlrun"))
    assert main(["analyze", "factories:tiny_mlp", "--task", str(odd_dir / f"{ODD}.npz"), "--out", str(run_dir),
                 "--quiet", "--no-latency", "--verify-policies", "0", "--random-policies", "2"]) == 0
    run = load_run(run_dir)
    assert run.status == "complete" and run.meta["data"]["source"].endswith(f"{ODD}.npz")
    assert main(["search", str(run_dir), "--max-drop", "0.05", "--out", str(pol)]) == 0
    assert main(["report", str(run_dir), "--policy", str(pol), "--out", str(html)]) == 0
    assert main(["report", str(run_dir), "--format", "md", "--out", str(md)]) == 0
    page = html.read_text(encoding="utf-8")  # valid UTF-8: the odd byte is written as an escape
    assert "caf\\udce9-\\udcff" in page
    assert main(["bundle", str(run_dir), "--out", str(bundle)]) == 0
    opened = open_bundle(bundle, odd_dir / f"{ODD}-opened")
    assert opened.layer_names == run.layer_names
    capsys.readouterr()


def test_missing_non_utf8_path_is_one_line(odd_dir, capsys):
    code = main(["report", str(odd_dir / f"{ODD}-absent"), "--out", str(odd_dir / "x.html")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a folder" in err
