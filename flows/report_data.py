"""What the loop-degradation report says, as plain data: which rows count, half-lives with CIs, the summary.

A study folder may hold several runs (a rerun, a resume, a study extended with a new condition). A rerun
only generates the blocks that were missing, so its own run id holds few or no per-sample rows. The
report therefore reads the rows of every run: per-sample rows are kept per sample and key from the latest
run that wrote them, and each condition's summary rows come from the latest run that summarised it.
Run order is the order the runs were recorded in the cube (``copgen_runs``), then the run ids (sortable
``<job>-<UTC time>-<hex>`` by default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from copgen.metrics.halflife import (
    ZERO_FLOOR_METRICS,
    HalfLifeCI,
    HalfLifeError,
    half_life_ci,
)

PER_SAMPLE_KEY = ("condition", "sample", "iteration", "modality", "metric", "comparison")
HEADLINE_METRICS = ("ssim", "psnr")


def run_order(cube_attrs: Mapping[str, Any] | None, *also: str | None) -> list[str]:
    """Runs oldest first: those recorded in the cube's attrs, then ``also`` (e.g. the current run)."""
    runs = list(dict((cube_attrs or {}).get("copgen_runs") or {}))
    return list(dict.fromkeys([*runs, *(r for r in also if r)]))


def latest_rows(df: pd.DataFrame, key: Sequence[str], order: Sequence[str]) -> pd.DataFrame:
    """One row per ``key``: the row of the latest run (``order`` oldest first; unknown runs sort by id
    before the known ones, so a recorded run always wins over an unrecorded one)."""
    if df.empty or "run_id" not in df:
        return df
    rank = {r: i for i, r in enumerate(order)}
    unknown = sorted(set(df["run_id"].dropna()) - set(rank))
    rank = {**{r: i - len(unknown) for i, r in enumerate(unknown)}, **rank}
    ranked = df.assign(_rank=df["run_id"].map(rank).fillna(-len(unknown) - 1))
    ranked = ranked.sort_values("_rank", kind="stable").drop_duplicates(list(key), keep="last")
    return ranked.drop(columns="_rank").sort_index()


def select_study_rows(df: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """The rows the report draws: the latest per-sample row per key, and for each condition the summary
    and histogram rows of the latest run that has summary rows for it."""
    samples = latest_rows(df[df["level"] == "sample"], PER_SAMPLE_KEY, order)
    rest = df[df["level"] != "sample"]
    keep = []
    rank = {r: i for i, r in enumerate(order)}
    for _condition, rows in rest.groupby("condition", sort=False):
        runs = rows.loc[rows["level"] == "summary", "run_id"].dropna().unique().tolist()
        if not runs:
            continue
        latest = max(runs, key=lambda r: (rank.get(r, -1), r))
        keep.append(rows[rows["run_id"] == latest])
    return pd.concat([samples, *keep], ignore_index=True) if keep or not samples.empty else df.iloc[:0]


@dataclass(frozen=True)
class HalfLifeRow:
    """One row of the full half-life table."""

    condition: str
    modality: str
    metric: str
    floor: float | None  # None: no floor available (the row has a note instead of k½)
    floor_kind: str  # "zero" | "chance"
    k_first: int
    value_first: float
    k_last: int
    value_last: float
    ci: HalfLifeCI | None = None
    note: str = ""

    @property
    def k_half_text(self) -> str:
        if self.ci is None:
            return "—"
        return self.ci.text(self.k_last)

    @property
    def retained_last(self) -> float:
        return self.ci.retained_last if self.ci is not None else math.nan


def per_cell_matrix(samples: pd.DataFrame, iterations: Sequence[int]) -> np.ndarray:
    """(cells, iterations) means of per-sample rows (a cell's patches/variants averaged first: the
    bootstrap resamples cells)."""
    table = samples.pivot_table(index="grid_cell", columns="iteration", values="value", aggfunc="mean")
    return table.reindex(columns=list(iterations)).to_numpy(float)


def half_life_rows(summary: pd.DataFrame, samples: pd.DataFrame, chance: Mapping[tuple[str, str], dict],
                   metrics: Iterable[str], seed: int = 0) -> list[HalfLifeRow]:
    """Half-lives of every (condition, modality, paired metric) with summary rows vs the real cell;
    the CI comes from the per-sample rows (bootstrap over cells)."""
    rows = []
    real = summary[(summary["comparison"] == "real") & (summary["iteration"] >= 1)]
    per = samples[samples["comparison"] == "real"] if not samples.empty else samples
    order = list(metrics)
    for (condition, modality, metric), ser in real.groupby(["condition", "modality", "metric"], sort=False):
        if metric not in order:
            continue
        ser = ser.groupby("iteration", as_index=False)["value"].mean().sort_values("iteration")
        ks, vs = ser["iteration"].astype(int).tolist(), ser["value"].tolist()
        kind = "zero" if metric in ZERO_FLOOR_METRICS else "chance"
        floor = 0.0 if kind == "zero" else chance.get((condition, modality), {}).get(metric)
        base = dict(condition=condition, modality=modality, metric=metric, floor=floor, floor_kind=kind,
                    k_first=ks[0], value_first=vs[0], k_last=ks[-1], value_last=vs[-1])
        if floor is None:
            rows.append(HalfLifeRow(**base, note="no chance level (the cube has < 2 real cells or is "
                                    "missing)"))
            continue
        mine = per[(per["condition"] == condition) & (per["modality"] == modality)
                   & (per["metric"] == metric)]
        matrix = per_cell_matrix(mine, ks) if not mine.empty else np.asarray([vs])
        if np.isnan(matrix).all(axis=0).any():  # per-sample rows missing for an iteration: the means only
            matrix = np.asarray([vs])
        try:
            ci = half_life_ci(ks, matrix, floor, values=vs, seed=seed)
        except HalfLifeError:
            rows.append(HalfLifeRow(**base, note=f"k={ks[0]} is already at the floor"))
            continue
        note = ("single generation" if len(ks) == 1 else
                "" if len(matrix) > 1 else "no per-sample rows: no CI")
        rows.append(HalfLifeRow(**base, ci=ci, note=note))
    rows.sort(key=lambda r: (r.condition, r.modality, order.index(r.metric)))
    return rows


@dataclass(frozen=True)
class Condition:
    """One loop condition as the report describes it (from the cube's provenance and the table)."""

    label: str
    spec: str
    control: str  # model | ae-roundtrip
    seed_policy: str
    inject_p: float = 0.0
    carry: str = "image"
    iterations: int | None = None
    cube: str = ""
    samples: int = 0
    cells: int = 0

    @property
    def is_main(self) -> bool:
        return self.control == "model" and not self.inject_p and self.carry == "image"

    @property
    def order(self) -> tuple[int, int]:
        """Main loops first (fresh seeds before fixed), then the controls."""
        return (0 if self.is_main else 1, 0 if self.seed_policy == "fresh" else 1)

    @property
    def role(self) -> str:
        if self.control == "ae-roundtrip":
            return "control: autoencoder round trip only (no network)"
        if self.inject_p:
            return f"control: real data injected with p={self.inject_p:g}"
        if self.carry == "latent":
            return "control: latents carried (no decode/encode between steps)"
        return f"model loop, seed={self.seed_policy}"


@dataclass
class Overview:
    """The opening of the report: what was studied, and what came out."""

    looped: list[str]
    iterations: str
    cells: str
    seeds: str
    controls: list[str]
    headline: list[list[str]] = field(default_factory=list)
    headline_header: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


def _retained(rows: list[HalfLifeRow], condition: str, metric: str = "ssim") -> tuple[float, list[str]]:
    mine = [r for r in rows if r.condition == condition and r.metric == metric and r.ci is not None
            and r.k_last > r.k_first]
    if not mine:
        return math.nan, []
    return float(np.mean([r.retained_last for r in mine])), [r.modality for r in mine]


def _step_change(summary: pd.DataFrame, condition: str) -> float:
    """Mean SSIM to the previous generation at the last iteration that has one (1 = no change)."""
    s = summary[(summary["condition"] == condition) & (summary["comparison"] == "previous")
                & (summary["metric"] == "ssim")]
    if s.empty:
        return math.nan
    return float(s[s["iteration"] == s["iteration"].max()]["value"].mean())


def finding(cond: Condition, main: Condition | None, rows: list[HalfLifeRow], summary: pd.DataFrame) -> str:
    """One plain sentence per condition: what its curves say, next to the main loop of the same spec."""
    r, mods = _retained(rows, cond.label)
    if math.isnan(r):
        return f"{cond.label}: no paired curve spans two generations of a modality, so no finding yet."
    keep = f"keeps {r:.0%} of its SSIM to the real cell at the last iteration ({', '.join(mods)})"
    if main is None or main.label == cond.label:
        return f"The model loop {cond.spec} (seed={cond.seed_policy}) {keep}."
    rm, _ = _retained(rows, main.label)
    if cond.control == "ae-roundtrip":
        share = min(max((1 - r) / (1 - rm), 0.0), 1.0) if rm < 1 and not math.isnan(rm) else math.nan
        part = (f"the autoencoder alone accounts for about {share:.0%} of the model loop's loss; the rest "
                "is the network's generation") if not math.isnan(share) else "the model loop lost nothing"
        return f"Autoencoder round trip only: {keep} vs {rm:.0%} for the model loop — {part}."
    if cond.seed_policy != main.seed_policy and cond.control == "model" and not cond.inject_p:
        c, cm = _step_change(summary, cond.label), _step_change(summary, main.label)
        settle = ("its steps change less than the main loop's (SSIM to the previous step "
                  f"{c:.2f} vs {cm:.2f}): the chain drifts towards a fixed point" if c > cm + 0.05 else
                  f"its step-to-step change is like the main loop's ({c:.2f} vs {cm:.2f}): no fixed "
                  "point yet")
        return f"Seed={cond.seed_policy}: {keep} vs {rm:.0%} with seed={main.seed_policy}; {settle}."
    verdict = "slower forgetting" if r > rm + 0.05 else ("faster forgetting" if r < rm - 0.05 else
                                                          "no clear difference")
    return f"{cond.role.split(': ', 1)[-1].capitalize()}: {keep} vs {rm:.0%} for the model loop — {verdict}."


def headline_table(rows: list[HalfLifeRow], conditions: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Half-lives with CIs per condition and generated modality for the headline metrics."""
    header = ["condition", "modality"] + [f"k½ {m.upper()} [95% CI]" for m in HEADLINE_METRICS] + [
        "SSIM at k₁ → last k"]
    by = {(r.condition, r.modality, r.metric): r for r in rows}
    out = []
    for condition in conditions:
        mods = list(dict.fromkeys(r.modality for r in rows if r.condition == condition))
        for modality in mods:
            cells = [by[condition, modality, m].k_half_text if (condition, modality, m) in by else "—"
                     for m in HEADLINE_METRICS]
            s = by.get((condition, modality, "ssim"))
            span = f"{s.value_first:.2f} (k={s.k_first}) → {s.value_last:.2f} (k={s.k_last})" if s else "—"
            out.append([condition, modality, *cells, span])
    return header, out
