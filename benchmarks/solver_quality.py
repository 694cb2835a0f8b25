"""Fewer solver steps at measured equal quality: the bundled model on held-out cells, per solver setting.

Every target modality (DEM, S1RTC, S2L1C, S2L2A) is generated from the other three real modalities of
held-out cells of the demo world (not the model's training world) with the release solver at 50 steps
(the reference) and with the other settings (``2m`` and ``release`` at fewer steps, bf16 autocast), all
from the same seeds. For each (setting, target) it reports

- paired metrics vs the real cell (PSNR, SSIM; mean with a 95% bootstrap CI over cells);
- distribution metrics vs the real held-out set: KID on the random-conv features and the pixel
  Wasserstein-1 (mean over bands), each with a 95% bootstrap CI over cells (the same resampled cells for
  every setting, so settings are compared on equal terms);
- agreement with the 50-step output of the same seed (PSNR/SSIM between the two generations).

A setting is "equal" on a target when none of its metrics vs the truth is worse than the edge of the
50-step CI (PSNR/SSIM not below its lower bound, KID/W1 not above its upper bound). The CLI default is
the cheapest setting (fewest network evaluations) that is equal on every target; the table and the
choice go to benchmarks/RESULTS.md.

Per-sample rows and the generated images are written as the run goes (``--out``), so an interrupted run
keeps what it finished; ``--summarize DIR`` prints the table again from them.

    python benchmarks/solver_quality.py [--cells 24] [--seeds 1] [--settings release-50,2m-10,...]
        [--out DIR] [--world DIR] [--threads N]
    python benchmarks/solver_quality.py --summarize DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REFERENCE = "release-50-float32"
DEFAULT_SETTINGS = (
    "release-50,2m-10,2m-15,2m-20,2m-25,2m-30,"
    "2m-10-bfloat16,2m-15-bfloat16,2m-20-bfloat16,release-50-bfloat16,release-20,release-30"
)
N_RESAMPLES = 1000
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "kid": False, "w1": False}


def parse_setting(text: str) -> tuple[str, int, str]:
    parts = text.strip().split("-")
    solver, steps = parts[0], int(parts[1])
    dtype = parts[2] if len(parts) > 2 else "float32"
    return solver, steps, dtype


def setting_name(solver: str, steps: int, dtype: str) -> str:
    return f"{solver}-{steps}-{dtype}"


def generate_all(args: argparse.Namespace, out: Path) -> None:
    import torch
    from copgen import bundled
    from copgen import seeds as seeding
    from copgen.flows.demo import DEMO_WORLD, write_demo_world
    from copgen.flows.jobs import SourceSpec
    from copgen.flows.models import ModelSpec, get_copgen, sample_size
    from copgen.flows.quality import load_complete_samples
    from copgen.modalities import ALL

    if args.threads:
        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    world = args.world
    if world is None:
        world = str(out / "world")
        if not (Path(world) / "world.json").exists():
            write_demo_world(world, **DEMO_WORLD)
    meta = json.loads((Path(world) / "world.json").read_text())
    net, vae = bundled.paths()
    source = SourceSpec(root=world, thumbnail_sizes=meta["thumbnail_sizes"])
    probe = get_copgen(ModelSpec(weights=net, vae=vae, device="cpu"))
    cells, real = load_complete_samples(source, sample_size(probe), args.cells)
    n = len(cells) * args.seeds
    labels = [c for c in cells for _ in range(args.seeds)]
    np.savez(out / "real.npz", cells=np.asarray(cells), labels=np.asarray(labels),
             **{m.name: np.repeat(real[m], args.seeds, axis=0) for m in ALL})
    settings = [parse_setting(s) for s in args.settings.split(",")]
    print(f"{len(cells)} held-out cells x {args.seeds} seed(s) = {n} samples per target; "
          f"{torch.get_num_threads()} torch threads", flush=True)
    for solver, steps, dtype in settings:
        name = setting_name(solver, steps, dtype)
        done, running = out / f"{name}.npz", out / f"{name}.running"
        if done.exists() or running.exists():  # resumable; several processes may share a folder
            print(f"{name}: {'done' if done.exists() else 'running'} in {out}", flush=True)
            continue
        running.write_text(str(os.getpid()))
        copgen = get_copgen(ModelSpec(weights=net, vae=vae, device="cpu", steps=steps, solver=solver,
                                      dtype=dtype, batch_size=min(n, args.batch)))
        gens, t0, cpu0 = {}, time.perf_counter(), time.process_time()
        for target in ALL:
            seeds = [seeding.sample_seed(k, c, "center", 1, f"solver-quality/{target.name}")
                     for c in cells for k in range(args.seeds)]
            conds = {m: np.repeat(real[m], args.seeds, axis=0) for m in ALL if m != target}
            gens[target.name] = copgen.generate(conds, [target], seeds)[target]
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        np.savez(done, **gens)
        (out / f"{name}.timing.json").write_text(json.dumps(
            {"setting": name, "nfe": steps, "seconds": seconds, "cpu_seconds": cpu, "samples": 4 * n}))
        running.unlink()
        print(f"{name}: {seconds:.0f} s wall, {cpu:.0f} s CPU for {4 * n} samples", flush=True)


def _distribution(gen: np.ndarray, real: np.ndarray, extractor, idx_sets: list, modality):
    """KID and mean band W1 on the whole set and on each bootstrap resample of the samples."""
    import torch
    from copgen.metrics import _pixel_bands, distribution

    fake_f, real_f = extractor(gen), extractor(real)
    g = _pixel_bands(modality, torch.as_tensor(gen))
    r = _pixel_bands(modality, torch.as_tensor(real))

    def both(ix):
        kid = distribution._mmd2_unbiased_poly(fake_f[ix], real_f[ix])
        w1 = float(np.mean(distribution.wasserstein_per_band(g[ix], r[ix])))
        return kid, w1

    full = both(np.arange(len(gen)))
    boot = np.array([both(ix) for ix in idx_sets])
    return full, boot


def _ci(rec, metric: str, fmt: str) -> str:
    return f"{rec[metric]:{fmt}} [{rec[metric + '_lo']:{fmt}}, {rec[metric + '_hi']:{fmt}}]"


def summarize(out: Path, n_resamples: int = N_RESAMPLES) -> str:
    """The markdown tables of a run folder, and the cheapest float32 setting equal on every target."""
    import pandas as pd
    from copgen.metrics import bootstrap_mean_ci, get_extractor, paired_metric_functions
    from copgen.modalities import ALL

    timings = [json.loads(p.read_text()) for p in sorted(out.glob("*.timing.json"))]
    if (out / "timing.jsonl").exists():  # the first runs' format
        timings += [json.loads(line) for line in (out / "timing.jsonl").read_text().splitlines()]
    timing = pd.DataFrame(timings).drop_duplicates("setting", keep="first")
    timing = timing.sort_values(["nfe", "setting"])
    timing = pd.concat([timing[timing.setting == REFERENCE], timing[timing.setting != REFERENCE]])
    if REFERENCE not in set(timing.setting):
        raise SystemExit(f"{out}: the reference {REFERENCE} has not been generated yet")
    real = np.load(out / "real.npz")
    labels = real["labels"]
    # cell-level resamples shared by every setting (the samples of one cell stay together)
    uniq, inv = np.unique(labels, return_inverse=True)
    rng = np.random.default_rng(0)
    members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    idx_sets = [np.concatenate([members[k] for k in rng.integers(0, len(uniq), len(uniq))])
                for _ in range(200)]
    extractor = get_extractor("random-conv")
    reference = dict(np.load(out / f"{REFERENCE}.npz"))
    ref_psnr = {}
    table = []
    for name in timing.setting:
        gens = np.load(out / f"{name}.npz")
        for target in ALL:
            gen, truth, ref = gens[target.name], real[target.name], reference[target.name]
            fns = paired_metric_functions(target, gen.shape[1:])
            values = {"psnr": fns["psnr"](gen, truth), "ssim": fns["ssim"](gen, truth),
                      "psnr_vs50": fns["psnr"](gen, ref), "ssim_vs50": fns["ssim"](gen, ref)}
            if name == REFERENCE:
                ref_psnr[target.name] = values["psnr"]
            values["dpsnr"] = values["psnr"] - ref_psnr[target.name]  # paired: same cell, same seed
            rec = {"setting": name, "target": target.name}
            for k, v in values.items():
                ci = bootstrap_mean_ci(v, groups=labels, n_resamples=n_resamples)
                rec[k], rec[k + "_lo"], rec[k + "_hi"] = ci.value, ci.ci_low, ci.ci_high
            (kid, w1), boot = _distribution(gen, truth, extractor, idx_sets, target)
            rec["kid"], rec["w1"] = kid, w1
            rec["kid_lo"], rec["kid_hi"] = np.quantile(boot[:, 0], [0.025, 0.975])
            rec["w1_lo"], rec["w1_hi"] = np.quantile(boot[:, 1], [0.025, 0.975])
            table.append(rec)
    df = pd.DataFrame(table)
    ref = df[df.setting == REFERENCE].set_index("target")
    equal = {}
    for name in timing.setting:
        ok = True
        for _, rec in df[df.setting == name].iterrows():
            r = ref.loc[rec.target]
            for m, higher in HIGHER_IS_BETTER.items():
                ok &= bool(rec[m] >= r[m + "_lo"]) if higher else bool(rec[m] <= r[m + "_hi"])
        equal[name] = ok
    nfe = dict(zip(timing.setting, timing.nfe, strict=True))
    lines = [f"{len(uniq)} held-out cells, {len(labels)} samples per target; 95% bootstrap CIs over cells",
             "", "| setting | NFE | target | PSNR vs real | paired dPSNR vs 50-step | SSIM vs real | "
             "KID (random-conv) | W1 (pixels) | PSNR / SSIM vs the 50-step output |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, rec in df.iterrows():
        is_ref = rec.setting == REFERENCE
        agree = "-" if is_ref else f"{rec.psnr_vs50:.1f} dB / {rec.ssim_vs50:.3f}"
        lines.append(f"| {rec.setting} | {nfe[rec.setting]} | {rec.target} | {_ci(rec, 'psnr', '.2f')} | "
                     f"{'-' if is_ref else _ci(rec, 'dpsnr', '+.2f')} | {_ci(rec, 'ssim', '.3f')} | "
                     f"{_ci(rec, 'kid', '.4f')} | {_ci(rec, 'w1', '.2f')} | {agree} |")
    lines += ["", "| setting | NFE | CPU s per sample | within the 50-step CI on every target |",
              "|---|---|---|---|"]
    for _, t in timing.iterrows():
        lines.append(f"| {t.setting} | {t.nfe} | {t.cpu_seconds / t.samples:.3f} | "
                     f"{'yes' if equal[t.setting] else 'no'} |")
    fp32 = [s for s in timing.setting if equal[s] and s.endswith("float32")]
    if fp32:
        best = min(fp32, key=lambda s: (nfe[s], s))
        lines += ["", f"cheapest float32 setting equal on every target: {best} ({nfe[best]} NFE)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=24, help="held-out complete cells")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per cell")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help="comma-separated solver-steps[-dtype]; must include release-50")
    ap.add_argument("--batch", type=int, default=32, help="network batch")
    ap.add_argument("--world", default=None, help="an existing world (default: write the demo world)")
    ap.add_argument("--out", default="solver-quality", help="folder for rows, images and timings")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--summarize", default=None, metavar="DIR", help="only print the table of DIR")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return
    generate_all(args, Path(args.out))
    print(summarize(Path(args.out)))


if __name__ == "__main__":
    main()
