"""Quality of the bundled model on held-out world cells (the demo world, not its training world).

Prints, per target modality, mean paired PSNR/SSIM vs the truth when generating from the other real
modalities, from one condition, and with the conditions withheld (same seeds). Figures go to the model
card (copgen_core/bundled/MODEL_CARD.md).

    python benchmarks/demo_quality.py [--cells 32] [--steps 20] [--world DIR] [--weights N --vae A]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=32, help="held-out complete cells to score")
    ap.add_argument("--steps", type=int, default=20, help="2M solver steps")
    ap.add_argument("--world", default=None, help="an existing world (default: write the demo world)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--weights", default=None, help="network checkpoint (default: the bundled one)")
    ap.add_argument("--vae", default=None, help="autoencoder checkpoint (default: the bundled one)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from copgen import bundled
    from copgen.flows.demo import DEMO_WORLD, write_demo_world
    from copgen.flows.jobs import SourceSpec
    from copgen.flows.models import ModelSpec, get_copgen, sample_size
    from copgen.flows.quality import conditional_quality, load_complete_samples

    world = args.world
    if world is None:
        world = tempfile.mkdtemp(prefix="copgen-quality-") + "/world"
        meta = write_demo_world(world, **DEMO_WORLD)
    else:
        import json
        from pathlib import Path

        meta = json.loads((Path(world) / "world.json").read_text())
    net, vae = bundled.paths()
    net, vae = args.weights or net, args.vae or vae
    copgen = get_copgen(ModelSpec(weights=net, vae=vae, device="cpu", steps=args.steps, solver="2m",
                                  batch_size=16))
    source = SourceSpec(root=world, thumbnail_sizes=meta["thumbnail_sizes"])
    cells, real = load_complete_samples(source, sample_size(copgen), args.cells)
    t0 = time.perf_counter()
    table = conditional_quality(copgen, cells, real)
    wide = table.pivot_table(index=["target", "condition"], columns="metric", values="value").round(3)
    name = "bundled model" if args.weights is None else net
    print(f"{name}, {len(cells)} held-out cells, {args.steps} steps (2M), "
          f"{time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} CPU threads")
    print(wide.to_string())


if __name__ == "__main__":
    main()
