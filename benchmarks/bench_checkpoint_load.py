"""Time and peak memory of loading a release-size network checkpoint (1.1 GB fp32) with load_network.

Writes a random state dict with the release's keys and shapes as .pth (zip) and .safetensors into a temporary
folder, then loads each in a fresh subprocess (so peak RSS is the load's own) with dtype float32 and bfloat16,
touching every weight afterwards. Prints one line per case: wall seconds, peak RSS in GB and in multiples of
the checkpoint size. Run: ``python benchmarks/bench_checkpoint_load.py [--dir /some/tmp]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from copgen.flows.models import load_network
path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
t0 = time.perf_counter()
net = load_network(path, dtype=dtype)
t_load = time.perf_counter() - t0
total = sum(float(p.float().sum()) for p in net.parameters())  # touch every page
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"load_s": t_load, "peak_gb": peak_kb / 2**20, "source": net.checkpoint_info.config_source}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write the 2.3 GB of temporary checkpoints")
    args = parser.parse_args()

    import torch
    from copgen.model import RELEASE_CONFIG, Triffuser
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="copgen-bench-") as tmp:
        with torch.device("meta"):
            shapes = {k: (v.shape, v.dtype) for k, v in Triffuser(**RELEASE_CONFIG).state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        state = {
            k: torch.randn(shape, generator=gen, dtype=dtype) * 0.02 for k, (shape, dtype) in shapes.items()
        }
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        pth, st = Path(tmp) / "nnet.pth", Path(tmp) / "nnet.safetensors"
        torch.save(state, pth)
        save_file(state, str(st))
        del state
        print(f"checkpoint: {len(shapes)} keys, {nbytes / 1e9:.3f} GB (release config by key match)")
        for path in (pth, st):
            for dtype in ("float32", "bfloat16"):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(path), dtype],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=Path(__file__).resolve().parents[1],
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(
                    f"{path.suffix:13s} {dtype:9s} load {r['load_s']:6.2f} s  peak RSS {r['peak_gb']:5.2f} GB"
                    f" = {r['peak_gb'] * 2**30 / nbytes:4.2f} x checkpoint  (config: {r['source']})"
                )


if __name__ == "__main__":
    main()
