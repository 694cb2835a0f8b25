"""The loop-degradation report on real metrics parts and real zarr cubes (local disk and S3)."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from copgen.flows.report import ReportError, build_report, half_life
from copgen.metrics import set_statistics_rows
from copgen.metrics.paired import psnr
from copgen.storage.cubes import ORIGIN_CODES, BlockData, Cube, CubeSpec
from copgen.storage.tables import METRICS_SCHEMA, write_metrics
from PIL import Image

MODS = ("S1RTC", "S2L2A")
K = 3
TILE = 32
CELLS = [f"{10 + i}U_{20 + i}R" for i in range(4)]
LOOP = "S2L2A>S1RTC>S2L2A"
FRESH = f"{LOOP} model seed=fresh"
FIXED = f"{LOOP} model seed=fixed"  # has no reference-set metrics
# S2L2A>S1RTC alternates: k=1 S1RTC, k=2 S2L2A, k=3 S1RTC
GENERATED = {1: "S1RTC", 2: "S2L2A", 3: "S1RTC"}
HOSTILE = "<script>alert('x')</script> & \"q\""


def _real_tiles(modality: str) -> np.ndarray:
    rng = np.random.default_rng(7 + MODS.index(modality))
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    tiles = []
    for i in range(len(CELLS)):
        base = 128 + 90 * np.sin((xx * (i + 1) + yy * (3 - i)) / 6.0)
        tiles.append(np.stack([base, base[::-1], base.T], -1) + rng.normal(0, 12, (TILE, TILE, 3)))
    return np.clip(tiles, 0, 255).astype(np.uint8)


def _cube_images(seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(images per modality (4, K+1, T, T, 3), origin (4, K+1, 2)): real at k=0, then the loop."""
    rng = np.random.default_rng(seed)
    images = {m: np.zeros((len(CELLS), K + 1, TILE, TILE, 3), np.uint8) for m in MODS}
    origin = np.zeros((len(CELLS), K + 1, len(MODS)), np.uint8)
    for m in MODS:
        images[m][:, 0] = _real_tiles(m)
        origin[:, 0, MODS.index(m)] = ORIGIN_CODES["real"]
    for k, m in GENERATED.items():
        real = images[m][:, 0].astype(float)
        noise = rng.uniform(0, 255, real.shape)
        images[m][:, k] = np.clip(real * (1 - 0.25 * k) + noise * 0.25 * k, 0, 255).astype(np.uint8)
        origin[:, k, MODS.index(m)] = ORIGIN_CODES["generated"]
    return images, origin


def _write_cube(url: str, seed: int, storage_options=None) -> dict[str, np.ndarray]:
    spec = CubeSpec(tile_size=TILE, iterations=K + 1, modalities=MODS, block_samples=4, synthetic=True,
                    provenance={"network_sha256": "ab" * 32, "autoencoder_sha256": "cd" * 32,
                                "sampler": "dpm_solver++", "steps": 10, "synthetic_inputs": True})
    cube = Cube.create(url, spec, storage_options)
    (block,) = cube.grow(CELLS, ["center"] * len(CELLS))
    images, origin = _cube_images(seed)
    cube.write_block(block, BlockData(keys=cube.sample_keys(), images=images, origin=origin))
    return images


def _chance_psnr(modality: str) -> float:
    """Mean PSNR of each real tile against the next cell's (cyclic): every cell differs here."""
    real = _real_tiles(modality)
    return float(np.mean(psnr(real, np.roll(real, -1, axis=0))))


def _paired_rows(condition: str, modality: str, comparison: str, values: dict[int, dict[str, float]]):
    rows = []
    for k, metrics in values.items():
        for metric, v in metrics.items():
            rows.append(dict(condition=condition, loop_spec=LOOP, iteration=k, modality=modality,
                             metric=metric, comparison=comparison, value=v, ci_low=v - 0.05, ci_high=v + 0.05,
                             n=4, seed_policy=condition.rsplit("=", 1)[-1], steps=10, sampler="dpm_solver++"))
            for i, cell in enumerate(CELLS):  # per-sample rows: far off, so any leak into the curves shows
                rows.append(dict(condition=condition, iteration=k, modality=modality, metric=metric,
                                 comparison=comparison, value=v + 100.0, n=1, grid_cell=cell, patch="center",
                                 sample=i))
    return rows


def _metrics(fresh_images: dict[str, np.ndarray], fixed_images: dict[str, np.ndarray]) -> list[dict]:
    f = _chance_psnr("S1RTC")
    rows = []
    # FRESH S1RTC: SSIM halves at k=3 (0.3 / 0.8); PSNR excess over chance 10 dB -> 4 dB: half-life 3,
    # although the plain ratio (f + 4) / (f + 10) stays well above one half
    first = {"ssim": 0.8, "psnr": f + 10}
    rows += _paired_rows(FRESH, "S1RTC", "real", {1: first, 3: {"ssim": 0.3, "psnr": f + 4}})
    rows += _paired_rows(FIXED, "S1RTC", "real", {1: first, 3: {"ssim": 0.6, "psnr": f + 8}})
    for cond in (FRESH, FIXED):
        rows += _paired_rows(cond, "S2L2A", "real", {2: {"ssim": 0.7, "sam": 0.2, "ergas": 9.0}})
        rows += _paired_rows(cond, "S1RTC", "previous", {3: {"ssim": 0.5, "psnr": 20.0}})
    for k in range(K + 1):
        for m in MODS:
            if k and GENERATED[k] != m:
                continue
            base = dict(condition=FRESH, loop_spec=LOOP, iteration=k, modality=m, comparison="reference", n=4,
                        feature_extractor="test-extractor", reference_set="ref-cells")
            rows += [{**base, "metric": "fd", "value": 5.0 + 3 * k},
                     {**base, "metric": "kid", "value": 0.01 * (1 + k), "ci_low": 0.005 * (1 + k),
                      "ci_high": 0.015 * (1 + k)},
                     {**base, "metric": "precision", "value": 0.8 - 0.1 * k},
                     {**base, "metric": "recall", "value": 0.7 - 0.15 * k}]
            for cond, imgs in ((FRESH, fresh_images), (FIXED, fixed_images)):
                for r in set_statistics_rows(m, imgs[m][:, k], hist_bins=16):
                    rows.append(dict(condition=cond, iteration=k, modality=r["modality"], metric=r["metric"],
                                     comparison=r["comparison"], value=r["value"], n=r["n"], bin=r["bin"]))
    return rows


class _Page(HTMLParser):
    """Figures (id -> attrs, img src, caption text), tables (id -> rows of cell text), every tag and text."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.lists: dict[str, list[str]] = {}
        self.ids: list[str] = []
        self._list: list[str] | None = None
        self.tags: list[str] = []
        self.text: list[str] = []
        self._figure = self._table = None
        self._caption = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids.append(a["id"])
        if tag == "ul" and a.get("id"):
            self._list = self.lists.setdefault(a["id"], [])
        elif tag == "li" and self._list is not None:
            self._list.append("")
        if tag == "figure":
            self._figure = self.figures.setdefault(a["id"], {"attrs": a, "img": [], "caption": ""})
        elif tag == "img" and self._figure is not None:
            self._figure["img"].append(a["src"])
        elif tag == "figcaption":
            self._caption = True
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "ul":
            self._list = None
        if tag == "figure":
            self._figure = None
        elif tag == "figcaption":
            self._caption = False
        elif tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._table is not None and self._cell is not None:
            self._table[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._list:
            self._list[-1] += data
        if self._caption and self._figure is not None:
            self._figure["caption"] += data
        if self._cell is not None:
            self._cell.append(data)


def _parse(index: str | Path, storage_options=None) -> _Page:
    page = _Page()
    with fsspec.open(str(index), "rb", **(storage_options or {})) as f:
        page.feed(f.read().decode("utf-8"))
    return page


def _decode_png(src: str) -> tuple[bytes, np.ndarray]:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix):])
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return data, np.asarray(im.convert("RGB"))


def _rows(table: list[list[str]]) -> list[dict[str, str]]:
    header, *body = table
    return [dict(zip(header, r, strict=True)) for r in body]


def _study(root: Path, storage_options=None, prefix: str | None = None) -> tuple[str, dict[str, str]]:
    base = prefix or str(root)
    cubes = {FRESH: f"{base}/fresh.zarr", FIXED: f"{base}/fixed.zarr"}
    fresh = _write_cube(cubes[FRESH], seed=1, storage_options=storage_options)
    fixed = _write_cube(cubes[FIXED], seed=2, storage_options=storage_options)
    metrics_url = f"{base}/tables/metrics"
    rows = _metrics(fresh, fixed)
    write_metrics(metrics_url, "run-1", "0000000000-0000000004", rows[: len(rows) // 2], storage_options)
    write_metrics(metrics_url, "run-1", "0000000004-0000000008", rows[len(rows) // 2:], storage_options)
    return metrics_url, cubes


def test_report_figures_half_lives_and_escaping(tmp_path):
    metrics_url, cubes = _study(tmp_path)
    index = build_report(tmp_path / "report", metrics_url=metrics_url, cubes=cubes, run_id="run-1",
                         provenance={"operator_note": HOSTILE}, max_cells=3)
    page = _parse(index)

    # (c) for S2L2A has no step-to-step rows: no figure and no stub, everything else drawn
    expected = {f"fig-{kind}-{m}" for kind in "abcd" for m in MODS} - {"fig-c-S2L2A"}
    grids = [fid for fid, f in page.figures.items() if f["attrs"]["data-kind"] == "e"]
    assert {fid for fid in page.figures if not fid.startswith("fig-e-")} == expected
    assert len(grids) == 4  # 2 modalities x 2 conditions
    # an image grid is named after its cube
    assert {f["attrs"]["data-cube"] for f in page.figures.values() if f["attrs"]["data-kind"] == "e"} == {
        "fresh", "fixed"}
    assert "fig-e-S1RTC-fresh" in page.figures
    drawn = {fid: f for fid, f in page.figures.items() if f["img"]}
    assert set(page.figures) == set(drawn)
    assert "Skipped" not in "".join(page.text)
    for fid, fig in drawn.items():
        assert fig["caption"].strip(), fid
        assert f"{fid}.png" in fig["caption"], fid  # the caption names the PNG beside the page
        data, pixels = _decode_png(fig["img"][0])
        assert pixels.shape[0] > 50 and pixels.shape[1] > 50, fid
        packed = pixels.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)
        assert pixels.std() > 5 and len(np.unique(packed)) > 20, f"{fid} looks blank"
        assert (Path(index).parent / f"{fid}.png").read_bytes() == data  # saved next to the page as well

    # the grid columns come from the cube's origin: k=0 and the iterations where the modality was generated
    by_key = {(f["attrs"]["data-modality"], f["attrs"]["data-condition"]): f for f in page.figures.values()
              if f["attrs"]["data-kind"] == "e"}
    assert by_key["S1RTC", FRESH]["attrs"]["data-iterations"] == "0 1 3"
    assert by_key["S2L2A", FIXED]["attrs"]["data-iterations"] == "0 2"
    assert by_key["S1RTC", FIXED]["attrs"]["data-cells"] == "3"

    half = {(r["condition"], r["modality"], r["metric"]): r for r in _rows(page.tables["half-lives"])}
    assert half[FRESH, "S1RTC", "ssim"]["k½"] == "3"
    assert half[FIXED, "S1RTC", "ssim"]["k½"] == "not reached"
    assert float(half[FIXED, "S1RTC", "ssim"]["retained at last k"]) == pytest.approx(0.75, abs=1e-3)
    floor = float(half[FRESH, "S1RTC", "psnr"]["floor value"])
    assert floor == pytest.approx(_chance_psnr("S1RTC"), rel=1e-3)
    assert half[FRESH, "S1RTC", "psnr"]["k½"] == "3"
    assert half[FIXED, "S1RTC", "psnr"]["k½"] == "not reached"
    assert half[FRESH, "S2L2A", "sam"]["note"] == "single generation"

    text = "".join(page.text)
    assert "script" not in page.tags and HOSTILE in text  # escaped: shown as text, never parsed as a tag
    # synthetic inputs: the licence line says so and never claims Copernicus data
    assert FRESH in text and "contains no Copernicus data" in text
    assert "contains modified Copernicus Sentinel data" not in text
    (run,) = _rows(page.tables["runs"])
    assert run["network sha256"] == "ab" * 6 + "…" and run["sampler"] == "dpm_solver++"
    prov = dict(page.tables["provenance"][1:])
    assert prov["feature extractor"] == "test-extractor"
    assert prov["operator_note"] == HOSTILE
    conditions = {r["condition"]: r for r in _rows(page.tables["conditions"])}
    assert conditions[FRESH]["samples / cells"] == "4 / 4"
    # the summary opens the page: half-lives with CIs per condition and modality, a sentence per condition
    headline = {(r["condition"], r["modality"]): r for r in _rows(page.tables["headline"])}
    assert headline[FRESH, "S1RTC"]["k½ SSIM [95% CI]"].startswith("3")
    assert len(page.lists["findings"]) == 2 and all(page.lists["findings"])
    assert page.ids.index("summary") < page.ids.index("section-a")
    assert any(FIXED in n and "reference" in n for n in text.split("\n"))  # FIXED: no reference metrics
    assert "SYNTHETIC DATA" in text


def test_half_life_definition():
    assert half_life([1, 3, 5], [0.8, 0.5, 0.39], floor=0.0) == (5, pytest.approx(0.4875))
    # lower is better (SAM): the ratio of distances to the chance level works the same way
    k_half, retained = half_life([1, 2, 3], [0.2, 0.5, 0.7], floor=0.9)
    assert k_half == 3 and retained == pytest.approx(0.2 / 0.7)
    assert half_life([2], [0.7], floor=0.0) == (None, 1.0)
    with pytest.raises(ReportError, match="equals the floor"):
        half_life([1, 2], [0.5, 0.4], floor=0.5)


def test_missing_pieces_give_notes_not_errors(tmp_path):
    """One iteration only, no reference rows, no histograms, and a cube URL that does not exist."""
    url = str(tmp_path / "metrics")
    rows = _paired_rows("only", "S1RTC", "real", {1: {"ssim": 0.5}})
    write_metrics(url, "r", "p0", rows)
    # a part not written by write_metrics: its modality would become a file name
    evil = {k: [v] for k, v in rows[0].items()} | {"modality": ["../../evil"]}
    pq.write_table(pa.Table.from_pydict({f.name: evil.get(f.name, [None]) for f in METRICS_SCHEMA},
                                        schema=METRICS_SCHEMA), f"{url}/run_id=r/part-p1.parquet")
    index = build_report(tmp_path / "out", metrics_url=url, cubes={"only": str(tmp_path / "nope.zarr")})
    assert sorted(p.name for p in tmp_path.rglob("*evil*")) == []
    page = _parse(index)
    # only what has data is drawn; what is missing is said once in the notes, with no stub sections
    assert list(page.figures) == ["fig-b-S1RTC"] and page.figures["fig-b-S1RTC"]["img"]
    assert [i for i in page.ids if i.startswith("section-")] == ["section-b"]
    text = "".join(page.text)
    assert "cannot open cube" in text and "Skipped" not in text
    assert "unknown modalities: ['../../evil']" in text and "section (a) is left out" in text
    assert _rows(page.tables["half-lives"])[0]["note"] == "single generation"

    # a second run with the same rows (a rerun): the report reads both and draws each row once
    write_metrics(url, "r2", "p0", rows)
    again = _parse(build_report(tmp_path / "out2", metrics_url=url, cubes={}))
    assert len(_rows(again.tables["half-lives"])) == 1
    with pytest.raises(ReportError, match="nothing at"):
        build_report(tmp_path / "out3", metrics_url=str(tmp_path / "absent"), cubes={})


def test_report_from_and_to_s3(s3_server):
    """Table, cube and report on S3 (one condition, paired rows only: moto is slow, the figures are tested
    above)."""
    so = s3_server.storage_options
    base = f"s3://{s3_server.new_bucket()}/study"
    _write_cube(f"{base}/fresh.zarr", seed=1, storage_options=so)
    f = _chance_psnr("S1RTC")
    rows = _paired_rows(FRESH, "S1RTC", "real", {1: {"psnr": f + 10}, 3: {"psnr": f + 4}})
    write_metrics(f"{base}/metrics", "run-s3", "p0", rows, so)
    cubes = {FRESH: f"{base}/fresh.zarr"}
    index = build_report(f"{base}/report", metrics_url=f"{base}/metrics", cubes=cubes,
                         storage_options=so, max_cells=2, iterations_shown=[0, 3])
    assert index == f"{base}/report/index.html"
    page = _parse(index, so)
    fid = next(f for f in page.figures if f.startswith("fig-e-S1RTC"))
    grid = page.figures[fid]
    assert grid["attrs"]["data-iterations"] == "0 3" and grid["attrs"]["data-cells"] == "2" and grid["img"]
    (half,) = _rows(page.tables["half-lives"])
    assert half["k½"] == "3" and float(half["floor value"]) == pytest.approx(f, rel=1e-3)
    # the figures sit beside the page there too, the same bytes as the page's data URI
    with fsspec.open(f"{base}/report/{fid}.png", "rb", **so) as png:
        assert png.read() == _decode_png(grid["img"][0])[0]
