"""Major TOM Core thumbnails: the published encoders, their bytes, and the release's cut into model samples.

Encoders reproduce ``MajorTOM/extras/thumbnail_{s2,s1rtc,dem}.py`` bit for bit (checked against
``shared/reference/thumbnails_reference.npz``), with one deliberate difference: the S1 encoder never
modifies its inputs (the official one overwrites negative values in place).

Sample layout (COP-GEN-Beta ``prepare_dataset_images.py``): the 1068 px thumbnail is centre-cropped to
1024 (torchvision ``CenterCrop``, offset 22) and cut row-major into 4x4 patches of 256 (patch 0..15), or
the single centred 256 crop (``"center"``). DEM thumbnails (356 px) first go through torchvision
``transforms.Resize(1068)`` on the PIL image, i.e. PIL BILINEAR upsampling, reproduced here with PIL.
Grey images are replicated to 3 channels. The release's random horizontal flip (``NMajorTOM``) is a
training augmentation and is not applied.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from copgen.errors import CopgenError
from copgen.modalities import Modality
from copgen.storage.majortom.grid import N_PATCHES, PATCH_GRID, PATCH_PX, RASTER_PX, patch_window
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ThumbnailError",
    "THUMBNAIL_PX",
    "THUMBNAIL_CHANNELS",
    "s2_thumbnail",
    "s1_thumbnail",
    "dem_thumbnail",
    "s2_reflectance_from_thumbnail",
    "sniff_format",
    "decode_thumbnail",
    "encode_thumbnail",
    "to_samples",
    "sample_window",
    "modality_encoder",
    "thumbnail_for",
]

DEM_PX = 356  # 30 m DEM thumbnails
THUMBNAIL_PX: dict[Modality, int] = {
    Modality.DEM: DEM_PX,
    Modality.S1RTC: RASTER_PX,
    Modality.S2L1C: RASTER_PX,
    Modality.S2L2A: RASTER_PX,
}
THUMBNAIL_CHANNELS: dict[Modality, int] = {
    Modality.DEM: 1,
    Modality.S1RTC: 3,
    Modality.S2L1C: 3,
    Modality.S2L2A: 3,
}
MAX_PIXELS = 64_000_000  # refuse decompression bombs long before PIL's own warning threshold


class ThumbnailError(CopgenError, ValueError):
    """Bad thumbnail bytes or arrays; the message names the dataset/file/cell given as ``context``."""

    def __init__(self, message: str, context: str | Mapping[str, Any] | None = None) -> None:
        self.context = context
        where = _context_text(context)
        super().__init__(f"{message} [{where}]" if where else message)


def _context_text(context: str | Mapping[str, Any] | None) -> str:
    if context is None:
        return ""
    if isinstance(context, Mapping):
        return ", ".join(f"{k}={v}" for k, v in context.items() if v is not None)
    return str(context)


# ----------------------------------------------------------------------------------------------- encoders


def _band(name: str, arr: Any, context) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ThumbnailError(f"band {name} must be 2-D (H, W), got shape {a.shape}", context)
    if a.dtype.kind not in "uif":
        raise ThumbnailError(f"band {name} must be numeric, got dtype {a.dtype}", context)
    return a


def s2_thumbnail(b04, b03, b02, gain: float = 1.3, gamma: float = 0.6, *, context=None) -> np.ndarray:
    """Sentinel-2 true colour: ``uint8(clip(gain * (DN/10000)**gamma, 0, 1) * 255)``, RGB = (B04, B03, B02).

    Float64 arithmetic and truncation to uint8, exactly as the official ``s2l2a_thumbnail`` (also used for
    L1C). DN are not harmonised (no -1000 offset correction), like the published thumbnails.
    Raises :class:`ThumbnailError` for shape mismatches and negative / non-finite DN (NaN in the original).
    """
    bands = [_band(n, b, context) for n, b in (("B04", b04), ("B03", b03), ("B02", b02))]
    if not bands[0].shape == bands[1].shape == bands[2].shape:
        raise ThumbnailError(f"S2 bands differ in shape: {[b.shape for b in bands]}", context)
    rgb = np.stack(bands, -1)
    if rgb.dtype.kind == "f" and not np.all(np.isfinite(rgb)):
        raise ThumbnailError("S2 bands contain NaN/inf", context)
    if rgb.dtype.kind != "u" and rgb.min() < 0:
        name = ("B04", "B03", "B02")[int(np.argmax([b.min() < 0 for b in bands]))]
        raise ThumbnailError(
            f"S2 band {name} has negative DN ({rgb.min()}); the stretch is undefined", context
        )
    thumb = gain * ((rgb / 10_000) ** gamma)
    return (thumb.clip(0, 1) * 255).astype(np.uint8)


def _db_stretch(name: str, band: np.ndarray, nodata: float, context) -> tuple[np.ndarray, np.ndarray]:
    """One S1 band -> (dB min-max stretched to 0..255 with nodata = 0, valid mask), in the band's dtype."""
    valid = band != nodata  # taken before any replacement, as the original
    non_negative = band >= 0
    if not valid.any():
        raise ThumbnailError(f"S1 band {name} is entirely nodata ({nodata})", context)
    if not non_negative.any():
        raise ThumbnailError(f"S1 band {name} has no non-negative value to replace negatives with", context)
    work = band.copy()  # the official function writes this replacement into the caller's array
    work[work < 0] = work[non_negative].min()
    with np.errstate(divide="ignore"):
        db = 10 * np.log10(work)
    lo, hi = db[valid].min(), db[valid].max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        # zeros / inf among the valid pixels make the official stretch NaN (undefined uint8 output)
        raise ThumbnailError(
            f"S1 band {name} has zero or non-finite valid values (log10 -> {lo}..{hi}); pass nodata=0.0 "
            "if zeros mark missing data",
            context,
        )
    if hi == lo:  # the original divides by zero here (NaN -> undefined uint8)
        raise ThumbnailError(
            f"S1 band {name} is constant over its valid pixels ({lo} dB): no stretch", context
        )
    db = (db - lo) / (hi - lo) * 255
    db[~valid] = 0
    return db, valid


def s1_thumbnail(
    vv, vh, nodata: float = -32768.0, *, vh_nodata: float | None = None, context=None
) -> np.ndarray:
    """Sentinel-1 RTC false colour from LINEAR power: R = VV dB, G = 255(VV+VH)/max(VV+VH), B = VH dB.

    As the official ``s1rtc_thumbnail``: nodata masks first; negatives (nodata included) replaced by the
    band's smallest non-negative value; 10*log10 in the input dtype; each band min-max stretched to 0..255
    over its valid pixels; nodata -> 0; uint8 by truncation. Unlike the original, ``vv``/``vh`` are NOT
    modified. ``vh_nodata`` defaults to ``nodata``.
    """
    vv_a, vh_a = _band("vv", vv, context), _band("vh", vh, context)
    if vv_a.shape != vh_a.shape:
        raise ThumbnailError(f"S1 bands differ in shape: vv {vv_a.shape}, vh {vh_a.shape}", context)
    vv_db, _ = _db_stretch("vv", vv_a, nodata, context)
    vh_db, _ = _db_stretch("vh", vh_a, nodata if vh_nodata is None else vh_nodata, context)
    both = vv_db + vh_db
    peak = np.max(both)
    if not peak > 0:
        raise ThumbnailError("S1 thumbnail undefined: VV+VH is 0 everywhere after the stretch", context)
    return np.stack([vv_db, 255 * both / peak, vh_db], -1).astype(np.uint8)


_AZIMUTH_DEG = 315.0
_ALTITUDE_DEG = 45.0


def _light_direction(azdeg: float, altdeg: float) -> np.ndarray:
    # matplotlib LightSource.direction: azimuth clockwise from north -> radians counter-clockwise from east
    az = np.radians(90 - azdeg)
    alt = np.radians(altdeg)
    return np.array([np.cos(az) * np.cos(alt), np.sin(az) * np.cos(alt), np.sin(alt)])


def _hillshade(dem: np.ndarray, azdeg: float, altdeg: float, vert_exag: float) -> np.ndarray:
    """matplotlib ``LightSource(azdeg, altdeg).hillshade(dem, vert_exag, dx=1, dy=1)``, same operations.

    Reimplemented (not imported) to keep matplotlib out of workers; every step keeps matplotlib's order
    and dtypes so the float64 result is identical.
    """
    e_dy, e_dx = np.gradient(vert_exag * dem, -1, 1)  # image rows run north -> south: dy is negative
    normal = np.empty(dem.shape + (3,))
    normal[..., 0] = -e_dx
    normal[..., 1] = -e_dy
    normal[..., 2] = 1
    sum_sq = 0
    for i in range(3):
        sum_sq = sum_sq + normal[..., i, np.newaxis] ** 2
    normal /= np.sqrt(sum_sq)
    intensity = normal.dot(_light_direction(azdeg, altdeg))
    imin, imax = intensity.min(), intensity.max()
    if (imax - imin) > 1e-6:
        intensity -= imin
        intensity /= imax - imin
    return np.clip(intensity, 0, 1)


def dem_thumbnail(dem, mode: str = "hillshade", *, context=None) -> np.ndarray:
    """DEM thumbnail (H, W) uint8: ``"hillshade"`` (published default) or ``"gray"`` (min-max).

    Hillshade: azimuth 315, altitude 45, vert_exag 1, pixel units (dx = dy = 1), min-max stretched, uint8
    by truncation. Like the original, nodata (-32767) is NOT masked: such pixels change the stretch of the
    whole image. ``"gray"`` of a constant DEM (NaN in the original) gives zeros.
    """
    d = _band("DEM", dem, context)
    if d.dtype.kind == "f" and not np.all(np.isfinite(d)):
        raise ThumbnailError("DEM contains NaN/inf", context)
    if min(d.shape) < 2:
        raise ThumbnailError(f"DEM must be at least 2x2 for gradients, got {d.shape}", context)
    if mode == "hillshade":
        return np.uint8(255 * _hillshade(d, _AZIMUTH_DEG, _ALTITUDE_DEG, 1))
    if mode == "gray":
        x = d - d.min()
        peak = x.max()
        if peak == 0:
            return np.zeros(d.shape, dtype=np.uint8)
        return np.uint8(x / peak * 255)
    raise ThumbnailError(f"unknown DEM thumbnail mode {mode!r}; use 'hillshade' or 'gray'", context)


def s2_reflectance_from_thumbnail(
    thumb, gain: float = 1.3, gamma: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """Invert the S2 stretch: uint8 thumbnail -> (reflectance = DN/10000 as float64, valid mask).

    Each value v came from the bin ``v <= 255*gain*r**gamma < v+1``; the bin's centre ``v + 0.5`` is
    inverted, so re-encoding the result gives back ``v`` exactly and the error is at most half a bin.
    0 and 255 are censored (below / above the stretch's range) and excluded from ``valid``.
    """
    t = np.asarray(thumb)
    if t.dtype != np.uint8:
        raise ThumbnailError(f"S2 thumbnail must be uint8, got {t.dtype}")
    reflectance = ((t.astype(np.float64) + 0.5) / (255.0 * gain)) ** (1.0 / gamma)
    valid = (t > 0) & (t < 255)
    return reflectance, valid


# ------------------------------------------------------------------------------------------------- bytes

_MAGIC: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("png", lambda b: b.startswith(b"\x89PNG\r\n\x1a\n")),
    ("jpeg", lambda b: b.startswith(b"\xff\xd8\xff")),
    ("webp", lambda b: len(b) >= 12 and b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
)
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def sniff_format(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"webp"`` from the magic bytes (names and metadata are not trusted)."""
    head = bytes(data[:16])
    for name, test in _MAGIC:
        if test(head):
            return name
    return None


def _jpeg_problem(data: bytes) -> str | None:
    """Structural check of a JPEG stream (markers, segment lengths, scan data, restart order): what libjpeg
    reports only as warnings ("extraneous bytes before marker", "premature end of data segment", corrupt
    restart markers). Bit errors inside entropy-coded data that still decode cannot be told (JPEG carries
    no checksum); README "Guarantees" says so."""
    n, i = len(data), 2
    if data[:2] != b"\xff\xd8":
        return "no start-of-image marker"
    while i < n:
        if data[i] != 0xFF:
            return f"extraneous bytes before a marker at byte {i}"
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker == 0xD9:  # end of image (bytes after it are ignored by every decoder)
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # markers without a length
        if i + 2 > n:
            break
        length = int.from_bytes(data[i:i + 2], "big")
        if length < 2 or i + length > n:
            return f"segment 0xFF{marker:02X} at byte {i - 2} has a bad length {length}"
        i += length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            expect = 0
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    return "premature end of data segment (truncated)"
                nxt = data[j + 1]
                if nxt in (0x00, 0xFF):
                    i = j + (2 if nxt == 0x00 else 1)
                elif 0xD0 <= nxt <= 0xD7:
                    if nxt - 0xD0 != expect:
                        return f"restart marker RST{nxt - 0xD0} out of order at byte {j} (corrupt data)"
                    expect, i = (expect + 1) % 8, j + 2
                else:
                    i = j
                    break
    return "premature end of data (no end-of-image marker: truncated)"


def decode_thumbnail(data: bytes, context: str | Mapping[str, Any] | None = None) -> np.ndarray:
    """Stored thumbnail bytes -> uint8 array: (H, W) for grey images, (H, W, 3) for colour.

    The format is sniffed from the magic bytes (PNG, JPEG, WebP). Palette/alpha/CMYK images are converted
    to RGB (grey+alpha to grey). Raises :class:`ThumbnailError` naming ``context`` (e.g.
    ``{"dataset": "Core-S2L2A", "file": ..., "cell": "454U_120R"}``) for empty, unknown, truncated or
    corrupt bytes, 16-bit images and absurd sizes.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ThumbnailError(f"thumbnail must be bytes, got {type(data).__name__}", context)
    data = bytes(data)
    if not data:
        raise ThumbnailError("thumbnail bytes are empty", context)
    fmt = sniff_format(data)
    if fmt is None:
        raise ThumbnailError(
            f"unknown image format (first bytes {data[:12]!r}); expected PNG, JPEG or WebP", context
        )
    problem = _jpeg_problem(data) if fmt == "jpeg" else None
    if problem:  # what libjpeg only warns about (Pillow does not surface it) is an error here
        raise ThumbnailError(f"corrupt or truncated jpeg bytes ({len(data)} B): {problem}", context)
    try:
        if fmt == "png":  # every chunk's CRC (a plain load checks the header chunks only)
            with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
                img.verify()
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ThumbnailError(f"{fmt} image of {img.width}x{img.height} px is too large", context)
            img.load()
            mode = img.mode
            if mode in ("L", "RGB"):
                out = img
            elif mode in ("LA", "1"):
                out = img.convert("L")
            elif mode in ("P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr"):
                out = img.convert("RGB")
            else:
                raise ThumbnailError(
                    f"unsupported {fmt} pixel mode {mode!r} (expected 8-bit grey or RGB)", context
                )
            arr = np.asarray(out, dtype=np.uint8).copy()
    except ThumbnailError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ThumbnailError(f"corrupt or truncated {fmt} bytes ({len(data)} B): {exc}", context) from exc
    return arr


def encode_thumbnail(arr, format: str = "png", quality: int | None = None) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> image bytes. ``format``: ``"png"`` (lossless), ``"jpeg"`` (quality
    default 95) or ``"webp"`` (lossless unless ``quality`` is given; WebP has no grey mode, so a grey
    image decodes back as 3 equal channels)."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise ThumbnailError(f"thumbnail must be uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or 0 in a.shape:
        raise ThumbnailError(f"thumbnail must be (H, W) or (H, W, 3), got shape {a.shape}")
    fmt = format.lower().replace("jpg", "jpeg")
    if fmt not in _PIL_FORMAT:
        raise ThumbnailError(f"unknown thumbnail format {format!r}; use png, jpeg or webp")
    kwargs: dict[str, Any] = {}
    if fmt == "jpeg":
        kwargs["quality"] = 95 if quality is None else quality
    elif fmt == "webp":
        kwargs["lossless"] = quality is None
        if quality is not None:
            kwargs["quality"] = quality
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format=_PIL_FORMAT[fmt], **kwargs)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- samples


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """PIL BILINEAR resize (what torchvision ``Resize`` does to PIL images) of a uint8 (H, W[, 3]) image."""
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))


def to_samples(
    thumb,
    modality: Modality | str | int,
    patch: str | int = "center",
    sample_size: int = PATCH_PX,
    *,
    context=None,
    dem_scale: int | None = None,
) -> np.ndarray:
    """Cut a thumbnail into model samples: uint8 (n, S, S, 3) with S = ``sample_size``.

    ``patch``: ``"center"`` (1 sample), an int 0..15 (1 sample) or ``"all"`` (16, row-major).

    Published sizes (the release path, exact): 1068 px (S1/S2, or a DEM already at 1068) -> centre crop
    1024 (offset 22) -> 4x4 patches of 256 / the centred 256 crop (offset 406); a 356 px DEM is first
    upsampled to 1068 with PIL BILINEAR (torchvision ``Resize(1068)`` on the PIL image).

    Any other square size N (e.g. a synthetic world's smaller thumbnails), with k = ``sample_size``: the
    grid is the centred crop C = the largest multiple of 4k that fits (C = 4k * (N // 4k)), offset
    ``round((N - C) / 2)`` like ``CenterCrop``, cut into 4x4 patches of side C/4 (= k unless N >= 8k);
    ``"center"`` is the centred crop of side C/4, or of side k when N < 4k (so an image that already is
    one k px sample gives itself back). This rule gives the published crop too (1068, k=256 -> C=1024).

    ``dem_scale``: for whole DEM thumbnails of a non-published size (a small world writes its DEM at a
    third of the S1/S2 size, as Major TOM does), upsample by this factor first; leave it None for images
    that already are model samples.

    Grey inputs are replicated to 3 channels. Patches whose side differs from ``sample_size`` (published
    256 px patches for a small model, or C/4 > k) are resized with PIL BILINEAR (antialiased shrinking).
    """
    m = Modality.parse(modality)
    t = _checked_thumbnail(thumb, m, context)
    if isinstance(sample_size, bool) or not isinstance(sample_size, int | np.integer) or sample_size < 1:
        raise ThumbnailError(f"sample_size must be a positive int, got {sample_size!r}", context)
    indices = _patch_indices(patch, context)
    n = t.shape[0]
    if m is Modality.DEM and (n == DEM_PX or (dem_scale and n != RASTER_PX)):
        # Major TOM's DEM thumbnail covers the cell's footprint at a third of the S1/S2 resolution (356 px
        # for the 1068 px raster): the release upsamples it to 1068 before cutting. ``dem_scale`` applies
        # the same rule to other sizes (a small world's DEM at N/3 px), for whole DEM thumbnails only.
        n = RASTER_PX if n == DEM_PX else int(dem_scale) * n
        t = _resize(t, n)
    windows = [_window(n, p, int(sample_size), m, context) for p in indices]
    if t.ndim == 2:
        t = np.repeat(t[..., None], 3, axis=-1)
    out = np.empty((len(windows), sample_size, sample_size, 3), dtype=np.uint8)
    for i, (col, row, side) in enumerate(windows):
        tile = t[row : row + side, col : col + side]
        out[i] = tile if side == sample_size else _resize(np.ascontiguousarray(tile), sample_size)
    return out


def _checked_thumbnail(thumb, m: Modality, context) -> np.ndarray:
    """``thumb`` as a square uint8 (N, N) or (N, N, 3) array (a single channel dropped to (N, N))."""
    t = np.asarray(thumb)
    if t.dtype != np.uint8:
        raise ThumbnailError(f"{m.name} thumbnail must be uint8, got {t.dtype}", context)
    if t.ndim == 3 and t.shape[2] == 1:
        t = t[..., 0]
    if not (t.ndim == 2 or (t.ndim == 3 and t.shape[2] == 3)) or t.shape[0] != t.shape[1]:
        raise ThumbnailError(f"{m.name} thumbnail must be square (N, N) or (N, N, 3), got {t.shape}", context)
    return t


def _patch_indices(patch, context) -> list[int | str]:
    """The patches that ``patch`` names: ``"all"`` (0..15), ``"center"`` or one patch index."""
    if patch == "all":
        return list(range(N_PATCHES))
    if patch == "center" or (
        isinstance(patch, int | np.integer) and not isinstance(patch, bool) and 0 <= patch < N_PATCHES
    ):
        return [patch if patch == "center" else int(patch)]
    raise ThumbnailError(f"patch must be 'center', 'all' or 0..{N_PATCHES - 1}, got {patch!r}", context)


def sample_window(n: int, patch: int | str, k: int = PATCH_PX, *, context=None) -> tuple[int, int, int]:
    """(col, row, side) in pixels of sample ``patch`` inside an ``n`` px (S1/S2-sized) thumbnail when
    cutting ``k`` px samples: the window :func:`to_samples` cuts (resized to ``k`` when ``side != k``)."""
    return _window(int(n), patch, int(k), Modality.S2L2A, context)


def _window(n: int, patch: int | str, k: int, m: Modality, context) -> tuple[int, int, int]:
    """(col, row, side) of a sample inside an n px thumbnail for samples of k px (see :func:`to_samples`)."""
    if n == RASTER_PX:
        return patch_window(patch)
    crop = PATCH_GRID * k * (n // (PATCH_GRID * k))
    if crop == 0:
        if patch == "center" and n >= k:
            off = (n - k) // 2
            return off, off, k
        raise ThumbnailError(
            f"{m.name} thumbnail of {n} px is too small for {'a' if patch == 'center' else '4x4'} "
            f"{k} px sample(s) (needs >= {k if patch == 'center' else PATCH_GRID * k} px)",
            context,
        )
    side = crop // PATCH_GRID
    if patch == "center":
        off = (n - side) // 2
        return off, off, side
    crop_off = int(round((n - crop) / 2.0))
    prow, pcol = divmod(int(patch), PATCH_GRID)
    return crop_off + pcol * side, crop_off + prow * side, side


def _pick(bands: Mapping[str, Any], name: str, modality: Modality, context) -> Any:
    if name in bands:
        return bands[name]
    lowered = {str(k).lower(): k for k in bands}
    if name.lower() in lowered:
        return bands[lowered[name.lower()]]
    raise ThumbnailError(
        f"{modality.name} thumbnail needs band {name!r}; got {sorted(map(str, bands))}", context
    )


def _s2_from_bands(m: Modality) -> Callable[..., np.ndarray]:
    def encode(bands: Mapping[str, Any], *, context=None, **kw) -> np.ndarray:
        return s2_thumbnail(
            *(_pick(bands, b, m, context) for b in ("B04", "B03", "B02")), context=context, **kw
        )

    return encode


def _s1_from_bands(bands: Mapping[str, Any], *, context=None, **kw) -> np.ndarray:
    m = Modality.S1RTC
    return s1_thumbnail(_pick(bands, "vv", m, context), _pick(bands, "vh", m, context), context=context, **kw)


def _dem_from_bands(bands: Mapping[str, Any], *, context=None, **kw) -> np.ndarray:
    return dem_thumbnail(_pick(bands, "DEM", Modality.DEM, context), context=context, **kw)


modality_encoder: dict[Modality, Callable[..., np.ndarray]] = {
    Modality.DEM: _dem_from_bands,
    Modality.S1RTC: _s1_from_bands,
    Modality.S2L1C: _s2_from_bands(Modality.S2L1C),
    Modality.S2L2A: _s2_from_bands(Modality.S2L2A),
}
"""Modality -> ``encode(bands: Mapping[str, array], *, context=None, **options) -> uint8 thumbnail``.

Band names are those of the Core parquet columns (matched case-insensitively): S2 ``B04, B03, B02``;
S1RTC ``vv, vh`` (linear power); DEM ``DEM``.
"""


def thumbnail_for(
    modality: Modality | str | int, bands: Mapping[str, Any], *, context=None, **options
) -> np.ndarray:
    """The published thumbnail of ``modality`` from its bands (see :data:`modality_encoder`)."""
    m = Modality.parse(modality)
    return modality_encoder[m](bands, context=context, **options)
