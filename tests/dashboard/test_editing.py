"""Fast editing on the Layers page: a click cycles a format, selected rows take one format at once, every change is
one undo step, and the policies tried in the session can be compared and gone back to.

The pure parts (``dashboard.history``) are checked directly; the page through AppTest, clicks sent as the browser
sends them (``apptest_support.click_format``). The browser half is tests/e2e/test_editing_journey.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from analysis.api import FORMAT_CODE, Projector, encode_codes
from analysis.store.run import load_run
from apptest_support import click_format, cycle, layer_table, open_bulk, select_rows, set_format, switch_page
from dashboard import history, state
from dashboard.history import Timeline, auto_name, diff, next_code, record, redo, remember, rename, undo


def c(*codes: int) -> np.ndarray:
    return np.array(codes, dtype=np.int8)


# --- history: pure functions on code arrays

def test_undo_and_redo_walk_the_changes_and_a_new_change_drops_the_redo():
    a, b, d = c(0, 0, 0), c(0, 2, 0), c(1, 2, 0)
    tl = record(record(Timeline(), a, b), b, d)
    tl, back = undo(tl, d)
    assert back.tolist() == b.tolist() and tl.can_undo and tl.can_redo
    tl, back = undo(tl, b)
    assert back.tolist() == a.tolist() and not tl.can_undo
    assert undo(tl, a) == (tl, None)
    tl, again = redo(tl, a)
    assert again.tolist() == b.tolist()
    tl = record(tl, b, c(2, 2, 2))  # a new change after an undo: nothing left to redo
    assert not tl.can_redo and redo(tl, c(2, 2, 2)) == (tl, None)


def test_a_change_that_changes_nothing_is_no_step_and_the_depth_is_bounded():
    tl = record(Timeline(), c(0, 1), c(0, 1))
    assert tl == Timeline()
    for k in range(10):
        tl = record(tl, c(k, 0), c(k + 1, 0), depth=4)
    assert len(tl.past) == 4 and history.codes_of(tl.past[0]).tolist() == [6, 0]


def test_steps_hold_copies_not_the_arrays_they_were_given():
    a = c(0, 0)
    tl = record(Timeline(), a, c(1, 0))
    a[0] = 3
    assert undo(tl, c(1, 0))[1].tolist() == [0, 0]


@pytest.mark.parametrize("codes, name", [((0, 0, 0), "all fp32"), ((1, 1, 1), "all int8"),
                                         ((2, 2, 1, 0, 2), "3 × int4, 1 × int8"),
                                         ((3, 1, 0, 0), "1 × int8, 1 × int8-dyn"), ((), "all fp32")])
def test_auto_names_count_the_formats(codes, name):
    assert auto_name(c(*codes)) == name


def test_the_tried_list_keeps_distinct_policies_most_recent_last_and_named_ones_longest():
    tried = ()
    for codes in ((0, 0), (1, 0), (0, 0), (2, 0)):  # going back to a policy moves it, keeps its number
        tried = remember(tried, c(*codes))
    assert [(t.number, t.codes.tolist()) for t in tried] == [(2, [1, 0]), (1, [0, 0]), (3, [2, 0])]
    tried = rename(tried, 2, "  my pick ")
    assert history.find(tried, 2).label() == "#2 · my pick" and history.find(tried, 3).label() == "#3 · 1 × int4"
    for k in range(3, 30):
        tried = remember(tried, c(k % 4, k))
    assert len(tried) == history.TRIED_MAX
    assert history.find(tried, 2) is not None  # named: kept while unnamed ones went
    assert history.find(rename(tried, 2, ""), 2).label() == "#2 · 1 × int8"  # blank: its automatic name again


def test_diff_lists_the_layers_that_differ_and_refuses_another_runs_policy():
    assert diff(c(0, 1, 2, 0), c(0, 2, 2, 1)).tolist() == [1, 3]
    with pytest.raises(ValueError, match="cannot be compared"):
        diff(c(0, 1), c(0, 1, 2))


@pytest.mark.parametrize("allowed, code, want", [
    ((1, 1, 1, 0), 0, 1), ((1, 1, 1, 0), 1, 2), ((1, 1, 1, 0), 2, 0),  # fp32 → int8 → int4 → fp32
    ((1, 1, 0, 1), 1, 3), ((1, 0, 0, 0), 0, 0), ((1, 0, 1, 0), 2, 0)])  # skips what the layer cannot take
def test_a_click_moves_one_format_along_the_runs_formats(allowed, code, want):
    assert next_code(np.array(allowed, dtype=bool), [1, 2, 3], code) == want


# --- the page

def quantized(at) -> str:
    return next(m for m in at.metric if m.label == "Layers quantized").value


def size_bytes(at) -> int:
    m = next(m for m in at.metric if m.label == "Projected size")
    return int(re.search(r"([\d,]+) B", m.proto.delta).group(1).replace(",", ""))


def qp(at, name: str) -> str:
    v = at.query_params[name]
    return v if isinstance(v, str) else v[0]


def codes_of(at) -> np.ndarray:
    return np.asarray(at.session_state[state.codes_key(at.session_state[state.RUN_DIRS][0])])


def both_rows(run) -> list[int]:
    pj = Projector(run)
    return [i for i in range(len(pj.names)) if pj.allowed[i, 1] and pj.allowed[i, 2]]


def test_a_click_cycles_the_format_and_the_headline_link_and_table_follow(app, syn_dir):
    run = load_run(syn_dir)
    pj, row = Projector(run), both_rows(run)[0]
    at = app([syn_dir], "layers")
    assert cycle(at, row) == ["fp32", "int8", "int4", "fp32"]
    for fmt in ("int8", "int4"):
        click_format(at, row)
        want = np.zeros(len(pj.names), dtype=np.int8)
        want[row] = FORMAT_CODE[fmt]
        assert not at.exception and codes_of(at).tolist() == want.tolist()
        assert layer_table(at).value["format"].iloc[row] == fmt
        assert size_bytes(at) == pj.project(want).bytes and quantized(at) == f"1 / {len(want)}"
        assert qp(at, "p") == encode_codes(want, run.model_sha256)


def test_a_click_lands_on_the_layer_of_the_row_after_a_filter_and_a_sort(app, syn_dir):
    run = load_run(syn_dir)
    at = app([syn_dir], "layers")
    at.text_input(key=state.FILTER_TEXT).set_value("fc").run()
    at.selectbox(key=state.SORT).set_value("name").run()
    shown = layer_table(at).value["layer"].tolist()
    assert shown == sorted(n for n in run.layer_names if "fc" in n)
    click_format(at, 2)
    assert np.flatnonzero(codes_of(at)).tolist() == [run.layer_names.index(shown[2])]


def test_selected_rows_take_a_format_at_once_and_the_buttons_count_them(app, syn_dir):
    run = load_run(syn_dir)
    at = app([syn_dir], "layers")
    path = at.session_state[state.RUN_DIRS][0]
    assert all(b.disabled for b in at.button if b.key.startswith("ql.set_selected_"))
    rows = both_rows(run)[:3]
    select_rows(at, path, rows).run()
    labels = {b.key: b.label for b in at.button}
    assert labels[state.set_selected_key("int4")] == "INT4 (3)" and labels[state.set_selected_key("fp32")] == "FP32 (3)"
    at.button(key=state.set_selected_key("int4")).click().run()
    assert not at.exception
    assert np.flatnonzero(codes_of(at)).tolist() == rows and set(codes_of(at)[rows]) == {2}
    assert quantized(at) == f"3 / {len(run.layer_names)}"
    assert layer_table(at).value["format"].iloc[rows].tolist() == ["int4"] * 3
    at.button(key=state.set_selected_key("fp32")).click().run()  # the selection stays for another try
    assert not codes_of(at).any()


def test_the_selection_follows_its_layers_when_the_filter_changes(app, syn_dir):
    run = load_run(syn_dir)
    at = app([syn_dir], "layers")
    path = at.session_state[state.RUN_DIRS][0]
    names = run.layer_names
    picked = [i for i, n in enumerate(names) if "fc1" in n][:2]
    select_rows(at, path, picked).run()
    at.text_input(key=state.FILTER_TEXT).set_value("fc1").run()
    assert at.session_state[state.table_key(path)]["selection"]["rows"] == [0, 1]
    at.button(key=state.set_selected_key("int8")).click().run()
    assert np.flatnonzero(codes_of(at)).tolist() == picked


def test_every_change_is_one_undo_step_and_redo_takes_it_again(app, syn_dir):
    run = load_run(syn_dir)
    rows = both_rows(run)
    at = app([syn_dir], "layers")
    path = at.session_state[state.RUN_DIRS][0]
    assert at.button(key=state.UNDO).disabled and at.button(key=state.REDO).disabled
    steps = [codes_of(at).copy()]
    for _ in range(2):  # fp32 → int8 → int4: two clicks, two steps
        click_format(at, rows[0])
        steps.append(codes_of(at).copy())
    select_rows(at, path, rows[1:3]).run()
    at.button(key=state.set_selected_key("int8")).click().run()
    steps.append(codes_of(at).copy())
    open_bulk(at).button(key=state.BULK_RESET).click().run()
    assert not codes_of(at).any()
    for want in reversed(steps):
        at.button(key=state.UNDO).click().run()
        assert codes_of(at).tolist() == want.tolist()
    assert at.button(key=state.UNDO).disabled and not at.button(key=state.REDO).disabled
    at.button(key=state.REDO).click().run()
    assert codes_of(at).tolist() == steps[1].tolist()
    assert layer_table(at).value["format"].iloc[rows[0]] == "int8"  # the table shows what the redo brought back
    assert qp(at, "p") == encode_codes(steps[1], run.model_sha256)
    click_format(at, rows[5])  # a new change: nothing left to redo
    assert at.button(key=state.REDO).disabled


def test_a_link_and_a_search_are_undo_steps_too(app, syn_dir):
    run = load_run(syn_dir)
    linked = np.zeros(len(run.layer_names), dtype=np.int8)
    linked[[1, 4]] = 1
    at = app([syn_dir], "search", {"p": encode_codes(linked, run.model_sha256)})
    assert codes_of(at).tolist() == linked.tolist()
    at.number_input(key=state.SEARCH_SIZE).set_value(Projector(run).fp32_bytes * 0.4 / 1e6)
    at.button(key=f"FormSubmitter:{state.SEARCH_FORM}-Find the best policy and apply it").click().run()
    searched = codes_of(at).copy()
    assert not at.exception and not np.array_equal(searched, linked)
    switch_page(at, "layers").run()
    at.button(key=state.UNDO).click().run()
    assert codes_of(at).tolist() == linked.tolist()
    at.button(key=state.UNDO).click().run()
    assert not codes_of(at).any() and at.button(key=state.UNDO).disabled


def test_history_lists_the_policies_tried_diffs_two_and_goes_back(app, syn_dir):
    run = load_run(syn_dir)
    pj, rows = Projector(run), both_rows(run)
    at = app([syn_dir], "layers")
    path = at.session_state[state.RUN_DIRS][0]
    click_format(at, rows[0])  # #2: 1 × int8
    select_rows(at, path, rows[1:4]).run()
    at.button(key=state.set_selected_key("int4")).click().run()  # #3: 3 × int4, 1 × int8
    at.session_state[state.HISTORY_OPEN] = True
    at.run()
    assert not at.exception
    listed = next(df for df in at.dataframe if "policy" in df.value.columns).value
    assert listed["policy"].tolist() == ["#3 · 3 × int4, 1 × int8 (current)", "#2 · 1 × int8", "#1 · all fp32"]
    cur = codes_of(at)
    assert listed.iloc[0]["size"].startswith(f"{pj.project(cur).bytes / 1e6:.3f}")
    changed = next(df for df in at.dataframe if "format A" in df.value.columns).value  # A: #2, B: #3 (current)
    assert changed["layer"].tolist() == [pj.names[i] for i in rows[1:4]]
    assert set(changed["format A"]) == {"fp32"} and set(changed["format B"]) == {"int4"}
    at.text_input(key=state.history_name_key(path, 2)).input("one int8").run()
    assert "#2 · one int8" in next(df for df in at.dataframe if "policy" in df.value.columns).value["policy"].tolist()
    at.button(key=state.HISTORY_BACK).click().run()  # back to A: the current policy again, one more undo step
    assert np.flatnonzero(codes_of(at)).tolist() == [rows[0]]
    assert quantized(at) == f"1 / {len(pj.names)}"
    at.button(key=state.UNDO).click().run()
    assert codes_of(at).tolist() == cur.tolist()


def test_a_layer_that_takes_no_other_format_says_so_on_a_click(app, tmp_path):
    from analysis.store.run import replace_table
    from analysis.store.synthetic import synthetic_run

    run = synthetic_run(tmp_path / "stuck", 6, seed=3, n_random=0)
    sens = run.sensitivity.copy()
    first = sens["layer"] == run.layer_names[0]
    sens.loc[first, ["status", "reason"]] = ["skipped", "unsupported op"]
    replace_table(run, "sensitivity", sens)
    at = app([str(run.path)], "layers")
    click_format(at, 0)
    assert not at.exception and not codes_of(at).any()
    assert any(run.layer_names[0] in w.value and "stays FP32" in w.value and "unsupported op" in w.value
               for w in at.warning)
    assert at.button(key=state.UNDO).disabled  # nothing changed: no step
