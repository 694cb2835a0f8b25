"""The loop-degradation report: one self-contained HTML page (plus the PNGs) per loop study.

Reads the long metrics table (``copgen.storage.tables``, every run of the study: see
``copgen.flows.report_data``) and one cube per loop condition (``copgen.storage.cubes``). The page opens
with a plain-language overview (what was looped, K, cells, seeds, controls, the half-lives with CIs and
one sentence per condition), then the plots of metrics-peers.md §2.3, each with its "how to read" once:

- (a) distribution metrics (FD, KID, precision, recall, ...) vs iteration with bootstrap CIs, the k=0
  real-vs-reference value as the noise floor;
- (b) paired metrics vs the real image of the same cell, with 95% bootstrap CI bands and chance levels;
- (c) step-to-step change (paired metrics vs the modality's previous generation);
- (d) overlaid per-band pixel histograms, coloured by k;
- (e) an image grid per modality and condition: rows = cells, columns = k=0 (real) and the iterations
  where that modality was generated.

Only modalities the study generated get figures, only sections with figures are shown; what is missing
is said once in the notes. The page is rendered from ``report.html.j2`` (jinja2, autoescaped) fed by a
plain :class:`ReportPage` object. Figure files are named after the figure ids; an image grid's id ends
with its cube's name (``fig-e-<modality>-<cube name>.png``).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import io
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
import numpy as np
import pandas as pd
import zarr
from copgen import package_version
from copgen.errors import CopgenError
from copgen.flows import report_data as rd
from copgen.flows import report_figures as figs
from copgen.metrics import band_names, paired_metric_functions
from copgen.metrics.halflife import HALF_LIFE_DEFINITION, HalfLifeError, chance_levels, chance_partners
from copgen.metrics.halflife import half_life as _half_life
from copgen.modalities import Modality
from copgen.storage.cubes import ORIGIN_CODES, Cube, CubeError, licence_text
from copgen.storage.fsutil import full_url, url_to_fs
from copgen.storage.objects import redact
from copgen.storage.tables import read_table
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

CHANCE_SAMPLES = 32  # real tiles (cells) for the chance level: a stable mean at a few seconds' cost


class ReportError(CopgenError, ValueError):
    """The report cannot be built from its inputs; the message names the input and the field."""


def half_life(iterations: Sequence[int], values: Sequence[float], floor: float) -> tuple[int | None, float]:
    """:func:`copgen.metrics.halflife.half_life`, raising :class:`ReportError`."""
    try:
        return _half_life(iterations, values, floor)
    except HalfLifeError as exc:
        raise ReportError(str(exc)) from None


@dataclass
class FigureOut:
    """One figure of the report."""

    id: str
    kind: str  # a | b | c | d | e
    title: str
    png: bytes
    modality: str = ""
    condition: str = ""
    note: str = ""
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return f"{self.id}.png"

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class Section:
    kind: str
    title: str
    how_to_read: str
    figures: list[FigureOut]


@dataclass
class ReportPage:
    """Everything the template shows, as plain values."""

    title: str
    synthetic: bool
    synthetic_inputs: bool
    overview: rd.Overview
    conditions: list[list[str]]
    half_life_definition: str
    half_life_header: list[str]
    half_life_rows: list[list[str]]
    sections: list[Section]
    provenance: list[tuple[str, str]]
    runs_header: list[str]
    runs: list[list[str]]
    notes: list[str]
    licence: str


def _slug(text: str) -> str:
    """A safe file/id component (conditions are free text; cube names are already path-safe)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "x"


# -- inputs ----------------------------------------------------------------------------------------


class _CubeView:
    """Read-only view of one condition's cube: what the report needs, read once."""

    def __init__(self, condition: str, url: str, storage_options: Mapping[str, Any] | None) -> None:
        self.condition, self.url = condition, url
        try:
            self.cube = Cube.open(url, storage_options, read_only=True)
            kwargs: dict[str, Any] = {"mode": "r", "zarr_format": 3, "use_consolidated": True}
            if storage_options and "://" in url:
                kwargs["storage_options"] = dict(storage_options)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
                self.group = zarr.open_group(url, **kwargs)
        except (FileNotFoundError, KeyError, CubeError, zarr.errors.GroupNotFoundError) as e:
            raise ReportError(f"condition {condition!r}: cannot open cube {redact(url)}: {e}") from None
        self.spec = self.cube.spec
        self.name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
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
        partners = chance_partners(list(self.grid_cell[samples]))
        if partners is None:
            return {}
        tiles = self.tiles(samples, [0], modality)[:, 0]
        key = hashlib.sha256(modality.name.encode() + tiles.tobytes() + partners.tobytes()).hexdigest()
        if key not in cache:
            functions = paired_metric_functions(modality, tuple(tiles.shape[1:]))
            cache[key] = chance_levels(tiles, partners, functions)
        return cache[key]


def _load_metrics(url: str, storage_options: Mapping[str, Any] | None, run_id: str | None) -> pd.DataFrame:
    try:
        df = read_table(url, storage_options, run_id)
    except FileNotFoundError:
        raise ReportError(f"metrics table: nothing at {redact(url)}") from None
    if df.empty:
        which = f" for run {run_id!r}" if run_id else ""
        raise ReportError(f"metrics table {redact(url)}: no rows{which}")
    df["condition"] = df["condition"].fillna("(no condition)")
    df["iteration"] = df["iteration"].astype(int)
    return df


def _summary(df: pd.DataFrame) -> pd.DataFrame:
    """Summary rows (no per-sample rows, no histogram bins); pixel W1 averaged over bands."""
    s = df[df["level"] == "summary"].copy()
    w1 = s[s["metric"].str.startswith("wasserstein1/")]
    if not w1.empty:
        keys = ["condition", "modality", "comparison", "iteration"]
        mean = w1.groupby(keys, dropna=False, as_index=False)[["value", "ci_low", "ci_high"]].mean()
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
        out = rows.groupby("iteration", as_index=False)[cols].mean()
        return out.dropna(subset=["value"]).sort_values("iteration", ignore_index=True)


# -- figures ---------------------------------------------------------------------------------------

HOW_TO_READ = {
    "a": ("Each generated set is compared with a held-out set of real cells (same N at every k); bands are "
          "95% bootstrap intervals over cells, the dashed line and grey band the k=0 noise floor (real loop "
          "cells vs the reference set). If the model's conditionals were exact the loop would be a Gibbs "
          "chain: these curves would stay at the floor while the paired curves (b) decay. Rising FD/KID or "
          "falling precision/recall/coverage with k measure model error, not unavoidable forgetting; "
          "compare with the autoencoder round-trip control. KID is the unbiased MMD² estimator: with a few "
          "dozen cells it can be negative (0 means the sets are indistinguishable; the solid grey line), "
          "so read it against the floor and its interval, not against zero."),
    "b": ("Paired similarity of each generated tile to the real tile of the same cell (mean over cells, "
          "shaded 95% bootstrap CI); dotted: the chance level of unrelated real pairs. Decay towards the "
          "chance level is the expected forgetting of the start (the mappings are one-to-many); a faster "
          "decay than the autoencoder round trip, or a gap closed by real-data injection, points at the "
          "model."),
    "c": ("Each generation against the same modality's previous generation (95% CI). Similarity rising "
          "towards its maximum (change → 0) means a fixed point / attractor, expected with seed=fixed — "
          "check (a) recall/diversity for collapse; a constant level means a diffusing chain (seed=fresh)."),
    "d": ("Per-band pixel histograms of the generated set at each iteration (colour = k; black dashed = "
          "k=0 real). Narrowing histograms or vanishing tails with k mean variance collapse (the Shumailov "
          "figure); a shifting peak means mean drift."),
    "e": ("Rows: cells; columns: k=0 (real) and the iterations where this modality was generated, read "
          "from the cube. Content drifting away from k=0 is forgetting; artefacts that grow along a row "
          "are model or autoencoder error; rows converging to one picture signal a generic attractor."),
}
TITLES = {"a": "(a) Distribution metrics vs iteration", "b": "(b) Paired metrics vs the real cell",
          "c": "(c) Step-to-step change", "d": "(d) Pixel histograms per iteration",
          "e": "(e) Image grids"}


def _distribution_figures(s: _Summary, modalities, conditions, colours) -> list[FigureOut]:
    out = []
    for modality in modalities:
        series: dict[str, dict[str, pd.DataFrame]] = {}
        for metric in figs.DISTRIBUTION_METRICS:
            comps = ["reference", "self"] if metric == "diversity" else ["reference"]
            for condition in conditions:
                ser = s.series(condition, modality, metric, comps)
                if not ser.empty and (ser["iteration"] > 0).any():
                    series.setdefault(metric, {})[condition] = ser
        if series:
            png = figs.distribution_figure(modality, series, colours)
            out.append(FigureOut(f"fig-a-{modality}", "a", f"{modality}", png, modality))
    return out


def _paired_figures(kind, s: _Summary, modalities, conditions, colours, chance) -> list[FigureOut]:
    comparison = "real" if kind == "b" else "previous"
    out = []
    f = s.frame
    for modality in modalities:
        present = f[(f["modality"] == modality) & (f["comparison"] == comparison)]["metric"].unique()
        metrics = [m for m in figs.PAIRED_METRICS if m in present]
        series: dict[str, dict[str, pd.DataFrame]] = {}
        for metric in metrics:
            for condition in conditions:
                ser = s.series(condition, modality, metric, [comparison])
                if not ser.empty:
                    series.setdefault(metric, {})[condition] = ser
        if not series:
            continue
        levels = {}
        if kind == "b":  # chance levels of the first condition whose cube has them
            levels = next((chance[c, modality] for c in conditions if chance.get((c, modality))), {})
        png = figs.paired_figure(modality, comparison, series, colours, levels)
        out.append(FigureOut(f"fig-{kind}-{modality}", kind, modality, png, modality))
    return out


def _histogram_figures(df: pd.DataFrame, modalities, conditions) -> list[FigureOut]:
    h = df[(df["level"] == "histogram") & df["metric"].str.startswith("hist/")]
    k_max = int(df["iteration"].max())  # one colour scale for every modality
    out = []
    for modality in modalities:
        hm = h[h["modality"] == modality]
        hists: dict[str, dict[str, pd.DataFrame]] = {}
        for condition in conditions:
            hc = hm[hm["condition"] == condition]
            if not (hc["iteration"] > 0).any():  # a condition that never generated this modality
                continue
            for metric, hb in hc.groupby("metric", sort=False):
                band = metric.split("/", 1)[1]
                hists.setdefault(condition, {})[band] = hb.groupby(["iteration", "bin"], as_index=False)[
                    "value"].mean()
        if hists:
            png = figs.histogram_figure(modality, hists, k_max, band_names(Modality.parse(modality)))
            out.append(FigureOut(f"fig-d-{modality}", "d", modality, png, modality))
    return out


def _grid_figure(view: _CubeView, modality: str, max_cells: int, iterations_shown) -> FigureOut | None:
    mod = Modality.parse(modality)
    samples = view.pick_samples(max_cells)
    if not len(samples):
        return None
    origin = view.origin(samples, mod)
    ks = [k for k in range(1, view.spec.iterations) if (origin[:, k] == ORIGIN_CODES["generated"]).any()]
    if not ks:
        return None
    ks = [0, *ks]
    if iterations_shown is not None:
        ks = [k for k in ks if k in set(iterations_shown)]
    if not ks:
        return None
    tiles = view.tiles(samples, ks, mod)
    present = origin[:, ks] != ORIGIN_CODES["absent"]
    labels = [f"{view.grid_cell[i]} {view.patch[i]}" for i in samples]
    png = figs.image_grid_figure(modality, view.condition, tiles, present, ks, labels)
    fig = FigureOut(f"fig-e-{modality}-{_slug(view.name)}", "e", f"{modality} — {view.condition}", png,
                    modality, view.condition)
    fig.attrs.update(iterations=" ".join(str(k) for k in ks), cells=str(len(samples)), cube=view.name)
    return fig


def _grid_figures(views, modalities, max_cells, iterations_shown) -> list[FigureOut]:
    out = []
    for modality in modalities:
        for view in views.values():
            if Modality.parse(modality) in view.spec.modalities:
                fig = _grid_figure(view, modality, max_cells, iterations_shown)
                if fig is not None:
                    out.append(fig)
    return out


# -- the page --------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return "—" if not math.isfinite(v) else f"{v:.4g}"
    return "—" if v is None or v == "" else str(v)


def _readable(value: Any) -> str:
    """A provenance value for people: mappings as ``key: value`` pairs, long hashes shortened."""
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_readable(v)}" for k, v in value.items() if v not in (None, "", False))
    if isinstance(value, list | tuple):
        return ", ".join(_readable(v) for v in value)
    text = str(value)
    return f"{text[:12]}…" if re.fullmatch(r"[0-9a-f]{40,64}", text) else text


def _conditions(df, views, labels) -> list[rd.Condition]:
    out = []
    for label in labels:
        view = views.get(label)
        loop = dict(view.provenance.get("loop") or {}) if view else {}
        sub = df[df["condition"] == label] if df is not None else None
        spec = loop.get("spec") or (", ".join(sub["loop_spec"].dropna().unique()) if sub is not None else "")
        seed = loop.get("seed_policy") or (", ".join(sub["seed_policy"].dropna().unique()) if sub is not None
                                           else "")
        k = (view.spec.iterations - 1) if view else (int(sub["iteration"].max()) if sub is not None else None)
        done = view.done if view else np.zeros(0, bool)
        out.append(rd.Condition(
            label=label, spec=spec or "—", control=loop.get("control", "model"), seed_policy=seed or "—",
            inject_p=float(loop.get("inject_p") or 0.0), carry=loop.get("carry", "image"), iterations=k,
            cube=redact(view.url) if view else "", samples=int(done.sum()),
            cells=len(set(view.grid_cell[done])) if view else 0))
    return out


def _overview(conds: list[rd.Condition], half: list[rd.HalfLifeRow], summary: pd.DataFrame,
              seeds: list[str]) -> rd.Overview:
    specs = list(dict.fromkeys(c.spec for c in conds))
    mains = {c.spec: c for c in conds if c.is_main and c.seed_policy != "fixed"}
    mains.update({c.spec: c for c in conds if c.is_main and c.spec not in mains})
    looped = []
    for spec in specs:
        labels = {c.label for c in conds if c.spec == spec}
        gen = sorted({r.modality for r in half if r.condition in labels})
        looped.append(f"{spec}: each iteration regenerates the next modality of the cycle from the model's "
                      f"own previous output" + (f" (generated: {', '.join(gen)})" if gen else ""))
    ks = sorted({c.iterations for c in conds if c.iterations is not None})
    cells = sorted({c.cells for c in conds if c.cells})
    header, rows = rd.headline_table(half, [c.label for c in conds])
    ov = rd.Overview(
        looped=looped, iterations=", ".join(str(k) for k in ks) or "—",
        cells=(f"{', '.join(str(n) for n in cells)} loop cells per condition (bootstrap CIs resample cells)"
               if cells else "—"),
        seeds=", ".join(seeds) or "—",
        controls=[f"{c.label} — {c.role}" for c in conds if not c.is_main or c.seed_policy == "fixed"],
        headline=rows, headline_header=header)
    ov.findings = [rd.finding(c, mains.get(c.spec), half, summary) for c in conds]
    return ov


RUNS_HEADER = ["run", "sampler", "steps", "seed", "network sha256", "autoencoder sha256", "version"]


def _provenance(df, views, extra: Mapping[str, Any] | None) -> tuple[list[tuple[str, str]], list[list[str]]]:
    runs: dict[str, dict[str, Any]] = {}
    for view in views.values():
        for run, prov in (view.attrs.get("copgen_runs") or {}).items():
            runs.setdefault(run, dict(prov))
    if not runs:  # a cube written outside the flows: its creation provenance stands for the run
        merged = {k: v for view in views.values() for k, v in view.provenance.items()}
        runs = {str(merged.get("run_id", "—")): merged} if merged else {}
    run_rows = [[r, _fmt(p.get("sampler") or p.get("solver")), _fmt(p.get("steps")), _fmt(p.get("run_seed")),
                 _readable(p.get("network_sha256") or "—"), _readable(p.get("autoencoder_sha256") or "—"),
                 _fmt(p.get("package_version"))] for r, p in runs.items()]

    def values(column: str) -> str:
        if df is None or column not in df:
            return "—"
        return ", ".join(str(v) for v in sorted(df[column].dropna().unique(), key=str)) or "—"

    rows = [("feature extractor", values("feature_extractor")), ("reference set", values("reference_set")),
            ("metrics from runs", values("run_id")), ("report written by", f"copgen {package_version()}")]
    rows += [(str(k), _readable(v)) for k, v in sorted((extra or {}).items()) if k != "synthetic_inputs"]
    return rows, run_rows


def _render(page: ReportPage) -> str:
    text = importlib.resources.files("copgen.flows").joinpath("report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    return env.from_string(text).render(page=page)


def _open_views(cubes: Mapping[str, str], storage_options, notes: list[str]) -> dict[str, _CubeView]:
    views: dict[str, _CubeView] = {}
    for condition, url in cubes.items():
        try:
            views[condition] = _CubeView(condition, url, storage_options)
        except ReportError as e:
            notes.append(f"{e} — its image grid and chance levels are left out.")
    return views


def _known_modalities(df: pd.DataFrame | None, notes: list[str]) -> pd.DataFrame | None:
    """Modality names become figure ids and file names: only known ones pass."""
    if df is None:
        return None
    unknown = sorted(set(df["modality"].dropna()) - set(Modality.__members__))
    if unknown:
        notes.append(f"Ignored metrics rows of unknown modalities: {unknown}.")
        df = df[df["modality"].isna() | df["modality"].isin(list(Modality.__members__))]
    return df


def _generated_modalities(df: pd.DataFrame | None, views: Mapping[str, _CubeView]) -> list[str]:
    """Modalities some condition generated (k ≥ 1 rows or generated tiles): the only ones with figures."""
    found = set(df.loc[df["iteration"] >= 1, "modality"].dropna()) if df is not None else set()
    for view in views.values():
        samples = view.pick_samples(4)
        for m in view.spec.modalities:
            if (view.origin(samples, m)[:, 1:] == ORIGIN_CODES["generated"]).any():
                found.add(m.name)
    return [m.name for m in Modality if m.name in found]


def _figures(df, views, modalities, conditions, chance, max_cells, iterations_shown) -> list[Section]:
    colours = figs.condition_colours(conditions)
    by_kind: dict[str, list[FigureOut]] = {k: [] for k in "abcde"}
    if df is not None:
        s = _Summary(_summary(df))
        by_kind["a"] = _distribution_figures(s, modalities, conditions, colours)
        by_kind["b"] = _paired_figures("b", s, modalities, conditions, colours, chance)
        by_kind["c"] = _paired_figures("c", s, modalities, conditions, colours, chance)
        by_kind["d"] = _histogram_figures(df, modalities, conditions)
    by_kind["e"] = _grid_figures(views, modalities, max_cells, iterations_shown)
    return [Section(k, TITLES[k], HOW_TO_READ[k], f) for k, f in by_kind.items() if f]


def _missing_notes(df, cubes, sections, conditions) -> list[str]:
    notes = []
    if df is None:
        notes.append("No metrics table given: only the image grids are drawn.")
        return notes
    drawn = {s.kind for s in sections}
    if "a" not in drawn:
        notes.append("No reference-set (distribution) metrics: section (a) is left out.")
    if "c" not in drawn:
        notes.append("No step-to-step rows (a modality generated twice): section (c) is left out.")
    without = [c for c in conditions if not ((df["condition"] == c) & (df["comparison"] == "reference")
                                             & (df["iteration"] >= 1)).any()]
    if without and "a" in drawn:
        notes.append("No reference-set metrics for: " + "; ".join(without) + ".")
    missing_cube = [c for c in conditions if c not in cubes]
    if missing_cube:
        notes.append("No cube given for: " + "; ".join(missing_cube) + " (no image grid).")
    return notes


def _half_life_table(half: list[rd.HalfLifeRow]) -> tuple[list[str], list[list[str]]]:
    header = ["condition", "modality", "metric", "floor", "floor value", "k₁", "value at k₁", "k½",
              "k½ 95% CI", "last k", "retained at last k", "note"]
    rows = []
    for h in half:
        ci = "—" if h.ci is None or h.ci.low == h.ci.high == h.ci.k_half else (
            f"[{'>' + str(h.k_last) if h.ci.low is None else h.ci.low}, "
            f"{'>' + str(h.k_last) if h.ci.high is None else h.ci.high}]")
        k_half = "—" if h.ci is None else ("not reached" if h.ci.k_half is None else str(h.ci.k_half))
        rows.append([h.condition, h.modality, h.metric, h.floor_kind, _fmt(h.floor), str(h.k_first),
                     _fmt(h.value_first), k_half, ci, str(h.k_last), _fmt(h.retained_last), h.note])
    return header, rows


def _compact_png(png: bytes) -> bytes:
    """Plots have few colours: a 256-colour palette PNG is about a third of the RGBA bytes and looks the
    same (the image grids' tiles are 64 px thumbnails drawn large, also well inside 256 colours)."""
    with Image.open(io.BytesIO(png)) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                           dither=Image.Dither.NONE)
        buf = io.BytesIO()
        small.save(buf, format="PNG", optimize=True)
    return buf.getvalue() if buf.tell() < len(png) else png


def build_report(
    out_dir: str | os.PathLike[str],
    *,
    metrics_url: str | None,
    cubes: Mapping[str, str],
    run_id: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    max_cells: int = 4,
    iterations_shown: Sequence[int] | None = None,
) -> str:
    """Write ``<out_dir>/index.html`` (self-contained: PNGs as data URIs) and each figure as
    ``<out_dir>/<figure id>.png``; returns the location of ``index.html`` (a local path, or the URL
    for a remote ``out_dir`` such as ``s3://bucket/run/report``).

    ``metrics_url``: the long metrics table (None draws only the image grids); ``cubes``: condition
    label → cube URL (the label must equal the table's ``condition``); ``run_id``: report this run only
    (default: every run of the study, see :mod:`copgen.flows.report_data`); ``storage_options``: fsspec
    options for the table, the cubes and ``out_dir``; ``provenance``: extra run-level provenance shown in
    the report; ``max_cells``: rows of the image grids; ``iterations_shown``: restrict the grid columns.
    """
    if max_cells < 1:
        raise ReportError(f"max_cells={max_cells}: need at least one row in the image grids")
    out_fs, out = url_to_fs(os.fspath(out_dir), storage_options)
    out = out.rstrip("/")
    out_fs.makedirs(out, exist_ok=True)
    notes: list[str] = []
    views = _open_views(cubes, storage_options, notes)
    df = _study_rows(metrics_url, storage_options, run_id, views, notes)
    labels = list(dict.fromkeys([*cubes, *(df["condition"].dropna().unique() if df is not None else [])]))
    modalities = _generated_modalities(df, views)
    chance = _chance(views)
    summary = _summary(df) if df is not None else pd.DataFrame(columns=["condition", "comparison"])
    samples = df[df["level"] == "sample"] if df is not None else pd.DataFrame()
    half = rd.half_life_rows(summary, samples, chance, figs.PAIRED_METRICS) if df is not None else []
    sections = _figures(df, views, modalities, labels, chance, max_cells, iterations_shown)
    _write_figures(out_fs, out, sections)
    notes += _missing_notes(df, cubes, sections, labels)
    conds = sorted(_conditions(df, views, labels), key=lambda c: c.order)  # stable: spec order kept
    seeds = sorted({str((v.provenance.get("loop") or {}).get("run_seed")) for v in views.values()} - {"None"})
    prov_rows, run_rows = _provenance(df, views, provenance)
    synthetic_inputs = bool((provenance or {}).get("synthetic_inputs")) or any(
        bool(v.attrs.get("synthetic_inputs") or v.provenance.get("synthetic_inputs")) for v in views.values())
    hl_header, hl_rows = _half_life_table(half)
    page = ReportPage(
        title="Loop-degradation report" + (f" — {run_id}" if run_id else ""),
        synthetic=any(bool(v.attrs.get("synthetic")) for v in views.values()),
        synthetic_inputs=synthetic_inputs, overview=_overview(conds, half, summary, seeds),
        conditions=[[c.label, c.role, c.spec, c.seed_policy, _fmt(c.iterations), f"{c.samples} / {c.cells}",
                     c.cube or "— (no cube)"] for c in conds],
        half_life_definition=HALF_LIFE_DEFINITION, half_life_header=hl_header, half_life_rows=hl_rows,
        sections=sections, provenance=prov_rows, runs_header=RUNS_HEADER, runs=run_rows, notes=notes,
        licence=licence_text(synthetic_inputs))
    index = f"{out}/index.html"
    out_fs.pipe_file(index, _render(page).encode("utf-8"))
    return index if isinstance(out_fs, LocalFileSystem) else full_url(out_fs, index)


def _study_rows(metrics_url: str | None, storage_options, run_id: str | None, views: Mapping[str, _CubeView],
                notes: list[str]) -> pd.DataFrame | None:
    """The metrics rows the report shows (None without a table): known modalities, the study's runs
    (the latest run's row wins)."""
    df = _load_metrics(metrics_url, storage_options, run_id) if metrics_url else None
    df = _known_modalities(df, notes)
    if df is not None:
        order = list(dict.fromkeys(r for v in views.values() for r in rd.run_order(v.attrs, run_id)))
        df = rd.select_study_rows(df, order)
    return df


def _write_figures(out_fs, out: str, sections) -> None:
    """Each figure as ``<out>/<figure id>.png`` (compacted); figures of an earlier report that this one
    has not are removed."""
    written = set()
    for section in sections:
        for fig in section.figures:
            fig.png = _compact_png(fig.png)
            out_fs.pipe_file(f"{out}/{fig.file_name}", fig.png)
            written.add(fig.file_name)
    for stale in out_fs.glob(f"{out}/fig-*.png"):
        if stale.rsplit("/", 1)[-1] not in written:
            out_fs.rm_file(stale)


def _chance(views: Mapping[str, _CubeView]) -> dict[tuple[str, str], dict[str, float]]:
    chance: dict[tuple[str, str], dict[str, float]] = {}
    cache: dict[str, dict[str, float]] = {}
    for condition, view in views.items():
        for m in view.spec.modalities:
            chance[condition, m.name] = view.chance_levels(m, cache)
    return chance


def study_cubes(out: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """condition label → URL of every loop cube (``loop-*.zarr``) of a study folder."""
    import fsspec
    from copgen.storage.fsutil import join_url

    fs, root = fsspec.core.url_to_fs(out, **dict(storage_options or {}))
    cubes = {}
    for path in sorted(fs.glob(f"{root.rstrip('/')}/loop-*.zarr")):
        url = join_url(out, path.rsplit("/", 1)[-1])
        cube = Cube.open(url, storage_options, read_only=True)
        cubes[cube.spec.provenance.get("condition", url)] = url
    return cubes
