"""The LDM-layout KL autoencoder vs the reference vectors, the release key spec and the diffusers layout."""

from __future__ import annotations

import json
import re

import pytest
import torch
from copgen.autoencoder import (
    RELEASE_DDCONFIG,
    RELEASE_EMBED_DIM,
    RELEASE_SCALE_FACTOR,
    AutoencoderKL,
    convert_diffusers_to_ldm,
    is_diffusers_layout,
)
from cpu_level import refused_below_hardware_level
from safetensors.torch import load_file


def _tolerance(text: str) -> dict[str, float]:
    """'atol=1e-4, rtol=1e-4' -> {'atol': 1e-4, 'rtol': 1e-4} (the sidecar writes tolerances as text)."""
    found = dict(re.findall(r"(atol|rtol)\s*=\s*([0-9.eE+-]+)", text))
    tol = {name: float(value) for name, value in found.items()}
    tol.setdefault("atol", 0.0)
    tol.setdefault("rtol", 0.0)
    return tol


@pytest.fixture(scope="module")
def sidecar(reference_dir):
    return json.loads((reference_dir / "autoencoder_tiny.json").read_text())


@pytest.fixture(scope="module")
def tiny_state(reference_dir):
    return load_file(reference_dir / "autoencoder_tiny.safetensors")


@pytest.fixture(scope="module")
def io(reference_dir):
    return load_file(reference_dir / "autoencoder_tiny_io.safetensors")


@pytest.fixture(scope="module")
def vae(sidecar, tiny_state):
    model = AutoencoderKL.from_config(sidecar).eval()
    result = model.load_state_dict(tiny_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def test_config_attributes(vae, sidecar):
    assert vae.scale_factor == pytest.approx(sidecar["scale_factor"])
    assert vae.embed_dim == sidecar["embed_dim"]
    assert vae.downsample_factor == sidecar["downsample_factor"]
    assert sum(p.numel() for p in vae.parameters()) == sidecar["n_parameters"]
    assert len(vae.state_dict()) == sidecar["n_keys"]


@torch.no_grad()
def test_moments_and_decode_match_reference(vae, io, sidecar):
    tol = _tolerance(sidecar["tolerances"]["recommended"]["moments, decoded"])
    moments = vae.encode_moments(io["image"])
    assert moments.shape == io["moments"].shape
    torch.testing.assert_close(moments, io["moments"], **tol)
    torch.testing.assert_close(vae.decode(io["z_fixed"]), io["decoded"], **tol)


@torch.no_grad()
def test_sample_encode_and_clamp_match_reference(vae, io, sidecar):
    rec = sidecar["tolerances"]["recommended"]
    tol_z = _tolerance(rec["z_sample"])
    torch.testing.assert_close(vae.sample(io["moments"], io["sample_noise"]), io["z_sample"], **tol_z)
    # encode() = encode_moments + sample: its moments differ from the stored ones by up to the moments
    # tolerance, which the scale factor shrinks.
    tol_m = _tolerance(rec["moments, decoded"])
    torch.testing.assert_close(vae.encode(io["image"], noise=io["sample_noise"]), io["z_sample"], **tol_m)
    clamp_z = vae.sample(io["clamp_moments"], io["clamp_noise"])
    torch.testing.assert_close(clamp_z, io["clamp_z"], **_tolerance(rec["clamp_z"]))
    # Without the clamp the result would be far off: the test data does exercise it.
    mean, logvar = io["clamp_moments"].chunk(2, dim=1)
    unclamped = vae.scale_factor * (mean + torch.exp(0.5 * logvar) * io["clamp_noise"])
    assert not torch.allclose(unclamped, io["clamp_z"], rtol=1e-3)


@torch.no_grad()
def test_encode_draws_noise_from_the_generator(vae, io):
    moments = vae.encode_moments(io["image"])
    shape = (moments.shape[0], moments.shape[1] // 2, *moments.shape[2:])
    expected = vae.sample(moments, torch.randn(shape, generator=torch.Generator().manual_seed(7)))
    got = vae.encode(io["image"], generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # exact: the same calls, same process


@torch.no_grad()
def test_channels_last_and_bf16_autocast(vae, io, sidecar):
    tol = _tolerance(sidecar["tolerances"]["recommended"]["moments, decoded"])
    model = AutoencoderKL.from_config(sidecar)
    model.load_state_dict(vae.state_dict())
    model = model.to(memory_format=torch.channels_last).eval()
    image = io["image"].contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model.encode_moments(image), io["moments"], **tol)
    z = io["z_fixed"].contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model.decode(z), io["decoded"], **tol)
    with refused_below_hardware_level(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = model.decode(z)
        z_sample = model.encode(image, noise=io["sample_noise"])
    assert decoded.dtype == torch.bfloat16 and z_sample.dtype == torch.float32
    # bf16 keeps ~3 significant digits: a few percent of the output range, far from a wrong result.
    span = io["decoded"].abs().max().item()
    torch.testing.assert_close(decoded.float(), io["decoded"], atol=0.05 * span, rtol=0)
    torch.testing.assert_close(
        z_sample, io["z_sample"], atol=0.05 * io["z_sample"].abs().max().item(), rtol=0
    )


def test_release_config_matches_spec_on_meta_device(reference_dir):
    spec = json.loads((reference_dir / "sd_vae_state_dict_spec.json").read_text())
    assert spec["ddconfig"] == RELEASE_DDCONFIG
    assert spec["embed_dim"] == RELEASE_EMBED_DIM
    assert spec["scale_factor"] == pytest.approx(RELEASE_SCALE_FACTOR)
    with torch.device("meta"):
        model = AutoencoderKL.release()
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    want = [(e["key"], e["shape"], e["dtype"]) for e in spec["keys"]]
    assert got == want  # names, shapes, dtypes and order
    assert len(got) == spec["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == spec["total_parameters"]
    assert sum(p.numel() for p in model.encoder.parameters()) == spec["encoder_parameters"]
    assert sum(p.numel() for p in model.decoder.parameters()) == spec["decoder_parameters"]
    assert model.downsample_factor == 8 and model.scale_factor == spec["scale_factor"]


# --- diffusers layout --------------------------------------------------------------------------------
#
# The inverse mapping, written here independently of the module (string surgery per LDM key).


def _to_diffusers(ldm: dict[str, torch.Tensor], n_levels: int, legacy_attention: bool = False):
    attn_names = (
        {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}
        if legacy_attention
        else {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    )
    out = {}
    for key, value in ldm.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        side, rest = parts[0], parts[1:]
        if rest[0] == "down" and rest[2] == "block":
            new = ["down_blocks", rest[1], "resnets", rest[3], *rest[4:]]
        elif rest[0] == "down" and rest[2] == "downsample":
            new = ["down_blocks", rest[1], "downsamplers", "0", *rest[3:]]
        elif rest[0] == "up" and rest[2] == "block":
            new = ["up_blocks", str(n_levels - 1 - int(rest[1])), "resnets", rest[3], *rest[4:]]
        elif rest[0] == "up" and rest[2] == "upsample":
            new = ["up_blocks", str(n_levels - 1 - int(rest[1])), "upsamplers", "0", *rest[3:]]
        elif rest[0] == "mid" and rest[1].startswith("block_"):
            new = ["mid_block", "resnets", str(int(rest[1][-1]) - 1), *rest[2:]]
        elif rest[0] == "mid" and rest[1] == "attn_1":
            new = ["mid_block", "attentions", "0", attn_names[rest[2]], rest[3]]
            if rest[2] != "norm" and rest[3] == "weight":
                value = value[:, :, 0, 0]  # 1x1 conv -> Linear
        elif rest[0] == "norm_out":
            new = ["conv_norm_out", *rest[1:]]
        else:
            new = rest
        name = ".".join([side, *new]).replace("nin_shortcut", "conv_shortcut")
        out[name] = value
    return out


# Literal diffusers names (public diffusers AutoencoderKL layout), valid for any 4-level config whose
# level 1 widens the channels (the release; the tiny reference config widens at level 2 instead).
_PINNED_ANY = [
    "encoder.down_blocks.0.resnets.0.norm1.weight",
    "encoder.down_blocks.0.downsamplers.0.conv.weight",
    "encoder.mid_block.attentions.0.to_q.weight",
    "encoder.mid_block.attentions.0.to_out.0.bias",
    "encoder.mid_block.attentions.0.group_norm.weight",
    "encoder.mid_block.resnets.1.conv2.weight",
    "encoder.conv_norm_out.weight",
    "decoder.up_blocks.0.resnets.2.conv1.weight",
    "decoder.up_blocks.0.upsamplers.0.conv.weight",
    "decoder.mid_block.attentions.0.to_v.weight",
    "decoder.conv_norm_out.bias",
    "quant_conv.weight",
    "post_quant_conv.bias",
]


def test_inverse_mapping_produces_the_public_diffusers_names(sidecar, tiny_state):
    n = len(sidecar["ddconfig"]["ch_mult"])
    diff = _to_diffusers(tiny_state, n)
    for name in _PINNED_ANY:
        assert name in diff, name
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in diff  # the last level never upsamples
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in diff
    # Reversed decoder order: diffusers up_blocks.0 is LDM up.{n-1} (the deepest level, runs first).
    # Exact: the mapping moves tensors, it computes nothing.
    assert torch.equal(
        diff["decoder.up_blocks.0.resnets.0.conv1.weight"],
        tiny_state[f"decoder.up.{n - 1}.block.0.conv1.weight"],
    )
    assert torch.equal(
        diff["decoder.up_blocks.0.upsamplers.0.conv.bias"],
        tiny_state[f"decoder.up.{n - 1}.upsample.conv.bias"],
    )
    # nin_shortcut becomes conv_shortcut wherever the width changes.
    shortcut_ldm = [k for k in tiny_state if "nin_shortcut" in k]
    assert shortcut_ldm and len([k for k in diff if "conv_shortcut" in k]) == len(shortcut_ldm)
    assert diff["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2


def test_release_diffusers_names_on_meta_device():
    with torch.device("meta"):
        ldm = AutoencoderKL.release().state_dict()
    diff = _to_diffusers(ldm, len(RELEASE_DDCONFIG["ch_mult"]))
    # The public SD VAE widens 128 -> 256 at down block 1 and narrows 512 -> 256 at up block 2.
    assert tuple(diff["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"].shape) == (256, 128, 1, 1)
    assert tuple(diff["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"].shape) == (256, 512, 1, 1)
    assert tuple(diff["encoder.mid_block.attentions.0.to_k.weight"].shape) == (512, 512)
    assert tuple(diff["decoder.up_blocks.3.resnets.2.conv2.weight"].shape) == (128, 128, 3, 3)
    back = convert_diffusers_to_ldm(diff)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ldm.items()}


@pytest.mark.parametrize("legacy", [False, True], ids=["to_q", "query"])
@torch.no_grad()
def test_diffusers_state_dict_loads_and_decodes_identically(sidecar, tiny_state, io, legacy):
    diff = _to_diffusers(tiny_state, len(sidecar["ddconfig"]["ch_mult"]), legacy_attention=legacy)
    assert is_diffusers_layout(diff) and not is_diffusers_layout(tiny_state)
    converted = convert_diffusers_to_ldm(diff)
    assert converted.keys() == tiny_state.keys()
    for key, value in tiny_state.items():
        assert torch.equal(converted[key], value), key  # exact: renamed (and reshaped) copies
    model = AutoencoderKL.from_config(sidecar).eval()
    model.load_state_dict(diff, strict=True)  # auto-detected layout
    tol = _tolerance(sidecar["tolerances"]["recommended"]["moments, decoded"])
    torch.testing.assert_close(model.decode(io["z_fixed"]), io["decoded"], **tol)


def test_unknown_diffusers_attention_key_is_named(sidecar, tiny_state):
    diff = _to_diffusers(tiny_state, len(sidecar["ddconfig"]["ch_mult"]))
    diff["encoder.mid_block.attentions.0.to_qkv.weight"] = diff.pop(
        "encoder.mid_block.attentions.0.to_q.weight"
    )
    with pytest.raises(KeyError, match="to_qkv"):
        convert_diffusers_to_ldm(diff)


def test_norm_groups_is_a_config_key_only_off_the_release_default():
    small = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 4, "embed_dim": 4}
    small["resolution"] = 16
    assert "norm_groups" not in AutoencoderKL(**small).config  # release-style configs stay as they were
    ae = AutoencoderKL(**small, norm_groups=4)
    norms = [m for m in ae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 4 for m in norms)
    again = AutoencoderKL.from_config(ae.config)
    assert again.config == ae.config and again.config["norm_groups"] == 4
    again.load_state_dict(ae.state_dict(), strict=True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again.encode_moments(x), ae.encode_moments(x))  # same weights, calls, process
