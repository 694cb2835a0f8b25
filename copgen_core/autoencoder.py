"""The Stable-Diffusion KL-f8 autoencoder in the LDM key layout of the COP-GEN-Beta release.

Parameter names follow the release checkpoint exactly (``encoder.down.{i}.block.{j}.*``,
``encoder.mid.attn_1.{norm,q,k,v,proj_out}.*``, ``quant_conv``, ``post_quant_conv``, ``decoder.up.{i}.*``),
so ``autoencoder_kl*.pth`` loads strictly. A diffusers-layout ``AutoencoderKL`` state dict is converted on
load (``convert_diffusers_to_ldm``).

Conventions of the release (DESIGN §4): images are (B, 3, H, W) in [-1, 1]; the diffusion model sees a
posterior *sample* times ``scale_factor`` (0.18215), never the mean; ``decode`` undoes the scale and
returns the raw decoder output (no clamp, no tanh).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from copgen.configs import RELEASE_DDCONFIG, RELEASE_EMBED_DIM, RELEASE_SCALE_FACTOR, AutoencoderConfig
from torch import Tensor, nn

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "RELEASE_DDCONFIG",
    "RELEASE_EMBED_DIM",
    "RELEASE_SCALE_FACTOR",
    "convert_diffusers_to_ldm",
    "is_diffusers_layout",
]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, with a 1x1 ``nin_shortcut`` when the width changes (no time embedding)."""

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32
    ) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (the LDM ``AttnBlock``).

    Runs through ``scaled_dot_product_attention`` (its default scale is c^-0.5, as in the release), so it
    uses the fused kernels on GPU and never materialises the (HW x HW) matrix where they apply.
    """

    def __init__(self, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = _group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        # (B, C, H, W) -> (B, 1, HW, C); reshape (not view) so channels-last inputs work too.
        def tokens(t: Tensor) -> Tensor:
            return t.reshape(b, c, hgt * wid).transpose(1, 2).unsqueeze(1)

        q, k, v = tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h))
        if q.dtype != v.dtype or k.dtype != v.dtype:  # defensive: SDPA needs one dtype
            q, k = q.to(v.dtype), k.to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Asymmetric zero pad (right, bottom) then a stride-2 3x3 conv, as in LDM."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block.{j}``, optional ``attn.{j}``, optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, x: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        return x


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, norm_groups: int = 32) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool,
        dropout: float,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        block_out = ch
        for i, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[i], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_out, norm_groups))
            level = _Level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_out)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_out, dropout, norm_groups)
        self.norm_out = _group_norm(block_out, norm_groups)
        self.conv_out = nn.Conv2d(block_out, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        out_ch: int,
        resolution: int,
        z_channels: int,
        dropout: float,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, norm_groups)
        levels: list[_Level] = [None] * n  # type: ignore[list-item]
        # Built deepest first, stored by level index: ``up.{n-1}`` runs first (LDM's up.insert(0, ...)).
        for i in reversed(range(n)):
            block_out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_out, norm_groups))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_out)
                res *= 2
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (SD KL-f8 for the release config) with the release's latent conventions.

    Keyword names are the LDM ddconfig names plus ``embed_dim``, ``scale_factor`` and ``norm_groups``
    (groups of every GroupNorm: 32 in LDM/SD; at 32 channels that is one channel per group, which
    normalises away each image's per-channel level right before the output conv and costs a narrow
    model its colours).
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        embed_dim: int,
        resolution: int,
        in_channels: int = 3,
        out_ch: int = 3,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        double_z: bool = True,
        scale_factor: float = RELEASE_SCALE_FACTOR,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        # validated once, by field name (copgen.configs); its dict form is what checkpoints record
        self.config = cfg = AutoencoderConfig(
            ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels, embed_dim=embed_dim,
            resolution=resolution, in_channels=in_channels, out_ch=out_ch, attn_resolutions=attn_resolutions,
            dropout=dropout, double_z=double_z, scale_factor=scale_factor, norm_groups=norm_groups)
        common = {
            "ch": cfg.ch,
            "ch_mult": cfg.ch_mult,
            "num_res_blocks": cfg.num_res_blocks,
            "attn_resolutions": cfg.attn_resolutions,
            "resolution": cfg.resolution,
            "z_channels": cfg.z_channels,
            "dropout": cfg.dropout,
            "norm_groups": cfg.norm_groups,
        }
        self.encoder = Encoder(in_channels=in_channels, double_z=double_z, **common)
        self.decoder = Decoder(out_ch=out_ch, **common)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = int(embed_dim)
        self.scale_factor = float(scale_factor)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)

    @classmethod
    def from_config(cls, config: AutoencoderConfig | Mapping[str, Any]) -> AutoencoderKL:
        """Build from an :class:`AutoencoderConfig` or a dict: the flat form (this class's keywords) or the
        LDM form ``{"ddconfig": {...}, "embed_dim": 4, "scale_factor": 0.18215}`` (the reference sidecars)."""
        return cls(**dataclasses.asdict(AutoencoderConfig.from_dict(config)))

    @classmethod
    def release(cls) -> AutoencoderKL:
        """The released SD KL-f8 configuration (random weights until a checkpoint is loaded)."""
        return cls.from_config(AutoencoderConfig.release())

    # -- the release's latent conventions -------------------------------------------------------------

    def encode_moments(self, x: Tensor) -> Tensor:
        """(B, 2*embed_dim, H/f, W/f): posterior mean ‖ logvar, unscaled."""
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.quant_conv.weight.dtype)  # e.g. float32 images into a bf16 model
        return self.quant_conv(self.encoder(x))

    def sample(self, moments: Tensor, noise: Tensor) -> Tensor:
        """Scaled posterior sample ``scale·(mean + exp(0.5·clamp(logvar, -30, 20))·noise)``.

        Computed in float32 whatever the autocast state: the latents feed the diffusion model and
        ``exp(0.5·20)`` ≈ 2.2e4 would lose most of its digits in bf16.
        """
        with torch.autocast(device_type=moments.device.type, enabled=False):
            mean, logvar = moments.float().chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
            return self.scale_factor * (mean + std * noise.to(device=mean.device, dtype=torch.float32))

    def encode(
        self, x: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Image in [-1, 1] -> scaled posterior sample. Without ``noise`` it is drawn with ``generator``
        on the generator's device (CPU generators give the same noise on every accelerator)."""
        moments = self.encode_moments(x)
        if noise is None:
            shape = (moments.shape[0], moments.shape[1] // 2, *moments.shape[2:])
            draw_device = generator.device if generator is not None else moments.device
            noise = torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32)
        return self.sample(moments, noise)

    def decode(self, z_scaled: Tensor) -> Tensor:
        """Scaled latent -> raw decoder output (nominally [-1, 1]; not clamped)."""
        z = z_scaled / self.scale_factor
        if not torch.is_autocast_enabled(z.device.type):
            z = z.to(self.post_quant_conv.weight.dtype)  # e.g. float32 latents into a bf16 model
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x, noise=noise))

    # -- checkpoints ----------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also accepts a diffusers-layout state dict (auto-detected)."""
        if is_diffusers_layout(state_dict):
            state_dict = convert_diffusers_to_ldm(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# --- diffusers layout -> LDM layout -------------------------------------------------------------------
#
# Facts of the diffusers ``AutoencoderKL`` layout (checked against the public LDM<->diffusers converters):
#   encoder.down_blocks.{i}.resnets.{j}.*        <-> encoder.down.{i}.block.{j}.*
#   encoder.down_blocks.{i}.downsamplers.0.conv  <-> encoder.down.{i}.downsample.conv
#   decoder.up_blocks.{i}.resnets.{j}.*          <-> decoder.up.{n-1-i}.block.{j}.*   (reversed order)
#   decoder.up_blocks.{i}.upsamplers.0.conv      <-> decoder.up.{n-1-i}.upsample.conv
#   *.mid_block.resnets.{0,1}                    <-> *.mid.block_{1,2}
#   *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}  <-> *.mid.attn_1.{norm,q,k,v,proj_out}
#       (diffusers < 0.17 named them query/key/value/proj_attn); q/k/v/out are Linear (C, C) there and
#       1x1 convs (C, C, 1, 1) here.
#   conv_shortcut <-> nin_shortcut, conv_norm_out <-> norm_out; conv_in, conv_out, quant_conv and
#   post_quant_conv keep their names.

_ATTN_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_DIFFUSERS_MARKERS = (
    "encoder.down_blocks.",
    "decoder.up_blocks.",
    "encoder.mid_block.",
    "decoder.mid_block.",
)


def is_diffusers_layout(state_dict: Mapping[str, Any]) -> bool:
    """True when the keys are in the diffusers ``AutoencoderKL`` layout."""
    return any(key.startswith(_DIFFUSERS_MARKERS) for key in state_dict)


def convert_diffusers_to_ldm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers-layout ``AutoencoderKL`` state dict to the LDM layout of the release.

    Tensors are not copied (attention weights become reshaped views). Keys already in the LDM layout pass
    through unchanged, for the strict load to judge. Raises ``KeyError`` for an unknown attention
    parameter.
    """
    up_levels = {int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(up_levels) + 1 if up_levels else 0
    return dict(_convert_key(key, value, n_up) for key, value in state_dict.items())


# (pattern on the part after "encoder."/"decoder.", LDM template); {up} is the reversed decoder level.
_BLOCK_RULES = [
    (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", "down.{1}.block.{2}.{3}"),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", "down.{1}.downsample.{2}"),
    (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", "up.{up}.block.{2}.{3}"),
    (r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", "up.{up}.upsample.{2}"),
    (r"mid_block\.resnets\.0\.(.*)", "mid.block_1.{1}"),
    (r"mid_block\.resnets\.1\.(.*)", "mid.block_2.{1}"),
    (r"conv_norm_out\.(.*)", "norm_out.{1}"),
]
_ATTN_RULES = [
    (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", "down.{1}.attn.{2}"),
    (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", "up.{up}.attn.{2}"),
    (r"mid_block\.attentions\.0\.(.*)", "mid.attn_1"),
]


def _convert_key(key: str, value: Tensor, n_up: int) -> tuple[str, Tensor]:
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        return key, value  # quant_conv, post_quant_conv
    for pattern, template in _BLOCK_RULES:
        if m := re.fullmatch(pattern, rest):
            up = n_up - 1 - int(m[1]) if "{up}" in template else None
            target = template.format(rest, *m.groups(), up=up)  # {1} is the first group
            return f"{part}.{target.replace('conv_shortcut', 'nin_shortcut')}", value
    for pattern, template in _ATTN_RULES:
        if m := re.fullmatch(pattern, rest):
            up = n_up - 1 - int(m[1]) if "{up}" in template else None
            prefix = template.format(rest, *m.groups(), up=up)
            try:
                attn_key, value = _convert_attention_key(m.groups()[-1], value)
            except KeyError:
                raise KeyError(f"unknown diffusers attention parameter: {key!r}") from None
            return f"{part}.{prefix}.{attn_key}", value
    return key, value  # conv_in, conv_out, or already LDM-named


def _convert_attention_key(rest: str, value: Tensor) -> tuple[str, Tensor]:
    """``to_q.weight`` -> ``q.weight`` (and a Linear weight becomes a 1x1 conv weight)."""
    for old, new in _ATTN_NAMES.items():
        if rest.startswith(old + "."):
            param = rest[len(old) + 1 :]
            if new != "norm" and param == "weight" and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
            return f"{new}.{param}", value
    raise KeyError(rest)
