"""Metadata rows the reader rejects: a real observation is never replaced, dropped or overwritten silently.

A rejected row (unparseable or off-grid ``grid_cell``, ``centre_lat`` NaN, ``nodata`` inf, ...) would
otherwise make its cell look as if that modality were missing, and completion would generate over a real
observation. So, by default (``invalid_rows="quarantine"``), every rejected row becomes a quarantine
record (cell, dataset, file, field, reason; ``stage="source"``) and the cell it describes is held back
from the cube: the run exits 3. The cell is found from the row's ``grid_cell``, or, when that is broken,
from the cell stored in the image row group the row points to; a row whose cell cannot be found at all is
recorded with its raw ``grid_cell`` text and still makes the run partial.

Records are rewritten each run under the lease: a row fixed in the source loses its record and its cell is
planned like any new cell. ``invalid_rows="missing"`` restores the old behaviour (the modality counts as
absent and may be generated); the choice is kept in the run's provenance.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
from copgen.flows.jobs import JobError
from copgen.modalities import ALL, Modality
from copgen.storage.ledger import Ledger, QuarantineRecord
from copgen.storage.majortom.reader import BadSample, MajorTomReader, MetadataFilter

POLICIES = ("quarantine", "missing")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise JobError(f"--invalid-rows {policy!r}: use 'quarantine' (default) or 'missing'")
    return policy


def _modality(dataset: str) -> Modality | None:
    return {m.dataset: m for m in ALL}.get(dataset)


def source_records(reader: MajorTomReader, bad: Iterable[BadSample], pairs: pd.DataFrame,
                   filters: MetadataFilter | None, run_id: str) -> list[QuarantineRecord]:
    """One record per rejected metadata row that concerns this run: every row when no filter is given,
    else rows of cells the run planned (or whose cell cannot be identified)."""
    planned = set(pairs["grid_cell"].astype(str))
    filtered = filters is not None and filters != MetadataFilter()
    out = []
    for b in bad:
        m = _modality(b.dataset)
        cell = b.grid_cell if b.field != "grid_cell" else None
        if cell is None and m is not None and b.image_file is not None and b.image_row is not None:
            cell = reader.cell_of_image(m, b.image_file, b.image_row)
        if cell is not None and filtered and cell not in planned:
            continue
        where = f"metadata row {b.metadata_row}" if b.metadata_row is not None else "metadata"
        note = "" if cell is not None else "; the cell it describes cannot be identified"
        out.append(QuarantineRecord(
            grid_cell=cell if cell is not None else f"?{b.grid_cell}", patch="*",
            modality=m.name if m is not None else "*", file=b.file or "", dataset=b.dataset,
            field=b.field or "",
            reason=f"{where}: {b.reason}{note}", run_id=run_id, stage="source"))
    return out


def hold_back(pairs: pd.DataFrame, records: Iterable[QuarantineRecord]) -> pd.DataFrame:
    """The pairs without the cells that have a rejected row."""
    cells = {r.grid_cell for r in records}
    return pairs[~pairs["grid_cell"].astype(str).isin(cells)].reset_index(drop=True)


def refresh(ledger: Ledger, records: list[QuarantineRecord]) -> None:
    """Driver, under the lease: the ledger's source-stage records become exactly ``records``."""
    keep = {r.key for r in records}
    for old in ledger.quarantined():
        if old.stage == "source" and old.key not in keep:
            ledger.forget_quarantine(old)
    for r in records:
        ledger.quarantine(r)
