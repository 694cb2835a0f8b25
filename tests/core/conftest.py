"""Fixtures shared by the core tests: the tiny reference Triffuser and its sidecar, one torch thread."""

from __future__ import annotations

import json

import pytest
import torch
from copgen.model import Triffuser
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matmuls: one thread is faster, and much faster on a shared, oversubscribed CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sidecar(reference_dir) -> dict:
    """``triffuser_tiny.json`` (the autoencoder tests override this with their own sidecar)."""
    return json.loads((reference_dir / "triffuser_tiny.json").read_text())


@pytest.fixture(scope="module")
def tiny(reference_dir, sidecar) -> Triffuser:
    """The reference tiny network, loaded strictly."""
    model = Triffuser.from_config(sidecar["config"])
    model.load_state_dict(load_file(reference_dir / "triffuser_tiny.safetensors"), strict=True)
    return model.eval()
