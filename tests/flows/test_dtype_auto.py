"""``--dtype auto``: bf16 on CUDA; on CPU bf16 only where the CPU has native bf16 units and the bundled
model's bf16 quality was measured equal to fp32 (benchmarks/RESULTS.md, "Session 5: bf16 on CPU")."""

from __future__ import annotations

import torch
from copgen.flows import models


def test_auto_is_bf16_on_cuda():
    assert models.auto_dtype(torch.device("cuda")) == "bfloat16"


def test_auto_on_cpu_follows_the_hardware_and_the_measurement(monkeypatch):
    cpu = torch.device("cpu")
    expected = "bfloat16" if models.native_bf16_cpu() else "float32"
    assert models.auto_dtype(cpu) == expected
    monkeypatch.setattr(models, "native_bf16_cpu", lambda: False)  # a CPU without bf16 units
    assert models.auto_dtype(cpu) == "float32"
    monkeypatch.setattr(models, "native_bf16_cpu", lambda: True)
    monkeypatch.setattr(models, "CPU_BF16_QUALITY_EQUAL", False)  # quality not (yet) measured equal
    assert models.auto_dtype(cpu) == "float32"


def test_native_bf16_reads_the_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    if flags:
        assert models.native_bf16_cpu() == bool(flags & {"amx_bf16", "avx512_bf16"})
