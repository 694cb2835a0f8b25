"""The loop-degradation report: one self-contained HTML page (plus the PNGs) per loop study.

Reads the long metrics table (``copgen.storage.tables``) and one cube per loop condition
(``copgen.storage.cubes``) and draws the plots of metrics-peers.md §2.3, with the reading of §2.4 in the
captions:

- (a) distribution metrics (FD, KID, precision, recall, ...) vs iteration, one line per condition, the
  k=0 real-vs-reference value as the noise floor;
- (b) paired metrics vs the real image of the same cell, with 95% bootstrap CI bands;
- (c) step-to-step change (paired metrics vs the modality's previous generation);
- (d) overlaid per-band pixel histograms, coloured by k;
- (e) an image grid per modality and condition: rows = cells, columns = k=0 (real) and the iterations
  where that modality was generated;
- a half-life table (definition in :func:`half_life` and ``HALF_LIFE_DEFINITION``).

Missing pieces (a condition without reference metrics, a single iteration, a condition without a cube)
skip the figure with a note in the report instead of failing. All text is HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.metadata
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import zarr
from copgen.errors import CopgenError
from copgen.flows import report_figures as figs
from copgen.metrics import band_names, paired_metric_functions
from copgen.modalities import Modality
from copgen.storage.cubes import LICENCE, ORIGIN_CODES, Cube, CubeError
from copgen.storage.fsutil import full_url, url_to_fs
from copgen.storage.objects import redact
from copgen.storage.tables import read_table
from fsspec.implementations.local import LocalFileSystem

LICENCE_LINE = f"{LICENCE}, contains modified Copernicus Sentinel data"
# Paired metrics whose chance level is 0 by construction (structure/orientation agreement of unrelated
# images): their half-life is the plain half. The others (PSNR, SAM, ERGAS) have no natural zero: their
# half-life is measured on the excess over the value of unrelated real pairs of the same modality.
ZERO_FLOOR_METRICS = frozenset({"ssim", "ms_ssim", "gradient_orientation"})
HALF_LIFE_DEFINITION = (
    "Half-life k½: the first iteration k after k₁ (the first iteration where the modality was generated) "
    "at which the paired similarity to the real cell has lost half of what it had at k₁, measured above "
    "a floor f: (m(k) − f) / (m(k₁) − f) ≤ 0.5. For SSIM, MS-SSIM and gradient-orientation agreement "
    "f = 0 (plain half: unrelated images score ≈ 0). PSNR (dB), SAM and ERGAS have no natural zero (half "
    "of a dB value means nothing), so f = their chance level: the mean value between real images of "
    "different cells of the same modality (k=0 tiles of the cube, each paired with the next cell). The "
    "ratio is direction-free, so it works for SAM/ERGAS, where lower is better. “not reached” = the "
    "ratio stayed above 0.5 up to the last iteration.")
CHANCE_SAMPLES = 32  # real tiles (cells) for the chance level: a stable mean at a few seconds' cost


class ReportError(CopgenError, ValueError):
    """The report cannot be built from its inputs; the message names the input and the field."""


@dataclass
class FigureOut:
    """One figure (or the note that replaces it) of the report."""

    id: str
    kind: str  # a | b | c | d | e
    title: str
    caption: str
    modality: str = ""
    condition: str = ""
    png: bytes | None = None
    note: str = ""
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HalfLife:
    """One row of the half-life table."""

    condition: str
    modality: str
    metric: str
    floor: float | None  # None: no floor available (the row has a note instead of k½)
    floor_kind: str  # "zero" | "chance"
    k_first: int
    value_first: float
    k_half: int | None
    k_last: int
    retained_last: float
    note: str = ""


def half_life(iterations: Sequence[int], values: Sequence[float], floor: float) -> tuple[int | None, float]:
    """``(k½, retained fraction at the last k)`` of one paired-vs-real series (see HALF_LIFE_DEFINITION).

    ``iterations`` ascending, the first being k₁. ``k½`` is None when the ratio never falls to 0.5.
    """
    if len(iterations) != len(values) or not len(iterations):
        raise ReportError(f"half_life: {len(iterations)} iterations for {len(values)} values")
    span = values[0] - floor
    if not math.isfinite(span) or span == 0:
        raise ReportError(f"half_life: the value at k={iterations[0]} ({values[0]}) equals the floor {floor}")
    ratios = [(v - floor) / span for v in values]
    k_half = next((k for k, r in zip(iterations[1:], ratios[1:], strict=True) if r <= 0.5), None)
    return k_half, float(ratios[-1])


def _slug(text: str) -> str:
    """A safe file/id component for any label (conditions are free text), unique by a short hash."""
    base = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:48] or "x"
    return f"{base}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


def _package_version() -> str:
    try:
        return importlib.metadata.version("copgen")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- inputs ----------------------------------------------------------------------------------------


class _CubeView:
    """Read-only view of one condition's cube: what the report needs, read once."""

    def __init__(self, condition: str, url: str, storage_options: Mapping[str, Any] | None) -> None:
        self.condition, self.url = condition, url
        try:
            self.cube = Cube.open(url, storage_options)
            kwargs: dict[str, Any] = {"mode": "r", "zarr_format": 3, "use_consolidated": True}
            if storage_options and "://" in url:
                kwargs["storage_options"] = dict(storage_options)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
                self.group = zarr.open_group(url, **kwargs)
        except (FileNotFoundError, KeyError, CubeError, zarr.errors.GroupNotFoundError) as e:
            raise ReportError(f"condition {condition!r}: cannot open cube {redact(url)}: {e}") from None
        self.spec = self.cube.spec
        self.attrs = dict(self.group.attrs)
        self.done = np.asarray(self.group["done"][:], dtype=bool)
        self.grid_cell = np.asarray(self.group["grid_cell"][:], dtype=object)
        self.patch = np.asarray(self.group["patch"][:], dtype=object)

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.attrs.get("copgen_provenance") or {})

    def modality_index(self, modality: Modality) -> int | None:
        return self.spec.modalities.index(modality) if modality in self.spec.modalities else None

    def pick_samples(self, n: int) -> np.ndarray:
        """Up to ``n`` done samples, one per grid cell first (a grid of one cell's patches says little)."""
        done = np.flatnonzero(self.done)
        first, seen = [], set()
        for i in done:
            if self.grid_cell[i] not in seen:
                seen.add(self.grid_cell[i])
                first.append(i)
            if len(first) == n:
                break
        if len(first) < n:  # fewer cells than rows: fill with further patches/variants
            taken = set(first)
            first += [i for i in done if i not in taken][: n - len(first)]
        return np.sort(np.asarray(first, dtype=int))

    def origin(self, samples: np.ndarray, modality: Modality) -> np.ndarray:
        """``origin`` codes (samples, iterations) of one modality."""
        m = self.modality_index(modality)
        if m is None or not len(samples):
            return np.zeros((len(samples), self.spec.iterations), dtype="uint8")
        return np.asarray(self.group["origin"].get_orthogonal_selection((samples, slice(None), m)))

    def tiles(self, samples: np.ndarray, iterations: Sequence[int], modality: Modality) -> np.ndarray:
        return np.asarray(self.group[modality.name].get_orthogonal_selection(
            (samples, np.asarray(iterations, dtype=int))))

    def chance_levels(self, modality: Modality, cache: dict[str, dict[str, float]]) -> dict[str, float]:
        """Mean paired metrics between real (k=0) tiles of different cells: each picked sample is paired
        with the next one of another cell (cyclic). Empty when fewer than two cells are real. ``cache``
        is keyed by the tiles' digest: the conditions of one study share their real cells."""
        samples = self.pick_samples(CHANCE_SAMPLES)
        if not len(samples):
            return {}
        real = self.origin(samples, modality)[:, 0] == ORIGIN_CODES["real"]
        samples = samples[real]
        cells = self.grid_cell[samples]
        if len(set(cells)) < 2:
            return {}
        partner = []
        for i in range(len(samples)):
            n = len(samples)
            partner.append(next(j % n for j in range(i + 1, i + n) if cells[j % n] != cells[i]))
        tiles = self.tiles(samples, [0], modality)[:, 0]
        a, b = tiles, tiles[np.asarray(partner)]
        key = hashlib.sha256(modality.name.encode() + a.tobytes() + b.tobytes()).hexdigest()
        if key in cache:
            return cache[key]
        out = cache[key] = {}
        for metric, function in paired_metric_functions(modality, tuple(a.shape[1:])).items():
            values = np.asarray(function(a, b), dtype=float)
            if np.isfinite(values).any():
                out[metric] = float(np.nanmean(values))
        return out


def _load_metrics(url: str, storage_options: Mapping[str, Any] | None, run_id: str | None) -> pd.DataFrame:
    try:
        df = read_table(url, storage_options, run_id)
    except FileNotFoundError:
        raise ReportError(f"metrics table: nothing at {redact(url)}") from None
    if df.empty:
        which = f" for run {run_id!r}" if run_id else ""
        raise ReportError(f"metrics table {redact(url)}: no rows{which}")
    runs = sorted(df["run_id"].dropna().unique()) if "run_id" in df else []
    if run_id is None and len(runs) > 1:
        raise ReportError(f"metrics table {redact(url)} holds runs {runs}: pass run_id to pick one")
    df["condition"] = df["condition"].fillna("(no condition)")
    df["iteration"] = df["iteration"].astype(int)
    return df


def _summary(df: pd.DataFrame) -> pd.DataFrame:
    """Aggregate rows (no per-sample rows, no histogram bins); pixel W1 averaged over bands."""
    s = df[df["sample"].isna() & df["bin"].isna()].copy()
    w1 = s[s["metric"].str.startswith("wasserstein1/")]
    if not w1.empty:
        keys = ["condition", "modality", "comparison", "iteration"]
        mean = w1.groupby(keys, dropna=False, as_index=False)["value"].mean()
        mean["metric"] = "wasserstein1"
        s = pd.concat([s, mean], ignore_index=True)
    return s


class _Summary:
    """The summary rows, grouped once by (condition, modality, metric) for fast series look-ups."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self._groups = dict(iter(frame.groupby(["condition", "modality", "metric"], sort=False)))

    def series(self, condition: str, modality: str, metric: str, comparisons: Sequence[str]) -> pd.DataFrame:
        """(iteration, value, ci_low, ci_high) ascending; empty when there are no such rows."""
        cols = ["value", "ci_low", "ci_high"]
        rows = self._groups.get((condition, modality, metric))
        if rows is None:
            return pd.DataFrame(columns=["iteration", *cols])
        rows = rows[rows["comparison"].isin(comparisons)]
        # several parts may repeat a summary (re-runs write identical rows): one value per iteration
        out = rows.groupby("iteration", as_index=False)[cols].mean()
        return out.dropna(subset=["value"]).sort_values("iteration", ignore_index=True)


# -- figures ---------------------------------------------------------------------------------------

CAPTIONS = {
    "a": ("Distribution fidelity per iteration against a held-out real reference set (same N at every k); "
          "the dashed line is the k=0 noise floor (real vs reference). How to read: if the model's "
          "conditionals were exact the loop is a Gibbs chain and these curves stay flat at the floor while "
          "the paired curves (b) decay; rising FD/KID or falling precision/recall/coverage with k measure "
          "model error (incompatible learned conditionals, autoencoder/quantisation loss), not the "
          "unavoidable forgetting. Compare with the ae-roundtrip control to separate autoencoder drift."),
    "b": ("Paired fidelity to the real image of the same cell (mean over cells, shaded 95% bootstrap CI "
          "over cells); dotted: chance level of unrelated real pairs. How to read: decay towards the "
          "chance level is expected forgetting of the start (the mappings are one-to-many); flat FD in (a) "
          "with decaying curves here = healthy Gibbs-chain behaviour. A faster decay than the "
          "ae-roundtrip control, or a gap closed by real-data injection, attributes it to the model."),
    "c": ("Step-to-step change: each generation against the same modality's previous generation (95% CI). "
          "How to read: similarity rising to its maximum (change → 0) means a fixed point / attractor, "
          "expected with seed=fixed — check (a) diversity/recall for collapse to few generic motifs; "
          "staying at a constant level means a diffusing chain (seed=fresh)."),
    "d": ("Per-band pixel histograms of the generated set at each iteration (colour = k; black dashed = "
          "k=0 real). How to read: the Shumailov figure — narrowing histograms or vanishing tails with k "
          "mean variance collapse; a shifting peak means mean drift."),
    "e": ("Rows: cells; columns: k=0 (real) and the iterations where this modality was generated, read "
          "from the cube. How to read: content drifting away from k=0 is forgetting; texture or colour "
          "artefacts that grow along a row are model or autoencoder error; rows converging to the same "
          "picture signal a generic attractor."),
}
TITLES = {"a": "(a) Distribution metrics vs iteration", "b": "(b) Paired metrics vs the real cell",
          "c": "(c) Step-to-step change", "d": "(d) Pixel histograms per iteration",
          "e": "(e) Image grid"}


def _distribution_figures(s, modalities, conditions, colours) -> list[FigureOut]:
    out = []
    wanted = list(figs.DISTRIBUTION_METRICS)
    for modality in modalities:
        fig = FigureOut(f"fig-a-{modality}", "a", f"{TITLES['a']} — {modality}", CAPTIONS["a"], modality)
        series: dict[str, dict[str, pd.DataFrame]] = {}
        missing = []
        for condition in conditions:
            found = False
            for metric in wanted:
                comps = ["reference", "self"] if metric == "diversity" else ["reference"]
                ser = s.series(condition, modality, metric, comps)
                if metric != "diversity" and not ser.empty:
                    found = True
                if not ser.empty:
                    series.setdefault(metric, {})[condition] = ser
            if not found:
                missing.append(condition)
        present = [c for c in conditions if c not in missing]
        series = {m: {c: v for c, v in d.items() if c in present} for m, d in series.items()}
        series = {m: d for m, d in series.items() if d}
        if missing:
            fig.note = "No reference-set metrics for: " + "; ".join(missing) + "."
        if not series:
            fig.note = f"Skipped: no reference-set metrics for {modality} in any condition."
        else:
            fig.png = figs.distribution_figure(modality, series, colours)
        out.append(fig)
    return out


def _paired_figures(kind, s, modalities, conditions, colours, chance) -> list[FigureOut]:
    comparison = "real" if kind == "b" else "previous"
    out = []
    for modality in modalities:
        fig = FigureOut(f"fig-{kind}-{modality}", kind, f"{TITLES[kind]} — {modality}", CAPTIONS[kind],
                        modality)
        series: dict[str, dict[str, pd.DataFrame]] = {}
        f = s.frame
        present = f[(f["modality"] == modality) & (f["comparison"] == comparison)]["metric"].unique()
        metrics = [m for m in figs.PAIRED_METRICS if m in present]
        metrics += sorted(m for m in present if m not in figs.PAIRED_METRICS)
        for metric in metrics:
            for condition in conditions:
                ser = s.series(condition, modality, metric, [comparison])
                if not ser.empty:
                    series.setdefault(metric, {})[condition] = ser
        if not series:
            fig.note = f"Skipped: no paired ({comparison}) summary rows for {modality}."
        else:
            levels = {}
            if kind == "b":  # chance levels of the first condition whose cube has them
                levels = next((chance[c, modality] for c in conditions if chance.get((c, modality))), {})
            fig.png = figs.paired_figure(modality, comparison, series, colours, levels)
            without = [c for c in conditions if not any(c in d for d in series.values())]
            if without:
                fig.note = f"No {comparison} rows for: " + "; ".join(without) + "."
        out.append(fig)
    return out


def _histogram_figures(df, modalities, conditions) -> list[FigureOut]:
    h = df[df["metric"].str.startswith("hist/") & df["sample"].isna() & df["bin"].notna()]
    k_max = int(df["iteration"].max())  # one colour scale for every modality
    out = []
    for modality in modalities:
        fig = FigureOut(f"fig-d-{modality}", "d", f"{TITLES['d']} — {modality}", CAPTIONS["d"], modality)
        hm = h[h["modality"] == modality]
        hists: dict[str, dict[str, pd.DataFrame]] = {}
        for condition in conditions:
            hc = hm[hm["condition"] == condition]
            for metric, hb in hc.groupby("metric", sort=False):
                band = metric.split("/", 1)[1]
                hists.setdefault(condition, {})[band] = hb.groupby(["iteration", "bin"], as_index=False)[
                    "value"].mean()
        if not hists:
            fig.note = f"Skipped: no histogram rows (hist/<band>) for {modality}."
        else:
            fig.png = figs.histogram_figure(modality, hists, k_max,
                                            band_names(Modality.parse(modality)))
        out.append(fig)
    return out


def _grid_figures(views, modalities, max_cells, iterations_shown) -> list[FigureOut]:
    out = []
    for condition, view in views.items():
        cube_mods = [m.name for m in view.spec.modalities]
        ordered = [m for m in modalities if m in cube_mods] + [m for m in cube_mods if m not in modalities]
        for modality in ordered:
            mod = Modality.parse(modality)
            fig = FigureOut(f"fig-e-{modality}-{_slug(condition)}", "e",
                            f"{TITLES['e']} — {modality} — {condition}", CAPTIONS["e"], modality, condition)
            samples = view.pick_samples(max_cells)
            origin = view.origin(samples, mod)
            generated = [k for k in range(1, view.spec.iterations)
                         if (origin[:, k] == ORIGIN_CODES["generated"]).any()]
            ks = [0, *generated]
            if iterations_shown is not None:
                ks = [k for k in ks if k in set(iterations_shown)]
            if not len(samples):
                fig.note = f"Skipped: cube {redact(view.url)} has no finished samples."
            elif not generated:
                fig.note = f"Skipped: {modality} is never generated in this condition."
            elif not ks:
                fig.note = "Skipped: none of iterations_shown holds this modality."
            else:
                tiles = view.tiles(samples, ks, mod)
                present = origin[:, ks] != ORIGIN_CODES["absent"]
                labels = [f"{view.grid_cell[i]} {view.patch[i]}" for i in samples]
                fig.png = figs.image_grid_figure(modality, condition, tiles, present, ks, labels)
                fig.attrs["iterations"] = " ".join(str(k) for k in ks)
                fig.attrs["cells"] = str(len(samples))
            out.append(fig)
    return out


def _half_lives(s, modalities, conditions, chance) -> list[HalfLife]:
    rows = []
    real = s.frame[s.frame["comparison"] == "real"]
    for condition in conditions:
        for modality in modalities:
            mine = real[(real["condition"] == condition) & (real["modality"] == modality)]
            present = set(mine["metric"])
            for metric in [m for m in figs.PAIRED_METRICS if m in present]:
                ser = s.series(condition, modality, metric, ["real"])
                ser = ser[ser["iteration"] >= 1]
                if ser.empty:
                    continue
                ks, vs = ser["iteration"].tolist(), ser["value"].tolist()
                kind = "zero" if metric in ZERO_FLOOR_METRICS else "chance"
                floor = 0.0 if kind == "zero" else chance.get((condition, modality), {}).get(metric)
                base = dict(condition=condition, modality=modality, metric=metric, floor_kind=kind,
                            k_first=ks[0], value_first=vs[0], k_last=ks[-1])
                if floor is None:
                    rows.append(HalfLife(**base, floor=None, k_half=None, retained_last=math.nan,
                                         note="no chance level (the cube has < 2 real cells or is missing)"))
                    continue
                try:
                    k_half, retained = half_life(ks, vs, floor)
                except ReportError:
                    rows.append(HalfLife(**base, floor=floor, k_half=None, retained_last=math.nan,
                                         note=f"k={ks[0]} is already at the floor"))
                    continue
                note = "single generation" if len(ks) == 1 else ""
                rows.append(HalfLife(**base, floor=floor, k_half=k_half, retained_last=retained, note=note))
    return rows


# -- HTML ------------------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return "—" if not math.isfinite(v) else f"{v:.4g}"
    return "—" if v is None else str(v)


def _unique(df: pd.DataFrame | None, column: str) -> list[str]:
    if df is None or column not in df:
        return []
    return [str(v) for v in sorted(df[column].dropna().unique(), key=str)]


def _provenance_rows(run_id, df, views, provenance, conditions) -> tuple[list[tuple[str, str]], dict]:
    merged: dict[str, Any] = {}
    for view in views.values():
        for k, v in view.provenance.items():
            if k in merged and merged[k] != v and str(v) not in str(merged[k]).split(" | "):
                merged[k] = f"{merged[k]} | {v}"
            else:
                merged.setdefault(k, v)
    merged.update(dict(provenance or {}))

    def pick(key: str, column: str | None = None) -> str:
        values = _unique(df, column) if column else []
        if not values and merged.get(key) is not None:
            values = [str(merged[key])]
        return ", ".join(values) or "—"

    runs = _unique(df, "run_id")
    n_values = []
    for condition in conditions:
        view = views.get(condition)
        if view is not None:
            done = view.done
            n_values.append(f"{condition}: {int(done.sum())} samples, "
                            f"{len(set(view.grid_cell[done]))} cells")
    if not n_values and df is not None:
        ref = df[df["sample"].isna() & (df["comparison"] == "reference")]
        n_values = [f"{c}: N={int(g['n'].max())}" for c, g in ref.groupby("condition")]
    rows = [
        ("run id", run_id or ", ".join(runs) or str(merged.get("run_id", "—"))),
        ("network sha256", pick("network_sha256")),
        ("autoencoder sha256", pick("autoencoder_sha256")),
        ("sampler", pick("sampler", "sampler")),
        ("steps", pick("steps", "steps")),
        ("seed policy", pick("seed_policy", "seed_policy")),
        ("N (per condition)", "; ".join(n_values) or "—"),
        ("feature extractor", pick("feature_extractor", "feature_extractor")),
        ("reference set", pick("reference_set", "reference_set")),
        ("package version", str(merged.get("package_version") or _package_version())),
        ("licence", LICENCE_LINE),
    ]
    shown = {"run_id", "network_sha256", "autoencoder_sha256", "sampler", "steps", "seed_policy",
             "feature_extractor", "reference_set", "package_version"}
    extra = {k: v for k, v in sorted(merged.items()) if k not in shown}
    return rows, extra


def _condition_rows(df, views, conditions) -> list[list[str]]:
    rows = []
    for c in conditions:
        sub = df[df["condition"] == c] if df is not None else None
        view = views.get(c)
        iterations = (view.spec.iterations - 1) if view else (
            int(sub["iteration"].max()) if sub is not None and not sub.empty else None)
        rows.append([c, ", ".join(_unique(sub, "loop_spec")) or "—",
                     ", ".join(_unique(sub, "seed_policy")) or "—", _fmt(iterations),
                     redact(view.url) if view else "— (no cube)"])
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}figure{margin:1.5em 0;border-top:1px solid #ddd;
padding-top:.8em}figure img{max-width:100%}figcaption{font-size:.9em;color:#444;max-width:70em}
.banner{background:#b00020;color:#fff;padding:.6em 1em;font-weight:600}.note{color:#8a5a00;font-style:italic}
code{font-size:.9em}"""


def _figure_html(fig: FigureOut, file_name: str | None) -> str:
    attrs = {"id": fig.id, "data-kind": fig.kind, "data-modality": fig.modality,
             "data-condition": fig.condition}
    attrs.update({f"data-{k}": v for k, v in fig.attrs.items()})
    attr = " ".join(f'{k}="{_e(v)}"' for k, v in attrs.items())
    parts = [f"<figure {attr}>", f"<h3>{_e(fig.title)}</h3>"]
    if fig.png is not None:
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(f'<img alt="{_e(fig.title)}" src="data:image/png;base64,{data}">')
    if fig.note:
        parts.append(f'<p class="note">{_e(fig.note)}</p>')
    link = f' <a href="{_e(file_name)}">PNG</a>' if file_name else ""
    parts.append(f"<figcaption>{_e(fig.caption)}{link}</figcaption></figure>")
    return "\n".join(parts)


def build_report(
    out_dir: str | os.PathLike[str],
    *,
    metrics_url: str | None,
    cubes: Mapping[str, str],
    run_id: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    max_cells: int = 6,
    iterations_shown: Sequence[int] | None = None,
) -> str:
    """Write ``<out_dir>/index.html`` (self-contained: PNGs as data URIs) and each figure as
    ``<out_dir>/<figure id>.png``; returns the location of ``index.html`` (a local path, or the URL
    for a remote ``out_dir`` such as ``s3://bucket/run/report``).

    ``metrics_url``: the long metrics table (``copgen.storage.tables``; None draws only the image grids);
    ``cubes``: condition label → cube URL (the label must equal the table's ``condition``);
    ``run_id``: the run to report (required when the table holds several); ``storage_options``: fsspec
    options for the table, the cubes and ``out_dir``; ``provenance``: extra run-level provenance shown in
    the report (overrides the cube attrs ``copgen_provenance``); ``max_cells``: rows of the image grids;
    ``iterations_shown``: restrict the grid columns to these k (e.g. ``[0, 1, 3, 5, 7, 9]``).
    """
    if max_cells < 1:
        raise ReportError(f"max_cells={max_cells}: need at least one row in the image grids")
    out_fs, out = url_to_fs(os.fspath(out_dir), storage_options)
    out = out.rstrip("/")
    out_fs.makedirs(out, exist_ok=True)
    notes: list[str] = []
    df = _load_metrics(metrics_url, storage_options, run_id) if metrics_url else None
    if df is None:
        notes.append("No metrics table given: only the image grids are drawn.")
    views: dict[str, _CubeView] = {}
    for condition, url in cubes.items():
        try:
            views[condition] = _CubeView(condition, url, storage_options)
        except ReportError as e:
            notes.append(f"{e} — its image grid and chance levels are skipped.")

    if df is not None:  # modality names become figure ids and file names: only known ones pass
        unknown = sorted(set(_unique(df, "modality")) - set(Modality.__members__))
        if unknown:
            notes.append(f"Ignored metrics rows of unknown modalities: {unknown}.")
            df = df[df["modality"].isna() | df["modality"].isin(list(Modality.__members__))]
    conditions = list(dict.fromkeys([*cubes, *(_unique(df, "condition") if df is not None else [])]))
    modality_order = {m.name: int(m) for m in Modality}
    mods = set(_unique(df, "modality")) | {m.name for v in views.values() for m in v.spec.modalities}
    modalities = sorted(mods, key=lambda m: modality_order.get(m, 99))
    colours = figs.condition_colours(conditions)

    chance: dict[tuple[str, str], dict[str, float]] = {}
    chance_cache: dict[str, dict[str, float]] = {}
    for condition, view in views.items():
        for m in view.spec.modalities:
            chance[condition, m.name] = view.chance_levels(m, chance_cache)

    figures: list[FigureOut] = []
    half: list[HalfLife] = []
    if df is not None:
        s = _Summary(_summary(df))
        table_mods = [m for m in modalities if m in set(_unique(df, "modality"))]
        table_conds = [c for c in conditions if c in set(_unique(df, "condition"))]
        if df["iteration"].max() < 1:
            notes.append("The metrics table holds iteration 0 only: no loop curves to draw.")
        figures += _distribution_figures(s, table_mods, table_conds, colours)
        figures += _paired_figures("b", s, table_mods, table_conds, colours, chance)
        figures += _paired_figures("c", s, table_mods, table_conds, colours, chance)
        figures += _histogram_figures(df, table_mods, table_conds)
        half = _half_lives(s, table_mods, table_conds, chance)
        missing_cube = [c for c in table_conds if c not in cubes]
        if missing_cube:
            notes.append("No cube given for: " + "; ".join(missing_cube) + " (no image grid).")
    figures += _grid_figures(views, modalities, max_cells, iterations_shown)

    for fig in figures:
        if fig.png is not None:
            out_fs.pipe_file(f"{out}/{fig.id}.png", fig.png)

    prov_rows, extra = _provenance_rows(run_id, df, views, provenance, conditions)
    synthetic = any(bool(v.attrs.get("synthetic")) for v in views.values())
    synthetic_inputs = bool((dict(provenance or {})).get("synthetic_inputs")) or any(
        bool(v.provenance.get("synthetic_inputs")) for v in views.values())

    body = [f"<h1>Loop-degradation report{(' — ' + _e(run_id)) if run_id else ''}</h1>"]
    if synthetic:
        body.append('<div class="banner" id="synthetic-banner">SYNTHETIC DATA: generated tiles (origin = '
                    "generated) are outputs of COP-GEN-Beta, not observations.</div>")
    if synthetic_inputs:
        body.append('<div class="banner" id="synthetic-inputs-banner">The real inputs of this run come from '
                    "the procedural synthetic world, not from Major TOM.</div>")
    body.append("<h2>Provenance</h2>")
    body.append(_table(["field", "value"], prov_rows, "provenance"))
    if extra:
        body.append(_table(["provenance key", "value"], list(extra.items()), "provenance-extra"))
    body.append("<h2>Conditions</h2>")
    body.append(_table(["condition", "loop spec", "seed policy", "iterations K", "cube"],
                       _condition_rows(df, views, conditions), "conditions"))
    if notes:
        body.append('<h2>Notes</h2><ul id="notes">' + "".join(
            f'<li class="note">{_e(n)}</li>' for n in notes) + "</ul>")
    body.append("<h2>Half-lives of paired similarity to the real cell</h2>")
    body.append(f'<p id="half-life-definition">{_e(HALF_LIFE_DEFINITION)}</p>')
    if half:
        body.append(_table(
            ["condition", "modality", "metric", "floor", "floor value", "k₁", "value at k₁", "k½",
             "last k", "retained at last k", "note"],
            [[h.condition, h.modality, h.metric, h.floor_kind, h.floor, h.k_first, h.value_first,
              h.k_half if h.k_half is not None else ("not reached" if h.floor is not None else "—"),
              h.k_last, h.retained_last, h.note] for h in half], "half-lives"))
    else:
        body.append('<p class="note">No paired (vs real) summary rows: no half-lives.</p>')
    for kind in "abcde":
        section = [f for f in figures if f.kind == kind]
        body.append(f'<h2 id="section-{kind}">{_e(TITLES[kind])}</h2>')
        if not section:
            body.append('<p class="note">Skipped: nothing to draw (see Notes).</p>')
        body += [_figure_html(f, f"{f.id}.png" if f.png is not None else None) for f in section]
    body.append(f'<footer><p id="licence">{_e(LICENCE_LINE)}.</p></footer>')

    title = "Loop-degradation report" + (f" — {run_id}" if run_id else "")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    index = f"{out}/index.html"
    out_fs.pipe_file(index, page.encode("utf-8"))
    return index if isinstance(out_fs, LocalFileSystem) else full_url(out_fs, index)
