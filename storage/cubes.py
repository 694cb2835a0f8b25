"""The Zarr v3 cube (DESIGN §3): schema, driver-side create/grow, worker-side block writes.

Layout of one cube (a Zarr v3 group, consolidated metadata, readable with ``xarray.open_zarr``)::

    grid_cell, patch (sample)            str      coordinates, written by the driver when it grows
    variant (sample)                     int32    seed variant (0..N-1 with N samples per cell)
    centre_lat, centre_lon (sample)      float64  coordinates (NaN when unknown)
    epsg (sample)                        int32    the sample's CRS (WGS84 UTM zone, EPSG 326zz/327zz)
    transform (sample, affine)           float64  GDAL geotransform of the tile in that CRS (georef.py)
    footprint (sample)                   str      WKT POLYGON of the tile's corners in lon/lat (EPSG:4326)
    iteration (iteration)                int32    0 = input state, 1..K = loop iterations
    modality (modality)                  str      the cube's modalities in canonical order
    DEM, S1RTC, S2L1C, S2L2A             uint8    (sample, iteration, y, x, band), one per modality
    latents (optional)                   float16  (sample, iteration, modality, c, h, w)
    origin                               uint8    (sample, iteration, modality): 0 absent, 1 real, 2 generated
    done (sample)                        uint8    1 once every array of the sample is written

Concurrency rules, enforced here rather than trusted (xarray does not check numpy region writes and
writers that share a shard lose updates, pipeline-stack.md §4.2):

- only the driver creates the group, resizes arrays and rewrites metadata (``create``, ``grow``); a
  worker opens the cube read-only for metadata and writes data objects only (``write_block``);
- the sample axis is cut into *work blocks*; a block is a whole number of shards, and the writer refuses
  any region that is not exactly one registered block, so no two tasks ever touch one object;
- inner chunks are one (sample, iteration) tile, so a tile read is one ranged read of a shard (after
  the read of its index); tiles are stored raw unless ``compress_tiles`` (write speed, see CubeSpec);
- arrays written by blocks name objects ``c.<sample>.<...>`` (one folder per array, no folder per
  sample); a block's objects are encoded and written whole and concurrently (storage/chunkwrite.py);
- ``done`` is written after the data; the ledger's block marker after ``done``.

The block list is part of the cube metadata: each ``grow`` appends a *batch* ``[start, stop)`` (which
starts on a shard boundary: after a batch whose length is not a multiple of ``shard_samples`` the next
one skips the rest of that shard, padding samples that belong to no batch and are never done) and the
batch is cut into blocks of ``block_samples``. Never use
``append_dim`` from workers: concurrent appends lose data (pipeline-stack.md §4.3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
from copgen import package_version
from copgen.errors import CopgenError
from copgen.modalities import ALL, Modality, parse_list
from copgen.records import ORIGIN_CODES, SampleKey, WorkBlock
from copgen.storage import chunkwrite
from copgen.storage.chunkwrite import write_region
from copgen.storage.georef import Georef, GeorefError, sample_georef
from copgen.storage.majortom.grid import RASTER_PX
from copgen.storage.objects import redact
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import ZstdCodec

SCHEMA_VERSION = 1
LICENCE = "CC-BY-SA-4.0"
LICENCE_NOTE = (
    "Contains modified Copernicus Sentinel data, via Major TOM Core (CC-BY-SA-4.0); generated samples "
    "(origin == generated) are synthetic outputs of COP-GEN-Beta, not observations."
)
SYNTHETIC_LICENCE_NOTE = (
    "Synthetic inputs (a procedural world written by `copgen world`): contains no Copernicus data; "
    "generated samples (origin == generated) are outputs of COP-GEN-Beta, not observations."
)


def licence_text(synthetic_inputs: bool) -> str:
    """The licence line of an output: Major TOM's terms, or the synthetic world's statement."""
    return SYNTHETIC_LICENCE_NOTE if synthetic_inputs else f"{LICENCE}. {LICENCE_NOTE}"


def licence_attrs(synthetic_inputs: bool) -> dict[str, str]:
    """Cube attrs for the licence: set when a run records whether its inputs were synthetic."""
    return {"license": LICENCE, "licence_note": SYNTHETIC_LICENCE_NOTE if synthetic_inputs else LICENCE_NOTE}


_COORDS = "grid_cell patch variant centre_lat centre_lon epsg transform footprint"
GEOREF_ARRAYS = ("epsg", "transform", "footprint")
_COORD_CHUNK = 4096


class CubeError(CopgenError):
    """Base class: a cube operation failed; the message names the cube and the offending field."""


class CubeSchemaError(CubeError):
    """Data handed to the cube does not match its schema (shape, dtype, missing variable)."""


class BlockAlignmentError(CubeError):
    """A write region is not exactly one work block (it would share shards with another task)."""


class CubeExistsError(CubeError):
    """``create`` found a cube at the URL whose schema differs from the one requested."""


class ForeignStoreError(CubeError):
    """Something that is not a copgen cube (a user's Zarr group, files) is at the URL: never written over."""


# What a cube's prefix may hold before its root ``zarr.json`` exists: the lease/ledger and plan of a create
# that was interrupted (ours), nothing else.
_OWN_PREFIXES = frozenset({"_ledger", "_plan"})


@dataclass(frozen=True)
class CubeSpec:
    """Schema of a cube. ``iterations`` is the length of the iteration axis (K + 1)."""

    tile_size: int = 256
    iterations: int = 1
    modalities: tuple[Modality, ...] = ALL
    bands: int = 3
    latent_shape: tuple[int, int, int] | None = None
    # samples per shard; 0 = one shard per work block (the default): a block is then one object per
    # array, written in one call (1 sample per shard made 6 objects per sample and wrote at 0.3-0.7x
    # plain files, benchmarks/RESULTS.md "Cube writes"); a tile read stays one ranged read plus the index
    shard_samples: int = 0
    block_samples: int = 64
    # zstd level 1: measured ~2.8x faster than level 0 (= zstd's default 3) on thumbnail-like uint8
    # tiles at the same ratio (benchmarks/cube_write.py; numcodecs 75 vs 211 MB/s on one core)
    zstd_level: int = 1
    # Image tiles are stored uncompressed by default: zstd-1 shrinks real thumbnails 1.4-2.7x but
    # encodes at 45-60 MB/s per core on the development machine, 8x slower than writing the bytes
    # (benchmarks/RESULTS.md "Cube writes"); True trades write speed for disk. Latents, origin, done and
    # the coordinates are always zstd. (Cubes made before this field existed have zstd tiles: writers
    # and readers follow each array's own metadata, so they stay correct.)
    compress_tiles: bool = False
    synthetic: bool = True
    title: str = "COP-GEN-Beta cube"
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", parse_list(self.modalities))
        if self.latent_shape is not None:
            object.__setattr__(self, "latent_shape", tuple(int(v) for v in self.latent_shape))
        if self.shard_samples == 0 and isinstance(self.block_samples, int):
            object.__setattr__(self, "shard_samples", self.block_samples)
        for name in ("tile_size", "iterations", "bands", "shard_samples", "block_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise CubeSchemaError(f"CubeSpec.{name} must be a positive int, got {value!r}")
        if not self.modalities:
            raise CubeSchemaError("CubeSpec.modalities is empty")
        if self.block_samples % self.shard_samples:
            raise CubeSchemaError(
                f"CubeSpec.block_samples={self.block_samples} must be a multiple of "
                f"shard_samples={self.shard_samples}: a shard may never span two work blocks"
            )
        try:
            json.dumps(dict(self.provenance), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CubeSchemaError(f"CubeSpec.provenance must be JSON-serialisable: {e}") from None

    def same_content(self, other: CubeSpec) -> bool:
        """Equal but for the storage layout (shards, compression): the cubes hold the same data."""
        layout = {"shard_samples": 1, "compress_tiles": False, "zstd_level": 1}
        return dataclasses.replace(self, **layout) == dataclasses.replace(other, **layout)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"] = [m.name for m in self.modalities]
        d["provenance"] = dict(self.provenance)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CubeSpec:
        d = dict(d)
        d["modalities"] = tuple(d["modalities"])
        if d.get("latent_shape") is not None:
            d["latent_shape"] = tuple(d["latent_shape"])
        return cls(**d)


@dataclass
class BlockData:
    """What a task hands to ``Cube.write_block`` for one block of ``n`` samples.

    ``keys``: the :class:`SampleKey` of each of the ``n`` samples, in block order; ``write_block`` checks
    them against the cube's ``grid_cell``/``patch``/``variant`` coordinates, so a block computed for other
    samples can never land in this one's place. ``images[m]``: uint8 ``(n, iterations, tile, tile,
    bands)`` (a modality left out is written as zeros, i.e. absent); ``origin``: uint8 ``(n, iterations,
    n_modalities)`` codes; ``latents``: float16 ``(n, iterations, n_modalities, c, h, w)`` when the cube
    has latents; ``done``: bool ``(n,)``, False for a quarantined sample (default: all True).
    """

    keys: Sequence[SampleKey]
    images: Mapping[Modality | str, np.ndarray]
    origin: np.ndarray
    latents: np.ndarray | None = None
    done: np.ndarray | None = None



def _sha256(arr: np.ndarray) -> str:
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _quiet_consolidate(store: Any) -> None:
    # Consolidated metadata is a zarr-python extension in v3 (it warns so); xarray and zarr read it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        # the ledger and plan objects live beside the arrays under the cube's prefix, by design
        warnings.filterwarnings("ignore", message="Object at _(ledger|plan) is not recognized")
        zarr.consolidate_metadata(store, zarr_format=3)


def _open_group(url: str, storage_options: Mapping[str, Any] | None, mode: str, consolidated: bool):
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3, "use_consolidated": consolidated}
    if storage_options and "://" in url:
        kwargs["storage_options"] = dict(storage_options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        return zarr.open_group(url, **kwargs)


class Cube:
    """Handle on one cube. Picklable (it carries the URL, storage options and schema, not open stores),
    so a driver can send it to Dask workers; each process opens the store lazily."""

    def __init__(
        self,
        url: str,
        spec: CubeSpec,
        batches: Sequence[Sequence[int]],
        storage_options: Mapping[str, Any] | None = None,
        *,
        read_only: bool = False,
    ) -> None:
        self.url = url.rstrip("/")
        self.spec = spec
        self.batches = [(int(a), int(b)) for a, b in batches]
        self.storage_options = dict(storage_options or {})
        self.read_only = read_only
        self._group: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_group"] = None
        return state

    def __repr__(self) -> str:
        return f"Cube({redact(self.url)!r}, samples={self.n_samples}, blocks={len(self.blocks())})"

    # -- driver side: metadata -------------------------------------------------------------------
    @classmethod
    def create(
        cls, url: str, spec: CubeSpec, storage_options: Mapping[str, Any] | None = None
    ) -> Cube:
        """Create the template (metadata only, zero samples). If a cube with the same schema already
        exists it is opened unchanged (resume; its storage layout wins: ``CubeSpec.same_content``); a
        different schema raises ``CubeExistsError``; anything else at the URL raises ``ForeignStoreError``
        and is left untouched. Driver only, under the lease."""
        existing = cls.refuse_foreign(url, storage_options)
        if existing is not None:
            if not existing.spec.same_content(spec):
                raise CubeExistsError(
                    f"cube {redact(url)} exists with another schema: {existing.spec.to_json()} "
                    f"!= requested {spec.to_json()}; use a new URL for a new schema"
                )
            return existing
        # Built in memory and uploaded in one concurrent batch: creating it in place costs ~130
        # sequential existence checks and PUTs on S3. The root zarr.json goes last: until it exists
        # there is no cube, and an interrupted create is simply redone.
        objects: dict[str, Any] = {}
        group = zarr.open_group(zarr.storage.MemoryStore(objects), mode="w-", zarr_format=3)
        group.attrs.update(cls._root_attrs(spec, []))
        cls._create_arrays(group, spec)
        _quiet_consolidate(group.store)
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        payload = {f"{root.rstrip('/')}/{k}": v.to_bytes() for k, v in objects.items()}
        root_meta = f"{root.rstrip('/')}/zarr.json"
        if isinstance(fs, LocalFileSystem):  # object stores have no directories; local disk does
            for parent in {k.rsplit("/", 1)[0] for k in payload}:
                fs.makedirs(parent, exist_ok=True)
        fs.pipe({k: v for k, v in payload.items() if k != root_meta})
        fs.pipe_file(root_meta, payload[root_meta])
        return cls.open(url, storage_options)

    @classmethod
    def refuse_foreign(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> Cube | None:
        """The copgen cube at ``url``, None when there is nothing there (or only our own ``_ledger``/``_plan``
        of an interrupted create); ``ForeignStoreError`` for anything else. Reads only: call it before
        taking a lease, which writes under the URL."""
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        root = root.rstrip("/")
        fs.invalidate_cache(root)
        try:
            entries = fs.ls(root, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        if not entries and fs.isfile(root):
            raise ForeignStoreError(f"{redact(url)} is a file, not a copgen cube: refusing to write there; "
                                    "choose another --out")
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
        if not names - _OWN_PREFIXES:
            return None
        try:
            return cls.open(url, storage_options, consolidated=False)
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError, CubeError) as exc:
            raise ForeignStoreError(
                f"{redact(url)} holds something that is not a copgen cube of schema {SCHEMA_VERSION} "
                f"({', '.join(sorted(names)[:6])}): it was left untouched; choose another --out, or move it "
                f"away ({type(exc).__name__})") from None

    @staticmethod
    def _root_attrs(spec: CubeSpec, batches: list[tuple[int, int]]) -> dict[str, Any]:
        provenance = {"package_version": package_version(), **dict(spec.provenance)}
        return {
            "Conventions": "CF-1.10",
            "title": spec.title,
            "source": "COP-GEN-Beta (multi-modal diffusion) conditioned on Major TOM Core thumbnails",
            "license": LICENCE,
            "licence_note": LICENCE_NOTE,
            "synthetic": bool(spec.synthetic),
            "origin_codes": dict(ORIGIN_CODES),
            "copgen_provenance": provenance,
            "copgen_cube": {
                "schema_version": SCHEMA_VERSION,
                "spec": spec.to_json(),
                "batches": [list(b) for b in batches],
            },
        }

    @staticmethod
    def _create_arrays(group: Any, spec: CubeSpec) -> None:
        """The cube's arrays, empty along ``sample``: the per-sample coordinates, then the data."""
        s, it, t, nb = spec.shard_samples, spec.iterations, spec.tile_size, spec.bands
        nm = len(spec.modalities)
        zstd = (ZstdCodec(level=spec.zstd_level),)
        tiles = zstd if spec.compress_tiles else None
        # Arrays written by blocks name their objects ``c.<sample>.0...`` in one folder per array: with
        # zarr's default "/" every sample is a chain of 4-5 nested folders, and creating them cost twice
        # the write itself on local disk (benchmarks/RESULTS.md "Cube writes"); object stores don't care.
        flat = {"chunk_key_encoding": {"name": "default", "separator": "."}}
        Cube._create_sample_coordinates(group, zstd)
        iteration = group.create_array("iteration", shape=(it,), chunks=(it,), dtype="int32",
                                       dimension_names=["iteration"], attributes={
                                           "long_name": "loop iteration (0 = input state)"})
        iteration[:] = np.arange(it, dtype="int32")
        modality = group.create_array("modality", shape=(nm,), chunks=(nm,), dtype=str,
                                      dimension_names=["modality"], attributes={"long_name": "modality"})
        modality[:] = np.array([m.name for m in spec.modalities], dtype=object)
        for m in spec.modalities:
            group.create_array(
                m.name, shape=(0, it, t, t, nb), dtype="uint8", fill_value=0,
                chunks=(1, 1, t, t, nb), shards=(s, it, t, t, nb), compressors=tiles,
                dimension_names=["sample", "iteration", "y", "x", "band"], **flat,
                attributes={"long_name": f"{m.name} thumbnail ({m.dataset})", "units": "1",
                            "valid_min": 0, "valid_max": 255, "coordinates": _COORDS},
            )
        if spec.latent_shape is not None:
            c, h, w = spec.latent_shape
            group.create_array(
                "latents", shape=(0, it, nm, c, h, w), dtype="float16", fill_value=0.0,
                chunks=(1, 1, 1, c, h, w), shards=(s, it, nm, c, h, w), compressors=zstd,
                dimension_names=["sample", "iteration", "modality", "c", "h", "w"], **flat,
                attributes={"long_name": "autoencoder latent (posterior sample x scale factor)",
                            "units": "1", "coordinates": _COORDS},
            )
        group.create_array(
            "origin", shape=(0, it, nm), dtype="uint8", fill_value=0, chunks=(s, it, nm),
            compressors=zstd, dimension_names=["sample", "iteration", "modality"], **flat,
            attributes={"long_name": "origin of the modality's tile",
                        "flag_values": list(ORIGIN_CODES.values()),
                        "flag_meanings": " ".join(ORIGIN_CODES), "coordinates": _COORDS},
        )
        group.create_array(
            "done", shape=(0,), dtype="uint8", fill_value=0, chunks=(s,), compressors=zstd,
            dimension_names=["sample"], **flat,
            attributes={"long_name": "sample fully written", "flag_values": [0, 1],
                        "flag_meanings": "pending done", "coordinates": _COORDS},
        )

    @staticmethod
    def _create_sample_coordinates(group: Any, zstd: tuple) -> None:
        """The coordinates along ``sample``: cell, patch, variant, centre, and the georeferencing."""
        coord = {"dimension_names": ["sample"], "chunks": (_COORD_CHUNK,), "compressors": zstd}
        group.create_array("grid_cell", shape=(0,), dtype=str,
                           attributes={"long_name": "Major TOM grid cell"}, **coord)
        group.create_array("patch", shape=(0,), dtype=str, attributes={
            "long_name": "patch of the 1024 px centre crop: 0..15 row-major 256 px, or 'center'"}, **coord)
        group.create_array("variant", shape=(0,), dtype="int32", fill_value=0, attributes={
            "long_name": "seed variant of the (grid_cell, patch) sample: 0..N-1 with N samples per cell"},
            **coord)
        for name, axis in (("centre_lat", "latitude"), ("centre_lon", "longitude")):
            group.create_array(name, shape=(0,), dtype="float64", fill_value=np.nan, attributes={
                "standard_name": axis, "units": f"degrees_{'north' if axis == 'latitude' else 'east'}",
                "long_name": f"{axis} of the grid cell centre"}, **coord)
        # Georeferencing (docs/DESIGN.md "Georeferencing"): per sample, because cells differ in UTM zone,
        # so one CF grid_mapping cannot describe the cube; these three are enough for rasterio/rioxarray.
        group.create_array("epsg", shape=(0,), dtype="int32", fill_value=0, attributes={
            "long_name": "EPSG code of the sample's CRS (WGS84 / UTM zone; 0 = unknown)",
            "grid_mapping_name": "transverse_mercator", "semi_major_axis": 6378137.0,
            "inverse_flattening": 298.257223563, "scale_factor_at_central_meridian": 0.9996,
            "false_easting": 500000.0, "latitude_of_projection_origin": 0.0,
            "comment": "per sample: central meridian -183 + 6 * (epsg % 100) deg, false northing 0 (326zz) "
                       "or 10000000 m (327zz); rioxarray: da.rio.write_crs(int(epsg))"}, **coord)
        group.create_array("transform", shape=(0, 6), dtype="float64", fill_value=np.nan,
                           chunks=(_COORD_CHUNK, 6), compressors=zstd, dimension_names=["sample", "affine"],
                           attributes={
                               "long_name": "GDAL geotransform of the tile in the sample's CRS",
                               "units": "m",
                               "comment": "(x_ul, res_x, 0, y_ul, 0, -res_y) of pixel corners (pixel "
                                          "(0, 0)'s upper-left corner at (x_ul, y_ul)); rasterio: "
                                          "Affine.from_gdal(*transform); NaN = unknown"})
        group.create_array("footprint", shape=(0,), dtype=str, attributes={
            "long_name": "footprint of the tile: WKT POLYGON of its corners in lon/lat (EPSG:4326)"},
            **coord)

    @classmethod
    def open(
        cls, url: str, storage_options: Mapping[str, Any] | None = None, *, consolidated: bool = True,
        read_only: bool = False,
    ) -> Cube:
        """Open an existing cube (schema and block list from its metadata). ``read_only``: a reader's
        handle (report, inspect, metrics, export): its group opens in mode ``r`` and it cannot write."""
        group = _open_group(url, storage_options, "r", consolidated=consolidated)
        meta = group.attrs.get("copgen_cube")
        if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
            raise CubeError(
                f"{redact(url)} is not a copgen cube of schema {SCHEMA_VERSION} (attr copgen_cube={meta!r})"
            )
        return cls(url, CubeSpec.from_json(meta["spec"]), meta["batches"], storage_options,
                   read_only=read_only)

    def grow(
        self,
        grid_cells: Sequence[str],
        patches: Sequence[str | int],
        centre_lat: Sequence[float] | None = None,
        centre_lon: Sequence[float] | None = None,
        variants: Sequence[int] | None = None,
        *,
        epsg: Sequence[int] | None = None,
        thumbnail_px: int | None = None,
        georef: Georef | None = None,
    ) -> list[WorkBlock]:
        """Driver only: append a batch of samples (resize, write their coordinates, register the blocks,
        re-consolidate). Returns the new batch's blocks. Run it before dispatching the blocks.

        Georeferencing: ``georef`` as given, else computed from the Major TOM grid for samples cut at the
        cube's tile size from ``thumbnail_px`` thumbnails (default: the published 1068 px) in ``epsg``
        (default: each cell's grid UTM zone)."""
        n = len(grid_cells)
        if n == 0:
            return []
        if len(patches) != n:
            raise CubeSchemaError(f"grow: {len(patches)} patches for {n} grid cells in {redact(self.url)}")
        georef = self._georef_for(grid_cells, patches, epsg, thumbnail_px, georef)
        lat = np.full(n, np.nan) if centre_lat is None else np.asarray(centre_lat, dtype="float64")
        lon = np.full(n, np.nan) if centre_lon is None else np.asarray(centre_lon, dtype="float64")
        var = np.zeros(n, dtype="int32") if variants is None else np.asarray(variants, dtype="int32")
        if lat.shape != (n,) or lon.shape != (n,) or var.shape != (n,):
            raise CubeSchemaError(
                f"grow: centre_lat/centre_lon/variants must have length {n} ({redact(self.url)})")
        # The metadata on disk, not a possibly stale consolidated copy, is the truth for the driver.
        fresh = Cube.open(self.url, self.storage_options, consolidated=False)
        self.batches = fresh.batches
        start = self.next_batch_start()
        stop = start + n
        group = _open_group(self.url, self.storage_options, "r+", consolidated=False)
        for _name, arr in group.arrays():
            if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == "sample":
                arr.resize((stop, *arr.shape[1:]))
        group["grid_cell"][start:stop] = np.array([str(c) for c in grid_cells], dtype=object)
        group["patch"][start:stop] = np.array([str(p) for p in patches], dtype=object)
        group["variant"][start:stop] = var
        group["centre_lat"][start:stop] = lat
        group["centre_lon"][start:stop] = lon
        if "epsg" in group:  # cubes created before georeferencing have none
            group["epsg"][start:stop] = georef.epsg.astype("int32")
            group["transform"][start:stop] = georef.transform
            group["footprint"][start:stop] = np.asarray(georef.footprint, dtype=object)
        self.batches = [*self.batches, (start, stop)]
        # The batch list is the commit point of a grow: written after the arrays, then consolidated.
        group.attrs["copgen_cube"] = self._root_attrs(self.spec, self.batches)["copgen_cube"]
        _quiet_consolidate(group.store)
        self._group = None
        return self.blocks_of(start, stop)

    def _georef_for(self, grid_cells, patches, epsg, thumbnail_px: int | None,
                    georef: Georef | None) -> Georef:
        """``georef`` checked to cover the samples, else computed from the Major TOM grid (see ``grow``)."""
        n = len(grid_cells)
        if georef is None:
            try:
                georef = sample_georef(grid_cells, patches, epsg, thumbnail_px=thumbnail_px or RASTER_PX,
                                       sample_px=self.spec.tile_size)
            except GeorefError as exc:
                raise CubeSchemaError(f"grow {redact(self.url)}: {exc}") from None
        if georef.epsg.shape != (n,) or georef.transform.shape != (n, 6):
            raise CubeSchemaError(f"grow: georef must cover {n} samples ({redact(self.url)})")
        return georef

    @contextlib.contextmanager
    def driver_group(self):
        """Driver only: the group opened for metadata edits (run attrs, summary subgroups); the
        consolidated metadata is rewritten when the block exits."""
        group = _open_group(self.url, self.storage_options, "r+", consolidated=False)
        yield group
        _quiet_consolidate(group.store)
        self._group = None

    def consolidate(self) -> None:
        """Driver only: rewrite the consolidated metadata (repair after an interrupted ``grow``)."""
        _quiet_consolidate(_open_group(self.url, self.storage_options, "r+", consolidated=False).store)

    # -- blocks ----------------------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return self.batches[-1][1] if self.batches else 0

    def next_batch_start(self) -> int:
        """Where the next ``grow`` puts its batch: on a shard boundary, so it never shares an object with
        the last batch; samples skipped after a ragged last shard are padding (in no batch, never done)."""
        shard = self.spec.shard_samples
        return -(-self.n_samples // shard) * shard

    def batch_mask(self) -> np.ndarray:
        """bool over all samples: True inside a batch, False for the padding between batches."""
        mask = np.zeros(self.n_samples, dtype=bool)
        for a, b in self.batches:
            mask[a:b] = True
        return mask

    def blocks_of(self, start: int, stop: int) -> list[WorkBlock]:
        size = self.spec.block_samples
        return [WorkBlock(a, min(a + size, stop)) for a in range(start, stop, size)]

    def blocks(self) -> list[WorkBlock]:
        """Every work block of the cube, in sample order."""
        return [b for start, stop in self.batches for b in self.blocks_of(start, stop)]

    def check_block(self, block: WorkBlock) -> WorkBlock:
        """Return ``block`` if it is a registered work block, else raise ``BlockAlignmentError``."""
        if block in set(self.blocks()):
            return block
        near = [b for b in self.blocks() if b.stop > block.start and b.start < block.stop][:4]
        raise BlockAlignmentError(
            f"region [{block.start}, {block.stop}) is not a work block of cube {redact(self.url)} "
            f"(block_samples={self.spec.block_samples}, shard_samples={self.spec.shard_samples}, "
            f"{self.n_samples} samples); overlapping blocks: {[(b.start, b.stop) for b in near]}. "
            "Write whole blocks only: a partial block would share shards with another task."
        )

    # -- worker side: data -----------------------------------------------------------------------
    @property
    def group(self) -> Any:
        # mode "r+" is needed to write chunks; this handle never writes metadata (only the driver does).
        if self._group is None:
            mode = "r" if self.read_only else "r+"
            self._group = _open_group(self.url, self.storage_options, mode, consolidated=True)
        return self._group

    def _expect(self, name: str, arr: Any, shape: tuple[int, ...], dtype: str,
                block: WorkBlock) -> np.ndarray:
        a = np.asarray(arr)
        if a.shape != shape or a.dtype != np.dtype(dtype):
            raise CubeSchemaError(
                f"block {block.id} of {redact(self.url)}: {name} must be {dtype} {shape}, got "
                f"{a.dtype} {a.shape}"
            )
        return a

    def sample_keys(self, start: int = 0, stop: int | None = None) -> list[SampleKey]:
        """The :class:`SampleKey` of samples ``[start, stop)`` (default: all), from the coordinates."""
        g = self.group
        stop = self.n_samples if stop is None else stop
        return [SampleKey(c, p, v) for c, p, v in zip(
            g["grid_cell"][start:stop], g["patch"][start:stop], g["variant"][start:stop], strict=True)]

    def _check_keys(self, block: WorkBlock, keys: Sequence[SampleKey]) -> None:
        """The block's samples must be the ones the cube holds at its place (like a chunk key against
        its template): a plan read for another cube or another batch would write the wrong cells."""
        keys = [k if isinstance(k, SampleKey) else SampleKey(*k) for k in keys]
        if len(keys) != block.size:
            raise CubeSchemaError(
                f"block {block.id} of {redact(self.url)}: {len(keys)} sample keys for {block.size} samples")
        stored = self.sample_keys(block.start, block.stop)
        for i, (want, got) in enumerate(zip(stored, keys, strict=True)):
            if want != got:
                raise CubeSchemaError(
                    f"block {block.id} of {redact(self.url)}: sample {block.start + i} is {want} in the "
                    f"cube, the block carries {got}")

    def write_block(self, block: WorkBlock, data: BlockData, rows_written: int = 0) -> dict[str, str]:
        """Worker: write all arrays of one block, ``done`` last. Returns ``{array: sha256}`` of what was
        written (deterministic, for the ledger marker). Rewriting a block writes the same bytes.
        ``rows_written``: the block's first rows whose data ``write_rows`` already stored (a pipeline
        writing behind generation); only the rest of the data, then ``done``, is written here."""
        arrays = self._block_arrays(block, data)
        if not (0 <= rows_written <= block.size
                and (rows_written % self.spec.shard_samples == 0 or rows_written == block.size)):
            raise BlockAlignmentError(f"rows_written={rows_written}: no shard boundary of block {block.id}")
        hashes = {name: chunkwrite.submit(_sha256, values) for name, values in arrays.items()}
        rest = {k: v[rows_written:] for k, v in arrays.items() if k != "done" and rows_written < block.size}
        # whole objects, encoded and stored concurrently; ``done`` only once every data object is stored
        write_region(self.group, self.url, self.storage_options, block.start + rows_written, rest)
        write_region(self.group, self.url, self.storage_options, block.start, {"done": arrays["done"]})
        return {name: f.result() for name, f in hashes.items()}

    def write_rows(self, block: WorkBlock, data: BlockData, lo: int, hi: int) -> None:
        """Worker: store the data arrays (not ``done``) of rows ``[lo, hi)`` of ``block`` (block-relative,
        on shard boundaries or the block's end), e.g. while later rows are still being generated. The
        block counts as written only once ``write_block`` has stored ``done``."""
        arrays = self._block_arrays(block, data)
        shard = self.spec.shard_samples
        if not (0 <= lo < hi <= block.size and lo % shard == 0 and (hi % shard == 0 or hi == block.size)):
            raise BlockAlignmentError(
                f"rows [{lo}, {hi}) of block {block.id} of {redact(self.url)} are not whole shards of "
                f"{shard} samples: they would share objects with rows written later")
        write_region(self.group, self.url, self.storage_options, block.start + lo,
                     {k: v[lo:hi] for k, v in arrays.items() if k != "done"})

    def _block_arrays(self, block: WorkBlock, data: BlockData) -> dict[str, np.ndarray]:
        """The block's arrays by name (data first, ``done`` last), validated against the schema and the
        block's keys against the cube's coordinates."""
        if self.read_only:
            raise CubeError(f"{redact(self.url)} was opened read-only: block {block.id} cannot be written")
        self.check_block(block)
        self._check_keys(block, data.keys)
        spec, n = self.spec, block.size
        tile = (n, spec.iterations, spec.tile_size, spec.tile_size, spec.bands)
        images = {Modality.parse(k): v for k, v in data.images.items()}
        extra = set(images) - set(spec.modalities)
        if extra:
            raise CubeSchemaError(
                f"block {block.id} of {redact(self.url)}: modalities {sorted(m.name for m in extra)} are "
                f"not in the cube ({[m.name for m in spec.modalities]})"
            )
        arrays: dict[str, np.ndarray] = {}
        for m in spec.modalities:
            arrays[m.name] = (
                self._expect(m.name, images[m], tile, "uint8", block) if m in images
                else np.zeros(tile, dtype="uint8")
            )
        nm = len(spec.modalities)
        if spec.latent_shape is not None:
            if data.latents is None:
                raise CubeSchemaError(
                    f"block {block.id} of {redact(self.url)}: the cube has latents; none given")
            arrays["latents"] = self._expect(
                "latents", data.latents, (n, spec.iterations, nm, *spec.latent_shape), "float16", block)
        elif data.latents is not None:
            raise CubeSchemaError(f"block {block.id} of {redact(self.url)}: latents given, cube has none")
        origin = self._expect("origin", data.origin, (n, spec.iterations, nm), "uint8", block)
        if origin.size and int(origin.max()) > max(ORIGIN_CODES.values()):
            raise CubeSchemaError(
                f"block {block.id} of {redact(self.url)}: origin codes must be {ORIGIN_CODES}, "
                f"got {int(origin.max())}")
        arrays["origin"] = origin
        done = np.ones(n, dtype=bool) if data.done is None else np.asarray(data.done, dtype=bool)
        arrays["done"] = self._expect("done", done.astype("uint8"), (n,), "uint8", block)
        return arrays

    # -- reading ---------------------------------------------------------------------------------
    def read_tile(self, sample: int, iteration: int, modality: Modality | str) -> np.ndarray:
        """One (sample, iteration) tile of one modality: ``(tile, tile, bands)`` uint8."""
        return self.group[Modality.parse(modality).name][sample, iteration]

    def read_block(self, block: WorkBlock) -> dict[str, np.ndarray]:
        """All arrays of one block (for checks and verification)."""
        names = [m.name for m in self.spec.modalities] + ["origin", "done"]
        if self.spec.latent_shape is not None:
            names.append("latents")
        return {name: self.group[name][block.start:block.stop] for name in names}

    # -- the read view (report, inspect, metrics): typed accessors and the xarray dataset -------------
    @property
    def attrs(self) -> dict[str, Any]:
        """The group's attributes (run provenance ``copgen_runs``, licence, ...)."""
        return dict(self.group.attrs)

    def grid_cells(self) -> np.ndarray:
        """``grid_cell`` of every sample (str)."""
        if not self.n_samples:
            return np.array([], str)
        return np.asarray([str(c) for c in self.group["grid_cell"][:]])

    def origins(self) -> np.ndarray:
        """``origin`` codes of every sample: uint8 ``(sample, iteration, modality)`` (see ``Origin``)."""
        if not self.n_samples:
            return np.zeros((0, self.spec.iterations, len(self.spec.modalities)), np.uint8)
        return np.asarray(self.group["origin"][:])

    def tiles(self, modality: Modality | str, samples: Sequence[int] | np.ndarray,
              iteration: int) -> np.ndarray:
        """Tiles of ``samples`` at ``iteration``: uint8 ``(len(samples), tile, tile, bands)``."""
        arr = self.group[Modality.parse(modality).name]
        return np.asarray(arr[np.asarray(samples, dtype=int), iteration])

    def dataset(self):
        """The cube as a lazy ``xarray.Dataset`` (consolidated metadata; nothing is loaded until used)."""
        import xarray as xr

        kwargs: dict[str, Any] = {"consolidated": True, "zarr_format": 3}
        if self.storage_options and "://" in self.url:
            kwargs["storage_options"] = dict(self.storage_options)
        return xr.open_zarr(self.url, **kwargs)

    def done_mask(self) -> np.ndarray:
        """``done`` as a bool array over all samples."""
        return np.asarray(self.group["done"][:], dtype=bool)

    def block_digest(self, block: WorkBlock) -> dict[str, str]:
        """``{array: sha256}`` of what is stored for ``block`` (compare with the marker's ``arrays``)."""
        return {name: _sha256(v) for name, v in self.read_block(block).items()}
