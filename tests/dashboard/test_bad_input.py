"""Bad input gets a clear message on the page, never a traceback."""
from __future__ import annotations

import json
import shutil

import pytest

from analysis.store.policy import Policy, uniform
from analysis.store.run import load_run, replace_table, update_meta
from analysis.store.synthetic import synthetic_run
from apptest_support import PAGES, layer_table, open_bulk


def messages(at) -> str:
    return " | ".join([e.value for e in at.error] + [w.value for w in at.warning] + [i.value for i in at.info])


def test_no_run_open(app):
    at = app([], "layers")
    assert not at.exception
    assert "No Run is open" in messages(at)


@pytest.mark.parametrize("kind, words", [("not_run", "no run.json"), ("schema", "quantlens.run/99"),
                                         ("corrupt", "sensitivity.parquet")])
@pytest.mark.parametrize("page", list(PAGES))
def test_broken_run_is_a_message(app, bad_dirs, kind, words, page):
    at = app([bad_dirs[kind]], page)
    assert not at.exception
    assert at.error and words in at.error[0].value and "cannot be opened" in at.error[0].value


def test_run_missing_a_field_is_a_message(app, tmp_path, syn_dir):
    broken = tmp_path / "nobaseline_loss"
    shutil.copytree(syn_dir, broken)
    meta = json.loads((broken / "run.json").read_text())
    del meta["baseline"]["loss"]
    (broken / "run.json").write_text(json.dumps(meta))
    at = app([str(broken)], "layers")
    assert not at.exception
    assert at.error and "loss" in at.error[0].value


def test_open_folder_from_sidebar(app, syn_dir, bad_dirs):
    at = app([syn_dir], "overview")
    at.sidebar.text_input[0].input(bad_dirs["not_run"])
    at.sidebar.button[0].click().run()
    assert not at.exception
    assert at.error and "no run.json" in at.error[0].value
    at.sidebar.selectbox[0].set_value(0).run()  # the good Run is still there
    assert not at.exception and not at.error


def upload(at, name: str, content: bytes):
    at.file_uploader[0].set_value((name, content, "application/json"))
    return at.run()


def test_policy_for_another_model_applies_what_matches(app, syn_dir):
    run = load_run(syn_dir)
    names = run.layer_names
    policy = Policy("e" * 64, {names[2]: "int8", names[3]: "int8", "decoder.extra": "int4"})
    at = upload(app([syn_dir], "export"), "p.json", policy.to_json().encode())
    assert not at.exception
    text = messages(at)
    assert "another model" in text and "decoder.extra" in text and "applied 2 layer setting(s)" in text
    codes = at.session_state[f"ql.codes::{at.session_state['ql.run_dirs'][0]}"]
    assert codes[2] == 1 and codes[3] == 1 and codes.sum() == 2


def test_policy_with_unknown_format_and_unavailable_layer(app, syn_dir):
    run = load_run(syn_dir)
    skipped = run.meta["uniform"]["int4"]["skipped_layers"][0]
    other = next(n for n in run.layer_names if n != skipped)
    policy = Policy(run.model_sha256, {other: "int2", skipped: "int4"})
    at = upload(app([syn_dir], "export"), "p.json", policy.to_json().encode())
    assert not at.exception
    text = messages(at)
    assert "int2" in text and skipped in text and "kept at fp32" in text


def test_own_policy_round_trips_through_upload(app, syn_dir):
    run = load_run(syn_dir)
    policy = uniform(run, "int4")
    at = upload(app([syn_dir], "export"), "p.json", policy.to_json().encode())
    assert not at.exception and any("applied to all 40 layers" in s.value for s in at.success)
    preview = next(c.value for c in at.code if c.language == "json")
    assert json.loads(preview) == policy.to_dict()


@pytest.mark.parametrize("content, words", [(b"{not json", "not valid JSON"),
                                            (b'{"schema": "x"}', "schema"),
                                            (b'{"schema": "quantlens.policy/1", "model": {}}', "model.sha256")])
def test_unreadable_policy_file_is_a_message(app, syn_dir, content, words):
    at = upload(app([syn_dir], "export"), "bad.json", content)
    assert not at.exception
    assert at.error and words in at.error[0].value and "bad.json" in at.error[0].value


def test_partial_run_opens_with_a_warning(app, tmp_path):
    run = synthetic_run(tmp_path / "partial", 12, seed=2, n_random=0)
    sens = run.sensitivity.copy()
    pending = sens.index[-6:]
    sens.loc[pending, ["status", "reason"]] = ["pending", "not measured yet"]
    sens.loc[pending, ["metric", "metric_delta", "loss", "loss_delta", "kl"]] = float("nan")
    replace_table(run, "sensitivity", sens)
    update_meta(run, status="partial", progress={"done": 18, "total": 24})
    for page in PAGES:
        at = app([str(run.path)], page)
        assert not at.exception and not at.error
        banner = next(w.value for w in at.warning if "partial" in w.value)
        assert "18 of 24" in banner and "--resume" in banner and str(run.path) in banner
    at = app([str(run.path)], "layers")
    notes = layer_table(at).value.set_index("layer")["note"]
    waiting = set(sens.loc[pending, "layer"])
    assert all(notes[n].startswith("NOT MEASURED YET") for n in waiting)  # never shown as safe
    assert not any("NOT MEASURED" in notes[n] for n in run.layer_names if n not in waiting)
    open_bulk(at).selectbox(key="ql.bulk_fmt").set_value("int8")
    at.button(key="ql.bulk_set").click().run()
    codes = at.session_state[f"ql.codes::{at.session_state['ql.run_dirs'][0]}"]
    pending_layers = set(sens.loc[pending].query("format == 'int8'")["layer"])
    names = run.layer_names
    assert {names[i] for i in range(len(names)) if codes[i] == 0} == pending_layers
