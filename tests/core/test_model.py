"""Triffuser vs the reference vectors (tiny config) and the released state-dict spec (meta device)."""

from __future__ import annotations

import json

import pytest
import torch
from copgen.model import (
    RELEASE_CONFIG,
    ModelInputError,
    Triffuser,
    count_parameters,
    release_network,
    timestep_embedding,
)
from cpu_level import refused_below_hardware_level
from safetensors.torch import load_file
from tolerances import ELEMENTWISE_ULPS, assert_ulp_close
from tolerances import recommended as recommended_tolerance

pytestmark = pytest.mark.usefixtures("single_thread")  # fixture in tests/core/conftest.py


@pytest.fixture(scope="module")
def io(reference_dir) -> dict[str, torch.Tensor]:
    return load_file(reference_dir / "triffuser_tiny_io.safetensors")


def test_tiny_state_dict_matches_sidecar(tiny, sidecar):
    assert len(tiny.state_dict()) == sidecar["n_keys"]
    assert count_parameters(tiny) == sidecar["n_parameters"]
    assert tiny.num_tokens == sidecar["n_tokens"]
    assert list(tiny.buffers()) == []


def test_forward_matches_reference(tiny, io, sidecar):
    tol = recommended_tolerance(sidecar, "forward eps, h_embed, h_final")
    rtol = recommended_tolerance(sidecar, "forward eps, h_embed, h_final", "rtol")
    with torch.no_grad():
        eps = tiny(list(io["x"]), list(io["t"]))
        h_embed = tiny.embed(io["x"], io["t"])
        h_final = tiny.trunk(h_embed)
    assert isinstance(eps, list) and len(eps) == io["x"].shape[0]
    torch.testing.assert_close(torch.stack(eps), io["eps"], atol=tol, rtol=rtol)
    torch.testing.assert_close(h_embed, io["h_embed"], atol=tol, rtol=rtol)
    torch.testing.assert_close(h_final, io["h_final"], atol=tol, rtol=rtol)


def test_stacked_form_and_batch_independence(tiny, io, sidecar):
    tol = recommended_tolerance(sidecar, "forward eps, h_embed, h_final")
    with torch.no_grad():
        stacked = tiny.forward_stacked(io["x"], io["t"])
        singles = [
            tiny.forward_stacked(io["x"][:, i : i + 1], io["t"][:, i : i + 1])
            for i in range(io["x"].shape[1])
        ]
    torch.testing.assert_close(stacked, io["eps"], atol=tol, rtol=tol)
    torch.testing.assert_close(torch.cat(singles, dim=1), stacked, atol=tol, rtol=tol)


def test_timestep_embedding_matches_reference(io, sidecar):
    tol = recommended_tolerance(sidecar, "temb / temb_1024")
    for key in ("temb", "temb_1024"):
        expected = io[key]
        got = timestep_embedding(io["temb_t"], expected.shape[-1])
        torch.testing.assert_close(got, expected, atol=tol, rtol=0)
        # cos half first: at t = 0 the first half is 1 and the second 0
        half = expected.shape[-1] // 2
        zero = timestep_embedding(torch.zeros(1), expected.shape[-1])[0]
        assert_ulp_close(zero[:half], torch.ones(half), ELEMENTWISE_ULPS, "cos(0)")
        assert_ulp_close(zero[half:], torch.zeros(half), ELEMENTWISE_ULPS, "sin(0)")


def test_bad_inputs_raise_clear_errors(tiny, io):
    with pytest.raises(ModelInputError, match="latents must be"):
        tiny(list(io["x"][:3]), list(io["t"][:3]))
    with pytest.raises(ModelInputError, match="timesteps must be"):
        tiny(list(io["x"]), list(io["t"][:, :2]))
    with pytest.raises(ValueError, match="drop_rate"):
        Triffuser(img_size=8, embed_dim=32, depth=2, num_heads=2, drop_rate=0.1)


def test_bf16_autocast_close_to_fp32(tiny, io):
    with torch.no_grad():
        ref = tiny.forward_stacked(io["x"], io["t"])
        with refused_below_hardware_level(), torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny.forward_stacked(io["x"], io["t"])
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 autocast deviates by {rel:.3f} (relative L2) from fp32"


def test_activation_checkpointing_gives_same_gradients(sidecar, io):
    cfg = {**sidecar["config"], "use_checkpoint": False}
    torch.manual_seed(0)
    plain = Triffuser.from_config(cfg).train()
    ckpt = Triffuser.from_config({**cfg, "use_checkpoint": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model.forward_stacked(io["x"], io["t"]).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_release_architecture_matches_state_dict_spec(reference_dir):
    """The release config on the meta device: names, order, shapes, count — no 1 GB allocation."""
    spec = json.loads((reference_dir / "copgen_beta_state_dict_spec.json").read_text())
    net = release_network("meta")
    assert net.pos_embed.is_meta
    sd = net.state_dict()
    assert list(sd) == [k["key"] for k in spec["keys"]]
    assert [list(v.shape) for v in sd.values()] == [k["shape"] for k in spec["keys"]]
    assert {str(v.dtype).removeprefix("torch.") for v in sd.values()} == {k["dtype"] for k in spec["keys"]}
    assert len(sd) == spec["num_keys"]
    assert count_parameters(net) == spec["total_parameters"]
    assert len(list(net.buffers())) == spec["num_buffers"]
    # the release's own config dict (with its extra, harmless keys) builds the same network
    assert {k: spec["config"][k] for k in RELEASE_CONFIG} == RELEASE_CONFIG
    with torch.device("meta"):
        from_release = Triffuser.from_config(spec["config"])
    assert [(k, v.shape) for k, v in from_release.state_dict().items()] == [
        (k, v.shape) for k, v in sd.items()
    ]


def test_release_checkpoint_loads_strictly(reference_dir):
    """A state dict shaped like ``nnet_ema_114000.pth`` loads with strict=True (meta tensors, assign)."""
    spec = json.loads((reference_dir / "copgen_beta_state_dict_spec.json").read_text())
    fake = {k["key"]: torch.empty(k["shape"], device="meta") for k in spec["keys"]}
    net = release_network("meta")
    assert not net.load_state_dict(fake, strict=True, assign=True).missing_keys
    fake.pop(spec["keys"][-1]["key"])
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict(fake, strict=True, assign=True)
