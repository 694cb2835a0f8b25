"""Single images as model inputs: PNG/JPEG/WebP thumbnails and GeoTIFFs (with their CRS), cut into model
tiles and stitched back.

Reading (``read_image``):

- PNG/JPEG/WebP: decoded as a Major TOM thumbnail would be (``thumbnails.decode_thumbnail``), grey -> RGB.
- GeoTIFF (rasterio): 3 uint8 bands = an RGB thumbnail, 1 uint8 band = grey; otherwise the raw bands of a
  modality, turned into its published thumbnail (``thumbnails.thumbnail_for``): S2 B04/B03/B02 (band
  descriptions when the file has them, else the Core band order: 12 bands = L2A without B10, as
  TerraMesh writes them; 13 = L1C), S1 ``vv``/``vh`` (2 bands, linear power), DEM heights (1 float band).
  The CRS and transform are kept for the outputs.

Tiling (``tile_grid``): the release's model sees ``k`` px samples of 10 m pixels (k = 256), so an image is
never resized: a ``k`` px image is one tile; a larger one is cut into k px tiles, the last row/column of
tiles aligned to the far edge (overlapping its neighbour; the overlap is taken from the later tile when
stitching); a smaller one is reflect-padded to k and the output cropped back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from copgen.errors import CopgenError
from copgen.modalities import Modality
from copgen.storage.majortom import thumbnails
from copgen.storage.majortom.layout import S2L1C_BANDS, S2L2A_BANDS

GEOTIFF_SUFFIXES = (".tif", ".tiff")


class ImageInputError(CopgenError, ValueError):
    """An input image that cannot be used; the message names the file and the field."""


@dataclass
class InputImage:
    """One modality's input: uint8 RGB pixels and, for a GeoTIFF, its georeferencing."""

    modality: Modality
    path: str
    pixels: np.ndarray  # uint8 (H, W, 3)
    epsg: int | None = None
    crs_wkt: str | None = None
    transform: tuple[float, ...] | None = None  # GDAL order
    kind: str = "thumbnail"  # thumbnail | rgb-geotiff | bands-geotiff


def read_image(path: str, modality: Modality | str, storage_options: Mapping[str, Any] | None = None
               ) -> InputImage:
    m = Modality.parse(modality)
    with fsspec.open(path, "rb", **dict(storage_options or {})) as f:
        data = f.read()
    if Path(str(path)).suffix.lower() in GEOTIFF_SUFFIXES or data[:4] in (b"II*\x00", b"MM\x00*"):
        return _read_geotiff(path, m, data)
    img = thumbnails.decode_thumbnail(data, context={"file": path, "modality": m.name})
    return InputImage(m, path, _rgb(img))


def _rgb(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a[..., :3]


def _read_geotiff(path: str, m: Modality, data: bytes) -> InputImage:
    from rasterio.errors import RasterioIOError
    from rasterio.io import MemoryFile

    try:
        with MemoryFile(data) as mem, mem.open() as ds:
            arr = ds.read()
            descriptions = [d or "" for d in ds.descriptions]
            crs = ds.crs
            epsg = crs.to_epsg() if crs is not None else None
            wkt = crs.to_wkt() if crs is not None else None
            transform = tuple(ds.transform.to_gdal()) if crs is not None else None
    except RasterioIOError as exc:
        raise ImageInputError(f"{path}: not a readable GeoTIFF ({exc})") from None
    count = arr.shape[0]
    ctx = {"file": path, "modality": m.name}
    if arr.dtype == np.uint8 and count in (1, 3):
        return InputImage(m, path, _rgb(np.moveaxis(arr, 0, -1)), epsg, wkt, transform, "rgb-geotiff")
    bands = _band_dict(path, m, arr, descriptions)
    try:
        thumb = thumbnails.thumbnail_for(m, bands, context=ctx)
    except thumbnails.ThumbnailError as exc:
        raise ImageInputError(f"{path}: cannot make the {m.name} thumbnail from its bands: {exc}") from None
    return InputImage(m, path, _rgb(thumb), epsg, wkt, transform, "bands-geotiff")


def _band_dict(path: str, m: Modality, arr: np.ndarray, descriptions: list[str]) -> dict[str, np.ndarray]:
    count = arr.shape[0]
    if all(descriptions):
        return {d: arr[i] for i, d in enumerate(descriptions)}
    if m is Modality.DEM and count == 1:
        return {"DEM": arr[0].astype(np.float32)}
    if m is Modality.S1RTC and count == 2:
        return {"vv": arr[0].astype(np.float32), "vh": arr[1].astype(np.float32)}
    if m in (Modality.S2L2A, Modality.S2L1C):
        for names in (S2L2A_BANDS, S2L1C_BANDS):
            if count == len(names):
                # DN as published; int16 files (TerraMesh) hold the same non-negative values
                return {n: arr[i].astype(np.uint16) for i, n in enumerate(names)}
    raise ImageInputError(
        f"{path}: {count} band(s) of {arr.dtype} without band descriptions: expected 3 uint8 (RGB), 1 uint8 "
        f"(grey) or the {m.name} bands (S2: 12/13 Core bands, S1: vv,vh, DEM: heights)")


@dataclass(frozen=True)
class Tile:
    """Where tile ``label`` sits: rows ``[row, row + k)``, columns ``[col, col + k)`` of the padded image."""

    label: str
    row: int
    col: int


def tile_grid(height: int, width: int, k: int) -> tuple[list[Tile], tuple[int, int]]:
    """Tiles covering an image (see the module docstring) and the padded size they cover."""
    ph, pw = max(height, k), max(width, k)
    rows = _starts(ph, k)
    cols = _starts(pw, k)
    if len(rows) == len(cols) == 1:
        return [Tile("center", 0, 0)], (ph, pw)
    return [Tile(f"r{i}c{j}", r, c) for i, r in enumerate(rows) for j, c in enumerate(cols)], (ph, pw)


def _starts(n: int, k: int) -> list[int]:
    starts = list(range(0, n - k + 1, k))
    if starts[-1] + k < n:
        starts.append(n - k)
    return starts


def pad_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reflect-pad (H, W, 3) at the bottom/right to at least (height, width)."""
    dh, dw = height - img.shape[0], width - img.shape[1]
    if dh <= 0 and dw <= 0:
        return img
    return np.pad(img, ((0, max(dh, 0)), (0, max(dw, 0)), (0, 0)), mode="reflect")


def cut(img: np.ndarray, tiles: list[Tile], k: int) -> np.ndarray:
    return np.stack([img[t.row:t.row + k, t.col:t.col + k] for t in tiles])


def stitch(tiles_px: np.ndarray, tiles: list[Tile], k: int, height: int, width: int,
           padded: tuple[int, int]) -> np.ndarray:
    """Tiles (n, k, k, 3) back into one (height, width, 3) image (later tiles win in overlaps)."""
    out = np.zeros((*padded, 3), dtype=np.uint8)
    for px, t in zip(tiles_px, tiles, strict=True):
        out[t.row:t.row + k, t.col:t.col + k] = px
    return out[:height, :width]
