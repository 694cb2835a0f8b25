"""``copgen export``: a cube (local or S3) as a training corpus a GIS or a training script reads.

Formats: ``majortom`` (the published Core layout with origin/provenance columns,
``storage/export_majortom.py``) and ``cog`` (Cloud-Optimized GeoTIFFs + a STAC catalog validated
offline, ``storage/stac.py``). ``with_source``: the full dataset view, the source's complete cells that
the completion did not touch added as real samples (``storage/export.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from copgen.storage.export import ExportError, Selection, SourceView, iter_samples
from copgen.storage.export_majortom import write_majortom
from copgen.storage.stac import validate_catalog, write_cog_stac

FORMATS = ("majortom", "cog")


def run_export(
    cube_url: str,
    out_url: str,
    *,
    format: str = "majortom",
    origins: Sequence[str] = ("real", "generated"),
    modalities: Sequence[str] | str | None = None,
    iteration: int | None = None,
    run_id: str | None = None,
    tables_url: str | None = "default",
    with_source: str | None = None,
    source_thumbnail_sizes: Mapping[str, int] | None = None,
    thumbnail_format: str | None = None,
    validate: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Export one cube; returns a summary (tiles per modality and origin, where it went)."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: choose from {list(FORMATS)}")
    from copgen.modalities import ALL, parse_list

    selection = Selection(origins=tuple(origins), modalities=parse_list(modalities) if modalities else ALL,
                          iteration=iteration, run_id=run_id)
    so = dict(storage_options or {})
    source = (SourceView(with_source, so, dict(source_thumbnail_sizes or {})) if with_source else None)
    samples = iter_samples(cube_url, selection, storage_options=so, tables_url=tables_url, source=source)
    if format == "majortom":
        summary = write_majortom(samples, out_url, storage_options=so, thumbnail_format=thumbnail_format)
    else:
        summary = write_cog_stac(samples, out_url, storage_options=so)
        if validate:
            summary["stac_files_validated"] = validate_catalog(out_url, so)
    if not summary["tiles"]:
        raise ExportError(f"nothing exported from {cube_url}: no done sample matches the filters "
                          f"(origin {list(origins)}, modality {modalities or 'all'}, run {run_id or 'any'})")
    summary["cube"] = cube_url
    return summary
