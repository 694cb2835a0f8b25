"""The model shipped in the package: intact, small, loadable, and actually conditional."""

from __future__ import annotations

import hashlib

import pytest
import torch

from copgen_core import bundled
from copgen_core.checkpoints import load_autoencoder, load_network
from flows.demo import write_demo_world
from flows.jobs import SourceSpec
from flows.models import ModelSpec, get_copgen, sample_size
from flows.quality import conditional_quality, load_complete_samples


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


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = str(tmp_path_factory.mktemp("heldout") / "world")
    # Held out: neither the training world (seed 20261127) nor the demo world (seed 7).
    meta = write_demo_world(root, seed=99, rows=3, cols=4, origin=(46.8, 6.5), thumbnail_size=384,
                            missing={}, cloud_prob=0.1)
    net, vae = bundled.paths()
    copgen = get_copgen(ModelSpec(weights=net, vae=vae, device="cpu", steps=12, solver="2m", batch_size=12))
    cells, real = load_complete_samples(SourceSpec(root=root, thumbnail_sizes=meta["thumbnail_sizes"]),
                                        sample_size(copgen), 12)
    table = conditional_quality(copgen, cells, real, seed=1)
    return table.pivot_table(index=["target", "condition"], columns="metric", values="value")


# What the bundled model achieves (MODEL_CARD.md; measured on this world with seeds 1 and 2): the S2 pair by
# 3-7 dB over the withheld baseline, S1RTC from all the others by 0.8-1.4 dB. DEM generation does not
# reliably beat the withheld baseline (the synthetic S2 carries almost no terrain shading, see the card):
# that gap is not pinned as if it were met.
@pytest.mark.parametrize("target", ["S2L1C", "S2L2A"])
def test_conditioning_beats_withholding_the_condition(quality, target):
    t = quality.loc[target]
    withheld = t.loc["none (withheld)"]
    single = next(c for c in t.index if c.endswith(" only"))
    assert t.loc[single, "psnr"] > withheld["psnr"] + 2.0, quality
    assert t.loc[single, "ssim"] > withheld["ssim"] + 0.05, quality
    assert t.loc["all others", "psnr"] > withheld["psnr"] + 2.0, quality


def test_s1rtc_from_the_other_modalities_beats_withholding_them(quality):
    t = quality.loc["S1RTC"]
    assert t.loc["all others", "psnr"] > t.loc["none (withheld)", "psnr"] + 0.3, quality


def test_s2l1c_from_s2l2a_is_close_to_the_truth(quality):
    s2 = quality.loc["S2L1C"]
    assert s2.loc["S2L2A only", "psnr"] > 22.0, quality
    assert s2.loc["S2L2A only", "ssim"] > 0.7, quality
    # within 9 dB of the autoencoder's own round trip, the ceiling of any generation
    assert s2.loc["S2L2A only", "psnr"] > s2.loc["autoencoder round trip", "psnr"] - 9.0, quality
