"""Sampler throughput: samples/s and network evaluations/s for the release network and a tiny one.

Random weights (speed does not depend on them), built directly on the target device. One scenario:
condition on S2L2A, generate DEM, S1RTC and S2L1C (the network always sees all four modalities, so the
cost per evaluation does not depend on the split). For each config × dtype × batch size × solver it
times complete ``sample_latents`` calls and prints:

    s/NFE       wall seconds per network evaluation (one evaluation processes the whole batch)
    NFE/s       batched evaluations per second
    img-NFE/s   per-sample evaluations per second (batch × NFE/s)
    samples/s   complete samples per second at the solver's nominal steps (release 50, 2m --fast-steps);
                marked "*" when projected from fewer timed steps (--steps / --quick)
    MFU         model FLOPs utilisation: img-NFE/s x FLOPs per sample evaluation (2 x parameters x
                tokens + 4 x depth x tokens^2 x width: ~0.68 TFLOP for the release network) / the peak
                (--peak-tflops; default from the GPU's name for the dtype, dense tensor cores)

Examples:
    python benchmarks/sampler.py --quick --threads 1            # CPU-friendly, a couple of minutes
    python benchmarks/sampler.py --device cuda --batch-sizes 1,8,32,64 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass

import torch
from copgen.diffusion import RELEASE_STEPS
from copgen.generate import sample_latents
from copgen.modalities import Modality
from copgen.model import RELEASE_CONFIG, Triffuser, count_parameters

TINY_CONFIG = {**RELEASE_CONFIG, "img_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
CONDITION, TARGETS = Modality.S2L2A, (Modality.DEM, Modality.S1RTC, Modality.S2L1C)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    config: str
    dtype: str
    solver: str
    batch: int
    timed_steps: int
    nominal_steps: int
    seconds: float

    flops: float = 0.0  # per sample evaluation
    peak: float | None = None  # TFLOP/s

    def row(self) -> str:
        per_nfe = self.seconds / self.timed_steps
        samples = self.batch / (per_nfe * self.nominal_steps)
        mark = "*" if self.timed_steps != self.nominal_steps else " "
        mfu = f"{self.batch / per_nfe * self.flops / (self.peak * 1e12):6.1%}" if self.peak else "     -"
        return (
            f"{self.config:8s} {self.dtype:5s} {self.solver:8s} {self.batch:6d} {per_nfe:10.4f} "
            f"{1 / per_nfe:9.2f} {self.batch / per_nfe:10.1f} {samples:10.3f}{mark} {mfu}"
        )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(config: dict, device: torch.device, compile_model: bool, mode: str | None = None) -> Triffuser:
    with torch.device(device):
        net = Triffuser(**config).eval()
    if compile_model:  # sample_latents calls forward_stacked: compile that entry point
        net.forward_stacked = torch.compile(net.forward_stacked, mode=mode)  # type: ignore[method-assign]
    return net


# dense tensor-core peaks (TFLOP/s) by GPU name and dtype; fp32 without TF32
_PEAKS = {"H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
          "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
          "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}}


def flops_per_sample_evaluation(net: Triffuser) -> float:
    """Forward FLOPs of one sample through the network: every weight is a multiply-add per token, plus
    attention's two T x T products per layer."""
    tokens, width, depth = net.num_tokens, net.embed_dim, 2 * len(net.in_blocks) + 1
    return 2.0 * count_parameters(net) * tokens + 4.0 * depth * tokens**2 * width


def peak_tflops(device: torch.device, dtype: str, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[dtype] for key, p in _PEAKS.items() if key in name), None)


def run_once(net: Triffuser, batch: int, solver: str, steps: int, autocast, device: torch.device) -> float:
    gen = torch.Generator().manual_seed(batch)
    shape = (batch, net.in_chans, net.img_size, net.img_size)
    cond = {CONDITION: torch.randn(shape, generator=gen)}
    noise = {m: torch.randn(shape, generator=gen) for m in TARGETS}
    synchronize(device)
    start = time.perf_counter()
    out = sample_latents(net, cond, TARGETS, noise, steps=steps, solver=solver, autocast_dtype=autocast)
    synchronize(device)
    elapsed = time.perf_counter() - start
    assert all(torch.isfinite(z).all() for z in out.values())
    return elapsed


def warm_up(net: Triffuser, batch: int, autocast, device: torch.device) -> None:
    """One evaluation per shape/dtype (and the compile, if any) outside the timing."""
    shape = (net.num_modalities, batch, net.in_chans, net.img_size, net.img_size)
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        net.forward_stacked(torch.randn(shape, device=device), torch.rand(shape[:2], device=device) * 1000)
    synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,4,16", help="comma list (default 1,4,16)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (autocast)")
    parser.add_argument("--solvers", default="release,2m")
    parser.add_argument("--configs", default="tiny,release", help="comma list of tiny, release")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed evaluations per solve for every solver (default: the nominal steps)",
    )
    parser.add_argument("--fast-steps", type=int, default=20, help="nominal steps of the 2m solver")
    parser.add_argument("--repeats", type=int, default=1, help="timed solves per cell (the best is kept)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak of the device for MFU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU-friendly: tiny config in full; release config at batch 1, one timed NFE (fp32 on CPU)",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    nominal = {"release": RELEASE_STEPS, "2m": args.fast_steps}
    batches = [int(b) for b in args.batch_sizes.split(",")]
    dtypes = args.dtypes.split(",")
    solvers = args.solvers.split(",")
    configs = {"tiny": TINY_CONFIG, "release": RELEASE_CONFIG}

    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"compile={args.compile} mode={args.compile_mode} quick={args.quick}"
    )
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(device)}")
    print(
        f"{'config':8s} {'dtype':5s} {'solver':8s} {'batch':>6s} {'s/NFE':>10s} {'NFE/s':>9s} "
        f"{'img-NFE/s':>10s} {'samples/s':>10s}  {'MFU':>6s}"
    )
    for name in args.configs.split(","):
        net = build(configs[name], device, args.compile, args.compile_mode)
        flops = flops_per_sample_evaluation(net)
        print(f"# {name}: {count_parameters(net):,} parameters, {net.num_tokens} tokens, "
              f"{flops / 1e12:.3f} TFLOP per sample evaluation")
        heavy = args.quick and name == "release"
        for dtype in dtypes:
            autocast = DTYPES[dtype]
            if heavy and autocast is not None and device.type == "cpu":
                print(
                    f"# {name} {dtype}: skipped by --quick on CPU (no fast CPU path; ~80 s/NFE measured here)"
                )
                continue
            for batch in batches[:1] if heavy else batches:
                if not (heavy and device.type == "cpu"):  # a CPU forward has no first-call cost worth 10 s
                    warm_up(net, batch, autocast, device)
                for solver in solvers[:1] if heavy else solvers:
                    # --quick times ONE evaluation of the release config (the 2m solver's single step);
                    # the cost per evaluation is the network's, so it projects both solvers
                    steps = 1 if heavy else (args.steps or nominal[solver])
                    run_solver = "2m" if heavy else solver
                    seconds = min(
                        run_once(net, batch, run_solver, steps, autocast, device) for _ in range(args.repeats)
                    )
                    for shown in solvers if heavy else [solver]:
                        print(
                            Result(name, dtype, shown, batch, steps, nominal[shown], seconds, flops,
                                   peak_tflops(device, dtype, args.peak_tflops)).row(),
                            flush=True,
                        )
        if device.type == "cuda":
            print(f"# peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        del net
    print("* projected from the timed steps (cost per evaluation × nominal steps)")


if __name__ == "__main__":
    main()
