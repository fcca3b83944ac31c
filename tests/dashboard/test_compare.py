"""Compare page: two Runs side by side; layers matched by name; one Run, a broken Run, the same Run twice."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from apptest_support import APP, switch_page


def compare_app(run_dirs: list[str], a: int | None = None, b: int | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["ql.run_dirs"] = [str(Path(d).resolve()) for d in run_dirs]
    if a is not None:
        at.session_state["ql.compare_a"], at.session_state["ql.compare_b"] = a, b
    at.run()
    return switch_page(at, "compare").run()


def texts(at) -> str:
    return "\n".join(e.value for e in [*at.caption, *at.markdown, *at.warning, *at.info, *at.error])


def test_two_runs_side_by_side(syn_dir, other_dir):
    at = compare_app([syn_dir, other_dir])
    assert not at.exception and not at.error
    assert at.title[0].value == "Compare Runs"
    tables = at.dataframe
    uniform, layers = tables[0].value, tables[1].value
    assert list(uniform["policy"]) == ["fp32", "all-int8", "all-int4"]
    assert uniform["size A (MB)"].notna().all() and uniform["size B (MB)"].notna().all()
    assert len(layers) == 40  # syn40's layers; syn12's are a subset of them by name
    assert (layers["in"] == "both").sum() == 12 and (layers["in"] == "A").sum() == 28
    assert layers.loc[layers["in"] == "A", "Δloss int8 B"].isna().all()
    body = texts(at)
    assert "12 layer(s) in both Runs" in body and "Only in Run A (28)" in body and "Only in Run B" not in body
    assert len(at.get("plotly_chart")) == 2  # sensitivity and frontiers


def test_swapped_runs_list_layers_only_in_b(syn_dir, other_dir):
    at = compare_app([syn_dir, other_dir], a=1, b=0)
    assert not at.exception
    assert "Only in Run B (28)" in texts(at)


def test_one_run_asks_for_a_second(syn_dir):
    at = compare_app([syn_dir])
    assert not at.exception
    assert any("Open a second Run" in i.value for i in at.info)


def test_same_run_twice_and_broken_run(syn_dir, bad_dirs):
    at = compare_app([syn_dir, bad_dirs["corrupt"]], a=0, b=0)
    assert not at.exception
    assert any("same Run" in w.value for w in at.warning)
    at = compare_app([syn_dir, bad_dirs["corrupt"]], a=0, b=1)
    assert not at.exception
    assert any("Run B cannot be opened" in e.value for e in at.error)


def test_export_page_offers_report_and_bundle(syn_dir):
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["ql.run_dirs"] = [str(Path(syn_dir).resolve())]
    at.run()
    switch_page(at, "export").run()
    assert not at.exception
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Download report (HTML)" in labels and "Download Run bundle (.qlrun)" in labels


def _spec(at, title: str) -> dict:
    import json

    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    found = [s for s in specs if s["layout"]["title"]["text"].startswith(title)]
    assert len(found) == 1, [s["layout"]["title"]["text"] for s in specs]
    return found[0]


def test_two_metrics_are_never_drawn_on_one_axis(syn_dir, other_dir, tmp_path):
    """A Run of another metric (and loss) gets its own panel, each axis titled with its Run's metric."""
    import shutil

    from analysis.store.run import load_run, update_meta

    emb = tmp_path / "emb"
    shutil.copytree(other_dir, emb)
    update_meta(load_run(emb), metric={"name": "embedding", "higher_is_better": True, "loss": "nmse_to_fp32"})
    at = compare_app([syn_dir, str(emb)])
    assert not at.exception
    assert any("cosine similarity" in w.value and "own panel" in w.value for w in at.warning)
    front = _spec(at, "Size vs metric")
    lay = front["layout"]
    axis_of = {t["name"]: t.get("yaxis", "y") for t in front["data"]}
    assert axis_of["Run A measured"] == "y" and axis_of["Run B measured"] == "y2"
    assert lay["yaxis"]["title"]["text"] == "Run A: accuracy"
    assert lay["yaxis2"]["title"]["text"] == "Run B: cosine similarity"
    sens = _spec(at, "Loss change")
    assert {t.get("xaxis", "x") for t in sens["data"]} == {"x", "x2"}
    assert {t["orientation"] for t in sens["data"]} == {"h"}
    assert sens["layout"]["xaxis2"]["title"]["text"] == "Run B: Δ nmse_to_fp32"

    at = compare_app([syn_dir, other_dir])  # one metric: one panel, one axis named by it
    front = _spec(at, "Size vs metric")
    assert {t.get("yaxis", "y") for t in front["data"]} == {"y"}
    assert front["layout"]["yaxis"]["title"]["text"] == "accuracy"
