"""Hypothesis: the Policy parser, the URL token codec and the Run loader take any input and answer
with a value or their own error (PolicyError / RunError), never another exception."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from analysis.store.policy import (POLICY_FORMATS, POLICY_SCHEMA, Policy, PolicyError, decode_codes, encode_codes,
                                   from_json, parse_policy)
from analysis.store.run import TABLES, Run, RunError, load_run

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=20)
POLICY_LIKE = st.fixed_dictionaries({"schema": st.just(POLICY_SCHEMA) | JSON, "model": JSON | st.fixed_dictionaries(
    {"sha256": JSON | st.text(min_size=1, max_size=8)})}, optional={"default": JSON | st.sampled_from(
        ["fp32", "int8", "int4"]), "layers": JSON | st.dictionaries(st.text(max_size=8), JSON, max_size=4)})


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_policy_from_any_bytes(data):
    try:
        assert isinstance(from_json(data), Policy)
    except PolicyError:
        pass


@given(JSON | POLICY_LIKE)
def test_policy_from_any_json_value(obj):
    try:
        p = parse_policy(obj)
    except PolicyError:
        return
    assert isinstance(p.default, str) and all(isinstance(v, str) for v in p.layers.values())
    assert from_json(p.to_json()) == p  # what parses, round-trips


@given(st.text(max_size=60) | st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}", st.text(max_size=4),
                                         st.text(max_size=4), st.text(max_size=4), st.text(max_size=8)))
def test_url_token_from_any_text(token):
    try:
        t = decode_codes(token)
    except PolicyError:
        return
    assert decode_codes(encode_codes(t.codes, t.sha_prefix)).codes.tolist() == t.codes.tolist()
    assert t.codes.ndim == 1 and (t.codes.size == 0 or (t.codes.min() >= 0 and t.codes.max() < len(POLICY_FORMATS)))


@given(st.lists(st.integers(0, len(POLICY_FORMATS) - 1), max_size=300),
       st.text("0123456789abcdef", min_size=12, max_size=12))
def test_url_token_round_trip(codes, sha):
    t = decode_codes(encode_codes(codes, sha))
    assert t.sha_prefix == sha and t.codes.tolist() == codes


@pytest.mark.parametrize("text, expected", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    ('{"schema": "quantlens.policy/1", "model": {"sha256": "a"}, "layers": {"x": ' + "[" * 500 + "]" * 500 + "}}",
     "field 'layers.x'"),
    (" " * (9 << 20), "more than a policy holds"),
    ('{"schema": "quantlens.policy/1", "model": {"sha256": "a"}, "default": ["int8"]}', "field 'default'"),
])
def test_huge_and_deep_policies_are_policy_errors(text, expected):
    with pytest.raises(PolicyError, match=expected):
        from_json(text)


def test_a_policy_of_100k_layers_is_within_the_limit():
    layers = {f"block.{i}.fc": "int8" for i in range(100_000)}
    text = json.dumps({"schema": POLICY_SCHEMA, "model": {"sha256": "a"}, "layers": layers})
    assert len(from_json(text).layers) == 100_000


@pytest.mark.parametrize("token", ["q1.abc.\u00b2.JA", "q1.abc.\u0663.JA", "q1.abc.3.J\u00e9"])
def test_non_ascii_tokens_are_policy_errors(token):
    with pytest.raises(PolicyError):
        decode_codes(token)


# ---- the Run loader ---------------------------------------------------------------------------

def _usable(run: Run) -> None:
    """What every reader of a loaded Run relies on works."""
    assert isinstance(run.model_sha256, str) and isinstance(run.higher_is_better, bool)
    assert run.status in ("partial", "complete") and all(isinstance(f, str) for f in run.formats)
    assert run.bytes_table().shape[0] == len(run.layer_names)


@pytest.fixture(scope="module")
def scratch(tiny_run, tmp_path_factory):
    """A copy of the tiny Run that each example damages one file of, then restores."""
    dst = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(tiny_run.path, dst)
    return dst, {p.name: p.read_bytes() for p in dst.iterdir() if p.is_file()}


def _load_after_writing(scratch, name, data):
    path, originals = scratch
    (path / name).write_bytes(data)
    try:
        _usable(load_run(path))
    except RunError:
        pass
    finally:
        (path / name).write_bytes(originals[name])


def _mutations():
    """The real run.json with one field (at any depth) replaced by any JSON value, or removed."""
    return st.tuples(st.lists(st.integers(0, 50), min_size=1, max_size=3), JSON, st.booleans())


def _mutate(meta, path, value, remove):
    node = meta
    for depth, i in enumerate(path):
        if not isinstance(node, dict) or not node:
            return
        key = sorted(node)[i % len(node)]
        if depth == len(path) - 1 or not isinstance(node[key], dict):
            if remove:
                del node[key]
            else:
                node[key] = value
            return
        node = node[key]


SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)


@SETTINGS
@given(st.binary(max_size=300))
def test_run_json_of_any_bytes(scratch, data):
    _load_after_writing(scratch, "run.json", data)


@SETTINGS
@given(_mutations())
def test_run_json_with_any_field_changed(scratch, mutation):
    meta = json.loads(scratch[1]["run.json"])
    _mutate(meta, *mutation)
    _load_after_writing(scratch, "run.json", json.dumps(meta).encode())


@SETTINGS
@given(st.sampled_from(TABLES), st.binary(max_size=300) | st.integers(0, 2000))
def test_tables_of_any_bytes_or_truncated(scratch, table, damage):
    original = scratch[1][f"{table}.parquet"]
    data = damage if isinstance(damage, bytes) else original[:damage % max(len(original), 1)]
    _load_after_writing(scratch, f"{table}.parquet", data)


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_deeply_nested_run_json_is_a_run_error(scratch, depth):
    path, originals = scratch
    (path / "run.json").write_text("[" * depth + "]" * depth)
    try:
        with pytest.raises(RunError, match="run.json"):
            load_run(path)
    finally:
        (path / "run.json").write_bytes(originals["run.json"])


def test_oversized_run_json_is_a_run_error(scratch):
    path, originals = scratch
    with open(path / "run.json", "wb") as f:
        f.truncate(17 << 20)
    try:
        with pytest.raises(RunError, match="more than a run.json holds"):
            load_run(path)
    finally:
        (path / "run.json").write_bytes(originals["run.json"])
