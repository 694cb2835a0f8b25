"""How good a model is at conditional generation, measured on held-out cells of a Major TOM source.

For every target modality, generate it (a) from the other real modalities, (b) from one informative
condition (e.g. DEM from S2L2A), and (c) with every condition withheld (the same seeds), then compare
each with the truth (paired PSNR/SSIM per sample, mean over samples). A model that learnt the joint
distribution must beat (c) with (a) and (b); ``benchmarks/demo_quality.py`` prints the table and the
model card quotes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from copgen import seeds as seeding
from copgen.flows.jobs import SourceSpec
from copgen.generate import CopGen
from copgen.metrics import paired_metric_functions
from copgen.modalities import ALL, Modality
from copgen.storage.majortom.thumbnails import to_samples

# One informative single condition per target (S2L1C from S2L2A: the same scene through the atmosphere).
SINGLE = {Modality.DEM: Modality.S2L2A, Modality.S1RTC: Modality.S2L2A, Modality.S2L1C: Modality.S2L2A,
          Modality.S2L2A: Modality.S2L1C}


def load_complete_samples(source: SourceSpec, size: int, cells: int | None = None, patch: str = "center"):
    """uint8 (N, S, S, 3) per modality for the source's complete cells (first ``cells`` in cell order)."""
    reader = source.open(on_error="raise")
    pairs = reader.pair().complete
    if cells:
        pairs = pairs.iloc[:cells]
    out = {}
    for m in ALL:
        samples = reader.read_samples(reader.refs(pairs, m)).samples
        out[m] = np.stack([to_samples(s.thumbnail, m, patch, size, dem_scale=3)[0] for s in samples])
    return list(pairs.grid_cell), out


def conditional_quality(copgen: CopGen, cells: Sequence[str], real: dict[Modality, np.ndarray],
                        seed: int = 0, roundtrip: bool = True) -> pd.DataFrame:
    """Rows (target, condition, metric, value): mean paired metric vs the truth for each setting; with
    ``roundtrip`` also the autoencoder's encode-decode of the truth (the practical ceiling)."""
    rows = []
    for target in ALL:
        seeds = [seeding.sample_seed(seed, c, "center", 1, f"quality/{target.name}") for c in cells]
        settings = {
            "all others": [m for m in ALL if m != target],
            f"{SINGLE[target].name} only": [SINGLE[target]],
            "none (withheld)": [],
        }
        for label, conds in settings.items():
            gen = copgen.generate({m: real[m] for m in conds}, [target], seeds)[target]
            rows += _scores(target, label, gen, real[target])
        if roundtrip:  # the autoencoder's own loss: the practical ceiling of every setting
            back = copgen.decode(copgen.encode({target: real[target]}, seeds))[target]
            rows += _scores(target, "autoencoder round trip", back, real[target])
    return pd.DataFrame(rows)


def _scores(target: Modality, label: str, gen: np.ndarray, truth: np.ndarray) -> list[dict]:
    rows = []
    for name, fn in paired_metric_functions(target, gen.shape[1:]).items():
        if name in ("psnr", "ssim"):
            rows.append({"target": target.name, "condition": label, "metric": name,
                         "value": float(np.mean(fn(gen, truth))), "n": len(gen)})
    return rows
