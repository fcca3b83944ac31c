"""Policy: JSON and URL round-trips, parse errors that name the field, matching against a Run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.store.policy import (POLICY_SCHEMA, Policy, PolicyError, decode_codes, decode_url_token, encode_codes,
                             encode_url_token, from_json, match_policy, policy_from_codes, uniform)
from analysis.store.synthetic import synthetic_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("pol") / "run", 40, seed=3)


def test_json_round_trip(run):
    p = uniform(run, "int8")
    q = from_json(p.to_json())
    assert q == p
    obj = json.loads(p.to_json())
    assert obj["schema"] == POLICY_SCHEMA and obj["model"] == {"sha256": run.model_sha256}
    assert obj["default"] == "fp32" and set(obj["layers"]) == set(run.layer_names)


@pytest.mark.parametrize("text, field", [
    ("[1, 2]", "policy"),
    ("not json", "policy"),
    ('{"schema": "quantlens.policy/9", "model": {"sha256": "a"}}', "schema"),
    ('{"schema": "quantlens.policy/1"}', "model"),
    ('{"schema": "quantlens.policy/1", "model": {"sha256": 3}}', "model.sha256"),
    ('{"schema": "quantlens.policy/1", "model": {"sha256": "a"}, "default": "int3"}', "default"),
    ('{"schema": "quantlens.policy/1", "model": {"sha256": "a"}, "layers": []}', "layers"),
    ('{"schema": "quantlens.policy/1", "model": {"sha256": "a"}, "layers": {"x": 8}}', "layers.x"),
])
def test_parse_errors_name_the_field(text, field):
    with pytest.raises(PolicyError, match=field.replace(".", r"\.")):
        from_json(text)


def test_uniform_keeps_skipped_layers_fp32(run):
    skipped = set(run.meta["uniform"]["int4"]["skipped_layers"])
    assert skipped, "the synthetic Run skips some layers at int4"
    p = uniform(run, "int4")
    assert {n for n, f in p.layers.items() if f == "fp32"} == skipped
    assert match_policy(p, run).clean


def test_match_reports_without_raising(run):
    names = run.layer_names
    skipped = next(n for n in run.meta["uniform"]["int4"]["skipped_layers"] if n not in names[:2])
    p = Policy("f" * 64, {names[0]: "int8", "no.such.layer": "int4", names[1]: "int3", skipped: "int4"})
    m = match_policy(p, run)
    assert m.model_mismatch == ("f" * 64, run.model_sha256)
    assert m.applied == {names[0]: "int8"}
    assert m.unknown_layers == ["no.such.layer"]
    assert m.unknown_formats == {names[1]: "int3"}
    assert list(m.unavailable) == [skipped]
    assert m.codes[0] == 1 and m.codes[1] == 0 and m.codes[names.index(skipped)] == 0
    text = " ".join(m.messages())
    assert "another model" in text and "no.such.layer" in text and "int3" in text and skipped in text


def test_default_applies_to_unnamed_layers(run):
    m = match_policy(Policy(run.model_sha256, {run.layer_names[0]: "fp32"}, default="int8"), run)
    assert m.codes[0] == 0 and (m.codes[1:] == 1).all()


def test_url_token_round_trip_on_run(run):
    p = uniform(run, "int4")
    token = encode_url_token(p, run)
    assert token.startswith("q1." + run.model_sha256[:12] + ".40.")
    back = decode_url_token(token, run)
    assert policy_from_codes(run, back.codes) == policy_from_codes(run, match_policy(p, run).codes)


def test_url_token_for_another_model_is_refused(run):
    token = encode_codes(np.zeros(40, dtype=np.int8), "0" * 64)
    with pytest.raises(PolicyError, match="another model"):
        decode_url_token(token, run)


@pytest.mark.parametrize("prefix", ["", "{sha:.1}", "{sha:.11}", "{sha:.12}0"])
def test_url_token_with_a_short_or_long_hash_prefix_is_refused(run, prefix):
    # an empty prefix once matched every model with the same layer count
    body = encode_codes(np.ones(40, dtype=np.int8), run.model_sha256).split(".")[3]
    token = f"q1.{prefix.format(sha=run.model_sha256)}.40.{body}"
    with pytest.raises(PolicyError, match="another model"):
        decode_url_token(token, run)


@pytest.mark.parametrize("token, part", [
    ("q1.abc.3", "4 dot-separated"), ("q9.abc.3.JA", "version"), ("q1.abc.x.JA", "layer count"),
    ("q1.abc.3.J*A", "base64url"), ("q1.abc.9.JA", "bytes of codes"),
])
def test_bad_tokens(token, part):
    with pytest.raises(PolicyError, match=part):
        decode_codes(token)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=0, max_size=1100), st.text("0123456789abcdef", min_size=12, max_size=64))
def test_codes_round_trip_exactly(codes, sha):
    token = encode_codes(codes, sha)
    assert set(token) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    back = decode_codes(token)
    assert back.codes.tolist() == codes and back.sha_prefix == sha[:12]


def test_thousand_layers_is_compact():
    token = encode_codes(np.random.default_rng(0).integers(0, 3, 1000), "a" * 64)
    assert len(token) <= 360
