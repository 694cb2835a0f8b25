"""The comparison helpers themselves: they must fail where they should, or every test using them is void."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cpu_level import REFUSAL, forced_below_hardware, refused_below_hardware_level
from tolerances import assert_uint8_close, assert_ulp_close, ulp_distance


def test_ulp_distance_counts_representable_steps_across_zero():
    one = torch.tensor([1.0])
    up = torch.nextafter(one, torch.tensor([2.0]))
    assert ulp_distance(up, one).tolist() == [1]
    assert ulp_distance(torch.tensor([-0.0]), torch.tensor([0.0])).tolist() == [0]
    tiny = torch.nextafter(torch.tensor([0.0]), one)  # the smallest subnormal
    assert ulp_distance(tiny, -tiny).tolist() == [2]
    assert_ulp_close(up, one, 1)
    with pytest.raises(AssertionError, match="1 of 1 values > 0 ulp"):
        assert_ulp_close(up, one, 0)
    with pytest.raises(AssertionError, match="float32"):
        ulp_distance(np.ones(2), np.ones(2))  # float64 has other ulps: refuse rather than mislead


def test_uint8_rule_allows_one_code_on_few_values_only():
    base = np.random.default_rng(0).integers(0, 255, 10_000, dtype=np.uint8)
    edge = base.copy()
    edge[:10] += 1  # 0.1 %: allowed
    assert_uint8_close(edge, base)
    with pytest.raises(AssertionError, match="differ"):
        assert_uint8_close(base + np.uint8(1), base)  # every value one code off: wrong
    far = base.copy()
    far[0] += 2
    with pytest.raises(AssertionError, match="max"):
        assert_uint8_close(far, base)


def test_only_the_forced_lower_level_refusal_skips(monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert not forced_below_hardware()
    # at the native level the refusal is a failure; any other error always propagates
    with pytest.raises(RuntimeError, match="pack_vnni2"), refused_below_hardware_level():
        raise RuntimeError(REFUSAL)
    with pytest.raises(RuntimeError, match="other"), refused_below_hardware_level():
        raise RuntimeError("other")
