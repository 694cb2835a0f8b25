"""The model shipped in the package: intact, small, loadable, and actually conditional."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from copgen import bundled
from copgen import seeds as seeding
from copgen.flows.demo import write_demo_world
from copgen.flows.jobs import SourceSpec
from copgen.flows.models import ModelSpec, get_copgen, load_autoencoder, load_network, sample_size
from copgen.flows.quality import conditional_quality, load_complete_samples
from copgen.metrics import paired_metric_functions
from copgen.modalities import Modality


def test_bundled_files_match_their_recorded_sha256_and_size_budget():
    sums = bundled.checksums()
    assert set(sums) == {"network.safetensors", "autoencoder.safetensors"}
    total = 0
    for name, digest in sums.items():
        data = (bundled.HERE / name).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == digest
    assert total <= 25 * 1024 * 1024


def test_bundled_model_loads_strictly_with_its_configs():
    net = load_network(str(bundled.NETWORK))
    ae = load_autoencoder(str(bundled.AUTOENCODER))
    assert net.img_size * ae.downsample_factor == 64
    assert (bundled.HERE / "MODEL_CARD.md").read_text().count("sha256") >= 1


def held_out(root: str, *, seed: int, rows: int, cols: int, origin: tuple[float, float], cloud_prob: float):
    """A held-out world (neither the training world, seed 20261127, nor the demo's, seed 7) with every
    modality, the bundled model (12 2M steps, one micro-batch), and the centre samples of its cells."""
    meta = write_demo_world(root, seed=seed, rows=rows, cols=cols, origin=origin, thumbnail_size=384,
                            missing={}, cloud_prob=cloud_prob)
    net, vae = bundled.paths()
    spec = ModelSpec(weights=net, vae=vae, device="cpu", steps=12, solver="2m", batch_size=rows * cols)
    copgen = get_copgen(spec)
    source = SourceSpec(root=root, thumbnail_sizes=meta["thumbnail_sizes"])
    cells, real = load_complete_samples(source, sample_size(copgen))
    return copgen, cells, real


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = str(tmp_path_factory.mktemp("heldout") / "world")
    copgen, cells, real = held_out(root, seed=99, rows=3, cols=4, origin=(46.8, 6.5), cloud_prob=0.1)
    table = conditional_quality(copgen, cells, real, seed=1)
    return table.pivot_table(index=["target", "condition"], columns="metric", values="value")


# What the bundled model achieves (MODEL_CARD.md; measured on this world with seeds 1-3): the S2 pair by
# 10-14 dB over the withheld baseline, S1RTC by 0.5-1.3 dB from S2L2A and 0.2-1.1 dB from all the others.
# The margins below are well inside those figures: they pin the direction, not the exact values.
@pytest.mark.parametrize("target", ["S2L1C", "S2L2A"])
def test_conditioning_beats_withholding_the_condition(quality, target):
    t = quality.loc[target]
    withheld = t.loc["none (withheld)"]
    single = next(c for c in t.index if c.endswith(" only"))
    assert t.loc[single, "psnr"] > withheld["psnr"] + 6.0, quality
    assert t.loc[single, "ssim"] > withheld["ssim"] + 0.2, quality
    assert t.loc["all others", "psnr"] > withheld["psnr"] + 6.0, quality


def test_s1rtc_from_the_other_modalities_beats_withholding_them(quality):
    t = quality.loc["S1RTC"]
    assert t.loc["S2L2A only", "psnr"] > t.loc["none (withheld)", "psnr"] + 0.3, quality
    assert t.loc["all others", "psnr"] > t.loc["none (withheld)", "psnr"] + 0.3, quality
    assert t.loc["all others", "ssim"] > t.loc["none (withheld)", "ssim"] + 0.01, quality


def test_s2l1c_from_s2l2a_is_close_to_the_truth(quality):
    s2 = quality.loc["S2L1C"]
    assert s2.loc["S2L2A only", "psnr"] > 25.0, quality
    assert s2.loc["S2L2A only", "ssim"] > 0.8, quality
    # within 6 dB of the autoencoder's own round trip, the ceiling of any generation
    assert s2.loc["S2L2A only", "psnr"] > s2.loc["autoencoder round trip", "psnr"] - 6.0, quality


@pytest.fixture(scope="module")
def dem_gain(tmp_path_factory):
    """Paired gain of DEM generation from S2L2A over withholding it: mean over 36 held-out cells x 3 seeds
    (the DEM effect is small, so it needs more cells than the fixture above; see MODEL_CARD.md)."""
    root = str(tmp_path_factory.mktemp("heldout-dem") / "world")
    copgen, cells, real = held_out(root, seed=12345, rows=6, cols=6, origin=(47.5, 8.5), cloud_prob=0.2)
    dem = real[Modality.DEM]
    fns = paired_metric_functions(Modality.DEM, dem.shape[1:])
    gains = {"psnr": [], "ssim": []}
    for seed in (0, 1, 2):
        seeds = [seeding.sample_seed(seed, c, "center", 1, "dem-gain") for c in cells]
        given = copgen.generate({Modality.S2L2A: real[Modality.S2L2A]}, [Modality.DEM], seeds)[Modality.DEM]
        withheld = copgen.generate({}, [Modality.DEM], seeds)[Modality.DEM]
        for name in gains:
            gains[name].append(np.mean(fns[name](given, dem)) - np.mean(fns[name](withheld, dem)))
    return len(cells), {k: float(np.mean(v)) for k, v in gains.items()}


def test_dem_from_s2l2a_beats_withholding_it(dem_gain):
    # measured +0.18 dB / +0.031 SSIM here (other seeds +0.29 / +0.028; the demo world +0.17 / +0.017):
    # small but consistently positive
    n, gain = dem_gain
    assert n == 36
    assert gain["psnr"] > 0.05, gain
    assert gain["ssim"] > 0.01, gain
