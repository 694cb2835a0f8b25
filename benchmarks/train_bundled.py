"""The recipe of the bundled model (``copgen_core/bundled``): training world, autoencoder, network.

    python benchmarks/train_bundled.py --out run1 --device cuda --ae-time 60 --net-time 240 --clean-prob 0
    python benchmarks/train_bundled.py --out run2 --device cuda --ae run1/model/autoencoder.safetensors \\
        --net-init run1/model/network.safetensors --net-time 230

1. Writes the training world: seed 20261127 around 46.3N 9.2E (not the demo's world), ``--blocks``
   blocks of ``--rows`` x ``--cols`` cells (defaults: 9 of 7x7, as the bundled model) written in parallel
   processes (disjoint regions of one world), all four modalities, 384 px thumbnails, clouds in 20% of
   the S2 scenes.
2. Fine-tunes the autoencoder from ``--ae-init`` (default: the bundled one) at full 64 px samples, or
   keeps ``--ae`` (with the ``training.json`` beside it).
3. Trains the network on its latents, from scratch or from ``--net-init`` (EMA; ``--clean-prob``, default
   0.5, see ``copgen.flows.jobs.NetworkStage``; 0 is the release objective).

Each model stops at its ``--*-time`` limit (seconds) or its step count, whichever comes first, and
records which in ``<out>/model/training.json``. Same code on CPU and GPU; ``--blocks 1 --rows 2 --cols 2
--ae-steps 2 --net-steps 2`` is a quick smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from copgen.bundled import AUTOENCODER as BUNDLED_AUTOENCODER
from copgen.flows import train as tf
from copgen.flows.jobs import AutoencoderStage, NetworkStage, TrainJob
from copgen.storage.majortom.synthetic import write_world

SEED, ORIGIN = 20261127, (46.3, 9.2)
# degrees per cell (10.68 km) of latitude and, here, of longitude: block origins are this times the block
# size apart (cells two blocks share are dropped from the second)
DEG_PER_CELL = (0.0985, 0.143)


def _write_block(args: tuple[str, tuple[float, float], int, int]) -> str:
    root, origin, rows, cols = args
    if not (Path(root) / "Core-S2L2A").exists():
        write_world(root, seed=SEED, origin=origin, rows=rows, cols=cols, thumbnail_size=384,
                    missing={}, cloud_prob=0.2)  # fmt: skip
    return root


def write_training_world(out: Path, blocks: int, rows: int, cols: int, workers: int) -> list[str]:
    side = int(np.ceil(np.sqrt(blocks)))
    jobs = []
    for b in range(blocks):
        row, col = divmod(b, side)
        origin = (ORIGIN[0] + row * rows * DEG_PER_CELL[0], ORIGIN[1] + col * cols * DEG_PER_CELL[1])
        jobs.append((str(out / f"block{b}"), origin, rows, cols))
    with ProcessPoolExecutor(max_workers=max(1, min(workers, blocks))) as pool:
        return list(pool.map(_write_block, jobs))


def _load_block(root: str) -> tf.TrainingData:
    return tf.load_training_data(root, sample_size=64, patch="all")


def load_blocks(roots: list[str], workers: int) -> tf.TrainingData:
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(roots)))) as pool:
        parts = list(pool.map(_load_block, roots))
    seen: set[str] = set()
    images, cells, patches = [], [], []
    for part in parts:
        keep = np.array([c not in seen for c in part.cells])
        seen.update(part.cells)
        images.append(part.images[keep])
        cells += [c for c, k in zip(part.cells, keep, strict=True) if k]
        patches += [p for p, k in zip(part.patches, keep, strict=True) if k]
    root = str(Path(roots[0]).parent)
    return tf.TrainingData(images=np.concatenate(images), cells=cells, patches=patches,
                           source=f"{root} ({len(roots)} blocks, world seed {SEED})",
                           sample_size=64, patch="all")  # fmt: skip


def keep_autoencoder(weights: Path, model: Path) -> dict:
    """Copy ``weights`` (+ its .json) into ``model`` and its ``training.json`` autoencoder entry."""
    model.mkdir(parents=True, exist_ok=True)
    for f in (weights, weights.with_suffix(".json")):
        shutil.copyfile(f, model / f"autoencoder{f.suffix}")
    doc = json.loads((weights.parent / "training.json").read_text())
    ae = doc["autoencoder"]
    target = model / "training.json"
    mine = json.loads(target.read_text()) if target.exists() else {}
    target.write_text(json.dumps({**mine, "autoencoder": ae}, indent=1))
    return ae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="world/ and model/ are written here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--rows", type=int, default=7)
    ap.add_argument("--cols", type=int, default=7)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing world blocks")
    ap.add_argument("--world-only", action="store_true", help="write the world and stop")
    ap.add_argument("--ae-init", default=str(BUNDLED_AUTOENCODER))
    ap.add_argument("--ae-steps", type=int, default=100_000)
    ap.add_argument("--ae-batch", type=int, default=32)
    ap.add_argument("--ae-lr", type=float, default=2e-4, help="fine-tuning: half the from-scratch 4e-4")
    ap.add_argument("--ae-time", type=float, default=None, help="seconds")
    ap.add_argument("--net-steps", type=int, default=1_000_000)
    ap.add_argument("--net-batch", type=int, default=256)
    ap.add_argument("--net-lr", type=float, default=2e-4)
    ap.add_argument("--net-time", type=float, default=None, help="seconds")
    ap.add_argument("--clean-prob", type=float, default=0.5, help="see copgen.flows.jobs.NetworkStage")
    ap.add_argument("--net-init", default=None, help="network weights to start from")
    ap.add_argument("--ae", default=None, help="keep this autoencoder (skip its fine-tuning)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = out / "model"
    t0 = time.perf_counter()
    roots = write_training_world(out / "world", args.blocks, args.rows, args.cols, args.workers)
    t_world = time.perf_counter() - t0
    if args.world_only:
        print(f"world: {len(roots)} blocks in {t_world:.1f} s", flush=True)
        return
    data = load_blocks(roots, args.workers)
    print(f"world: {data.n_cells} cells, {data.images.shape[0]} samples in {t_world:.1f} s (+ read "
          f"{time.perf_counter() - t0 - t_world:.1f} s)", flush=True)
    job = TrainJob(
        str(out / "world"), str(model), sample_size=64, device=args.device, bf16=args.bf16,
        autoencoder=AutoencoderStage(steps=args.ae_steps, batch_size=args.ae_batch, lr=args.ae_lr,
                                     init=args.ae_init, save_every=1000, log_every=100),
        network=NetworkStage(steps=args.net_steps, batch_size=args.net_batch, lr=args.net_lr,
                             clean_prob=args.clean_prob, init=args.net_init, save_every=2000, log_every=500),
    )  # fmt: skip
    if args.ae:  # keep an autoencoder from an earlier run: its files and its training.json entry
        ae = keep_autoencoder(Path(args.ae), model)
    else:
        ae = tf.train_autoencoder(replace(job, time_limit_s=args.ae_time), data=data)
    net = tf.train_network(replace(job, time_limit_s=args.net_time), data=data)  # the autoencoder in model/
    for name, entry in (("autoencoder", ae), ("network", net)):
        brief = {k: entry.get(k) for k in ("steps", "stopped_at_time_limit", "wall_time_s", "final_loss")}
        print(name, json.dumps(brief), flush=True)
    print("reconstruction PSNR", json.dumps(ae["reconstruction_psnr"]), flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
