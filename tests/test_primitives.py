import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st
from hypothesis.extra.numpy import arrays

from analysis.quant.formats import PerChannel, PerGroup, PerTensor, WeightSpec
from analysis.quant.primitives import (StreamingHistogram, RangeObserver, choose_qparams, dequantize, fake_quantize,
                                 fake_quantize_weight, mse_range, percentile_range, qrange, quantize, quantize_weight)

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (4, True)])
def test_per_tensor_matches_torch_exactly(bits, symmetric):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(bits)) * 3
    scale, zero = choose_qparams(x.min(), x.max(), bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero), qmin, qmax)
    assert torch.equal(fake_quantize(x, scale, zero, qmin, qmax), ref)


@pytest.mark.parametrize("shape", [(16, 40), (8, 4, 3, 3)])
def test_per_channel_weight_matches_torch_exactly(shape):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    spec = WeightSpec(8, symmetric=True, granularity=PerChannel(0))
    _, scale, zero = quantize_weight(W, spec)
    ref = torch.fake_quantize_per_channel_affine(W, scale, zero, 0, -127, 127)
    assert torch.equal(fake_quantize_weight(W, spec), ref)


def test_group_wise_matches_a_plain_loop():
    W = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    spec = WeightSpec(4, symmetric=False, granularity=PerGroup(32))
    got = fake_quantize_weight(W, spec)
    for r in range(6):
        for g in range(2):
            w = W[r, g * 32:(g + 1) * 32]
            lo, hi = torch.clamp(w.min(), max=0.0), torch.clamp(w.max(), min=0.0)  # float32 throughout
            scale = (hi - lo) / 15
            zero = torch.clamp(-torch.round(lo / scale), 0, 15)
            ref = (torch.clamp(torch.round(w * (1.0 / scale)) + zero, 0, 15) - zero) * scale
            assert torch.equal(got[r, g * 32:(g + 1) * 32], ref)


def test_group_size_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 9), WeightSpec(4, False, PerGroup(32)))


@given(arrays(np.float32, st.integers(2, 200), elements=finite), st.sampled_from([(8, False), (8, True), (4, False), (4, True)]))
def test_roundtrip_error_within_half_a_step(a, fmt):
    bits, symmetric = fmt
    x = torch.from_numpy(a)
    scale, zero = choose_qparams(x.min(), x.max(), bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    q = quantize(x, scale, zero, qmin, qmax)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (x - dequantize(q, scale, zero)).abs()
    assert float(err.max()) <= float(scale) / 2 * (1 + 1e-5) + 1e-6
    dq = dequantize(q, scale, zero)
    assert torch.equal(fake_quantize(dq, scale, zero, qmin, qmax), dq)  # idempotent


GRANULARITIES = [PerTensor(), PerChannel(0), PerGroup(32), PerGroup(16)]


@given(arrays(np.float32, (4, 64), elements=finite), st.sampled_from(GRANULARITIES))
@example(np.where(np.arange(256).reshape(4, 64) == 0, 59.0, 17.0).astype(np.float32), PerTensor())
def test_weight_codes_in_range_and_error_within_half_a_step(a, gran):
    """On any weights each format's error stays within half its step, and INT8's step is the finer one.

    Not that INT8's error is the smaller on every tensor: the two grids are not nested, so a tensor whose
    values sit on INT4's grid (59 and 17: 17 / (59/7) = 2.02 steps) can come out closer at INT4."""
    W = torch.from_numpy(a)
    absmax = float(W.abs().max())
    for bits in (8, 4):
        qmax = 2 ** (bits - 1) - 1
        err = (W - fake_quantize_weight(W, WeightSpec(bits, True, gran))).abs()
        assert float(err.max()) <= absmax / qmax / 2 * (1 + 1e-5) + 1e-6, bits  # a group's step <= the tensor's
    codes, _, _ = quantize_weight(W, WeightSpec(4, False, gran))
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15


@pytest.mark.parametrize("gran", GRANULARITIES)
def test_int8_beats_int4_on_gaussian_weights(gran):
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    e8 = (W - fake_quantize_weight(W, WeightSpec(8, True, gran))).pow(2).sum()
    e4 = (W - fake_quantize_weight(W, WeightSpec(4, True, gran))).pow(2).sum()
    assert float(e8) * 50 < float(e4)  # 16x finer steps: about 256x less squared error


def test_zero_is_exactly_representable():
    x = torch.tensor([0.3, 1.7, 2.9])
    scale, zero = choose_qparams(x.min(), x.max(), 8, False)
    assert float(fake_quantize(torch.tensor(0.0), scale, zero, 0, 255)) == 0.0


def test_constant_tensor_does_not_divide_by_zero():
    W = torch.zeros(3, 32)
    out = fake_quantize_weight(W, WeightSpec(4, False, PerGroup(32)))
    assert torch.equal(out, W)


def test_observers_shrink_ranges_with_outliers():
    x = torch.cat([torch.randn(100_000, generator=torch.Generator().manual_seed(0)), torch.tensor([60.0])])
    rng = RangeObserver()
    rng.update(x)
    h = StreamingHistogram(rng.lo, rng.hi)
    h.update(x)
    assert h.count == x.numel()
    p_lo, p_hi = percentile_range(h, 99.9)
    m_lo, m_hi = mse_range(h, 8, False)
    assert rng.lo <= p_lo < p_hi < 10 < rng.hi == 60.0
    assert m_hi < 60.0 and m_lo >= rng.lo
    assert math.isclose(h.fraction_outside(rng.lo, rng.hi), 0.0)


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False)])
def test_fake_quantize_equals_the_integer_path_bit_for_bit_and_in_layout(bits, symmetric):
    """The in-place float path must give what dequantize(quantize(x)) gives, laid out alike: a later
    convolution picks its kernel by layout (an (N, 1, H, W) input with channels-last strides once
    changed the digits sweep's numbers)."""
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(64, 8, 8, 1, generator=g) * 3).permute(0, 3, 1, 2)  # (N, 1, 8, 8), strides (64, 1, 8, 1)
    for t in (x, torch.randn(32, 300, generator=g) * 5):
        scale, zero = choose_qparams(t.min() * 0.8, t.max() * 0.8, bits, symmetric)  # some values clip
        qmin, qmax = qrange(bits, symmetric)
        ref = dequantize(quantize(t, scale, zero, qmin, qmax), scale, zero)
        out = fake_quantize(t, scale, zero, qmin, qmax)
        assert torch.equal(out, ref) and out.stride() == ref.stride() and out.dtype == torch.float32
