"""GPU-path options of ``CopGen`` exercised on the CPU: ``torch.compile`` of the network's evaluation and
batch sizing for device memory (the CUDA probe itself runs in tests/core/test_cuda.py's device session)."""

from __future__ import annotations

import copy

import pytest
import torch
from copgen.generate import CopGen, GenerationError, batch_for_memory, fit_batch_size
from copgen.modalities import Modality
from tolerances import recommended

pytestmark = pytest.mark.usefixtures("single_thread")  # fixture in tests/core/conftest.py


def test_compiled_network_samples_like_the_eager_one(tiny, sidecar):
    """A compiled evaluation is another float implementation of the same network (fused kernels reorder
    sums): the reference README's tolerance for correct sampling implementations applies."""
    atol = recommended(sidecar, "sampling generated")
    g = torch.Generator().manual_seed(3)
    shape = (2, tiny.in_chans, tiny.img_size, tiny.img_size)
    conditions = {Modality.S2L2A: torch.randn(shape, generator=g)}
    kwargs = dict(steps=3, solver="2m", batch_size=2)
    eager = CopGen(copy.deepcopy(tiny), None, **kwargs).generate_latents(conditions, ["S1RTC"], [5, 6])
    compiled = CopGen(copy.deepcopy(tiny), None, compile="default", **kwargs)
    assert compiled.network.forward_stacked is not type(compiled.network).forward_stacked
    got = compiled.generate_latents(conditions, ["S1RTC"], [5, 6])
    torch.testing.assert_close(got[Modality.S1RTC], eager[Modality.S1RTC], atol=atol, rtol=1e-5)
    assert "forward_stacked" not in dict(compiled.network.state_dict())  # the module is unchanged
    with pytest.raises(GenerationError, match="compile='fast'"):
        CopGen(copy.deepcopy(tiny), None, compile="fast")


def test_batch_for_memory():
    gib = 2**30
    assert batch_for_memory(100 * gib, gib // 10, fraction=0.6, cap=128) == 128  # capped
    assert batch_for_memory(10 * gib, gib // 10, fraction=0.6, cap=128) == 32  # 60 fit -> 32
    assert batch_for_memory(gib // 20, gib // 10) == 1  # never below one
    assert fit_batch_size(torch.nn.Linear(1, 1), "cpu", cap=16) == 16  # no probe off the GPU
