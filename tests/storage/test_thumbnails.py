"""Thumbnail encoders vs the official outputs, bytes codecs, the release's sample cut, real data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from copgen.modalities import Modality
from copgen.storage.majortom import grid
from copgen.storage.majortom import thumbnails as th
from copgen.storage.majortom.thumbnails import ThumbnailError
from PIL import Image
from tolerances import assert_uint8_close


@pytest.fixture(scope="module")
def ref(reference_dir: Path) -> dict[str, np.ndarray]:
    with np.load(reference_dir / "thumbnails_reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def sidecar(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "thumbnails_reference.json").read_text())


def _assert_matches(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """The reference README's rule: |diff| <= 1 on <= 0.1 % of values. Exact on the producing machine, but
    numpy's pow/log10/arctan2 dispatch by CPU level and can move a truncated code elsewhere."""
    assert_uint8_close(got, want, what)


def test_s2_matches_reference(ref, sidecar) -> None:
    assert "gain=1.3, gamma=0.6" in sidecar["calls"]["s2_thumb"]
    _assert_matches(th.s2_thumbnail(ref["s2_B04"], ref["s2_B03"], ref["s2_B02"]), ref["s2_thumb"])
    key = next(k for k in ref if k.startswith("s2_thumb_gain"))
    gain, gamma = (float(v) for v in key.removeprefix("s2_thumb_gain").split("_gamma"))
    _assert_matches(th.s2_thumbnail(ref["s2_B04"], ref["s2_B03"], ref["s2_B02"], gain, gamma), ref[key])


@pytest.mark.parametrize("case, nodata", [("s1a", -32768.0), ("s1b", 0.0)])
def test_s1_matches_reference_without_mutating(ref, sidecar, case: str, nodata: float) -> None:
    call = sidecar["calls"][f"{case}_thumb"]
    assert ("NODATA=0.0" in call) == (nodata == 0.0)
    vv, vh = ref[f"{case}_vv"].copy(), ref[f"{case}_vh"].copy()
    got = th.s1_thumbnail(vv, vh, nodata=nodata)
    _assert_matches(got, ref[f"{case}_thumb"])
    # exact: the inputs must be untouched (the original overwrites negatives in place)
    np.testing.assert_array_equal(vv, ref[f"{case}_vv"])
    np.testing.assert_array_equal(vh, ref[f"{case}_vh"])
    assert (vv < 0).any() or (vv == 0).any()  # the case does exercise the replacement


@pytest.mark.parametrize("case", ["a", "b"])
def test_dem_matches_reference(ref, sidecar, case: str) -> None:
    dem = ref[f"dem_{case}"].copy()
    _assert_matches(th.dem_thumbnail(dem), ref[f"dem_{case}_hillshade"])
    _assert_matches(th.dem_thumbnail(dem, mode="gray"), ref[f"dem_{case}_gray"])
    np.testing.assert_array_equal(dem, ref[f"dem_{case}"])  # exact: the input is untouched
    atol = float(sidecar["tolerance"]["hillshade_float"].split("=")[1])
    shade = th._hillshade(dem, 315, 45, 1)
    np.testing.assert_allclose(shade, ref[f"dem_{case}_hillshade_float"], rtol=0, atol=atol)


def test_dem_nodata_changes_the_whole_stretch(ref) -> None:
    """As the original: -32767 pixels are not masked (dem_a vs dem_b differ away from the nodata)."""
    a, b = ref["dem_a"], ref["dem_b"]
    far = np.ones(a.shape, bool)
    for r, c in zip(*np.nonzero(a != b), strict=True):
        far[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3] = False
    assert np.any(th.dem_thumbnail(a)[far] != th.dem_thumbnail(b)[far])


def test_encoder_errors() -> None:
    ok = np.full((4, 4), 100, np.uint16)
    with pytest.raises(ThumbnailError, match="differ in shape"):
        th.s2_thumbnail(ok, ok, np.zeros((4, 5), np.uint16))
    with pytest.raises(ThumbnailError, match=r"B03 has negative DN.*cell=7U_3R"):
        th.s2_thumbnail(ok, ok.astype(np.int16) - 200, ok, context={"cell": "7U_3R"})
    lin = np.linspace(0.01, 0.2, 16, dtype=np.float32).reshape(4, 4)
    with pytest.raises(ThumbnailError, match="vh is entirely nodata"):
        th.s1_thumbnail(lin, np.full((4, 4), -32768.0, np.float32))
    zeros = lin.copy()
    zeros[0, 0] = 0.0
    with pytest.raises(ThumbnailError, match="nodata=0.0"):
        th.s1_thumbnail(zeros, lin)
    with pytest.raises(ThumbnailError, match="vv is constant"):
        th.s1_thumbnail(np.full((4, 4), 0.1, np.float32), lin)
    with pytest.raises(ThumbnailError, match="mode"):
        th.dem_thumbnail(np.zeros((4, 4), np.float32), mode="relief")
    assert not th.dem_thumbnail(np.full((4, 4), 7.0), mode="gray").any()
    with pytest.raises(ThumbnailError, match="2-D"):
        th.dem_thumbnail(np.zeros((2, 4, 4)))


def test_s2_inversion_round_trips(ref) -> None:
    thumb = th.s2_thumbnail(ref["s2_B04"], ref["s2_B03"], ref["s2_B02"])
    refl, valid = th.s2_reflectance_from_thumbnail(thumb)
    assert refl.dtype == np.float64 and valid.shape == thumb.shape
    np.testing.assert_array_equal(valid, (thumb > 0) & (thumb < 255))  # from uint8 codes: exact
    assert (~valid).any() and valid.mean() > 0.5
    # re-encoding the inverted reflectance gives back exactly the valid values (exact on any machine: the
    # inversion returns each bin's centre, half a code from either truncation edge)
    again = th.s2_thumbnail(*(refl[..., i] * 10_000 for i in range(3)))
    np.testing.assert_array_equal(again[valid], thumb[valid])
    # and the original reflectance lies within the value's quantisation bin
    truth = np.stack([ref["s2_B04"], ref["s2_B03"], ref["s2_B02"]], -1) / 10_000
    lo = (thumb / (255 * 1.3)) ** (1 / 0.6)
    hi = ((thumb + 1.0) / (255 * 1.3)) ** (1 / 0.6)
    assert np.all((truth[valid] >= lo[valid] - 1e-12) & (truth[valid] < hi[valid] + 1e-12))
    assert np.all((refl[valid] > lo[valid]) & (refl[valid] < hi[valid]))
    with pytest.raises(ThumbnailError, match="uint8"):
        th.s2_reflectance_from_thumbnail(thumb.astype(np.float32))


# ------------------------------------------------------------------------------------------------ bytes


@pytest.mark.parametrize("fmt", ["png", "webp"])
@pytest.mark.parametrize("channels", [1, 3])
def test_lossless_bytes_round_trip(fmt: str, channels: int) -> None:
    rng = np.random.default_rng(channels)
    arr = rng.integers(0, 256, (37, 41) if channels == 1 else (37, 41, 3), dtype=np.uint8)
    data = th.encode_thumbnail(arr, format=fmt)
    assert th.sniff_format(data) == fmt
    back = th.decode_thumbnail(data)
    if fmt == "webp" and channels == 1:  # WebP has no grey mode: grey comes back as equal RGB channels
        back = back[..., 0]
    np.testing.assert_array_equal(back, arr)


def test_jpeg_bytes_round_trip() -> None:
    y, x = np.mgrid[0:64, 0:64]
    arr = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)
    data = th.encode_thumbnail(arr, format="jpg")
    assert data[:3] == b"\xff\xd8\xff" and th.sniff_format(data) == "jpeg"
    back = th.decode_thumbnail(data)
    assert back.shape == arr.shape and np.abs(back.astype(int) - arr).mean() < 3


def test_decode_converts_palette_and_alpha() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    assert th.decode_thumbnail(buf.getvalue()).shape == (8, 8, 3)
    buf = io.BytesIO()
    Image.fromarray(rgba[..., :3]).quantize(colors=2).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "P"
    np.testing.assert_array_equal(th.decode_thumbnail(buf.getvalue()), rgba[..., :3])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(buf, format="PNG")
    with pytest.raises(ThumbnailError, match="unsupported png pixel mode"):
        th.decode_thumbnail(buf.getvalue())


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"GIF89a......", "unknown image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt or truncated png"),
        (b"\xff\xd8\xff\xe0" + b"\x13" * 40, "corrupt or truncated jpeg"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x01" * 20, "corrupt or truncated webp"),
    ],
)
def test_decode_errors_name_the_context(data: bytes, message: str) -> None:
    ctx = {"dataset": "Core-S2L2A", "file": "images/part_00001.parquet", "cell": "454U_120R"}
    with pytest.raises(ThumbnailError, match=message) as info:
        th.decode_thumbnail(data, context=ctx)
    text = str(info.value)
    assert "Core-S2L2A" in text and "part_00001" in text and "454U_120R" in text
    assert info.value.context == ctx


def test_decode_truncated_real_bytes() -> None:
    data = th.encode_thumbnail(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ThumbnailError, match="corrupt or truncated png"):
        th.decode_thumbnail(data[: len(data) // 2], context="Core-S1RTC 1U_1R")
    with pytest.raises(ThumbnailError, match="bytes"):
        th.decode_thumbnail("not bytes")  # type: ignore[arg-type]


def test_encode_errors() -> None:
    with pytest.raises(ThumbnailError, match="uint8"):
        th.encode_thumbnail(np.zeros((4, 4), np.float32))
    with pytest.raises(ThumbnailError, match="shape"):
        th.encode_thumbnail(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ThumbnailError, match="format"):
        th.encode_thumbnail(np.zeros((4, 4), np.uint8), format="tiff")


# ---------------------------------------------------------------------------------------------- samples
#
# Samples are uint8 slices of uint8 thumbnails, or Pillow's fixed-point resizes of them compared with the
# same Pillow call in the same process: exact comparisons hold on any machine.


def _ramp(n: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(n)
    shape = (n, n) if channels == 1 else (n, n, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def test_release_patches_of_a_1068_thumbnail() -> None:
    t = _ramp(grid.RASTER_PX)
    s = th.to_samples(t, Modality.S2L2A, patch="all")
    assert s.shape == (grid.N_PATCHES, grid.PATCH_PX, grid.PATCH_PX, 3) and s.dtype == np.uint8
    crop = t[22 : 22 + grid.CROP_PX, 22 : 22 + grid.CROP_PX]  # torchvision CenterCrop(1024)
    tiles = crop.reshape(4, 256, 4, 256, 3).transpose(0, 2, 1, 3, 4).reshape(16, 256, 256, 3)
    np.testing.assert_array_equal(s, tiles)  # row-major, as unfold(1).unfold(2); uint8 slices: exact
    np.testing.assert_array_equal(th.to_samples(t, "S1RTC", patch=6)[0], tiles[6])
    centre = th.to_samples(t, "s2_l1c", patch="center")
    np.testing.assert_array_equal(centre[0], crop[384:640, 384:640])


def test_dem_is_resized_bilinear_and_replicated() -> None:
    dem = _ramp(th.DEM_PX, channels=1)
    s = th.to_samples(dem, "DEM", patch="all")
    assert s.shape == (16, 256, 256, 3)
    np.testing.assert_array_equal(s[..., 0], s[..., 2])
    # exact: the same Pillow resize in the same process (Pillow's 8-bit resampling is fixed point)
    big = np.asarray(Image.fromarray(dem).resize((1068, 1068), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(s[0, ..., 1], big[22:278, 22:278])
    # bilinear, not nearest: interior values are mixtures of neighbours
    nearest = np.asarray(Image.fromarray(dem).resize((1068, 1068), Image.Resampling.NEAREST))
    assert np.any(big != nearest)


def test_small_models_and_arbitrary_sizes() -> None:
    t = _ramp(grid.RASTER_PX)
    small = th.to_samples(t, "S2L2A", patch="all", sample_size=32)
    assert small.shape == (16, 32, 32, 3)
    full = th.to_samples(t, "S2L2A", patch=3)[0]
    np.testing.assert_array_equal(
        small[3], np.asarray(Image.fromarray(full).resize((32, 32), Image.BILINEAR))
    )
    # a synthetic world's 134 px thumbnail with 32 px samples: centred 128 crop at offset 3, no resize
    syn = _ramp(134)
    s = th.to_samples(syn, "S1RTC", patch="all", sample_size=32)
    np.testing.assert_array_equal(s[0], syn[3:35, 3:35])
    np.testing.assert_array_equal(s[15], syn[3 + 96 : 3 + 128, 3 + 96 : 3 + 128])
    np.testing.assert_array_equal(th.to_samples(syn, "S1RTC", "center", 32)[0], syn[51:83, 51:83])
    # an image that already is one sample comes back unchanged as "center"
    one = _ramp(40)
    np.testing.assert_array_equal(th.to_samples(one, "S2L1C", "center", 40)[0], one)


@pytest.mark.parametrize(
    "thumb, kwargs, message",
    [
        (np.zeros((100, 100, 3), np.uint8), {"patch": "all"}, "too small for 4x4 256 px"),
        (np.zeros((100, 100, 3), np.uint8), {"patch": "center"}, "too small for a 256 px"),
        (np.zeros((1068, 1000, 3), np.uint8), {}, "square"),
        (np.zeros((1068, 1068, 4), np.uint8), {}, "square"),
        (np.zeros((1068, 1068, 3), np.float32), {}, "uint8"),
        (np.zeros((1068, 1068, 3), np.uint8), {"patch": 16}, "patch must be"),
        (np.zeros((1068, 1068, 3), np.uint8), {"patch": "centre"}, "patch must be"),
        (np.zeros((1068, 1068, 3), np.uint8), {"sample_size": 0}, "sample_size"),
    ],
)
def test_to_samples_errors(thumb, kwargs, message) -> None:
    with pytest.raises(ThumbnailError, match=message):
        th.to_samples(thumb, "S2L2A", context="Core-S2L2A 1U_1R", **kwargs)


def test_thumbnail_for_each_modality(ref) -> None:
    s2 = {"B04": ref["s2_B04"], "b03": ref["s2_B03"], "B02": ref["s2_B02"], "B08": ref["s2_B02"]}
    for m in (Modality.S2L1C, Modality.S2L2A):
        _assert_matches(th.thumbnail_for(m, s2), ref["s2_thumb"], m.name)
    s1 = {"vv": ref["s1b_vv"], "vh": ref["s1b_vh"]}
    _assert_matches(th.thumbnail_for("S1RTC", s1, nodata=0.0), ref["s1b_thumb"], "S1RTC")
    _assert_matches(th.thumbnail_for(0, {"DEM": ref["dem_b"]}), ref["dem_b_hillshade"], "DEM")
    assert set(th.modality_encoder) == set(Modality)
    with pytest.raises(ThumbnailError, match=r"needs band 'B02'.*cell=5U_5R"):
        th.thumbnail_for("S2L2A", {"B04": ref["s2_B04"], "B03": ref["s2_B03"]}, context={"cell": "5U_5R"})


# -------------------------------------------------------------------------------------------- real data

_REAL_MODALITY = {
    "dem": Modality.DEM,
    "s1rtc": Modality.S1RTC,
    "s2l1c": Modality.S2L1C,
    "s2l2a": Modality.S2L2A,
}


@pytest.mark.parametrize("name", sorted(_REAL_MODALITY))
def test_real_webp_thumbnails(real_dir: Path, name: str) -> None:
    data = (real_dir / f"{name}.webp").read_bytes()
    assert th.sniff_format(data) == "webp"
    img = th.decode_thumbnail(data, context={"file": f"{name}.webp"})
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    samples = th.to_samples(img, _REAL_MODALITY[name], patch="center", sample_size=img.shape[0])
    assert samples.shape == (1, img.shape[0], img.shape[1], 3)
    np.testing.assert_array_equal(samples[0], img)  # already one model-size sample
    assert img.std() > 5  # real content, not a flat image
    spread = int(np.ptp(img.astype(np.int16), axis=-1).max())
    if name == "dem":  # a grey hillshade stored as RGB: lossy chroma only
        assert spread <= 3
    else:
        assert spread > 10
    # with 64 px samples the 256 px image is a 4x4 grid of them: "center" is its centred 64 px crop
    n = img.shape[0]
    small = th.to_samples(img, _REAL_MODALITY[name], patch="center", sample_size=n // 4)
    off = (n - n // 4) // 2
    np.testing.assert_array_equal(small[0], img[off : off + n // 4, off : off + n // 4])


def test_real_geotiffs_to_s2_thumbnails(real_dir: Path) -> None:
    import tifffile

    tifs = sorted(real_dir.glob("*.tif"))
    assert tifs
    for path in tifs:
        cube = tifffile.imread(path)  # (H, W, 12) int16, bands B01..B12 without B10
        assert cube.ndim == 3 and cube.shape[2] == 12 and cube.dtype == np.int16
        b04, b03, b02 = (cube[..., i - 1] for i in (4, 3, 2))  # 1-based band numbers
        thumb = th.thumbnail_for("S2L2A", {"B04": b04, "B03": b03, "B02": b02}, context={"file": path.name})
        assert thumb.shape == cube.shape[:2] + (3,) and thumb.dtype == np.uint8
        assert thumb.std() > 3, path.name
        refl, valid = th.s2_reflectance_from_thumbnail(thumb)
        truth = np.stack([b04, b03, b02], -1) / 10_000
        # inverse within one quantisation bin of the true reflectance on every uncensored pixel
        hi = ((thumb + 1.0) / (255 * 1.3)) ** (1 / 0.6)
        lo = (thumb / (255 * 1.3)) ** (1 / 0.6)
        assert valid.mean() > 0.9, path.name
        assert np.all(np.abs(refl - truth)[valid] <= (hi - lo)[valid]), path.name


def test_dem_scale_puts_a_small_world_dem_on_the_s2_footprint() -> None:
    # A 64 px DEM of a 192 px world: upsampled 3x, its 4x4 patches of 32 px cover what the S2 ones do.
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    patches = th.to_samples(ramp, Modality.DEM, "all", 32, dem_scale=3)
    s2 = np.tile(np.linspace(0, 255, 192).astype(np.uint8), (192, 1))
    s2_patches = th.to_samples(np.repeat(s2[..., None], 3, -1), Modality.S2L2A, "all", 32)
    assert patches.shape == s2_patches.shape == (16, 32, 32, 3)
    assert np.abs(patches[:, 16, 16, 0].astype(int) - s2_patches[:, 16, 16, 0]).max() <= 6
    # A published 1068 px DEM is never rescaled, whatever dem_scale says.
    big = np.zeros((1068, 1068), np.uint8)
    assert th.to_samples(big, Modality.DEM, 0, 256, dem_scale=3).shape == (1, 256, 256, 3)
