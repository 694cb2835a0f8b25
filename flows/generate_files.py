"""``copgen generate``: what the release's inference notebook does, for files: take one image per known
modality, generate the missing ones, write them out.

Inputs are read by ``storage/images.py`` (PNG/JPEG/WebP thumbnails, GeoTIFFs with their CRS), cut into
the model's ``k`` px tiles (never resized: the model was trained on 10 m pixels) and generated tile by
tile with one seed per tile, derived exactly as the ``complete`` flow derives a sample's seed:
``sample_seed(seed, grid_cell, tile, 1, "variant0")`` with ``grid_cell`` = ``--grid-cell`` (default
``"image"``) and ``tile`` = ``center`` for a single tile or ``r<i>c<j>``. The same pixels and seed as a
Major TOM sample therefore give the same output as ``copgen complete``.

Outputs in ``out_dir``: ``<TARGET>.tif`` (GeoTIFF in the inputs' CRS and transform) when an input had one,
else ``<TARGET>.png``; ``provenance.json`` (inputs and their sha256, targets, tiles and seeds, model
weights and their sha256, sampler, licence note).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
from copgen import package_version
from copgen import seeds as seeding
from copgen.flows.models import ModelSpec, get_copgen, sample_size
from copgen.modalities import ALL, Modality, parse_list
from copgen.storage.checkpoint_files import sha256_of
from copgen.storage.cubes import LICENCE_NOTE
from copgen.storage.fsutil import join_url
from copgen.storage.images import ImageInputError, InputImage, cut, pad_to, read_image, stitch, tile_grid
from copgen.storage.majortom.thumbnails import encode_thumbnail


def tile_seed(run_seed: int, grid_cell: str, label: str) -> int:
    """The seed of one tile: the ``complete`` flow's rule for sample (grid_cell, patch=label, variant 0)."""
    return seeding.sample_seed(run_seed, grid_cell, label, 1, "variant0")


def _check_inputs(images: Mapping[Modality, InputImage]) -> tuple[int, int, InputImage | None]:
    shapes = {m.name: img.pixels.shape[:2] for m, img in images.items()}
    if len(set(shapes.values())) != 1:
        raise ImageInputError(f"input images differ in size: {shapes}; give co-registered images of one size")
    geo = [img for img in images.values() if img.transform is not None]
    for other in geo[1:]:
        if other.epsg != geo[0].epsg or not np.allclose(other.transform, geo[0].transform, rtol=0, atol=1e-6):
            raise ImageInputError(
                f"{other.path} and {geo[0].path} are not on the same grid (CRS EPSG:{other.epsg} vs "
                f"EPSG:{geo[0].epsg}, transforms {other.transform} vs {geo[0].transform})")
    h, w = next(iter(shapes.values()))
    return h, w, (geo[0] if geo else None)


def run_generate(
    inputs: Mapping[Modality | str, str],
    out_dir: str,
    model: ModelSpec,
    *,
    targets: Sequence[Modality | str] | str | None = None,
    seed: int = 0,
    grid_cell: str = "image",
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate ``targets`` (default: every modality not given) from the ``inputs`` files; returns the
    provenance it also writes to ``<out_dir>/provenance.json``."""
    so = dict(storage_options or {})
    if not inputs:
        raise ImageInputError("give at least one input image (--dem, --s1rtc, --s2l1c, --s2l2a)")
    images = {Modality.parse(m): read_image(p, m, so) for m, p in inputs.items()}
    wanted = [m for m in ALL if m not in images] if not targets else list(parse_list(targets))
    clash = [m.name for m in wanted if m in images]
    if clash or not wanted:
        raise ImageInputError(f"--target {clash or '(none)'}: targets must be modalities not given as inputs")
    height, width, geo = _check_inputs(images)
    fs, root = _new_outputs(out_dir, wanted, so)
    copgen = get_copgen(model)
    k = sample_size(copgen)
    tiles, padded = tile_grid(height, width, k)
    seeds = [tile_seed(seed, grid_cell, t.label) for t in tiles]
    conditions = {m: cut(pad_to(img.pixels, *padded), tiles, k) for m, img in images.items()}
    generated = copgen.generate(conditions, wanted, seeds)

    outputs = {}
    for m in wanted:
        name, data = _encoded(m, stitch(generated[m], tiles, k, height, width, padded), geo, seed)
        fs.pipe_file(f"{root.rstrip('/')}/{name}", data)
        outputs[m.name] = join_url(out_dir, name)
    prov = {
        "inputs": _input_records(images, so),
        "targets": [m.name for m in wanted],
        "outputs": outputs,
        "size": [height, width],
        "sample_size": k,
        "tiles": [{"tile": t.label, "row": t.row, "col": t.col, "seed": s} for t, s in zip(tiles, seeds,
                                                                                          strict=True)],
        "padded_to": list(padded),
        "run_seed": int(seed),
        "grid_cell": grid_cell,
        "crs": f"EPSG:{geo.epsg}" if geo is not None and geo.epsg else None,
        "transform": list(geo.transform) if geo is not None else None,
        **_model_record(model, so),
        "package_version": package_version(),
        "licence_note": LICENCE_NOTE,
    }
    with fsspec.open(join_url(out_dir, "provenance.json"), "w", **so) as f:
        json.dump(prov, f, indent=1)
    return prov


def _new_outputs(out_dir: str, wanted: Sequence[Modality], so: Mapping[str, Any]):
    """``(fs, root)`` of the output folder, created; refused when it already holds any of our outputs
    (never overwrite earlier outputs, or someone else's files)."""
    fs, root = fsspec.core.url_to_fs(out_dir, **so)
    taken = [n for n in ("provenance.json", *(f"{m.name}.{e}" for m in wanted for e in ("tif", "png")))
             if fs.exists(f"{root.rstrip('/')}/{n}")]
    if taken:
        raise ImageInputError(f"{out_dir} already holds {taken}; choose a new --out")
    fs.makedirs(root, exist_ok=True)
    return fs, root


def _encoded(m: Modality, full: np.ndarray, geo: InputImage | None, seed: int) -> tuple[str, bytes]:
    """``(file name, bytes)`` of a generated image: a GeoTIFF on the inputs' grid, else a PNG (grey DEM)."""
    if geo is not None:
        from copgen.storage.stac import cog_bytes

        return f"{m.name}.tif", cog_bytes(full, m, geo.epsg or 0, geo.transform,
                                          {"copgen_origin": "generated", "copgen_seed": str(seed)})
    grey = m is Modality.DEM
    px = np.round(full.astype(np.float32).mean(axis=-1)).astype(np.uint8) if grey else full
    return f"{m.name}.png", encode_thumbnail(px, "png")


def _input_records(images: Mapping[Modality, InputImage], so) -> dict[str, Any]:
    return {m.name: {"path": img.path, "kind": img.kind, "epsg": img.epsg,
                     "sha256": sha256_of(img.path, so or None)} for m, img in images.items()}


def _model_record(model: ModelSpec, so) -> dict[str, Any]:
    return {"network": model.weights, "autoencoder": model.vae,
            "network_sha256": model.weights_sha256 or sha256_of(model.weights, so or None),
            "autoencoder_sha256": model.vae_sha256 or sha256_of(model.vae, so or None),
            "sampler": model.solver, "steps": model.steps, "dtype": model.dtype}

