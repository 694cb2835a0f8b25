"""Training data over corpora: a PyTorch ``IterableDataset`` over a cube or a ``copgen export``
(Major TOM layout), with a chosen real/generated mix and modality set.

A *sample* here is one ``(grid_cell, patch, variant)`` that has every selected modality (real or
generated; absent never). It is *generated* when any of its selected tiles is. ``generated_fraction``
picks, deterministically from ``seed``, the largest subset whose share of generated samples is that
fraction (``None``: every eligible sample; 0: only fully real ones; 1: only ones with generated tiles).

Workers: each DataLoader worker (``torch.utils.data.get_worker_info``) reads a disjoint, strided share of
the index; ``shard=(i, n)`` splits further across processes (Dask tasks, ranks). The dataset holds only
URLs and the small index, so it pickles to workers cheaply; tiles are read lazily in contiguous runs.

Each item: ``{"images": uint8 tensor (M, S, S, 3), "modalities": "DEM,S1RTC,...", "origin":
"generated,real,...", "grid_cell", "patch", "variant", "epsg", "transform": float64 tensor (6,),
"provenance": JSON str}`` (all collate with the default ``collate_fn``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import torch
from copgen.errors import CopgenError
from copgen.modalities import ALL, Modality, parse_list
from copgen.storage.cubes import ORIGIN_CODES, Cube, CubeError
from copgen.storage.export import read_plan_rows
from copgen.storage.fsutil import join_url
from copgen.storage.ledger import Ledger
from copgen.storage.objects import redact
from PIL import Image


class DatasetError(CopgenError, ValueError):
    """A corpus that cannot give the requested samples; the message names the corpus and option."""


def corpus_kind(url: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """``"cube"`` (a copgen cube), ``"export"`` (a ``copgen export --format majortom`` corpus: its
    metadata has an ``origin`` column) or None (anything else, e.g. a plain Major TOM source)."""
    so = dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(url, **so)
    root = root.rstrip("/")
    if fs.exists(f"{root}/zarr.json"):
        try:
            Cube.open(url, so, read_only=True)
            return "cube"
        except (CubeError, KeyError, FileNotFoundError):
            return None
    for m in ALL:
        meta = f"{root}/{m.dataset}/metadata.parquet"
        if fs.exists(meta):
            import pyarrow.parquet as pq

            with fs.open(meta, "rb") as f:
                return "export" if "origin" in pq.read_schema(f).names else None
    return None


@dataclass(frozen=True)
class _Index:
    table: pd.DataFrame  # one row per eligible sample: key, generated flag, where to read it


class CorpusDataset(torch.utils.data.IterableDataset):
    """Samples of a cube or an exported corpus (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        modalities: Sequence[Modality | str] = ALL,
        generated_fraction: float | None = None,
        iteration: int | None = None,
        sample_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shard: tuple[int, int] = (0, 1),
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self.modalities = parse_list(modalities)
        self.storage_options = dict(storage_options or {})
        self.sample_size = sample_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.shard = (int(shard[0]), int(shard[1]))
        if not 0 <= self.shard[0] < self.shard[1]:
            raise DatasetError(f"shard {shard}: need 0 <= i < n")
        if generated_fraction is not None and not 0.0 <= float(generated_fraction) <= 1.0:
            raise DatasetError(f"generated_fraction {generated_fraction}: must be in [0, 1]")
        self.kind = corpus_kind(url, self.storage_options)
        if self.kind is None:
            raise DatasetError(f"{redact(url)} is neither a copgen cube nor a copgen export (majortom)")
        full = self._cube_index(iteration) if self.kind == "cube" else self._export_index()
        self.index = _mix(full, generated_fraction, self.seed)
        if self.index.empty:
            raise DatasetError(
                f"{redact(url)}: no sample for generated_fraction={generated_fraction}: of "
                f"{len(full)} samples with all of {[m.name for m in self.modalities]}, "
                f"{int(full.generated.sum()) if len(full) else 0} hold generated tiles")

    # -- index -------------------------------------------------------------------------------------
    def _cube_index(self, iteration: int | None) -> pd.DataFrame:
        cube = Cube.open(self.url, self.storage_options, read_only=True)
        self.iteration = cube.spec.iterations - 1 if iteration is None else int(iteration)
        missing = [m.name for m in self.modalities if m not in cube.spec.modalities]
        if missing or not 0 <= self.iteration < cube.spec.iterations:
            raise DatasetError(f"{redact(self.url)}: modalities {missing} / iteration {self.iteration} not "
                               f"in the cube")
        g = cube.group
        cols = [cube.spec.modalities.index(m) for m in self.modalities]
        origin = np.asarray(g["origin"][:, self.iteration])[:, cols] if cube.n_samples else np.zeros((0, 1))
        done = cube.done_mask()
        bad = {(q.grid_cell, q.patch) for q in Ledger(cube.url, self.storage_options).quarantined()}
        df = pd.DataFrame({"grid_cell": [str(c) for c in g["grid_cell"][:]],
                           "patch": [str(p) for p in g["patch"][:]],
                           "variant": g["variant"][:].astype(int), "pos": np.arange(cube.n_samples)})
        df["epsg"] = g["epsg"][:] if "epsg" in g else 0
        ok = done & (origin != ORIGIN_CODES["absent"]).all(axis=1)
        ok &= ~np.fromiter(((c, p) in bad for c, p in zip(df.grid_cell, df.patch, strict=True)), bool,
                           count=len(df))
        df["origin"] = [",".join("generated" if c == ORIGIN_CODES["generated"] else "real" for c in row)
                        for row in origin]
        df["generated"] = (origin == ORIGIN_CODES["generated"]).any(axis=1)
        self._transform = np.asarray(g["transform"][:]) if "transform" in g else np.full((len(df), 6), np.nan)
        self._plan = read_plan_rows(cube, self.storage_options)
        return df[ok].reset_index(drop=True)

    def _export_index(self) -> pd.DataFrame:
        from copgen.storage.majortom.reader import MajorTomReader

        self.iteration = None
        reader = MajorTomReader(self.url, modalities=list(self.modalities),
                                storage_options=self.storage_options, on_error="skip",
                                thumbnail_sizes={m: None for m in self.modalities})
        cells = [c for c in reader.pair().cells() if c.present.issuperset(self.modalities)]
        extra = {m: self._export_meta(m).set_index("grid_cell") for m in self.modalities}
        df = pd.DataFrame({"grid_cell": pd.Series([c.grid_cell for c in cells], dtype=object)})
        first = extra[self.modalities[0]]
        df["patch"] = [str(first.at[c, "patch"]) for c in df.grid_cell]
        df["variant"] = [int(first.at[c, "variant"]) for c in df.grid_cell]
        df["epsg"] = [int(first.at[c, "epsg"]) for c in df.grid_cell]
        df["pos"] = np.arange(len(df))
        df["origin"] = [",".join(str(extra[m].at[c, "origin"]) for m in self.modalities)
                        for c in df.grid_cell]
        df["generated"] = df["origin"].str.contains("generated")
        self._cells = cells
        self._extra = extra
        self._transform = np.asarray([json.loads(first.at[c, "transform"]) for c in df.grid_cell],
                                     dtype=np.float64).reshape(len(df), 6)
        return df

    def _export_meta(self, m: Modality) -> pd.DataFrame:
        url = join_url(self.url, m.dataset, "metadata.parquet")
        with fsspec.open(url, "rb", **self.storage_options) as f:
            meta = pd.read_parquet(io.BytesIO(f.read()))
        return meta.drop_duplicates("grid_cell", keep="first")  # the reader keeps the first row too

    # -- iteration ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._my_rows(1, 0))

    def _my_rows(self, n_workers: int, worker: int) -> pd.DataFrame:
        order = self.index
        if self.shuffle:
            order = order.sample(frac=1.0, random_state=self.seed)
        parts = self.shard[1] * n_workers
        part = self.shard[0] * n_workers + worker
        return order.iloc[part::parts]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        rows = self._my_rows(info.num_workers if info else 1, info.id if info else 0)
        read = self._read_cube if self.kind == "cube" else self._read_export
        for start in range(0, len(rows), 32):
            chunk = rows.iloc[start:start + 32]
            yield from read(chunk)

    def _item(self, r, images: list[np.ndarray], provenance: Mapping[str, Any]) -> dict[str, Any]:
        size = self.sample_size or images[0].shape[0]
        tiles = [img if img.shape[0] == size else
                 np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
                 for img in images]
        return {
            "images": torch.from_numpy(np.stack(tiles)),
            "modalities": ",".join(m.name for m in self.modalities),
            "origin": r.origin,
            "grid_cell": r.grid_cell,
            "patch": r.patch,
            "variant": int(r.variant),
            "epsg": int(r.epsg),
            "transform": torch.from_numpy(self._transform[int(r.pos)].copy()),
            "provenance": json.dumps(dict(provenance), sort_keys=True, default=str),
        }

    def _read_cube(self, chunk: pd.DataFrame) -> Iterator[dict[str, Any]]:
        cube = Cube.open(self.url, self.storage_options, read_only=True)
        g = cube.group
        runs = dict(g.attrs.get("copgen_runs", {}))
        for r in chunk.itertuples(index=False):
            i = int(r.pos)
            images = [np.asarray(g[m.name][i, self.iteration]) for m in self.modalities]
            prov: dict[str, Any] = {"source": redact(self.url), "sample": i, "iteration": self.iteration,
                                    "runs": sorted(runs)}
            if not self._plan.empty and i in self._plan.index:
                for m in self.modalities:
                    pid = self._plan.loc[i].get(f"{m.name}_product_id")
                    if isinstance(pid, str):
                        prov[f"{m.name}_product_id"] = pid
            yield self._item(r, images, prov)

    def _read_export(self, chunk: pd.DataFrame) -> Iterator[dict[str, Any]]:
        from copgen.storage.majortom.reader import MajorTomReader

        reader = MajorTomReader(self.url, modalities=list(self.modalities),
                                storage_options=self.storage_options, on_error="skip",
                                thumbnail_sizes={m: None for m in self.modalities})
        cells = [self._cells[int(p)] for p in chunk.pos]
        thumbs = {m: reader.fetch_thumbnails([c.source(m) for c in cells], m).thumbnails
                  for m in self.modalities}
        for r in chunk.itertuples(index=False):
            if not all(r.grid_cell in thumbs[m] for m in self.modalities):
                continue  # an unreadable record: the reader logged it
            images = []
            for m in self.modalities:
                t = thumbs[m][r.grid_cell]
                images.append(np.repeat(t[..., None], 3, axis=-1) if t.ndim == 2 else t)
            prov = {"source": redact(self.url)}
            for m in self.modalities:
                prov[f"{m.name}_generator"] = json.loads(self._extra[m].at[r.grid_cell, "generator"] or "{}")
            yield self._item(r, images, prov)


def _mix(df: pd.DataFrame, fraction: float | None, seed: int) -> pd.DataFrame:
    """The largest subset of ``df`` whose share of generated samples is ``fraction`` (seeded choice)."""
    if fraction is None or df.empty:
        return df
    gen, real = df[df.generated], df[~df.generated]
    f = float(fraction)
    if f == 0.0:
        return real
    if f == 1.0:
        return gen
    n_gen = min(len(gen), int(np.floor(len(real) * f / (1.0 - f) + 1e-9)))
    n_real = min(len(real), int(np.floor(n_gen * (1.0 - f) / f + 1e-9))) if n_gen else 0
    rng = np.random.default_rng(seed)
    pick_g = np.sort(rng.choice(len(gen), n_gen, replace=False)) if n_gen else []
    pick_r = np.sort(rng.choice(len(real), n_real, replace=False)) if n_real else []
    return pd.concat([gen.iloc[pick_g], real.iloc[pick_r]]).sort_values("pos").reset_index(drop=True)


def training_arrays(
    url: str, *, sample_size: int, generated_fraction: float | None = None, seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, list[str], list[str]]:
    """All four modalities of every selected sample as uint8 ``(N, 4, S, S, 3)`` (model order), with
    their cells and patches: what ``copgen train --source <cube or export>`` trains on."""
    ds = CorpusDataset(url, modalities=ALL, generated_fraction=generated_fraction, sample_size=sample_size,
                       seed=seed, shuffle=False, storage_options=storage_options)
    items = list(ds)
    if not items:
        raise DatasetError(f"{redact(url)}: no readable sample")
    return (np.stack([it["images"].numpy() for it in items]), [it["grid_cell"] for it in items],
            [f"{it['patch']}:v{it['variant']}" for it in items])
