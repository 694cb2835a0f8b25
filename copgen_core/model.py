"""Triffuser: the COP-GEN-Beta network, a post-LayerNorm U-ViT with one time token per modality.

State-dict compatible with the release (``nnet_ema_114000.pth`` loads with ``strict=True``): key names,
order and shapes follow the reference class. The computation is re-organised for speed — the per-modality
patch embeddings and output heads run as one batched matmul over the modality axis instead of a Python
loop — but it is the same function (DESIGN §4):

    tokens = [t_0..t_{M-1}, patches of modality 0, ..., patches of modality M-1] + pos_embed
    in_blocks (push) -> mid_block -> out_blocks (pop, LIFO long skips) -> LayerNorm -> per-modality Linear
    block:  x = norm1(skip_linear(cat[x, skip]))   (out_blocks only)
            x = norm2(x + attn(x));  x = norm3(x + mlp(x))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from copgen.configs import TriffuserConfig
from copgen.errors import CopgenError
from torch import nn
from torch.utils.checkpoint import checkpoint

#: The released network's constructor arguments (Beta config ``rome_dems1s2s2_cop_gen_beta.py``).
RELEASE_CONFIG: dict = {
    "img_size": 32,
    "in_chans": 4,
    "patch_size": 2,
    "embed_dim": 1024,
    "depth": 20,
    "num_heads": 16,
    "mlp_ratio": 4,
    "qkv_bias": False,
    "num_modalities": 4,
}


class ModelInputError(CopgenError, ValueError):
    """The network was called with inputs that do not fit its configuration."""


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Raw sinusoidal embedding of (fractional) timesteps, ``[cos(t·f), sin(t·f)]`` — cos half FIRST.

    ``f_k = exp(-ln(max_period)·k/half)``, computed in float32 like the release (no MLP follows it:
    the release's ``mlp_time_embed=False``). Returns ``(*timesteps.shape, dim)`` float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class PatchEmbed(nn.Module):
    """Holds one modality's ``Conv2d(C, D, p, stride=p)`` (key ``patch_embeds.i.proj``); the network
    applies all modalities' kernels at once as a batched matmul (see ``Triffuser._embed_patches``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, upcast: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.upcast = upcast
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        # 'B L (K H Dh) -> K B H L Dh' as the release splits it
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.upcast:  # the release computes attention in float32 even under autocast
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, L, D)
        return self.proj(out.to(x.dtype) if self.upcast else out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the release
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-LN transformer block; ``skip=True`` makes it a U-ViT decoder block (long skip input).

    Submodules are declared in the release's state-dict order: norm1, norm2, attn, norm3, mlp, skip_linear.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool, upcast: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if skip else None
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.norm1(self.skip_linear(torch.cat([x, skip], dim=-1)))
        x = self.norm2(x + self.attn(x))
        return self.norm3(x + self.mlp(x))


class Triffuser(nn.Module):
    """The COP-GEN-Beta network (release class ``Triffuser`` of ``triffuser_multi_post_ln``).

    Args are the release config names. ``pos_drop_rate``, ``drop_rate`` and ``attn_drop_rate`` exist in
    the release config with value 0 and are accepted only as 0 (this implementation has no dropout).
    ``use_checkpoint`` enables activation checkpointing of the blocks during training (no state-dict or
    numerical effect). ``upcast_attention`` reproduces the release's float32 attention under autocast
    (slower; off by default: without autocast it changes nothing).
    """

    def __init__(
        self,
        img_size: int = 32,
        in_chans: int = 4,
        patch_size: int = 2,
        embed_dim: int = 1024,
        depth: int = 20,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        num_modalities: int = 4,
        mlp_time_embed: bool = False,
        pos_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        use_checkpoint: bool = False,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        # validated once, by field name (copgen.configs); the release-only keys are checked and dropped
        self.config = TriffuserConfig.from_dict(dict(
            img_size=img_size, in_chans=in_chans, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, num_modalities=num_modalities,
            mlp_time_embed=mlp_time_embed, pos_drop_rate=pos_drop_rate, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, use_checkpoint=use_checkpoint, upcast_attention=upcast_attention))
        self.img_size = img_size
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_modalities = num_modalities
        self.use_checkpoint = use_checkpoint
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.num_tokens = num_modalities * (1 + self.num_patches)

        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.patch_embeds = nn.ModuleList(
            PatchEmbed(patch_size, in_chans, embed_dim) for _ in range(num_modalities)
        )
        blk = dict(
            dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            upcast=upcast_attention,
        )
        self.in_blocks = nn.ModuleList(Block(skip=False, **blk) for _ in range(depth // 2))
        self.mid_block = Block(skip=False, **blk)
        self.out_blocks = nn.ModuleList(Block(skip=True, **blk) for _ in range(depth // 2))
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_preds = nn.ModuleList(
            nn.Linear(embed_dim, patch_size**2 * in_chans) for _ in range(num_modalities)
        )
        self._init_weights()

    @classmethod
    def from_config(cls, config: TriffuserConfig | Mapping[str, Any]) -> Triffuser:
        """Build from a :class:`TriffuserConfig` or its dict form (a release config dict as well: its
        ``name`` must be the release's)."""
        return cls(**dataclasses.asdict(TriffuserConfig.from_dict(config)))

    def _init_weights(self) -> None:
        # release init: trunc_normal(.02) Linear weights, zero biases, LN (1, 0), pos_embed trunc_normal(.02);
        # the patch-embedding convs keep PyTorch's default init
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- input/output layout -------------------------------------------------------------------------

    def _stack_inputs(self, latents, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        M, C, S = self.num_modalities, self.in_chans, self.img_size
        x = latents if isinstance(latents, torch.Tensor) else torch.stack(list(latents))
        t = (
            timesteps
            if isinstance(timesteps, torch.Tensor)
            else torch.stack([torch.as_tensor(v, device=x.device) for v in timesteps])
        )
        if x.dim() != 5 or x.shape[0] != M or x.shape[2:] != (C, S, S):
            raise ModelInputError(
                f"latents must be {M} tensors of shape (B, {C}, {S}, {S}) (one per modality), "
                f"got stacked shape {tuple(x.shape)}"
            )
        if t.shape != x.shape[:2]:
            raise ModelInputError(
                f"timesteps must be {M} tensors of shape ({x.shape[1]},), got stacked shape {tuple(t.shape)}"
            )
        return x, t

    def _embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, C, H, W) -> (B, M·L, D): every modality's stride-p conv as one batched matmul."""
        M, B, C, H, W = x.shape
        p, g = self.patch_size, self.grid
        # patch vectors in the conv kernel's (C, p1, p2) order, patches row-major
        patches = x.reshape(M, B, C, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(M, B * g * g, C * p * p)
        weight = torch.stack([pe.proj.weight.reshape(self.embed_dim, C * p * p) for pe in self.patch_embeds])
        bias = torch.stack([pe.proj.bias for pe in self.patch_embeds]).unsqueeze(1)
        tokens = torch.baddbmm(bias, patches, weight.transpose(1, 2))  # (M, B·L, D)
        return tokens.view(M, B, g * g, self.embed_dim).transpose(0, 1).reshape(B, M * g * g, self.embed_dim)

    def _decode_patches(self, h: torch.Tensor) -> torch.Tensor:
        """(B, M·L, D) -> (M, B, C, H, W): per-modality Linear, unpatchified as (p1 p2 C) like the release."""
        B = h.shape[0]
        M, L, D, C, p, g = (
            self.num_modalities,
            self.num_patches,
            self.embed_dim,
            self.in_chans,
            self.patch_size,
            self.grid,
        )
        h = h.view(B, M, L, D).transpose(0, 1).reshape(M, B * L, D)
        weight = torch.stack([lin.weight for lin in self.decoder_preds])  # (M, p·p·C, D)
        bias = torch.stack([lin.bias for lin in self.decoder_preds]).unsqueeze(1)
        out = torch.baddbmm(bias, h, weight.transpose(1, 2))  # (M, B·L, p·p·C)
        out = out.view(M, B, g, g, p, p, C).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(M, B, C, g * p, g * p)

    # ---- forward -------------------------------------------------------------------------------------

    def embed(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Token sequence (B, M·(1+L), D) after adding ``pos_embed``: M time tokens, then the patch tokens
        of each modality. Stays float32 under autocast, as the release's residual stream does."""
        time_tokens = timestep_embedding(t.transpose(0, 1), self.embed_dim)  # (B, M, D) float32
        patch_tokens = self._embed_patches(x)
        return torch.cat([time_tokens, patch_tokens.to(time_tokens.dtype)], dim=1) + self.pos_embed

    def trunk(self, h: torch.Tensor) -> torch.Tensor:
        """The U-ViT: in_blocks (pushing long skips), mid_block, out_blocks (popping, LIFO), final norm."""
        ckpt = self.use_checkpoint and self.training and torch.is_grad_enabled()
        skips = []
        for blk in self.in_blocks:
            h = checkpoint(blk, h, use_reentrant=False) if ckpt else blk(h)
            skips.append(h)
        h = checkpoint(self.mid_block, h, use_reentrant=False) if ckpt else self.mid_block(h)
        for blk in self.out_blocks:
            h = checkpoint(blk, h, skips.pop(), use_reentrant=False) if ckpt else blk(h, skips.pop())
        return self.norm(h)

    def forward_stacked(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Stacked form: ``x`` (M, B, C, H, W) latents, ``t`` (M, B) timesteps on the 0..1000 scale;
        returns the predicted noise (M, B, C, H, W) of every modality."""
        x, t = self._stack_inputs(x, t)
        h = self.trunk(self.embed(x, t))
        # the M time tokens are dropped; only patch tokens are decoded
        return self._decode_patches(h[:, self.num_modalities :])

    def forward(
        self, latents: Sequence[torch.Tensor] | torch.Tensor, timesteps: Sequence[torch.Tensor] | torch.Tensor
    ) -> list[torch.Tensor]:
        """Release interface: one latent (B, C, H, W) and one float timestep vector (B,) in [0, 1000] per
        modality (canonical order); returns the list of predicted noises, one per modality."""
        return list(self.forward_stacked(latents, timesteps).unbind(0))


def release_network(device: str | torch.device = "cpu", **overrides) -> Triffuser:
    """The release architecture (random init), built directly on ``device`` (``"meta"`` allocates nothing)."""
    with torch.device(device):
        return Triffuser(**{**RELEASE_CONFIG, **overrides})


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
