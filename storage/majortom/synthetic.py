"""A procedural synthetic Copernicus world, written as the four Major TOM Core datasets.

It gives the demo, tests, benchmarks and the training of a small model an input that means something,
with no download. The world is deterministic from a seed: a rectangle of real Major TOM grid cells, each
with physically related modalities (physics in ``copgen.scene``):

- DEM: multi-octave terrain sampled in world coordinates (one UTM frame for the whole world), so
  neighbouring and overlapping cells agree; ridged mountain ranges (ridges ~5 km apart, Alpine slopes),
  carved river valleys, flat lakes.
- land cover from terrain: water, snow, rock, forest, grassland, cropland parcels, settlements.
- S2L2A: surface reflectance per class with texture and terrain illumination (sun from date and
  latitude; slopes in the shadow of the terrain between them and the sun keep only the sky light),
  DN = reflectance * 10000; clouds and their shadows with probability ``cloud_prob``. The shading is what
  ties the S2 image to the DEM hillshade.
- S2L1C: the same acquisition at the top of the atmosphere: path radiance (haze, strongest in blue),
  transmittance and adjacency blur.
- S1RTC: VV/VH gamma0 (linear power) per class, terrain modulation relative to the look direction of
  the pass (ascending looks east, descending west), multiplicative gamma speckle.

Thumbnails come from the published encoders (``thumbnails``) at the published sizes by default
(S2/S1 1068 px, DEM 356 px); ``thumbnail_size`` renders a smaller world (DEM = round(size / 3)).

Resolution choices (speed): terrain, slopes, illumination and every smooth field are computed on the DEM
grid (30 m at 1068 px; terrain with a 2.5 km margin so slopes at the edges and shadows cast from outside
the cell match the neighbours) and resampled bilinearly; land cover is upsampled with a smooth sub-pixel
jitter; parcels, buildings, per-pixel texture and speckle are drawn at full resolution. The DEM thumbnail of a
smaller world is the published hillshade of heights scaled by 30 m / pixel size, so that it looks like a
downscaled published one (the hillshade works in pixel units); at 1068 px the scale is exactly 1.
Speckle of a coarser pixel has proportionally more looks (it averages more 10 m pixels).

Metadata follow the published formats: timestamps ``YYYYMMDDTHHMMSS``; product ids carry the prefix
``SYNTH_`` before the published format: S2
``S2A_MSIL2A_<sensing>_N0214_R<orbit>_T<MGRS tile>_<generation>`` (L1C: ``MSIL1C``, ``N0209``); baselines
before N0400 so DN carry no +1000 offset; S1 ids ``S1A_IW_GRDH_1SDV_<start>_<stop>_<orbit>_<datatake>_<crc>``;
S1 acquired 1-6 days before or after S2. Acquisition years 2019-2021.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from copgen import scene as sc
from copgen.errors import CopgenError
from copgen.modalities import Modality
from copgen.storage.majortom import grid, thumbnails
from copgen.storage.majortom.utm import utm_forward
from copgen.storage.majortom.writer import CellRecord, MajorTomWriter, WriteSummary

PUBLISHED_THUMBNAIL_PX = 1068
PUBLISHED_DEM_PX = 356
EXTENT_M = grid.CELL_M + 2 * grid.PADDING_M  # 10680 m: the published raster footprint
_DEM_PIXEL_M = EXTENT_M / PUBLISHED_DEM_PX  # 30 m
_MAX_CELLS = 100_000
# Product ids follow the published formats behind this prefix: no one mistakes a synthetic tile for a
# Copernicus product (the world contains no Copernicus data).
SYNTHETIC_ID_PREFIX = "SYNTH_"


class SyntheticWorldError(CopgenError, ValueError):
    """A synthetic world was asked for with an invalid setting; names the field (and cell if any)."""

    def __init__(self, field: str, reason: str, cell: str | None = None) -> None:
        self.field, self.reason, self.cell = field, reason, cell
        where = f" (cell {cell!r})" if cell else ""
        super().__init__(f"synthetic world: {field}{where}: {reason}")


def dem_size_for(thumbnail_size: int) -> int:
    """DEM pixels for an S2/S1 thumbnail size: the published ratio 1068 -> 356, i.e. round(size / 3)."""
    return max(4, int(round(thumbnail_size / 3)))


@dataclass(frozen=True)
class Acquisition:
    """When and how one cell was observed (all derived from the world seed and the cell id)."""

    cell: str
    s2_time: datetime
    s2l2a_product_id: str
    s2l1c_product_id: str
    s1_time: datetime
    s1_product_id: str
    orbit_state: str  # "ascending" / "descending"
    cloud_fraction: float  # target cloud fraction of the S2 scene (0 = clear)
    aerosol: float


@dataclass
class RenderedCell:
    """One cell: its acquisition, the physical scene and the uint8 thumbnails of the modalities it has."""

    cell: str
    acquisition: Acquisition
    scene: sc.Scene
    thumbnails: dict[Modality, np.ndarray]


@dataclass(frozen=True)
class WorldSummary:
    """What ``write_world`` wrote."""

    root_url: str
    seed: int
    cells: tuple[str, ...]  # every cell of the world, row-major from the south-west
    modalities: dict[str, tuple[str, ...]]  # cell -> names of the modalities written for it
    datasets: dict[str, WriteSummary]  # modality name -> writer summary
    thumbnail_size: int
    dem_size: int
    epsg: int

    def cells_with(self, modality: Modality | str) -> tuple[str, ...]:
        """Cells that have ``modality``."""
        name = Modality.parse(modality).name
        return tuple(c for c in self.cells if name in self.modalities[c])


class SyntheticWorld:
    """A rows x cols rectangle of Major TOM cells starting at the cell containing ``origin``."""

    def __init__(
        self,
        seed: int,
        origin: tuple[float, float] = (46.0, 8.0),
        rows: int = 4,
        cols: int = 4,
        *,
        thumbnail_size: int = PUBLISHED_THUMBNAIL_PX,
        missing: Mapping[Modality | str, float] | None = None,
        cloud_prob: float = 0.3,
    ) -> None:
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise SyntheticWorldError("seed", f"a non-negative integer is required, got {seed!r}")
        if not (isinstance(rows, int) and isinstance(cols, int)) or rows < 1 or cols < 1:
            raise SyntheticWorldError("rows/cols", f"positive integers required, got {rows!r} x {cols!r}")
        if rows * cols > _MAX_CELLS:
            raise SyntheticWorldError("rows/cols", f"{rows * cols} cells is more than {_MAX_CELLS}")
        if not isinstance(thumbnail_size, int) or not 16 <= thumbnail_size <= 4096:
            raise SyntheticWorldError(
                "thumbnail_size", f"an integer in 16..4096 required, got {thumbnail_size!r}"
            )
        if not 0.0 <= float(cloud_prob) <= 1.0:
            raise SyntheticWorldError("cloud_prob", f"a probability in [0, 1] required, got {cloud_prob!r}")
        self.seed = int(seed)
        self.rows, self.cols = rows, cols
        self.thumbnail_size = thumbnail_size
        self.dem_size = dem_size_for(thumbnail_size)
        self.cloud_prob = float(cloud_prob)
        self.missing = self._parse_missing(missing or {})
        self.cells = self._grid_cells(origin)
        self.epsg = int(grid.cell_utm_epsg(self.cells[0]))  # one world frame: the south-west cell's zone

    # -- layout --------------------------------------------------------------------------------------

    @staticmethod
    def _parse_missing(missing: Mapping[Modality | str, float]) -> dict[Modality, float]:
        out = {m: 0.0 for m in Modality}
        for key, rate in missing.items():
            try:
                m = Modality.parse(key)
            except ValueError as exc:
                raise SyntheticWorldError("missing", str(exc)) from None
            if not 0.0 <= float(rate) <= 1.0:
                raise SyntheticWorldError("missing", f"rate for {m.name} must be in [0, 1], got {rate!r}")
            out[m] = float(rate)
        return out

    def _grid_cells(self, origin: tuple[float, float]) -> tuple[str, ...]:
        try:
            lat, lon = float(origin[0]), float(origin[1])
            row0, _ = grid.parse_cell(grid.latlon_to_cell(lat, lon))
            lat0, _ = grid.cell_bottom_left(grid.latlon_to_cell(lat, lon))
        except (TypeError, ValueError, IndexError) as exc:
            raise SyntheticWorldError("origin", f"unusable (lat, lon) {origin!r}: {exc}") from None
        dlat = 180.0 / 2004  # the grid's row spacing
        cells = []
        for i in range(self.rows):
            row_lat = lat0 + (i + 0.5) * dlat  # a point inside row i, at the origin's longitude
            try:
                row_u, col0 = grid.parse_cell(grid.latlon_to_cell(row_lat, lon))
                lo, hi = grid.column_range(row_u)
            except ValueError as exc:
                raise SyntheticWorldError("rows", f"row {i} leaves the grid: {exc}") from None
            if col0 + self.cols - 1 > hi:
                raise SyntheticWorldError("cols", f"{self.cols} columns from {col0} pass the antimeridian")
            cells += [grid.format_cell(row_u, col0 + j) for j in range(self.cols)]
            assert row_u == row0 + i
        return tuple(str(c) for c in cells)

    def footprint(self, cell: str) -> grid.SampleFootprint:
        """The cell's published raster footprint, in the world's UTM frame."""
        return grid.sample_footprint(cell, self.epsg)

    # -- per-cell randomness -------------------------------------------------------------------------

    def _uniform(self, cell: str, what: str) -> float:
        return (sc.stream_key(self.seed, f"{cell}|{what}") >> 11) / float(2**53)

    def has(self, cell: str, modality: Modality | str) -> bool:
        """Whether ``cell`` has ``modality`` (seeded draw against the configured missing rate)."""
        m = Modality.parse(modality)
        return self._uniform(cell, f"missing:{m.name}") >= self.missing[m]

    def modalities(self, cell: str) -> tuple[Modality, ...]:
        """The modalities ``cell`` has, in canonical order."""
        return tuple(m for m in Modality if self.has(cell, m))

    def acquisition(self, cell: str) -> Acquisition:
        """Dates, product ids, pass direction and atmosphere of ``cell``'s acquisitions."""
        u = lambda what: self._uniform(cell, what)  # noqa: E731
        lat, lon = grid.cell_centre(cell, self.epsg)
        day = datetime(2019 + int(u("year") * 3), 1, 1, tzinfo=UTC) + timedelta(
            days=120 + int(u("doy") * 160)
        )
        solar = timedelta(hours=10.5 + 0.4 * (u("hour") - 0.5) - lon / 15.0)  # local 10:30 -> UTC
        s2_time = (day + solar).replace(microsecond=0)
        gap = timedelta(days=1 + int(u("gap") * 6), hours=0) * (1 if u("gap-sign") < 0.5 else -1)
        ascending = u("pass") < 0.5
        s1_solar = timedelta(hours=(18.0 if ascending else 6.0) + 0.3 * u("s1-hour") - lon / 15.0)
        s1_time = (day + gap + s1_solar).replace(microsecond=0)
        cloudy = u("cloudy") < self.cloud_prob
        return Acquisition(
            cell=cell,
            s2_time=s2_time,
            s2l2a_product_id=_s2_product_id("MSIL2A", "N0214", s2_time, lat, lon, u),
            s2l1c_product_id=_s2_product_id("MSIL1C", "N0209", s2_time, lat, lon, u),
            s1_time=s1_time,
            s1_product_id=_s1_product_id(s1_time, u),
            orbit_state="ascending" if ascending else "descending",
            cloud_fraction=0.05 + 0.6 * u("cloud-fraction") if cloudy else 0.0,
            aerosol=0.6 + 0.9 * u("aerosol"),
        )

    # -- rendering -----------------------------------------------------------------------------------

    def render(self, cell: str, modalities: tuple[Modality, ...] | None = None) -> RenderedCell:
        """Render ``cell`` (only what ``modalities`` need; default: the modalities the cell has)."""
        if cell not in self.cells:
            raise SyntheticWorldError("cell", "not a cell of this world", cell)
        mods = self.modalities(cell) if modalities is None else tuple(Modality.parse(m) for m in modalities)
        acq = self.acquisition(cell)
        fp = self.footprint(cell)
        xmin, _, _, ymax = fp.bounds
        lat, _ = fp.centre_latlon()
        doy = acq.s2_time.timetuple().tm_yday
        spec = sc.SceneSpec(
            xmin=xmin,
            ymax=ymax,
            extent_m=EXTENT_M,
            size=self.thumbnail_size,
            coarse_size=self.dem_size,
            world_seed=self.seed,
            scene_key=sc.stream_key(self.seed, f"{cell}|scene"),
            sun=sc.sun_position(lat, doy),
            cloud_fraction=acq.cloud_fraction,
            aerosol=acq.aerosol,
            # right-looking SAR: an ascending pass (heading ~north) looks east, a descending one west
            radar=sc.RadarGeometry(look_azimuth_deg=80.0 if acq.orbit_state == "ascending" else 280.0),
            want_s2=Modality.S2L2A in mods or Modality.S2L1C in mods,
            want_s1=Modality.S1RTC in mods,
        )
        scene = sc.render_scene(spec)
        return RenderedCell(cell, acq, scene, self._thumbnails(cell, scene, mods))

    def _thumbnails(
        self, cell: str, scene: sc.Scene, mods: tuple[Modality, ...]
    ) -> dict[Modality, np.ndarray]:
        ctx = {"grid_cell": cell, "source": "synthetic"}
        out: dict[Modality, np.ndarray] = {}
        for m, dn in ((Modality.S2L2A, scene.l2a), (Modality.S2L1C, scene.l1c)):
            if m in mods and dn is not None:
                b02, b03, b04 = dn[0], dn[1], dn[2]
                out[m] = thumbnails.s2_thumbnail(b04, b03, b02, context=ctx)
        if Modality.S1RTC in mods and scene.vv is not None:
            out[Modality.S1RTC] = thumbnails.s1_thumbnail(scene.vv, scene.vh, context=ctx)
        if Modality.DEM in mods:
            # the hillshade works in pixel units: scale heights so a coarser DEM shades like the 30 m one
            scale = _DEM_PIXEL_M / (EXTENT_M / self.dem_size)
            out[Modality.DEM] = thumbnails.dem_thumbnail(scene.elevation * np.float32(scale), context=ctx)
        return out

    def records(self, rendered: RenderedCell, with_bands: bool = False) -> dict[Modality, CellRecord]:
        """Writer records for the modalities rendered in ``rendered.thumbnails``."""
        acq, scene, fp = rendered.acquisition, rendered.scene, self.footprint(rendered.cell)
        xmin, _, _, ymax = fp.bounds
        lat, lon = fp.centre_latlon()
        common = dict(
            grid_cell=rendered.cell, crs=self.epsg, centre_lat=lat, centre_lon=lon, origin=(xmin, ymax)
        )
        out: dict[Modality, CellRecord] = {}
        for m, thumb in rendered.thumbnails.items():
            bands: dict[str, np.ndarray] | None = None
            if m in (Modality.S2L2A, Modality.S2L1C):
                dn = scene.l2a if m == Modality.S2L2A else scene.l1c
                if with_bands:
                    bands = {b: dn[i] for i, b in enumerate(sc.S2_BANDS)}
                    bands["cloud_mask"] = scene.cloud_mask
                pid = acq.s2l2a_product_id if m == Modality.S2L2A else acq.s2l1c_product_id
                out[m] = CellRecord(
                    thumbnail=thumb,
                    bands=bands,
                    product_id=pid,
                    timestamp=acq.s2_time.replace(tzinfo=None),
                    cloud_cover=round(scene.cloud_cover, 4),
                    **common,
                )
            elif m == Modality.S1RTC:
                bands = {"vv": scene.vv, "vh": scene.vh} if with_bands else None
                out[m] = CellRecord(
                    thumbnail=thumb,
                    bands=bands,
                    product_id=acq.s1_product_id,
                    timestamp=acq.s1_time.replace(tzinfo=None),
                    orbit_state=acq.orbit_state,
                    **common,
                )
            else:
                dem = scene.elevation
                out[m] = CellRecord(
                    thumbnail=thumb,
                    bands={"DEM": dem} if with_bands else None,
                    min_val=float(dem.min()),
                    max_val=float(dem.max()),
                    **common,
                )
        return out

    def iter_rendered(self) -> Iterator[RenderedCell]:
        """Every cell in order, rendered for the modalities it has (one at a time: flat memory)."""
        for cell in self.cells:
            yield self.render(cell)


def write_world(
    root_url: str,
    *,
    seed: int,
    origin: tuple[float, float] = (46.0, 8.0),
    rows: int = 4,
    cols: int = 4,
    thumbnail_size: int = PUBLISHED_THUMBNAIL_PX,
    missing: Mapping[Modality | str, float] | None = None,
    cloud_prob: float = 0.3,
    with_bands: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    rows_per_part: int = 500,
) -> WorldSummary:
    """Render a synthetic world and write ``<root_url>/Core-{DEM,S1RTC,S2L1C,S2L2A}`` in the published
    layout (thumbnails; S2 B02/B03/B04/B08 + cloud mask, S1 vv/vh and the DEM band if ``with_bands``).

    Cells stream through one at a time; each dataset lists only the cells that have its modality.
    """
    world = SyntheticWorld(
        seed, origin, rows, cols, thumbnail_size=thumbnail_size, missing=missing, cloud_prob=cloud_prob
    )
    writers = {
        m: MajorTomWriter(
            root_url,
            m,
            rows_per_part=rows_per_part,
            include_bands=with_bands,
            storage_options=storage_options,
            overwrite=overwrite,
        )
        for m in Modality
    }
    present: dict[str, tuple[str, ...]] = {}
    try:
        for rendered in world.iter_rendered():
            records = world.records(rendered, with_bands=with_bands)
            for m in Modality:
                if m in records:
                    writers[m].write(records[m])
            present[rendered.cell] = tuple(m.name for m in Modality if m in records)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    summaries = {m.name: w.close() for m, w in writers.items()}
    return WorldSummary(
        root_url=root_url,
        seed=world.seed,
        cells=world.cells,
        modalities=present,
        datasets=summaries,
        thumbnail_size=world.thumbnail_size,
        dem_size=world.dem_size,
        epsg=world.epsg,
    )


# ------------------------------------------------------------------------------------------- identifiers

_MGRS_BANDS = "CDEFGHJKLMNPQRSTUVWX"  # 8 deg latitude bands from 80 S
_MGRS_COLUMN_SETS = ("STUVWXYZ", "ABCDEFGH", "JKLMNPQR")  # by zone % 3
_MGRS_ROWS = "ABCDEFGHJKLMNPQRSTUV"


def mgrs_tile(lat: float, lon: float) -> str:
    """The 100 km MGRS tile (Sentinel-2 granule name without the ``T``) containing (lat, lon)."""
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    epsg = (32700 if lat < 0 else 32600) + zone
    easting, northing = utm_forward(lat, lon, epsg)
    band = _MGRS_BANDS[min(max(int((lat + 80.0) // 8), 0), len(_MGRS_BANDS) - 1)]
    column = _MGRS_COLUMN_SETS[zone % 3][min(max(int(easting // 100_000) - 1, 0), 7)]
    row = _MGRS_ROWS[(int(northing // 100_000) + (5 if zone % 2 == 0 else 0)) % 20]
    return f"{zone:02d}{band}{column}{row}"


def _stamp(t: datetime) -> str:
    return t.strftime("%Y%m%dT%H%M%S")


def _s2_product_id(level: str, baseline: str, t: datetime, lat: float, lon: float, u) -> str:
    sat = "S2A" if u("s2-sat") < 0.5 else "S2B"
    orbit = 1 + int(u("s2-orbit") * 143)
    generated = t + timedelta(minutes=40 + int(u(f"{level}-gen") * 200))
    ident = f"{_stamp(t)}_{baseline}_R{orbit:03d}_T{mgrs_tile(lat, lon)}_{_stamp(generated)}"
    return f"{SYNTHETIC_ID_PREFIX}{sat}_{level}_{ident}"


def _s1_product_id(t: datetime, u) -> str:
    s1a = u("s1-sat") < 0.5
    launch = datetime(2014, 4, 3, tzinfo=UTC) if s1a else datetime(2016, 4, 25, tzinfo=UTC)
    orbit = 1 + int((t - launch).total_seconds() / 86400.0 * 175.0 / 12.0)  # 175 orbits per 12 days
    datatake = int(u("s1-datatake") * 0xFFFFFF)
    crc = int(u("s1-crc") * 0xFFFF)
    stop = t + timedelta(seconds=25)
    sat = "S1A" if s1a else "S1B"
    ident = f"{_stamp(t)}_{_stamp(stop)}_{orbit:06d}_{datatake:06X}_{crc:04X}"
    return f"{SYNTHETIC_ID_PREFIX}{sat}_IW_GRDH_1SDV_{ident}"
