"""Training: the release diffusion objective for a ``Triffuser`` on scaled latents; a small KL autoencoder.

Diffusion objective (release ``train_triffuser_discrete.py`` ``Schedule.sample`` + ``LSimple``, DESIGN §4):
for every modality i independently and for every sample, an integer timestep n_i ~ U{1..1000} and noise
eps_i; ``x_n = sqrt(ᾱ_n)·x0 + sqrt(1-ᾱ_n)·eps`` with ᾱ_n = prod_{k<=n}(1-β_k) of the SD betas (float64
table, coefficients cast to float32 like the release's ``type_as``); ONE network call gets the noisy
latents of all modalities and the integer n_i as its timesteps (the 0..1000 scale the sampler also feeds,
t·1000); loss = sum over modalities of the per-modality MSE of eps (the release's per-sample
mean-of-squares, summed over modalities, then averaged over the batch). t = 0 is never drawn and there is
no modality dropout. Latents are posterior *samples* times the scale factor, re-drawn every step from
moments encoded once (``LatentBank``), as the release trains from stored moments.

Optimiser: AdamW lr 2e-4, weight decay 0.03, betas (0.99, 0.99), linear warm-up ``min(step/warmup, 1)``
evaluated at the number of completed steps (as the release's ``LambdaLR``: the very first step has lr 0).
EMA of the parameters with rate 0.9999, initialised as a copy of the network. Short runs may enable
``ema_warmup``: rate ``min(rate, (1+k)/(10+k))`` at update k (the TF/LDM warm-up), without which a 0.9999
EMA of a few thousand steps would still mostly be the random initialisation.

Autoencoder objective (LDM ``LPIPSWithDiscriminator`` without its perceptual and GAN terms): L1
reconstruction (+ optional L2) plus ``kl_weight``·KL(q(z|x) || N(0, I)). LDM sums both terms over pixels /
latent elements; here both are divided by the number of image elements, which keeps LDM's ratio (so
kl_weight=1e-6 means the same) while giving per-pixel loss figures. No LPIPS and no discriminator: their
pretrained VGG weights cannot be downloaded in the offline settings this project targets, and a small
model trained for minutes gains little from an adversarial term.

Every random number (initialisation aside, see ``seeded``) comes from one CPU ``torch.Generator`` owned
by the trainer, whose state is part of ``Trainer.state_dict`` — a resumed run continues the exact
sequence of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from copgen import seeds as seeding
from copgen.autoencoder import LOGVAR_MAX, LOGVAR_MIN, AutoencoderKL
from copgen.diffusion import NUM_TIMESTEPS, stable_diffusion_betas
from copgen.errors import TrainingError
from copgen.generate import images_to_tensor
from copgen.model import Triffuser
from torch import Tensor, nn

__all__ = [
    "AutoencoderTrainer",
    "DiffusionTrainer",
    "EMA",
    "ImageBank",
    "LatentBank",
    "OptimConfig",
    "Trainer",
    "TrainingError",
    "alphas_cumprod",
    "autoencoder_loss",
    "diffusion_loss",
    "ema_rate_at",
    "encode_moments",
    "kl_divergence",
    "loss_summary",
    "noise_latents",
    "posterior_sample",
    "sample_timesteps",
    "seeded",
    "train_steps",
]


# ---- schedule and objective ---------------------------------------------------------------------------


def alphas_cumprod(betas: np.ndarray | None = None) -> Tensor:
    """ᾱ as the release's training ``Schedule`` indexes it: float64 (N+1,), ᾱ_0 = 1 (β_0 = 0 prepended),
    ᾱ_n = prod_{k=1..n}(1-β_k)."""
    b = stable_diffusion_betas() if betas is None else np.asarray(betas, dtype=np.float64)
    return torch.from_numpy(np.concatenate([[1.0], np.cumprod(1.0 - b)]))


def sample_timesteps(
    num_modalities: int,
    batch: int,
    generator: torch.Generator,
    num_timesteps: int = NUM_TIMESTEPS,
    clean_prob: float = 0.0,
) -> Tensor:
    """Integer timesteps (M, B) drawn independently per modality and sample, uniform on {1..N}.

    ``clean_prob`` > 0 (not the release: its default 0 draws exactly the release's timesteps) sets each
    modality of each sample to n = 0 (given clean, as a condition is at sampling time) with that
    probability, keeping at least one modality per sample noised. It trains the conditional mode the
    sampler uses directly instead of only through nearly-clean draws, which a small model trained briefly
    otherwise learns only for strongly related pairs."""
    n = torch.randint(1, num_timesteps + 1, (num_modalities, batch), generator=generator)
    if clean_prob > 0:
        clean = torch.rand((num_modalities, batch), generator=generator) < clean_prob
        keep = torch.randint(0, num_modalities, (batch,), generator=generator)
        clean[keep, torch.arange(batch)] = False
        n = torch.where(clean, torch.zeros_like(n), n)
    return n


def noise_latents(x0: Tensor, n: Tensor, eps: Tensor, abar: Tensor) -> Tensor:
    """``sqrt(ᾱ_n)·x0 + sqrt(1-ᾱ_n)·eps`` for stacked latents x0 (M, B, C, H, W) and timesteps n (M, B)."""
    idx = n.to(device="cpu", dtype=torch.long)
    a = abar[idx].sqrt().to(device=x0.device, dtype=x0.dtype)[..., None, None, None]
    s = (1.0 - abar[idx]).sqrt().to(device=x0.device, dtype=x0.dtype)[..., None, None, None]
    return a * x0 + s * eps


@dataclass
class DiffusionLoss:
    """One step's loss: ``total`` (scalar, differentiable) = ``per_modality.sum()``; the drawn timesteps."""

    total: Tensor
    per_modality: Tensor  # (M,) detached float32
    timesteps: Tensor  # (M, B) int64 on the CPU


def diffusion_loss(
    network: Triffuser,
    x0: Tensor,
    generator: torch.Generator,
    *,
    abar: Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    timesteps: Tensor | None = None,
    noise: Tensor | None = None,
    clean_prob: float = 0.0,
) -> DiffusionLoss:
    """The release's LSimple on stacked latents x0 (M, B, C, H, W): independent n per modality and sample,
    eps-prediction MSE per modality, summed over modalities. ``timesteps``/``noise`` override the draws.
    Entries with n = 0 (clean, see ``sample_timesteps``' ``clean_prob``) are conditions, not targets:
    they leave the loss, which then averages each modality over its noised samples."""
    abar = alphas_cumprod() if abar is None else abar
    M, B = x0.shape[:2]
    if timesteps is None:
        n = sample_timesteps(M, B, generator, abar.numel() - 1, clean_prob=clean_prob)
    else:
        n = timesteps.cpu().long()
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    eps = noise.to(device=x0.device, dtype=torch.float32)
    xn = noise_latents(x0.float(), n, eps, abar)
    with _autocast(x0.device, autocast_dtype):
        pred = network.forward_stacked(xn, n.to(device=x0.device, dtype=torch.float32))
    per_sample = (pred.float() - eps).pow(2).mean(dim=(2, 3, 4))  # (M, B)
    clean = n == 0
    if bool(clean.any()):
        target = (~clean).to(device=per_sample.device, dtype=per_sample.dtype)
        per_modality = (per_sample * target).sum(dim=1) / target.sum(dim=1).clamp(min=1.0)
    else:
        per_modality = per_sample.mean(dim=1)
    return DiffusionLoss(per_modality.sum(), per_modality.detach(), n)


def posterior_sample(moments: Tensor, noise: Tensor, scale_factor: float) -> Tensor:
    """``scale·(mean + exp(0.5·clamp(logvar, -30, 20))·noise)``: ``AutoencoderKL.sample`` without the
    module, for training on stored moments (float32)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
    return scale_factor * (mean + std * noise.to(device=mean.device, dtype=torch.float32))


def kl_divergence(moments: Tensor) -> Tensor:
    """KL(N(mean, var) || N(0, I)) per sample (B,), summed over latent elements (LDM's posterior.kl())."""
    mean, logvar = moments.float().chunk(2, dim=1)
    logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


@dataclass
class AutoencoderLoss:
    total: Tensor
    l1: Tensor
    l2: Tensor
    kl: Tensor  # per sample, summed over latent elements (before weighting)


def autoencoder_loss(
    autoencoder: AutoencoderKL,
    images: Tensor,
    noise: Tensor,
    *,
    l1_weight: float = 1.0,
    l2_weight: float = 0.0,
    kl_weight: float = 1e-6,
    autocast_dtype: torch.dtype | None = None,
) -> AutoencoderLoss:
    """Reconstruct ``images`` (B, 3, S, S) in [-1, 1] through a posterior sample drawn with ``noise``;
    loss = l1·mean|x-x̂| + l2·mean(x-x̂)² + kl_weight·KL/(image elements) (LDM's ratio, see module doc)."""
    with _autocast(images.device, autocast_dtype):
        moments = autoencoder.encode_moments(images)
        z = autoencoder.sample(moments, noise)
        recon = autoencoder.decode(z).float()
    diff = recon - images.float()
    l1 = diff.abs().mean()
    l2 = diff.pow(2).mean()
    kl = kl_divergence(moments).mean()
    total = l1_weight * l1 + l2_weight * l2 + kl_weight * kl / images[0].numel()
    return AutoencoderLoss(total, l1.detach(), l2.detach(), kl.detach())


# ---- data held in memory --------------------------------------------------------------------------------


class _EpochOrder:
    """Shuffled epochs without replacement, incomplete last batch dropped (the release's DataLoader)."""

    def __init__(self, size: int, what: str) -> None:
        if size < 1:
            raise TrainingError(f"no {what} to train on")
        self.size, self.what = size, what
        self.order = torch.empty(0, dtype=torch.long)
        self.cursor = 0

    def take(self, batch: int, generator: torch.Generator) -> Tensor:
        if batch > self.size:
            raise TrainingError(f"batch_size {batch} is larger than the {self.size} {self.what} held")
        if self.cursor + batch > self.order.numel():
            self.order, self.cursor = torch.randperm(self.size, generator=generator), 0
        idx = self.order[self.cursor : self.cursor + batch]
        self.cursor += batch
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        order = state["order"]
        if order.numel() and int(order.max()) >= self.size:
            raise TrainingError(f"saved data order does not fit the {self.size} {self.what} held")
        self.order, self.cursor = order.clone().long(), int(state["cursor"])


class LatentBank:
    """Posterior moments of a dataset, encoded once; draws training batches of scaled posterior samples.

    ``moments``: (N, M, 2E, h, w) float32. ``flipped``: the moments of the horizontally flipped images
    (same shape) or None. With ``flipped``, each drawn sample uses one orientation for all its modalities
    with probability 1/2 (flip augmentation as the release, done by encoding both orientations once).
    """

    def __init__(self, moments: Tensor, scale_factor: float, flipped: Tensor | None = None) -> None:
        if moments.dim() != 5:
            raise TrainingError(f"moments must be (N, M, 2E, h, w), got shape {tuple(moments.shape)}")
        if flipped is not None and flipped.shape != moments.shape:
            raise TrainingError(f"flipped moments {tuple(flipped.shape)} differ from {tuple(moments.shape)}")
        self.moments, self.flipped, self.scale_factor = moments.float(), flipped, float(scale_factor)
        self._order = _EpochOrder(moments.shape[0], "samples")

    def __len__(self) -> int:
        return self.moments.shape[0]

    def batch(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Stacked latents (M, B, E, h, w): epoch-ordered samples, per-sample flip, fresh posterior noise."""
        idx = self._order.take(batch_size, generator)
        moments = self.moments[idx]
        if self.flipped is not None:
            flip = torch.rand(batch_size, generator=generator) < 0.5
            moments = torch.where(flip[:, None, None, None, None], self.flipped[idx].float(), moments)
        N, M, C2, h, w = moments.shape
        noise = torch.randn((N * M, C2 // 2, h, w), generator=generator)
        z = posterior_sample(moments.reshape(N * M, C2, h, w), noise, self.scale_factor)
        return z.view(N, M, C2 // 2, h, w).transpose(0, 1).contiguous()

    def state_dict(self) -> dict[str, Any]:
        return self._order.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._order.load_state_dict(state)


class ImageBank:
    """uint8 images (N, S, S, 3) held in memory; batches in [-1, 1] with random horizontal flips and,
    with ``crop``, random ``crop`` px square crops (a convolutional autoencoder trains on crops at a
    fraction of the cost, as LDM's autoencoders did)."""

    def __init__(self, images: np.ndarray, flip: bool = True, crop: int | None = None) -> None:
        arr = np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise TrainingError(f"images must be uint8 (N, S, S, 3), got {arr.dtype} {arr.shape}")
        if crop is not None and not 0 < crop <= min(arr.shape[1:3]):
            raise TrainingError(f"crop {crop} must be in 1..{min(arr.shape[1:3])} px")
        self.images, self.flip, self.crop = arr, flip, crop
        self._order = _EpochOrder(arr.shape[0], "images")

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, batch_size: int, generator: torch.Generator) -> Tensor:
        idx = self._order.take(batch_size, generator)
        x = images_to_tensor(self.images[idx.numpy()])
        if self.crop is not None and self.crop < max(x.shape[-2:]):
            k = self.crop
            rows = torch.randint(0, x.shape[-2] - k + 1, (batch_size,), generator=generator).tolist()
            cols = torch.randint(0, x.shape[-1] - k + 1, (batch_size,), generator=generator).tolist()
            x = torch.stack([img[:, r : r + k, c : c + k] for img, r, c in zip(x, rows, cols, strict=True)])
        if self.flip:
            flip = torch.rand(batch_size, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def state_dict(self) -> dict[str, Any]:
        return self._order.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._order.load_state_dict(state)


@torch.no_grad()
def encode_moments(
    autoencoder: AutoencoderKL,
    images: np.ndarray,
    *,
    batch_size: int = 64,
    flip: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Posterior moments (N, 2E, h, w) float32 on the CPU of uint8 images (N, S, S, 3), in batches;
    ``flip=True`` encodes the horizontally flipped images."""
    device = next(autoencoder.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start : start + batch_size]).to(device)
        if flip:
            x = x.flip(-1)
        with _autocast(device, autocast_dtype):
            out.append(autoencoder.encode_moments(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


# ---- EMA, optimiser, trainer ----------------------------------------------------------------------------


def ema_rate_at(update: int, rate: float, warmup: bool) -> float:
    """The EMA rate used at (0-based) update ``update``: ``rate``, or with warm-up
    ``min(rate, (1+update)/(10+update))``."""
    return min(rate, (1.0 + update) / (10.0 + update)) if warmup else rate


class EMA:
    """Exponential moving average of a module's parameters (the release averages parameters only;
    neither model here has buffers). Starts as a copy, as the release's ``ema_update(0)``."""

    def __init__(self, module: nn.Module) -> None:
        self.shadow = {name: p.detach().clone().float() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module, rate: float) -> None:
        """``shadow = rate·shadow + (1-rate)·param``."""
        names = list(self.shadow)
        params = dict(module.named_parameters())
        shadows = [self.shadow[n] for n in names]
        torch._foreach_mul_(shadows, rate)
        torch._foreach_add_(shadows, [params[n].detach().float() for n in names], alpha=1.0 - rate)

    def state_dict(self, module: nn.Module) -> dict[str, Tensor]:
        """``module``'s state dict with every parameter replaced by its average."""
        return {k: self.shadow.get(k, v).detach().clone() for k, v in module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise TrainingError(f"saved EMA lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for k in self.shadow:
            if state[k].shape != self.shadow[k].shape:
                raise TrainingError(f"saved EMA {k}: shape {tuple(state[k].shape)} != {self.shadow[k].shape}")
            self.shadow[k] = state[k].detach().clone().float().to(self.shadow[k].device)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings; the defaults are the release's (``rome_dems1s2s2_cop_gen_beta.py``)."""

    lr: float = 2e-4
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.99, 0.99)
    warmup_steps: int = 5000
    grad_clip: float | None = None  # max global grad norm; None: no clipping (the release)

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimiser step taken after ``step`` completed steps."""
        return self.lr * (min(step / self.warmup_steps, 1.0) if self.warmup_steps > 0 else 1.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


class Trainer:
    """Optimiser, EMA, step counter and the one generator of a training run (model-agnostic)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        optim: OptimConfig = OptimConfig(),
        ema_rate: float | None = 0.9999,
        ema_warmup: bool = False,
        seed: int = 0,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if ema_rate is not None and not 0.0 <= ema_rate < 1.0:
            raise TrainingError(f"ema_rate must be in [0, 1), got {ema_rate}")
        if optim.lr <= 0 or optim.warmup_steps < 0:
            raise TrainingError(f"invalid optimiser settings {optim}")
        self.model, self.optim, self.autocast_dtype = model, optim, autocast_dtype
        self.ema_rate, self.ema_warmup = ema_rate, ema_warmup
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas)
        )
        self.ema = EMA(model) if ema_rate is not None else None
        self.step = 0
        self.generator = torch.Generator().manual_seed(seeding.derive(seed, "train"))

    def _apply(self, total: Tensor) -> float:
        """Backward, clip, optimiser step at the scheduled lr, EMA update; returns the grad norm (or nan)."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.optim.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        norm = float("nan")
        if self.optim.grad_clip is not None:
            norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, ema_rate_at(self.step, self.ema_rate, self.ema_warmup))
        self.step += 1
        return norm

    def weights(self, use_ema: bool = True) -> dict[str, Tensor]:
        """The weights to publish: the EMA average when kept (and asked for), else the raw parameters."""
        if use_ema and self.ema is not None:
            return self.ema.state_dict(self.model)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors and plain values only: loads with weights_only=True)."""
        return {
            "step": self.step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": None if self.ema is None else {k: v.cpu() for k, v in self.ema.shadow.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "optim": self.optim.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"], strict=True)
            if self.ema is not None:
                if state.get("ema") is None:
                    raise TrainingError("saved state has no EMA but this run keeps one")
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            self.step = int(state["step"])
        except (KeyError, RuntimeError) as exc:
            raise TrainingError(f"saved training state does not fit this run: {exc}") from exc


class DiffusionTrainer(Trainer):
    """The release objective for a ``Triffuser``; ``train_step`` takes stacked latents (M, B, C, H, W)."""

    def __init__(self, network: Triffuser, *, clean_prob: float = 0.0, **kwargs) -> None:
        super().__init__(network, **kwargs)
        if not 0.0 <= clean_prob < 1.0:
            raise TrainingError(f"clean_prob must be in [0, 1), got {clean_prob}")
        self.abar = alphas_cumprod()
        self.clean_prob = float(clean_prob)

    def train_step(self, latents: Tensor) -> dict[str, Any]:
        out = diffusion_loss(
            self.model, latents.to(self.device), self.generator, abar=self.abar,
            autocast_dtype=self.autocast_dtype, clean_prob=self.clean_prob,
        )  # fmt: skip
        lr = self.optim.lr_at(self.step)
        norm = self._apply(out.total)
        return {
            "loss": float(out.total.detach()),
            "per_modality": out.per_modality.cpu().tolist(),
            "lr": lr,
            "grad_norm": norm,
            "timesteps": out.timesteps,
        }


class AutoencoderTrainer(Trainer):
    """Reconstruction + KL training of an ``AutoencoderKL``; ``train_step`` takes images (B, 3, S, S)."""

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        *,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        kl_weight: float = 1e-6,
        **kwargs,
    ) -> None:
        kwargs.setdefault("optim", OptimConfig(lr=4e-4, weight_decay=0.0, betas=(0.5, 0.9), warmup_steps=0))
        kwargs.setdefault("ema_rate", None)
        super().__init__(autoencoder, **kwargs)
        self.weights_kw = {"l1_weight": l1_weight, "l2_weight": l2_weight, "kl_weight": kl_weight}

    def train_step(self, images: Tensor) -> dict[str, Any]:
        x = images.to(self.device)
        shape = (x.shape[0], self.model.embed_dim, *(s // self.model.downsample_factor for s in x.shape[2:]))
        noise = torch.randn(shape, generator=self.generator)
        out = autoencoder_loss(self.model, x, noise, autocast_dtype=self.autocast_dtype, **self.weights_kw)
        lr = self.optim.lr_at(self.step)
        norm = self._apply(out.total)
        return {
            "loss": float(out.total.detach()),
            "l1": float(out.l1),
            "l2": float(out.l2),
            "kl": float(out.kl),
            "lr": lr,
            "grad_norm": norm,
        }


# ---- the generic training loop ------------------------------------------------------------------------


def train_steps(
    trainer: Trainer,
    bank: LatentBank | ImageBank,
    *,
    steps: int,
    batch_size: int,
    history: dict[str, list],
    log: Callable[[str], None],
    checkpoint: Callable[[], None],
    log_every: int,
    save_every: int,
    deadline: float | None = None,
    name: str = "train",
) -> bool:
    """Train ``trainer`` on batches of ``bank`` up to ``steps`` total steps (resumes where its counter
    stands): appends each step's loss and parts to ``history``, logs every ``log_every`` steps, calls
    ``checkpoint()`` every ``save_every`` steps before the end (the caller saves the final state), stops
    early at ``deadline`` (``time.monotonic()``). Returns whether the deadline stopped it. Model-agnostic:
    the autoencoder and the network share it; saving is the caller's (it owns the bytes)."""
    last_log_t, last_log_step = time.perf_counter(), trainer.step
    while trainer.step < steps:
        if deadline is not None and time.monotonic() >= deadline:
            log(f"{name}: time limit reached at step {trainer.step}/{steps}; saving (resumable)")
            return True
        out = trainer.train_step(bank.batch(batch_size, trainer.generator))
        history["loss"].append(out["loss"])
        history["parts"].append(out.get("per_modality") or [out["l1"], out["l2"], out["kl"]])
        if not np.isfinite(out["loss"]):
            raise TrainingError(f"{name}: loss is {out['loss']} at step {trainer.step}; lower the lr")
        if trainer.step % log_every == 0 or trainer.step == steps:
            now = time.perf_counter()
            rate = (trainer.step - last_log_step) / max(now - last_log_t, 1e-9)
            last_log_t, last_log_step = now, trainer.step
            tail = history["loss"][-log_every:]
            log(f"{name} step {trainer.step}/{steps} loss {np.mean(tail):.4f} lr {out['lr']:.2e} "
                f"{rate:.2f} steps/s")
        if trainer.step % save_every == 0 and trainer.step < steps:
            checkpoint()
    return False


# ---- helpers ------------------------------------------------------------------------------------------


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Run ``build`` (a module constructor) with the global RNG seeded from ``seed`` and restored after:
    the initial weights depend on the seed only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeding.derive(seed, "init") % (2**63))
        return build()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_summary(losses: list[float], points: int = 20) -> dict[str, Any]:
    """A compact loss curve: ``points`` evenly spaced window means (step at the window end) and the mean
    of the first and last 10 % of steps."""
    if not losses:
        return {"points": [], "first_mean": None, "last_mean": None}
    arr = np.asarray(losses, dtype=np.float64)
    k = max(1, math.ceil(len(arr) / points))
    pts = [[min(i + k, len(arr)), float(arr[i : i + k].mean())] for i in range(0, len(arr), k)]
    tenth = max(1, len(arr) // 10)
    return {"points": pts, "first_mean": float(arr[:tenth].mean()), "last_mean": float(arr[-tenth:].mean())}
