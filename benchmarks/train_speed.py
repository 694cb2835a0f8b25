"""Training speed of candidate small configs (network and autoencoder separately), on in-memory data.

    python benchmarks/train_speed.py [--threads 2] [--steps 20] [--sample-size 64] [--bf16] [--only net|ae]
                                     [--device cuda]

For each config: parameters, safetensors size (fp32 / fp16), steps/s and samples/s of the real training
step (``copgen.train``: forward, loss, backward, AdamW, EMA), after ``--warmup`` untimed steps. Data
are random uint8 images / moments (speed does not depend on content). Prints the machine's load average:
figures from a busy machine are lower bounds.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from copgen import train as T
from copgen.autoencoder import AutoencoderKL
from copgen.model import Triffuser, count_parameters

# name -> AutoencoderKL keywords (64 px samples -> latent 8x8 needs downsample 8: four levels)
AUTOENCODERS = {
    "ae-32-1222-r1": {"ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1},
    "ae-32-1224-r1": {"ch": 32, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1},
    "ae-32-1122-r2": {"ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 2},
}
# name -> Triffuser keywords (img_size / in_chans come from the latent)
NETWORKS = {
    "net-128-d6-p2": {"embed_dim": 128, "depth": 6, "num_heads": 2, "patch_size": 2},
    "net-192-d8-p2": {"embed_dim": 192, "depth": 8, "num_heads": 3, "patch_size": 2},
    "net-256-d8-p2": {"embed_dim": 256, "depth": 8, "num_heads": 4, "patch_size": 2},
    "net-128-d8-p1": {"embed_dim": 128, "depth": 8, "num_heads": 2, "patch_size": 1},
    "net-192-d8-p1": {"embed_dim": 192, "depth": 8, "num_heads": 3, "patch_size": 1},
}


def _mb(params: int, bytes_per: int) -> float:
    return params * bytes_per / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(trainer: T.Trainer, bank, batch: int, warmup: int, steps: int) -> float:
    """Training steps per second after ``warmup`` untimed steps (each step reads its loss back, so the
    host waits for the device every step, as in real training)."""
    for _ in range(warmup):
        trainer.train_step(bank.batch(batch, trainer.generator))
    _sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(bank.batch(batch, trainer.generator))
    _sync(trainer.device)
    return steps / (time.perf_counter() - t0)


def bench_autoencoders(args, autocast) -> None:
    s = args.sample_size
    held = max(256, 2 * max(args.ae_batch))  # the bank must hold more than a batch
    images = np.random.default_rng(0).integers(0, 256, (held, s, s, 3), dtype=np.uint8)
    for name, kw in AUTOENCODERS.items():
        if args.names and name not in args.names:
            continue
        ae = AutoencoderKL(**kw, z_channels=4, embed_dim=4, resolution=s).to(args.device)
        bank = T.ImageBank(images, crop=args.ae_crop)
        trainer = T.AutoencoderTrainer(ae, autocast_dtype=autocast)
        for batch in args.ae_batch:
            rate = _time_steps(trainer, bank, batch, args.warmup, args.steps)
            n, h = count_parameters(ae), s // ae.downsample_factor
            print(
                f"{name:16s} latent {h}x{h} params {n / 1e6:5.2f} M "
                f"({_mb(n, 4):5.1f} MB fp32, {_mb(n, 2):5.1f} MB fp16)  batch {batch:3d}: "
                f"{rate:6.2f} steps/s  {rate * batch:7.1f} images/s"
                + (f" ({args.ae_crop} px crops)" if args.ae_crop else ""),
                flush=True,
            )


def bench_networks(args, autocast) -> None:
    latent = args.sample_size // 8
    moments = torch.randn(max(256, 2 * max(args.net_batch)), 4, 8, latent, latent)
    for name, kw in NETWORKS.items():
        if args.names and name not in args.names:
            continue
        net = Triffuser(img_size=latent, in_chans=4, mlp_ratio=4, qkv_bias=False, num_modalities=4, **kw)
        net = net.to(args.device)
        bank = T.LatentBank(moments, 0.18215, flipped=moments)
        trainer = T.DiffusionTrainer(net, autocast_dtype=autocast, ema_warmup=True)
        for batch in args.net_batch:
            rate = _time_steps(trainer, bank, batch, args.warmup, args.steps)
            n = count_parameters(net)
            print(
                f"{name:16s} tokens {net.num_tokens:4d} params {n / 1e6:5.2f} M "
                f"({_mb(n, 4):5.1f} MB fp32, {_mb(n, 2):5.1f} MB fp16)  batch {batch:3d}: "
                f"{rate:6.2f} steps/s  {rate * batch:7.1f} samples/s",
                flush=True,
            )


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per config")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, oneDNN caches)")
    ap.add_argument("--sample-size", type=int, default=64)
    ap.add_argument("--ae-batch", type=int, nargs="+", default=[16])
    ap.add_argument("--ae-crop", type=int, default=None, help="train the autoencoder on random crops")
    ap.add_argument("--net-batch", type=int, nargs="+", default=[32])
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--only", choices=["net", "ae"], default=None)
    ap.add_argument("--names", nargs="*", default=None, help="only these configs (default: all)")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    args = ap.parse_args()
    args.device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    autocast = torch.bfloat16 if args.bf16 else None
    print(
        f"torch {torch.__version__} on {_device_name(args.device)}, {args.threads} thread(s), "
        f"{args.sample_size} px, "
        f"{'bf16' if args.bf16 else 'fp32'}; load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if args.only in (None, "ae"):
        bench_autoencoders(args, autocast)
    if args.only in (None, "net"):
        bench_networks(args, autocast)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
