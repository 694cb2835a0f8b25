"""Skip an op only where torch itself refuses it because ATEN_CPU_CAPABILITY forces a level below the CPU's.

On an AMX machine, bf16 autocast with ``ATEN_CPU_CAPABILITY=default`` (or avx2) raises "pack_vnni2 is only
supported when avx512 is supported": oneDNN picks its AMX path from the hardware, then the forced kernel
level cannot pack for it. That is torch refusing a configuration no user runs by accident; anywhere else
the same error (or any other) is a failure, never a skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

#: The refusal text (torch 2.13, ATen cpublas packing for oneDNN's AMX bf16 path).
REFUSAL = "pack_vnni2 is only supported when avx512 is supported"
_LEVELS = ("DEFAULT", "AVX2", "AVX512")


def hardware_level() -> str:
    """The highest x86 level the CPU supports (cpuinfo, independent of ATEN_CPU_CAPABILITY)."""
    if torch.cpu._is_avx512_supported():
        return "AVX512"
    return "AVX2" if torch.cpu._is_avx2_supported() else "DEFAULT"


def forced_below_hardware() -> bool:
    """True only when ATEN_CPU_CAPABILITY is set and torch runs at a lower level than the CPU has."""
    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        return False
    running = torch.backends.cpu.get_cpu_capability().upper()
    if running not in _LEVELS:  # e.g. ZVECTOR, or a future level: not ours to interpret
        return False
    return _LEVELS.index(running) < _LEVELS.index(hardware_level())


@contextmanager
def refused_below_hardware_level() -> Iterator[None]:
    """Run the block; turn torch's AMX packing refusal into a skip only under a forced lower level."""
    try:
        yield
    except RuntimeError as exc:
        if REFUSAL in str(exc) and forced_below_hardware():
            pytest.skip(
                f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} is below this CPU's "
                f"{hardware_level()}: torch refuses bf16 autocast ({REFUSAL})"
            )
        raise
