"""The physics of the synthetic Copernicus world: terrain, land cover, Sentinel-2 and Sentinel-1 signals.

Pure numpy, no I/O. Every field is a function of WORLD coordinates (metres in one UTM frame), so two
cells that overlap (published footprints overlap by 680 m) or touch see the same ground. Pixel grids are
axis-aligned in that frame, so every noise octave is evaluated separably (a cubic B-spline along x on the
lattice rows, then along y): a handful of full-image operations per octave instead of 16 gathers.

Units: elevations in metres, reflectance as a fraction (DN = 10000 * reflectance), radar in linear
gamma0 power. Angles in degrees at the interfaces, radians inside.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

_U64 = np.uint64


class LandCover(enum.IntEnum):
    """Land-cover classes of the synthetic world (the values are stored in ``Scene.land_cover``)."""

    WATER = 0
    SNOW = 1
    ROCK = 2
    FOREST = 3
    GRASSLAND = 4
    CROPLAND = 5
    URBAN = 6


# Sentinel-2 bands the world renders (10 m bands); DN = reflectance * 10000.
S2_BANDS = ("B02", "B03", "B04", "B08")

# Typical surface reflectance per class for (B02, B03, B04, B08): clear water is dark and darkest in NIR,
# vegetation has the red edge (low red, high NIR), snow is bright everywhere.
_CLASS_REFLECTANCE = np.array(
    [
        [0.045, 0.050, 0.030, 0.015],  # water
        [0.880, 0.870, 0.850, 0.760],  # snow
        [0.110, 0.125, 0.140, 0.210],  # rock
        [0.022, 0.042, 0.024, 0.290],  # forest
        [0.045, 0.080, 0.065, 0.300],  # grassland (overridden per parcel for cropland)
        [0.050, 0.085, 0.080, 0.300],  # cropland (mean; parcels below)
        [0.095, 0.105, 0.115, 0.180],  # urban
    ]
)

# Cropland parcel states: green crop, young crop, bare brown soil, yellow stubble, meadow, wet dark soil.
_CROP_REFLECTANCE = np.array(
    [
        [0.032, 0.066, 0.040, 0.400],
        [0.045, 0.074, 0.066, 0.290],
        [0.065, 0.090, 0.118, 0.210],
        [0.080, 0.112, 0.140, 0.250],
        [0.040, 0.074, 0.055, 0.330],
        [0.052, 0.072, 0.090, 0.180],
    ]
)

# Radar gamma0 per class (dB) for (VV, VH): calm water is a specular mirror (dark), forests scatter in
# volume (high VH relative to VV), buildings form corner reflectors (bright).
_CLASS_BACKSCATTER_DB = np.array(
    [
        [-21.0, -31.0],  # water
        [-12.5, -20.5],  # snow (dry)
        [-9.5, -17.5],  # rock
        [-7.5, -13.0],  # forest
        [-11.0, -18.5],  # grassland
        [-10.0, -17.5],  # cropland
        [-3.5, -11.0],  # urban
    ]
)

# Top-of-atmosphere model per band (B02, B03, B04, B08): path reflectance for an average aerosol load
# (Rayleigh + aerosol scattering, strongest in blue) and the two-way transmittance.
_PATH_REFLECTANCE = np.array([0.072, 0.058, 0.046, 0.025])
_TRANSMITTANCE = np.array([0.82, 0.87, 0.90, 0.94])
_CLOUD_REFLECTANCE = np.array([0.62, 0.62, 0.63, 0.66])
_RED_ROOF = (0.07, 0.08, 0.17, 0.20)
# how strongly the smooth texture modulates each class (water, snow, rock, forest, grass, crop, urban)
_TEXTURE_STRENGTH = np.array([0.1, 0.04, 0.15, 0.15, 0.12, 0.12, 0.1])
_STREET = (0.07, 0.075, 0.08, 0.12)
_ADJACENCY = 0.18  # fraction of the TOA surface signal coming from the ~1 km neighbourhood
_ADJACENCY_RADIUS_M = 600.0
_CLOUD_HEIGHT_M = 1800.0


# ------------------------------------------------------------------------------------------- noise


def _splitmix(h: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = h ^ (h >> _U64(30))
        h = h * _U64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> _U64(27))
        h = h * _U64(0x94D049BB133111EB)
        return h ^ (h >> _U64(31))


def stream_key(seed: int, name: str) -> int:
    """A 64-bit key for one named random stream of one world (stable across runs and platforms)."""
    h = np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=_U64)
    for ch in name.encode():
        with np.errstate(over="ignore"):
            h = _splitmix(h ^ _U64(ch) + _U64(0x9E3779B97F4A7C15))
    return int(h[0])


def _lattice(iy: np.ndarray, ix: np.ndarray, key: int) -> np.ndarray:
    """Uniform values in [-1, 1) at integer lattice points (hash of the coordinates and the key)."""
    with np.errstate(over="ignore"):
        h = iy.astype(np.int64).astype(_U64) * _U64(0x9E3779B97F4A7C15)
        h = h + ix.astype(np.int64).astype(_U64) * _U64(0xC2B2AE3D27D4EB4F)
        h = _splitmix(h ^ _U64(key))
    return (h >> _U64(11)).astype(np.float64) * (2.0 / 2**53) - 1.0


def _bspline_weights(t: np.ndarray) -> np.ndarray:
    """Uniform cubic B-spline weights for lattice offsets -1, 0, 1, 2 (C2: no creases in a hillshade)."""
    t2, t3 = t * t, t * t * t
    return np.stack(
        [(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6], axis=-1
    )


def value_noise(xs: np.ndarray, ys: np.ndarray, wavelength: float, key: int) -> np.ndarray:
    """Smooth noise (std ~0.3, range within [-1, 1]) on the grid ``ys x xs`` (metres), shape (ny, nx)."""
    offset = _lattice(np.array([1]), np.array([2]), key)[0] * 1000.0  # decorrelate octaves' lattices
    u = xs / wavelength + offset
    v = ys / wavelength - offset
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    wu, wv = _bspline_weights(u - iu), _bspline_weights(v - iv)
    lx = np.arange(iu.min() - 1, iu.max() + 3)
    ly = np.arange(iv.min() - 1, iv.max() + 3)
    lattice = _lattice(ly[:, None], lx[None, :], key)
    cols = iu[:, None] - lx[0] + np.arange(-1, 3)  # (nx, 4)
    along_x = np.einsum("lnk,nk->ln", lattice[:, cols], wu)  # (Ly, nx)
    rows = iv[:, None] - ly[0] + np.arange(-1, 3)  # (ny, 4)
    out = along_x[rows[:, 0]] * wv[:, 0, None]
    for k in range(1, 4):
        out += along_x[rows[:, k]] * wv[:, k, None]
    return out


def fbm(
    xs: np.ndarray,
    ys: np.ndarray,
    key: int,
    wavelength: float,
    octaves: int,
    pixel_m: float,
    gain: float = 0.5,
    lacunarity: float = 2.07,
) -> np.ndarray:
    """Fractional Brownian motion; octaves finer than 2 pixels are dropped (they would only alias)."""
    out = np.zeros((ys.size, xs.size))
    amp, lam = 1.0, wavelength
    for octave in range(octaves):
        if lam < 2.0 * pixel_m:
            break
        out += amp * value_noise(xs, ys, lam, key + octave * 7919)
        amp *= gain
        lam /= lacunarity
    return out


def ridged(
    xs: np.ndarray, ys: np.ndarray, key: int, wavelength: float, octaves: int, pixel_m: float
) -> np.ndarray:
    """Ridged multifractal in [0, ~1]: sharp crests where the noise crosses zero, rougher on the crests."""
    out = np.zeros((ys.size, xs.size))
    weight = np.ones_like(out)
    amp, lam, total = 1.0, wavelength, 0.0
    for octave in range(octaves):
        if lam < 2.0 * pixel_m:
            break
        v = value_noise(xs, ys, lam, key + octave * 104729) * 2.2
        # smooth |v|: crests are rounded a little, so zero contours do not print as razor-sharp arcs
        signal = (1.0 - np.sqrt(v * v + 0.012)).clip(0.0, 1.0) ** 2
        signal *= weight
        weight = (signal * 1.6).clip(0.0, 1.0)
        out += amp * signal
        total += amp
        amp *= 0.5
        lam /= 2.03
    return out / max(total, 1e-9)


def smoothstep(edge0: float | np.ndarray, edge1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Separable box mean over (2r+1)^2 pixels with edge replication (cumulative sums: O(n) per pass)."""
    if radius < 1:
        return a
    out = a
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis)
        n = out.shape[axis]
        hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        out = (hi - lo) / (2 * radius + 1)
    return out


# ----------------------------------------------------------------------------------------- terrain


@dataclass
class Terrain:
    """Elevation and the hydrology drawn into it, on one pixel grid."""

    elevation: np.ndarray  # metres
    river: np.ndarray  # bool: river channel
    lake: np.ndarray  # bool: lake surface (elevation is flat there)
    pixel_m: float


LAKE_LEVEL_M = 215.0


def terrain(xs: np.ndarray, ys: np.ndarray, seed: int, pixel_m: float) -> Terrain:
    """Elevation at pixel centres ``ys x xs`` (metres): lowland hills, ridged mountain ranges in some
    regions, meandering rivers in carved valleys, lakes in basins below ``LAKE_LEVEL_M``."""
    k = lambda name: stream_key(seed, name)  # noqa: E731
    region = fbm(xs, ys, k("region"), 48_000.0, 2, pixel_m)
    mountains = smoothstep(-0.08, 0.22, region)
    hills = fbm(xs, ys, k("hills"), 22_000.0, 4, pixel_m)
    crests = ridged(xs, ys, k("ridges"), 5000.0, 9, pixel_m)
    detail = fbm(xs, ys, k("detail"), 900.0, 5, pixel_m)

    # Rivers follow the zero set of a smooth field; |f| / |grad f| approximates the distance to it.
    flow = fbm(xs, ys, k("rivers"), 26_000.0, 2, pixel_m)
    flow += 0.12 * fbm(xs, ys, k("meander"), 5000.0, 2, pixel_m)
    gy, gx = np.gradient(flow, pixel_m)
    dist = np.abs(flow) / (np.hypot(gx, gy) + 1e-12)
    floor = 300.0 + 260.0 * hills
    relief = mountains * 3500.0 * crests**1.25  # lowland stays smooth: no sharp crests there
    valley = np.exp(-((dist / (1200.0 + 1800.0 * mountains)) ** 2))
    elevation = floor + relief * (1.0 - 0.9 * valley) + detail * (1.5 + 90.0 * mountains**2)

    width = 25.0 + 40.0 * (1.0 + fbm(xs, ys, k("width"), 8000.0, 1, pixel_m))
    river = dist < np.maximum(width / 2, 0.6 * pixel_m)  # never thinner than a pixel: no broken lines
    elevation -= 2.5 * np.exp(-((dist / (2.0 * width)) ** 2))  # the channel is cut into the floor

    lake = elevation < LAKE_LEVEL_M
    elevation = np.where(lake, LAKE_LEVEL_M, elevation)
    return Terrain(elevation=elevation, river=river & ~lake, lake=lake, pixel_m=pixel_m)


def slope_aspect(elevation: np.ndarray, pixel_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Slope (radians) and aspect = azimuth of the DOWNSLOPE direction (radians, clockwise from north).

    Rows run south (north-up raster), so d/dnorth = -d/drow."""
    d_row, d_col = np.gradient(elevation, pixel_m)
    dz_east, dz_north = d_col, -d_row
    slope = np.arctan(np.hypot(dz_east, dz_north))
    aspect = np.arctan2(-dz_east, -dz_north)
    return slope, aspect


# -------------------------------------------------------------------------------------- land cover


def land_cover(
    xs: np.ndarray, ys: np.ndarray, seed: int, ter: Terrain, slope: np.ndarray, aspect: np.ndarray
) -> np.ndarray:
    """Classify each pixel from terrain: water in lakes/rivers, snow above a slope- and aspect-dependent
    line, rock on steep slopes and above the tree line, forest on mid slopes, cropland on flat lowland,
    grassland elsewhere, a few settlements on flat lowland."""
    k = lambda name: stream_key(seed, name)  # noqa: E731
    p = ter.pixel_m
    z = ter.elevation
    slope_deg = np.degrees(slope)
    patch = fbm(xs, ys, k("lc-patch"), 2500.0, 4, p)
    north_facing = np.cos(aspect) * np.sin(slope)  # > 0 where the slope faces north (shaded, colder)

    snowline = 2350.0 + 350.0 * fbm(xs, ys, k("snowline"), 6000.0, 2, p) - 250.0 * north_facing
    treeline = 1850.0 + 250.0 * patch
    lc = np.full(z.shape, LandCover.GRASSLAND, dtype=np.uint8)

    flat_low = (slope_deg < 4.5 + 2.0 * patch) & (z < 650.0)
    lc[flat_low] = LandCover.CROPLAND
    forest = (z < treeline) & (patch + 0.45 * smoothstep(4.0, 16.0, slope_deg) > 0.3) & (slope_deg < 42.0)
    lc[forest] = LandCover.FOREST
    town = fbm(xs, ys, k("towns"), 7000.0, 3, p) + 0.08 * patch
    urban = (town > 0.56) & (slope_deg < 7.0) & (z < 800.0)
    lc[urban] = LandCover.URBAN
    rock = (slope_deg > 36.0 + 6.0 * patch) | ((z > treeline + 250.0 + 300.0 * patch) & (slope_deg > 18.0))
    lc[rock] = LandCover.ROCK
    snow = (z > snowline) & (slope_deg < 48.0)
    lc[snow] = LandCover.SNOW
    lc[ter.lake | ter.river] = LandCover.WATER
    return lc


def _parcels(xs: np.ndarray, ys: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
    """Rectangular field parcels: 1.6 km blocks, each cut into strips (180-700 m, east-west or
    north-south by block) and the strips into fields 80-400 m long.

    Returns (per-pixel parcel hash in [0, 2**31); distance to the parcel boundary in metres)."""
    block_m = 1600.0
    bx = np.floor(xs / block_m).astype(np.int64)[None, :]
    by = np.floor(ys / block_m).astype(np.int64)[:, None]
    vertical = _lattice(by, bx, key) > 0.0  # strips run north-south in half of the blocks
    strip_h = 180.0 + 520.0 * (_lattice(by, bx, key + 1) * 0.5 + 0.5)
    along = np.where(vertical, xs[None, :], ys[:, None])  # across the strips
    other = np.where(vertical, ys[:, None], xs[None, :])  # along the strips
    sv = along / strip_h
    strip = np.floor(sv)
    width = 80.0 + 320.0 * (_lattice(strip.astype(np.int64), bx + 7 * by, key + 2) * 0.5 + 0.5)
    fv = other / width + strip * 0.37
    field = np.floor(fv)
    parcel = _lattice(strip.astype(np.int64) * 7919 + by, field.astype(np.int64) * 31 + bx, key + 3)
    parcel = ((parcel + 1.0) * 2**30).astype(np.uint64)
    d_strip = np.minimum(sv - strip, strip + 1 - sv) * strip_h
    d_field = np.minimum(fv - field, field + 1 - fv) * width
    return parcel, np.minimum(d_strip, d_field)


# ----------------------------------------------------------------------------------- Sentinel-2


@dataclass
class Sun:
    zenith_deg: float
    azimuth_deg: float  # clockwise from north


def sun_position(lat_deg: float, day_of_year: int, solar_hour: float = 10.5) -> Sun:
    """Solar zenith/azimuth at local solar time (Sentinel-2 crosses the equator at ~10:30)."""
    decl = math.radians(23.44) * math.sin(2 * math.pi * (day_of_year - 81) / 365.0)
    phi = math.radians(lat_deg)
    h = math.radians(15.0 * (solar_hour - 12.0))
    cos_z = math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(h)
    cos_z = min(max(cos_z, 0.1), 1.0)  # keep the sun above ~84 deg zenith
    zen = math.acos(cos_z)
    az = math.atan2(math.sin(h), math.cos(h) * math.sin(phi) - math.tan(decl) * math.cos(phi)) + math.pi
    return Sun(math.degrees(zen), math.degrees(az) % 360.0)


def illumination(
    slope: np.ndarray, aspect: np.ndarray, sun: Sun, shadow: np.ndarray | None = None
) -> np.ndarray:
    """Lambertian terrain illumination relative to flat ground: direct (cosine of the local incidence
    angle over cos(sun zenith), none where ``shadow`` is true) plus a diffuse sky term weighted by the
    visible sky."""
    sz, sa = math.radians(sun.zenith_deg), math.radians(sun.azimuth_deg)
    # aspect is the downslope azimuth; a slope faces the sun when its downslope points at the sun
    cos_i = math.cos(sz) * np.cos(slope) + math.sin(sz) * np.sin(slope) * np.cos(aspect - sa)
    direct = np.clip(cos_i, 0.0, None) / math.cos(sz)
    if shadow is not None:
        direct = np.where(shadow, 0.0, direct)
    sky = (1.0 + np.cos(slope)) / 2.0
    return 0.82 * direct + 0.18 * sky


SHADOW_REACH_M = 2500.0  # longest cast shadow modelled (a 2 km ridge at a 50 deg sun zenith casts ~2.4 km)


def cast_shadow(
    elevation: np.ndarray, pixel_m: float, sun: Sun, reach_m: float = SHADOW_REACH_M
) -> np.ndarray:
    """Pixels in the shadow of terrain between them and the sun (bool): march towards the sun one pixel
    at a time and compare the terrain with the sun ray's height above the pixel. Pixels within
    ``reach_m`` of the array's edge see no terrain beyond it: give the array that margin."""
    rows, cols = np.indices(elevation.shape)
    sa = math.radians(sun.azimuth_deg)
    rise = pixel_m / math.tan(math.radians(max(sun.zenith_deg, 1.0)))  # ray height gained per pixel
    d_row, d_col = -math.cos(sa), math.sin(sa)  # north-up raster: north is row - 1
    top_r, top_c = elevation.shape[0] - 1, elevation.shape[1] - 1
    shadow = np.zeros(elevation.shape, dtype=bool)
    for step in range(1, int(reach_m / pixel_m) + 1):
        r = np.clip(np.rint(rows + step * d_row), 0, top_r).astype(np.intp)
        c = np.clip(np.rint(cols + step * d_col), 0, top_c).astype(np.intp)
        shadow |= elevation[r, c] > elevation + step * rise
    return shadow


# ----------------------------------------------------------------------------------- Sentinel-1


class Upsampler:
    """Bilinear resampling from the coarse (terrain) grid to the full grid of the same footprint."""

    def __init__(self, n_coarse: int, n_full: int) -> None:
        # both grids cover the same square: pixel centres at (i + 0.5) / n of the extent
        pos = np.clip((np.arange(n_full) + 0.5) / n_full * n_coarse - 0.5, 0.0, n_coarse - 1.0)
        self.n_coarse = n_coarse
        self.pos = pos
        self.i0 = np.minimum(np.floor(pos).astype(np.intp), max(n_coarse - 2, 0))
        self.i1 = np.minimum(self.i0 + 1, n_coarse - 1)
        self.w = (pos - self.i0).astype(np.float32)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        """(..., nc, nc) -> (..., n, n) float32 (PIL's bilinear: same pixel-centre convention, ~2x faster
        than numpy gathers)."""
        a = np.asarray(a, dtype=np.float32)
        n = self.pos.size
        if a.ndim > 2:
            return np.stack([self(plane) for plane in a.reshape(-1, *a.shape[-2:])]).reshape(
                *a.shape[:-2], n, n
            )
        return np.asarray(Image.fromarray(a).resize((n, n), Image.Resampling.BILINEAR))

    def labels(self, labels: np.ndarray, jitter: np.ndarray) -> np.ndarray:
        """Nearest-neighbour class map with a smooth sub-pixel jitter (coarse px), so class boundaries
        come out organic at full resolution instead of as coarse staircases."""
        top = self.n_coarse - 1
        rows = np.clip(np.rint(self.pos[:, None] + jitter), 0, top).astype(np.intp)
        cols = np.clip(np.rint(self.pos[None, :] + jitter.T), 0, top).astype(np.intp)
        return labels[rows, cols]


@dataclass(frozen=True)
class RadarGeometry:
    look_azimuth_deg: float  # ground-range direction, pointing AWAY from the sensor
    incidence_deg: float = 39.0
    looks_10m: float = 4.4  # equivalent number of looks of one 10 m RTC pixel


@dataclass(frozen=True)
class SceneSpec:
    """Everything one cell's scene depends on (all deterministic inputs)."""

    xmin: float  # footprint's west edge, world metres
    ymax: float  # footprint's north edge
    extent_m: float  # footprint side (published: 10680 m)
    size: int  # optical / radar pixels per side
    coarse_size: int  # terrain (DEM) pixels per side
    world_seed: int  # the ground: terrain, land cover, fields (shared by all cells)
    scene_key: int  # this cell's acquisitions: clouds, haze, speckle
    sun: Sun
    cloud_fraction: float  # 0 = clear sky
    aerosol: float  # path-radiance multiplier (1 = average)
    radar: RadarGeometry
    want_s2: bool = True
    want_s1: bool = True


@dataclass
class Scene:
    """One cell rendered: terrain on the coarse grid, everything else on the full grid."""

    elevation: np.ndarray  # (coarse, coarse) float32 metres = the DEM band
    land_cover: np.ndarray  # (size, size) uint8 LandCover
    l2a: np.ndarray | None = None  # (4, size, size) uint16 DN of S2_BANDS, surface reflectance
    l1c: np.ndarray | None = None  # (4, size, size) uint16 DN, top of atmosphere
    cloud_mask: np.ndarray | None = None  # (size, size) uint8: 0 clear, 1 thick, 2 thin, 3 shadow
    cloud_cover: float = 0.0  # percent
    vv: np.ndarray | None = None  # (size, size) float32 linear gamma0
    vh: np.ndarray | None = None


def render_scene(spec: SceneSpec) -> Scene:
    """Render one cell. Terrain, slopes, illumination and every smooth field are computed on the coarse
    grid and resampled bilinearly; class maps, field parcels, buildings and speckle at full resolution."""
    n, nc = spec.size, spec.coarse_size
    p, pc = spec.extent_m / n, spec.extent_m / nc
    # terrain on the cell plus a margin: slopes at the edges and shadows cast from outside the cell come
    # out as in the neighbouring cells
    m = int(math.ceil(SHADOW_REACH_M / pc))
    xe = spec.xmin + (np.arange(-m, nc + m) + 0.5) * pc
    ye = spec.ymax - (np.arange(-m, nc + m) + 0.5) * pc
    ter_e = terrain(xe, ye, spec.world_seed, pc)
    slope_e, aspect_e = slope_aspect(ter_e.elevation, pc)
    inner = (slice(m, m + nc), slice(m, m + nc))
    xc, yc = xe[m : m + nc], ye[m : m + nc]
    ter = Terrain(ter_e.elevation[inner], ter_e.river[inner], ter_e.lake[inner], pc)
    slope, aspect = slope_e[inner], aspect_e[inner]
    shadow = cast_shadow(ter_e.elevation, pc, spec.sun)[inner] if spec.want_s2 else None
    lc_c = land_cover(xc, yc, spec.world_seed, ter, slope, aspect)
    up = Upsampler(nc, n)
    jitter = up(1.6 * value_noise(xc, yc, 2.5 * pc, stream_key(spec.world_seed, "lc-jitter")))
    lc = up.labels(lc_c, jitter)
    scene = Scene(elevation=ter.elevation.astype(np.float32), land_cover=lc)
    xs = spec.xmin + (np.arange(n) + 0.5) * p
    ys = spec.ymax - (np.arange(n) + 0.5) * p
    rng = np.random.default_rng(np.random.SeedSequence([spec.scene_key & 0xFFFFFFFF, spec.scene_key >> 32]))
    if spec.want_s2:
        _render_s2(spec, scene, xs, ys, xc, yc, ter, slope, aspect, shadow, lc_c, up, rng)
    if spec.want_s1:
        _render_s1(spec, scene, xc, yc, slope, aspect, lc_c, up, rng)
    return scene


def _render_s2(spec, scene, xs, ys, xc, yc, ter, slope, aspect, shadow, lc_c, up, rng) -> None:
    """S2 of one cell: per-pixel surface reflectance (classes, crop parcels, town blocks) times smooth
    shading and clouds is L2A; with haze, transmittance and adjacency it is L1C. The random draws keep
    their order (towns, then the per-pixel variation): a world is the same bytes for the same seed."""
    k = lambda name: stream_key(spec.world_seed, name)  # noqa: E731
    lc = scene.land_cover
    refl = np.stack([_CLASS_REFLECTANCE[:, b].astype(np.float32)[lc] for b in range(4)])
    _paint_cropland(refl, lc, xs, ys, spec.extent_m / spec.size, k("parcels"))
    _paint_towns(refl, lc, xs, ys, k("roofs"), rng)
    boa, coarse_refl = _shade(spec, scene, refl, xc, yc, slope, aspect, shadow, lc_c, up, rng, k("texture"))
    scene.l2a = to_dn(boa)
    scene.l1c = to_dn(_top_of_atmosphere(spec, boa, coarse_refl, xc, yc, up))


def _paint_cropland(refl: np.ndarray, lc: np.ndarray, xs, ys, pixel_m: float, key: int) -> None:
    """Field parcels on the cropland pixels of ``refl``: one crop state and brightness a parcel, grass
    margins along the parcel edges."""
    crop = lc == LandCover.CROPLAND
    if not crop.any():
        return
    parcel, edge_dist = _parcels(xs, ys, key)
    state = (parcel % _U64(len(_CROP_REFLECTANCE))).astype(np.intp)
    bright = 0.9 + 0.2 * ((parcel >> _U64(8)) % _U64(1000)).astype(np.float32) / 1000.0
    hedge = edge_dist < max(6.0, 0.5 * pixel_m)  # field margins: grass strips, hedges
    state[hedge] = len(_CROP_REFLECTANCE)  # one extra row: the grass of the margins
    table = np.vstack([_CROP_REFLECTANCE, _CLASS_REFLECTANCE[LandCover.GRASSLAND]]).astype(np.float32)
    for b in range(4):
        refl[b] = np.where(crop, table[:, b][state] * bright, refl[b])


def _paint_towns(refl: np.ndarray, lc: np.ndarray, xs, ys, key: int, rng: np.random.Generator) -> None:
    """10 m pixels of a town mix roofs (mostly grey, some red tiles), gardens and streets; each block
    has its own building density."""
    urban = lc == LandCover.URBAN
    if not urban.any():
        return
    n = lc.shape[0]
    bx, by = np.floor(xs / 90.0).astype(np.int64), np.floor(ys / 75.0).astype(np.int64)
    density = (_lattice(by[:, None], bx[None, :], key) * 0.25 + 0.65).astype(np.float32)
    pick = rng.random((n, n), dtype=np.float32)
    material = np.where(pick < density, np.where(pick < 0.18 * density, 1, 0), 2)  # grey, red, garden
    street = (np.abs(xs / 90.0 - np.round(xs / 90.0))[None, :] < 0.07) | (
        np.abs(ys / 75.0 - np.round(ys / 75.0))[:, None] < 0.08
    )
    material = np.where(street, 3, material)
    tone = 0.8 + 0.4 * rng.random((n, n), dtype=np.float32)
    table = np.array(
        [_CLASS_REFLECTANCE[LandCover.URBAN], _RED_ROOF, _CLASS_REFLECTANCE[LandCover.GRASSLAND], _STREET],
        dtype=np.float32,
    )
    for b in range(4):
        refl[b] = np.where(urban, table[:, b][material] * tone, refl[b])


def _shade(spec, scene, refl, xc, yc, slope, aspect, shadow, lc_c, up, rng, texture_key: int):
    """Bottom-of-atmosphere reflectance (4, n, n) and the coarse surface reflectance the adjacency effect
    sees. Smooth multiplicative factors are combined on the coarse grid, then resampled once: terrain
    illumination, world-continuous texture (class strength from the coarse map), cloud shadow and the
    cloud's own cover; sets the scene's cloud mask and cover."""
    n, pc = spec.size, spec.extent_m / spec.coarse_size
    lc = scene.land_cover
    illum_c = illumination(slope, aspect, spec.sun, shadow)
    strength_c = _TEXTURE_STRENGTH[lc_c]
    tex_c = fbm(xc, yc, texture_key, 450.0, 4, pc, gain=0.6)
    surface_c = illum_c * (1.0 + strength_c * tex_c)
    coarse_refl = np.moveaxis(_CLASS_REFLECTANCE[lc_c], -1, 0) * illum_c  # for the adjacency effect
    cloud = None
    if spec.cloud_fraction > 0:
        opacity_c, shadow_c = _clouds(xc, yc, spec.scene_key, spec.cloud_fraction, spec.sun, pc)
        surface_c = surface_c * (1.0 - 0.7 * shadow_c) * (1.0 - opacity_c)
        puff_c = (
            opacity_c * (1.0 + 0.12 * fbm(xc, yc, spec.scene_key + 5, 700.0, 4, pc)) * (0.6 + 0.4 * opacity_c)
        )
        cloud = up(puff_c)
        coarse_refl = coarse_refl * (1 - opacity_c) + _CLOUD_REFLECTANCE[:, None, None] * puff_c
        opacity, cloud_shadow = up(opacity_c), up(shadow_c)
        scene.cloud_mask = _cloud_mask(opacity, cloud_shadow)
        scene.cloud_cover = float((opacity > 0.5).mean() * 100.0)
    else:
        scene.cloud_mask = np.zeros((n, n), dtype=np.uint8)
    fine = rng.standard_normal((n, n), dtype=np.float32)  # per-pixel variation (not world-continuous)
    shade = up(surface_c) * (1.0 + 0.25 * _TEXTURE_STRENGTH.astype(np.float32)[lc] * fine)
    boa = refl * shade
    boa[:3] += np.where(lc == LandCover.WATER, np.float32(0.008), np.float32(0.0))  # suspended matter
    if cloud is not None:
        boa += _CLOUD_REFLECTANCE.astype(np.float32)[:, None, None] * cloud
    return boa, coarse_refl


def _top_of_atmosphere(spec, boa: np.ndarray, coarse_refl: np.ndarray, xc, yc, up) -> np.ndarray:
    """Top-of-atmosphere reflectance: patchy haze (path radiance, strongest in blue), transmittance, and
    the adjacency effect (light from the ~1 km surroundings), both smooth: one coarse additive plane a
    band."""
    pc = spec.extent_m / spec.coarse_size
    haze_c = spec.aerosol * (1.0 + 0.35 * fbm(xc, yc, spec.scene_key + 9, 30_000.0, 3, pc))
    radius = max(1, int(round(_ADJACENCY_RADIUS_M / pc)))
    additive_c = np.stack(
        [
            _PATH_REFLECTANCE[b] * haze_c + _TRANSMITTANCE[b] * _ADJACENCY * box_blur(coarse_refl[b], radius)
            for b in range(4)
        ]
    )
    direct = (_TRANSMITTANCE * (1.0 - _ADJACENCY)).astype(np.float32)[:, None, None]
    return boa * direct + up(additive_c)


def _clouds(xc, yc, key: int, fraction: float, sun: Sun, pc: float) -> tuple[np.ndarray, np.ndarray]:
    """Cumulus-like cloud opacity covering ~``fraction`` of the cell, and its shadow, displaced away
    from the sun by cloud height * tan(sun zenith)."""
    field = fbm(xc, yc, key, 5000.0, 7, pc, gain=0.55)
    threshold = np.quantile(field, 1.0 - fraction)
    opacity = smoothstep(threshold - 0.04, threshold + 0.18, field)
    shift_m = _CLOUD_HEIGHT_M * math.tan(math.radians(sun.zenith_deg))
    az = math.radians(sun.azimuth_deg)
    dcol = int(round(-shift_m * math.sin(az) / pc))  # shadows fall away from the sun
    drow = int(round(shift_m * math.cos(az) / pc))  # rows grow southwards
    shadow = _shift(opacity, drow, dcol) * (1.0 - opacity)
    return opacity, shadow


def _shift(a: np.ndarray, drow: int, dcol: int) -> np.ndarray:
    out = np.zeros_like(a)
    ny, nx = a.shape
    if abs(drow) >= ny or abs(dcol) >= nx:
        return out
    src = a[max(0, -drow) : ny - max(0, drow), max(0, -dcol) : nx - max(0, dcol)]
    out[max(0, drow) : max(0, drow) + src.shape[0], max(0, dcol) : max(0, dcol) + src.shape[1]] = src
    return out


def _cloud_mask(opacity: np.ndarray, shadow: np.ndarray) -> np.ndarray:
    """SEnSeI-style mask as Major TOM stores it: 0 clear, 1 thick cloud, 2 thin cloud, 3 shadow."""
    mask = np.zeros(opacity.shape, dtype=np.uint8)
    mask[shadow > 0.35] = 3
    mask[(opacity > 0.2) & (opacity <= 0.6)] = 2
    mask[opacity > 0.6] = 1
    return mask


def to_dn(reflectance: np.ndarray) -> np.ndarray:
    """Reflectance -> Sentinel-2 DN (uint16, 10000 per unit, no +1000 offset: baselines before N0400)."""
    return np.clip(np.rint(reflectance * 10000.0), 1, 65535).astype(np.uint16)


def _render_s1(spec, scene, xc, yc, slope, aspect, lc_c, up, rng) -> None:
    """Gamma0 VV/VH (linear power) with terrain modulation and multiplicative speckle.

    Slopes facing the sensor return more (smaller local incidence; foreshortening the RTC area
    normalisation does not fully undo), slopes facing away return less, down to radar shadow (the noise
    floor) where the local incidence passes 90 deg."""
    n, pc = spec.size, spec.extent_m / spec.coarse_size
    lc = scene.land_cover
    key = spec.scene_key
    geom = spec.radar
    var = 2.0 * fbm(xc, yc, stream_key(spec.world_seed, "s1-var"), 900.0, 4, pc)
    wind = 5.0 * fbm(xc, yc, key + 2, 4000.0, 3, pc)  # wind roughens open water: brighter, patchy
    water_c = lc_c == LandCover.WATER
    theta, look = math.radians(geom.incidence_deg), math.radians(geom.look_azimuth_deg)
    cos_local = np.cos(slope) * math.cos(theta) - np.sin(slope) * math.sin(theta) * np.cos(aspect - look)
    gain = (np.clip(cos_local, 0.0, None) / math.cos(theta)) ** 1.6
    factors = up(
        np.stack(
            [
                gain * 10 ** (np.where(water_c, wind, var) / 10),
                gain * 10 ** (np.where(water_c, 0.6 * wind, var) / 10),
            ]
        )
    )
    looks = geom.looks_10m * (spec.extent_m / n / 10.0) ** 2  # a coarser pixel averages more looks
    # the same strong scatterers shine in both polarisations
    urban_hot = (lc == LandCover.URBAN) & (rng.random((n, n), dtype=np.float32) < 0.04)
    point = rng.random((n, n), dtype=np.float32) < 1e-4  # pylons, isolated buildings: corner reflectors
    out = []
    for pol in range(2):
        power = (10 ** (_CLASS_BACKSCATTER_DB[:, pol] / 10)).astype(np.float32)[lc] * factors[pol]
        power = np.where(urban_hot, power * np.float32(8.0 if pol == 0 else 3.0), power)
        power = np.where(point, np.float32(10 ** (1.5 - pol)), power)
        power += np.float32(_NOISE_FLOOR[pol])
        out.append(power * _gamma_speckle(rng, looks, (n, n)))
    scene.vv, scene.vh = out


_NOISE_FLOOR = (10 ** (-3.0), 10 ** (-3.2))  # thermal noise, NESZ ~ -30 / -32 dB


def _gamma_speckle(rng: np.random.Generator, looks: float, shape: tuple[int, int]) -> np.ndarray:
    """Unit-mean Gamma(L, 1/L) speckle via the Wilson-Hilferty cube of a normal (5x faster than
    ``rng.gamma`` and within a few % of its quantiles for L >= 1)."""
    z = rng.standard_normal(shape, dtype=np.float32)
    c = 1.0 / (9.0 * looks)
    g = (1.0 - c + z * np.float32(math.sqrt(c))) ** 3
    return np.maximum(g, np.float32(0.03)).astype(np.float32)
