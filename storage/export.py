"""Read a cube as a training corpus: samples with their tiles, origins, georeferencing and provenance.

``iter_samples`` is the one reader behind ``copgen export`` (Major TOM layout, COG + STAC) and the
training dataset (``copgen.storage.dataset``). A sample is one ``(grid_cell, patch, variant)`` of the
cube at one iteration; its tiles are the selected modalities whose origin there is real or generated
(absent tiles are never exported). Excluded always: samples not ``done`` (quarantined or unfinished) and
samples the ledger quarantined.

Where provenance comes from:

- the cube: georeferencing (``epsg``, ``transform``, ``footprint``), origins, the runs' attrs;
- the plan beside the cube (``<cube>/_plan``): each real tile's product id, time, CRS, cloud cover;
- the provenance table (default ``<cube>/../tables/provenance``, optional): per generated tile its run,
  seed, sampler, steps, conditioning modalities and the weights' sha256.

The *full dataset view* (``source=``): the source's complete cells that the cube does not hold (a
completion run plans only cells that lack something) are added as real samples cut the same way, so one
corpus holds every cell.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from copgen.errors import CopgenError
from copgen.modalities import ALL, Modality, parse_list
from copgen.records import SourceRef
from copgen.storage import plans, tables
from copgen.storage.cubes import ORIGIN_CODES, Cube
from copgen.storage.fsutil import join_url
from copgen.storage.georef import sample_epsg, sample_georef
from copgen.storage.ledger import Ledger
from copgen.storage.majortom.thumbnails import to_samples
from copgen.storage.objects import redact

log = logging.getLogger("copgen.export")
ORIGINS = ("real", "generated")
_CODE_NAME = {v: k for k, v in ORIGIN_CODES.items()}


class ExportError(CopgenError, ValueError):
    """An export that cannot run; the message names the cube, option or field."""


@dataclass(frozen=True)
class Selection:
    """Which tiles: ``origins`` (real, generated), ``modalities``, ``iteration`` (None = the cube's last:
    the completed state), ``run_id`` (only samples whose generated tiles came from that run)."""

    origins: tuple[str, ...] = ORIGINS
    modalities: tuple[Modality, ...] = ALL
    iteration: int | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        bad = set(self.origins) - set(ORIGINS)
        if bad or not self.origins:
            raise ExportError(f"--origin {sorted(bad) or '(none)'}: choose from {list(ORIGINS)}")
        object.__setattr__(self, "modalities", parse_list(self.modalities))
        object.__setattr__(self, "origins", tuple(self.origins))


@dataclass
class Tile:
    """One modality of one sample: uint8 ``(S, S, 3)`` pixels and where they came from."""

    modality: Modality
    origin: str  # real | generated
    image: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One exported sample: identity, georeferencing, its tiles (selected modalities only)."""

    grid_cell: str
    patch: str
    variant: int
    index: int  # position on the cube's sample axis; -1 for a source cell outside the cube
    epsg: int
    transform: tuple[float, ...]  # GDAL order
    corners: np.ndarray  # (4, 2) lon/lat, upper-left first, clockwise
    footprint: str  # WKT
    centre_lat: float
    centre_lon: float
    run_id: str | None
    tiles: dict[Modality, Tile]
    product_time: pd.Timestamp | None = None  # acquisition time of its real tiles (S2 first)

    @property
    def id(self) -> str:
        return f"{self.grid_cell}_{self.patch}_v{self.variant}"

    @property
    def size(self) -> int:
        return int(next(iter(self.tiles.values())).image.shape[0])

    def bounds(self) -> tuple[float, float, float, float]:
        x, res, _, y, _, neg = self.transform
        return x, y + neg * self.size, x + res * self.size, y


@dataclass(frozen=True)
class SourceView:
    """A Major TOM source for the full dataset view: its root, options and thumbnail side (None =
    published 1068 px)."""

    root: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    thumbnail_sizes: Mapping[str, int] = field(default_factory=dict)

    @property
    def thumbnail_px(self) -> int | None:
        sizes = [int(v) for m, v in self.thumbnail_sizes.items() if m != "DEM" and int(v) > 0]
        return max(sizes) if sizes else None


# ---- cube side ------------------------------------------------------------------------------------


def default_tables_url(cube_url: str) -> str:
    """``<out>/tables/provenance`` for a cube at ``<out>/<name>.zarr`` (the flows' layout)."""
    return join_url(cube_url.rstrip("/").rsplit("/", 1)[0], "tables", "provenance")


def read_plan_rows(cube: Cube, storage_options: Mapping[str, Any] | None) -> pd.DataFrame:
    """The cube's plan as a table indexed by sample (``copgen.storage.plans``); empty if none."""
    return plans.plan_table(cube, storage_options)


def read_provenance(table_url: str | None, cube: Cube, storage_options) -> dict[tuple[int, int, str], dict]:
    """Provenance rows of the cube's samples, ``{(sample, iteration, modality): row}`` (last run wins for
    a tile written twice); empty if there is no table."""
    if table_url is None:
        return {}
    try:
        # Arrow rows, not pandas: a seed column with nulls (real tiles) would become float64 and lose the
        # low bits of 63-bit seeds
        rows = tables.dataset(table_url, storage_options).to_table().to_pylist()
    except FileNotFoundError:
        log.warning("no provenance table at %s: exporting run-level provenance only", redact(table_url))
        return {}
    # one table serves several cubes (complete, loop-*): keep rows whose cell/patch match this cube's
    cells = [str(c) for c in cube.group["grid_cell"][:]]
    patches = [str(p) for p in cube.group["patch"][:]]
    out: dict[tuple[int, int, str], dict] = {}
    for r in sorted(rows, key=lambda r: str(r.get("run_id"))):
        i = r.get("sample")
        if i is None or not 0 <= i < len(cells) or cells[i] != r["grid_cell"] or patches[i] != r["patch"]:
            continue
        out[(int(i), int(r["iteration"]), str(r["modality"]))] = r
    return out


def _excluded(cube: Cube, storage_options) -> set[tuple[str, str]]:
    return {(q.grid_cell, q.patch) for q in Ledger(cube.url, storage_options).quarantined()}


def _real_provenance(plan: pd.DataFrame, i: int, m: Modality) -> dict[str, Any]:
    if plan.empty or i not in plan.index:
        return {}
    r = plan.loc[i]
    out = {"product_id": r.get(f"{m.name}_product_id"), "product_time": r.get(f"{m.name}_timestamp"),
           "crs": r.get(f"{m.name}_crs"), "cloud_cover": r.get(f"{m.name}_cloud_cover")}
    return {k: v for k, v in out.items() if v is not None and not pd.isna(v)}


def _names(value: Any) -> list[str]:
    return [] if value is None or (isinstance(value, float) and np.isnan(value)) else [str(v) for v in value]


def _generated_provenance(prov: Mapping[tuple[int, int, str], dict], i: int, it: int, m: Modality,
                          runs: Mapping[str, Any]) -> dict[str, Any]:
    r = prov.get((i, it, m.name))
    if r is None:
        return {}
    run = runs.get(str(r.get("run_id")), {})
    out = {
        "run_id": r.get("run_id"), "seed": r.get("seed"), "sampler": r.get("sampler"),
        "steps": r.get("steps"), "conditioned_on": _names(r.get("conditioned_on")),
        "loop_spec": r.get("loop_spec"), "network_sha256": r.get("network_sha256"),
        "autoencoder_sha256": r.get("autoencoder_sha256"), "package_version": r.get("package_version"),
        "network": run.get("network"), "autoencoder": run.get("autoencoder"),
    }
    clean = {}
    for k, v in out.items():
        if v is None or (not isinstance(v, list) and pd.isna(v)):
            continue
        clean[k] = v.item() if isinstance(v, np.generic) else v
    return clean


def iter_samples(
    cube_url: str,
    selection: Selection = Selection(),
    *,
    storage_options: Mapping[str, Any] | None = None,
    tables_url: str | None = "default",
    source: SourceView | None = None,
    chunk: int = 64,
) -> Iterator[Sample]:
    """The cube's samples (then the source's untouched complete cells if ``source``), ``chunk`` samples
    read at a time. ``tables_url``: the provenance table (``"default"``: beside the cube; None: none)."""
    so = dict(storage_options or {})
    cube = Cube.open(cube_url, so, read_only=True)
    spec, g = cube.spec, cube.group
    it = _checked_iteration(cube, cube_url, selection)
    plan = read_plan_rows(cube, so)
    prov = read_provenance(default_tables_url(cube.url) if tables_url == "default" else tables_url, cube, so)
    runs = dict(g.attrs.get("copgen_runs", {}))
    done = cube.done_mask()
    quarantined = _excluded(cube, so)
    cells, patches = g["grid_cell"][:], g["patch"][:]
    variants = g["variant"][:]
    lat, lon = g["centre_lat"][:], g["centre_lon"][:]
    epsg, transform, footprint = g["epsg"][:], g["transform"][:], g["footprint"][:]
    mod_idx = {m: spec.modalities.index(m) for m in selection.modalities}
    wanted_codes = {ORIGIN_CODES[o] for o in selection.origins}
    n_skipped = 0
    for start in range(0, cube.n_samples, chunk):
        stop = min(start + chunk, cube.n_samples)
        keep = [i for i in range(start, stop)
                if done[i] and (str(cells[i]), str(patches[i])) not in quarantined]
        n_skipped += (stop - start) - len(keep)
        if not keep:
            continue
        origin = g["origin"][start:stop, it]
        images = {m: g[m.name][start:stop, it] for m in selection.modalities}
        for i in keep:
            k = i - start
            run_id = _generated_by(prov, i, it, origin[k], spec.modalities)
            if selection.run_id is not None and run_id != selection.run_id:
                continue
            tiles = {}
            for m, j in mod_idx.items():
                code = int(origin[k, j])
                if code not in wanted_codes:
                    continue
                name = _CODE_NAME[code]
                p = (_real_provenance(plan, i, m) if name == "real"
                     else _generated_provenance(prov, i, it, m, runs))
                tiles[m] = Tile(m, name, np.asarray(images[m][k]), p)
            if not tiles:
                continue
            sample = _sample(cells[i], patches[i], variants[i], i, epsg[i], transform[i], footprint[i],
                             lat[i], lon[i], run_id, tiles)
            sample.product_time = _product_time(plan, i)
            yield sample
    if n_skipped:
        log.info("cube %s: %d samples not done or quarantined were left out", redact(cube_url), n_skipped)
    if source is not None:
        held = {str(c) for c in cells}
        yield from _source_samples(source, held, selection, spec.tile_size)


def _checked_iteration(cube: Cube, cube_url: str, selection: Selection) -> int:
    """The iteration to export; the selection's modalities and the cube's georeferencing checked."""
    spec = cube.spec
    it = spec.iterations - 1 if selection.iteration is None else int(selection.iteration)
    if not 0 <= it < spec.iterations:
        raise ExportError(
            f"--iteration {it}: cube {redact(cube_url)} has iterations 0..{spec.iterations - 1}")
    missing = [m.name for m in selection.modalities if m not in spec.modalities]
    if missing:
        have = [m.name for m in spec.modalities]
        raise ExportError(f"--modality {missing}: not in cube {redact(cube_url)} ({have})")
    if "epsg" not in cube.group:
        raise ExportError(f"cube {redact(cube_url)} has no georeferencing (written before epsg/transform): "
                          "re-run the completion into a new --out")
    return it


def _generated_by(prov: dict, i: int, it: int, origin_row, modalities) -> str | None:
    """The run that generated sample ``i``'s tiles at iteration ``it`` (the latest id when several did)."""
    run_ids = {str(prov[(i, it, m.name)].get("run_id")) for j, m in enumerate(modalities)
               if (i, it, m.name) in prov and origin_row[j] == ORIGIN_CODES["generated"]}
    return sorted(run_ids)[-1] if run_ids else None


def _product_time(plan: pd.DataFrame, i: int) -> pd.Timestamp | None:
    if plan.empty or i not in plan.index:
        return None
    for m in (Modality.S2L2A, Modality.S2L1C, Modality.S1RTC):
        t = plan.loc[i].get(f"{m.name}_timestamp")
        if t is not None and not pd.isna(t):
            return pd.Timestamp(t)
    return None


def _sample(cell, patch, variant, index, epsg, transform, footprint, lat, lon, run_id, tiles) -> Sample:
    ring = [tuple(map(float, xy.split())) for xy in str(footprint)[len("POLYGON (("):-2].split(", ")]
    return Sample(str(cell), str(patch), int(variant), int(index), int(epsg),
                  tuple(float(v) for v in transform), np.asarray(ring[:4]), str(footprint), float(lat),
                  float(lon), run_id, tiles)


# ---- full dataset view: the source's cells that needed nothing --------------------------------------


def _source_samples(source: SourceView, held: set[str], selection: Selection, size: int) -> Iterator[Sample]:
    from copgen.storage.majortom.reader import MajorTomReader

    if "real" not in selection.origins:
        return
    sizes = {m: (None if int(v) < 0 else int(v)) for m, v in source.thumbnail_sizes.items()} or None
    reader = MajorTomReader(source.root, storage_options=dict(source.storage_options), on_error="skip",
                            thumbnail_sizes=sizes)
    with reader:
        pairing = reader.pair()
        cells = [c for c in pairing.cells(pairing.complete) if c.grid_cell not in held]
        if not cells:
            return
        geo = sample_georef([c.grid_cell for c in cells], ["center"] * len(cells), sample_epsg(cells),
                            thumbnail_px=source.thumbnail_px or 1068, sample_px=size)
        for start in range(0, len(cells), 16):
            chunk = cells[start:start + 16]
            fetched = {m: reader.fetch_thumbnails([s for c in chunk if (s := c.source(m))], m).thumbnails
                       for m in selection.modalities}
            for i, c in enumerate(chunk, start):
                if not all(c.grid_cell in fetched[m] for m in selection.modalities):
                    continue  # a bad record: the reader logged it; the cell is left out
                tiles = {}
                for m in selection.modalities:
                    img = to_samples(fetched[m][c.grid_cell], m, "center", size, dem_scale=3,
                                     context={"dataset": m.dataset, "cell": c.grid_cell})[0]
                    tiles[m] = Tile(m, "real", img, _source_provenance(c.source(m)))
                s = Sample(c.grid_cell, "center", 0, -1, int(geo.epsg[i]),
                           tuple(float(v) for v in geo.transform[i]), geo.corners[i], str(geo.footprint[i]),
                           c.centre_lat, c.centre_lon, None, tiles)
                s.product_time = _timestamp(c.source(Modality.S2L2A))
                yield s


def _source_provenance(ref: SourceRef | None) -> dict[str, Any]:
    p = {} if ref is None else {"product_id": ref.product_id, "product_time": _timestamp(ref), "crs": ref.crs}
    return {k: v for k, v in p.items() if v is not None}


def _timestamp(ref: SourceRef | None) -> pd.Timestamp | None:
    return None if ref is None or ref.timestamp is None else pd.Timestamp(ref.timestamp)


def provenance_json(tile: Tile) -> str:
    """A tile's provenance as compact JSON (timestamps as ISO strings)."""
    return json.dumps({k: (v.isoformat() if isinstance(v, pd.Timestamp) else v)
                       for k, v in tile.provenance.items()}, sort_keys=True, default=str)


def modalities_arg(text: str | Sequence[str] | None) -> tuple[Modality, ...]:
    return ALL if not text else parse_list(text)
