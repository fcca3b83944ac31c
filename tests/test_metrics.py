"""Metrics: nmse, the automatic choice that avoids degenerate metrics, and user metrics (package.module:function)."""
import sys
import textwrap

import pytest
import torch

from analysis.data.metrics import METRICS, MetricError, MetricState, choose_metric, get_metric

torch.set_num_threads(1)


def test_nmse_is_the_normalised_squared_error_per_sample():
    torch.manual_seed(0)
    y_ref = torch.randn(5, 3, 4)
    y = y_ref + 0.1 * torch.randn(5, 3, 4)
    m = get_metric("nmse")
    assert m.higher_is_better is False
    metric, loss, kl = m.per_sample(y, y_ref, None)
    a, b = y.double().reshape(5, -1), y_ref.double().reshape(5, -1)
    expected = ((a - b) ** 2).sum(1) / (b**2).sum(1)
    assert torch.allclose(metric, expected, rtol=1e-12) and torch.equal(metric, loss) and kl is None
    st = MetricState("nmse")
    st.update(y[:2], y_ref[:2], None)
    st.update(y[2:], y_ref[2:], None)
    r = st.result()
    assert r["metric"] == pytest.approx(float(expected.mean()), rel=1e-12) and r["metric"] == r["loss"]
    same = MetricState("nmse")
    same.update(y_ref, y_ref, None)
    assert same.result()["metric"] == 0.0


def _classes(n=16, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g)


@pytest.mark.parametrize("y, labels, expected", [
    (_classes(), True, "accuracy"),
    (_classes(), False, "agreement"),
    (torch.randn(16, 3, 8, generator=torch.Generator().manual_seed(2)), False, "cosine"),  # a sequence of vectors
    (torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(1)), False, "cosine"),  # feature maps
])
def test_automatic_choice_keeps_metrics_that_can_move(y, labels, expected):
    m, why = choose_metric(None, labels, y)
    assert (m.name, why) == (expected, None)


def _one_class(n=16, c=5):
    y = _classes(n, c)
    y[:, 3] += 100.0  # FP32 picks class 3 for every sample
    return y


@pytest.mark.parametrize("y, needle", [
    (torch.randn(16, 1, generator=torch.Generator().manual_seed(3)), "one value per sample (shape (16, 1))"),
    (torch.arange(1.0, 17.0).reshape(16, 1, 1) * torch.ones(16, 1, 6), "repeats one value over its 6 elements"),
    (_one_class(), "picks class 3 for every one of the 16 samples"),
    (torch.ones(16, 5) * torch.arange(1.0, 17.0)[:, None], "class scores are tied"),
])
def test_automatic_choice_avoids_degenerate_and_uninformative_metrics(y, needle):
    m, why = choose_metric(None, False, y)
    assert m.name == "nmse" and not m.higher_is_better
    assert needle in why and "\n" not in why


def test_a_named_metric_that_cannot_move_is_refused_naming_it():
    with pytest.raises(MetricError, match=r"metric 'cosine' cannot move on this model: .*one value per sample"):
        choose_metric("cosine", False, torch.randn(16, 1))
    with pytest.raises(MetricError, match=r"metric 'agreement' cannot move on this model: .*tied"):
        choose_metric("agreement", False, torch.zeros(16, 5) + 1.0)
    with pytest.raises(MetricError, match=r"metric 'nmse' cannot move on this model: .*all zero for 2 of the 16"):
        y = torch.randn(16, 4)
        y[[3, 9]] = 0.0
        choose_metric("nmse", False, y)


def test_a_named_metric_that_tells_little_is_honoured():
    """One FP32 class for every sample: agreement can still move (a layer can flip the top class), so an
    explicit choice stands; only the automatic one avoids it."""
    m, why = choose_metric("agreement", False, _one_class())
    assert (m.name, why) == ("agreement", None)


def test_existing_checks_still_apply():
    with pytest.raises(MetricError, match="metric 'accuracy' needs labels"):
        choose_metric("accuracy", False, _classes())
    with pytest.raises(MetricError, match=r"metric 'agreement' needs class scores \(N, C\)"):
        choose_metric("agreement", False, torch.randn(16))
    with pytest.raises(MetricError, match=r"metric 'accuracy' needs class scores"):
        choose_metric(None, True, torch.randn(16, 1))  # labels, but no class scores to take the top of
    with pytest.raises(MetricError, match=r"unknown metric 'f1'; known: accuracy, .*nmse.*or package.module:function"):
        choose_metric("f1", False, _classes())


def test_nothing_built_in_fits_an_all_zero_output():
    with pytest.raises(MetricError, match="no built-in metric fits .*package.module:function"):
        choose_metric(None, False, torch.zeros(16, 1))


# ---- user metrics ----------------------------------------------------------------------------------

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a module into a fresh working folder; get_metric must find it there (as worker processes do)."""
    counter = iter(range(1000))

    def write(body: str) -> str:
        name = f"usermetric_{next(counter)}_{tmp_path.name.replace('-', '_')}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        return name

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield write
    for k in [k for k in sys.modules if k.startswith("usermetric_")]:
        del sys.modules[k]


def test_user_metric_per_sample_scores_and_direction(user_module):
    mod = user_module("""
        import torch

        def neg_mae(y_fp32, y_q, labels):
            '''Negative mean absolute error to FP32.'''
            return -(y_q - y_fp32).abs().flatten(1).mean(1)

        def mae(y_fp32, y_q, labels):
            return float((y_q - y_fp32).abs().mean())
        mae.higher_is_better = False
    """)
    y_ref = torch.randn(6, 4)
    y = y_ref + 0.5
    m = get_metric(f"{mod}:neg_mae")
    assert m.higher_is_better and m.user and m.loss == "nmse_to_fp32"
    assert m.description == f"user metric {mod}:neg_mae: Negative mean absolute error to FP32."
    st = MetricState(f"{mod}:neg_mae")
    st.update(y, y_ref, None)
    r = st.result()
    assert r["metric"] == pytest.approx(-0.5, abs=1e-6)
    assert r["loss"] == pytest.approx(float(METRICS["nmse"].per_sample(y, y_ref, None)[0].mean()), rel=1e-12)
    # one number per batch counts once per sample: batches of 2 and 4 weigh 2:4
    st = MetricState(f"{mod}:mae")
    assert st.metric.higher_is_better is False
    st.update(y_ref[:2] + 1.0, y_ref[:2], None)
    st.update(y_ref[2:] + 4.0, y_ref[2:], None)
    assert st.result()["metric"] == pytest.approx((2 * 1.0 + 4 * 4.0) / 6, rel=1e-6)
    # a user metric is taken as is: no shape checks apply
    assert choose_metric(f"{mod}:mae", False, torch.randn(6, 1)) == (get_metric(f"{mod}:mae"), None)


def test_user_metric_sees_fp32_first_and_labels(user_module):
    mod = user_module("""
        seen = []

        def record(y_fp32, y_q, labels):
            seen.append((y_fp32.clone(), y_q.clone(), labels))
            y_fp32.zero_()  # must not reach the caller's shared reference
            return (y_q.argmax(1) == labels).double()
    """)
    y_ref, y, labels = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    keep = y_ref.clone()
    st = MetricState(f"{mod}:record")
    st.update(y, y_ref, labels)
    seen = sys.modules[mod].seen
    assert torch.equal(seen[0][0], keep) and torch.equal(seen[0][1], y) and torch.equal(seen[0][2], labels)
    assert torch.equal(y_ref, keep)
    assert st.result()["metric"] == pytest.approx(float((y.argmax(1) == labels).double().mean()))


@pytest.mark.parametrize("body, spec, needle", [
    ("def f(a, b, l):\n    raise ValueError('labels are needed')\n", "f",
     "metric {mod}:f raised ValueError: labels are needed"),
    ("def f(a, b, l):\n    return a.sum(1, keepdim=True)\n", "f", "metric {mod}:f returned shape (4, 1); expected one score"),
    ("def f(a, b, l):\n    return [1.0, 2.0, 3.0, 4.0]\n", "f", "metric {mod}:f returned list; expected one score"),
    ("def f(a, b, l):\n    return float('nan')\n", "f", "metric {mod}:f returned NaN or Inf for 4 of 4 sample(s)"),
    ("def f(a, b, l):\n    return 1.0\n", "g", "metric '{mod}:g': module '{mod}' has no function 'g'"),
    ("f = 3\n", "f", "metric '{mod}:f': 'f' is a int, not a function"),
    ("def f(a, b, l):\n    return 1.0\nf.higher_is_better = 'no'\n", "f", "higher_is_better must be True or False"),
    ("raise RuntimeError('broken at import')\n", "f", "importing module '{mod}' raised RuntimeError: broken at import"),
])
def test_user_metric_errors_are_one_line_naming_it(user_module, body, spec, needle):
    mod = user_module(body)
    with pytest.raises(MetricError) as e:
        MetricState(f"{mod}:{spec}").update(torch.randn(4, 3), torch.randn(4, 3), None)
    assert needle.format(mod=mod) in str(e.value) and "\n" not in str(e.value)


def test_user_metric_module_that_does_not_import(user_module):
    with pytest.raises(MetricError, match=r"metric 'no_such_mod_xyz:f': cannot import module 'no_such_mod_xyz'"):
        get_metric("no_such_mod_xyz:f")
    with pytest.raises(MetricError, match="expected package.module:function"):
        get_metric(":f")


def test_user_metric_nan_where_the_outputs_are_nan_is_left_to_the_sweep(user_module):
    """A quantized output with NaN is a non-finite job the sweep records; the metric's NaN there is not its bug."""
    mod = user_module("def f(a, b, l):\n    return -(b - a).abs().flatten(1).mean(1)\n")
    y_ref = torch.randn(4, 3)
    y = y_ref.clone()
    y[1, 0] = float("nan")
    st = MetricState(f"{mod}:f")
    st.update(y, y_ref, None)
    assert st.n == 4
