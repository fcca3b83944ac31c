"""A Run that measured int8-dyn offers it where measured (and only there); one that did not never takes it."""
from __future__ import annotations

import numpy as np
import pytest

from analysis import analyze
from analysis.store.policy import FORMAT_CODE, encode_codes
from analysis.store.run import load_run
from apptest_support import cycle, select_rows
from dashboard import state
from test_pages import edit, size_bytes


@pytest.fixture(scope="module")
def dyn_dir(tmp_path_factory) -> str:
    """The digits CNN at int8, int4 and int8-dyn: its convolutions are skipped for int8-dyn."""
    out = tmp_path_factory.mktemp("dash") / "digits-dyn"
    analyze("demo:digits", "digits", out, formats=["int8", "int4", "int8-dyn"], progress=False, latency=False, verify_policies=0,
            random_policies=4)
    return str(out)


def test_a_linear_layer_takes_int8_dyn_and_the_size_moves_by_its_bytes(app, dyn_dir):
    run = load_run(dyn_dir)
    row = run.layer_names.index("fc1")
    at = app([dyn_dir], "layers")
    path = at.session_state["ql.run_dirs"][0]
    assert not at.exception
    before = size_bytes(at)
    at = edit(at, path, row, "int8-dyn")
    assert not at.exception and not at.warning
    bt = run.bytes_table()
    assert size_bytes(at) - before == int(bt.loc["fc1", "int8-dyn"] - bt.loc["fc1", "fp32"])
    codes = at.session_state[f"ql.codes::{path}"]
    assert codes[row] == FORMAT_CODE["int8-dyn"] and np.count_nonzero(codes) == 1
    assert at.query_params["p"] == encode_codes(codes, run.model_sha256)


def test_a_convolution_cannot_take_int8_dyn(app, dyn_dir):
    """A click never offers it; setting the selected rows to it keeps conv1 at FP32 and says why."""
    at = app([dyn_dir], "layers")
    path = at.session_state["ql.run_dirs"][0]
    seen = cycle(at, 0)
    assert "int8" in seen and "int8-dyn" not in seen
    select_rows(at, path, [0]).run()
    at.button(key=state.set_selected_key("int8-dyn")).click().run()
    assert any("conv1: int8-dyn not available" in w.value and "convolutions take static int8" in w.value
               for w in at.warning)
    assert at.session_state[f"ql.codes::{path}"][0] == 0


def test_a_run_without_int8_dyn_refuses_it(app, syn_dir):
    """Neither a click nor a button offers it."""
    at = app([syn_dir], "layers")
    path = at.session_state["ql.run_dirs"][0]
    before = size_bytes(at)
    assert "int8-dyn" not in cycle(at, 3)
    assert not [b for b in at.button if b.key == state.set_selected_key("int8-dyn")]
    assert not at.exception
    assert size_bytes(at) == before and not at.session_state[f"ql.codes::{path}"].any()
