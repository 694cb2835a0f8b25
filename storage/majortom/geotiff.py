"""Single-band GeoTIFF bytes, the cell format of Major TOM band columns (B04, vv, DEM, cloud_mask ...).

Written with tifffile plus the three GeoTIFF tags that matter (pixel scale, tie point, GeoKey directory
with the EPSG code) and GDAL's nodata tag, so rasterio/GDAL read CRS and transform from them.
Read with tifffile; LZW (the published compression) needs ``imagecodecs`` in tifffile, so without it the
pixels are decoded through Pillow's libtiff instead. Every failure raises ``GeoTiffError``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import tifffile
from copgen.errors import CopgenError

FOOTPRINT_M = 10_680.0  # Major TOM raster side: 10 km cell + 340 m padding each side (research §1.3)

_PIXEL_SCALE = 33550
_TIEPOINT = 33922
_GEOKEYS = 34735
_GDAL_NODATA = 42113


class GeoTiffError(CopgenError, ValueError):
    """The bytes are not a readable single-band GeoTIFF."""


@dataclass(frozen=True)
class GeoInfo:
    """Georeferencing read back from a band: EPSG code, upper-left corner (m), pixel size (m), nodata."""

    epsg: int | None
    origin: tuple[float, float] | None
    pixel_size: tuple[float, float] | None
    nodata: float | None


def encode_band(
    array: np.ndarray,
    *,
    epsg: int | None = None,
    origin: tuple[float, float] | None = None,
    pixel_size: float | None = None,
    nodata: float | None = None,
    compression: str | None = "zlib",
) -> bytes:
    """Encode a 2-D array as single-band GeoTIFF bytes.

    ``origin`` is the upper-left corner in the CRS's metres; ``pixel_size`` defaults to the Major TOM
    footprint divided by the raster side. ``compression``: ``"zlib"`` (deflate, always available),
    ``"lzw"`` (as published; needs imagecodecs) or ``None``.
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise GeoTiffError(f"a band must be 2-D, got shape {array.shape}")
    size = pixel_size if pixel_size is not None else FOOTPRINT_M / array.shape[1]
    tags: list[tuple[int, str, int, object, bool]] = [(_PIXEL_SCALE, "d", 3, (size, size, 0.0), True)]
    if origin is not None:
        tags.append((_TIEPOINT, "d", 6, (0.0, 0.0, 0.0, float(origin[0]), float(origin[1]), 0.0), True))
    if epsg is not None:
        geographic = 4000 <= epsg < 5000
        keys = [
            (1024, 0, 1, 2 if geographic else 1),  # GTModelType: 1 projected, 2 geographic
            (1025, 0, 1, 1),  # GTRasterType: PixelIsArea
            (2048 if geographic else 3072, 0, 1, int(epsg)),
        ]
        directory = [1, 1, 0, len(keys)] + [v for key in keys for v in key]
        tags.append((_GEOKEYS, "H", len(directory), tuple(directory), True))
    if nodata is not None:
        tags.append((_GDAL_NODATA, "s", 0, f"{nodata:g}", True))
    buffer = io.BytesIO()
    try:
        tifffile.imwrite(buffer, array, compression=compression, extratags=tags, photometric="minisblack")
    except Exception as exc:  # tifffile raises several types (ValueError, ImportError for codecs)
        raise GeoTiffError(f"cannot encode band of shape {array.shape} ({array.dtype}): {exc}") from exc
    return buffer.getvalue()


def decode_band(data: bytes) -> tuple[np.ndarray, GeoInfo]:
    """Decode single-band GeoTIFF bytes into ``(array, GeoInfo)``."""
    if not data:
        raise GeoTiffError("empty GeoTIFF bytes")
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            info = _geo_info(page.tags)
            try:
                array = page.asarray()
            except (ValueError, ImportError) as exc:
                if "imagecodecs" not in str(exc):
                    raise
                array = _decode_with_pillow(data)
    except GeoTiffError:
        raise
    except Exception as exc:
        raise GeoTiffError(f"not a readable GeoTIFF: {exc}") from exc
    if array.ndim != 2:
        raise GeoTiffError(f"expected a single-band raster, got shape {array.shape}")
    return array, info


def _decode_with_pillow(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.array(image)


def _geo_info(tags) -> GeoInfo:
    scale = tags.get(_PIXEL_SCALE)
    tie = tags.get(_TIEPOINT)
    keys = tags.get(_GEOKEYS)
    nodata = tags.get(_GDAL_NODATA)
    epsg = None
    if keys is not None:
        values = list(keys.value)
        for i in range(4, 4 + 4 * values[3], 4):
            if values[i] in (3072, 2048) and values[i + 1] == 0:
                epsg = int(values[i + 3])
    return GeoInfo(
        epsg=epsg,
        origin=(float(tie.value[3]), float(tie.value[4])) if tie is not None else None,
        pixel_size=(float(scale.value[0]), float(scale.value[1])) if scale is not None else None,
        nodata=float(str(nodata.value).strip("\x00 ")) if nodata is not None else None,
    )
