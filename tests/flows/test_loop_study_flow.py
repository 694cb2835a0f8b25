"""The ``loop_study`` flow end to end on a tiny model: every iteration in a cube per condition, paired
and distribution metrics per iteration in the long table, the cube summary and the report."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from copgen.flows.jobs import JobError, LoopJob, OutputLayout
from copgen.flows.loop_study import run_loop_study
from copgen.loop import Origin
from copgen.modalities import Modality
from copgen.storage import tables

K = 3


@pytest.fixture(scope="module")
def study(on_cluster, source, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("loop")
    summary = on_cluster(run_loop_study, job=LoopJob(
        source=source, out=OutputLayout(str(out)), model=model,
        spec="S2L2A>S1RTC", iterations=K, controls="ae-roundtrip", block_samples=4,
        run_seed=3, feature_extractor="random-conv"))
    return out, summary


def test_every_iteration_is_written_per_condition(study):
    out, summary = study
    assert len(summary["conditions"]) == 2 and summary["quarantined"] == 0
    assert summary["loop_cells"] >= 2 and summary["reference_cells"] >= 1
    for label, url in summary["conditions"].items():
        ds = xr.open_zarr(url)
        assert ds.sizes["iteration"] == K + 1 and ds.done.values.all()
        o = ds.origin.values
        assert (o[:, 0] == Origin.REAL).all()  # iteration 0: the real cell
        s1, s2 = Modality.S1RTC.value, Modality.S2L2A.value
        assert (o[:, 1, s1] == Origin.GENERATED).all() and (o[:, 1, s2] == Origin.ABSENT).all()
        assert (o[:, 2, s2] == Origin.GENERATED).all() and (o[:, 3, s1] == Origin.GENERATED).all()
        assert (o[:, 1:, Modality.DEM.value] == Origin.ABSENT).all()
        assert ds.attrs["copgen_provenance"]["condition"] == label
        gen = ds.S1RTC.values[:, 1]
        assert gen.std() > 0 and not np.array_equal(gen, ds.S1RTC.values[:, 0])


def test_metrics_table_has_paired_and_distribution_rows(study):
    out, summary = study
    df = tables.read_table(str(out / "tables" / "metrics"), run_id=summary["run_id"])
    main = df[df.condition.str.contains("model")]
    summ = main[main["level"] == "summary"]
    assert summ.equals(main[main["sample"].isna() & main["bin"].isna()])  # level says what the nulls meant
    psnr = summ[(summ.metric == "psnr") & (summ.comparison == "real")]
    assert sorted(psnr.iteration) == [1, 2, 3]  # S1RTC at 1 and 3, S2L2A at 2
    assert (psnr.ci_low <= psnr.value).all() and (psnr.value <= psnr.ci_high).all()
    per_sample = main[main["sample"].notna() & (main.metric == "ssim") & (main.comparison == "real")]
    k1 = per_sample[per_sample.iteration == 1]
    # the summary is the mean of the per-sample values the blocks wrote
    ssim1 = summ[(summ.metric == "ssim") & (summ.comparison == "real") & (summ.iteration == 1)].value.item()
    assert ssim1 == pytest.approx(k1.value.mean())
    assert {"previous", "self"} <= set(summ.comparison)
    # iteration 0 against the held-out reference set: the real-vs-real noise floor
    floor = summ[(summ.iteration == 0) & (summ.comparison == "reference")]
    if summary["reference_cells"] >= 4 and summary["loop_cells"] >= 4:
        assert {"fd", "precision", "recall"} <= set(floor.metric)
        assert (summ[summ.comparison == "reference"].feature_extractor.dropna().str.contains("random")).all()


def test_ae_control_is_closer_to_real_than_the_model_loop(study):
    out, summary = study
    df = tables.read_table(str(out / "tables" / "metrics"), run_id=summary["run_id"])
    s = df[df["sample"].isna() & (df.metric == "psnr") & (df.comparison == "real") & (df.iteration == 1)]
    ae = s[s.condition.str.contains("ae-roundtrip")].value.item()
    model = s[s.condition.str.contains("model")].value.item()
    assert ae > model  # a round trip loses less than a random-weight model's generation


def test_cube_summary_and_report(study):
    out, summary = study
    url = next(iter(summary["conditions"].values()))
    metrics = xr.open_zarr(url, group="metrics")
    assert "psnr/real" in set(metrics.metric.values)
    assert metrics.value.sizes["iteration"] == K + 1
    html = (out / "report" / "index.html").read_text()
    # the study read the synthetic world: the page says so and claims no Copernicus data
    assert summary["run_id"] in html and "contains no Copernicus data" in html
    assert "Copernicus Sentinel data" not in html
    assert len(list((out / "report").glob("*.png"))) >= 4


def test_bad_loop_options_name_the_option(on_cluster, source, model, tmp_path):
    with pytest.raises(JobError, match="loop"):
        on_cluster(run_loop_study, job=LoopJob(
            source=source, out=OutputLayout(str(tmp_path)), model=model,
            spec="S2L2A>S2L2A", iterations=2))
    with pytest.raises(JobError, match="controls"):
        on_cluster(run_loop_study, job=LoopJob(
            source=source, out=OutputLayout(str(tmp_path)), model=model,
            iterations=2, controls="teleport"))


def _outline(report_dir) -> dict[str, object]:
    """What a reader sees of a report: its sections and figures, the summary tables and sentences."""
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.ids, self.cells, self._in = [], {}, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if a.get("id"):
                self.ids.append(a["id"])
            if tag in ("table", "ul") and a.get("id") in ("headline", "half-lives", "findings"):
                self._in = self.cells.setdefault(a["id"], [])

        def handle_endtag(self, tag):
            if tag in ("table", "ul"):
                self._in = None

        def handle_data(self, data):
            if self._in is not None and data.strip():
                self._in.append(data.strip())

    page = Page()
    page.feed((report_dir / "index.html").read_text())
    return {"ids": page.ids, **page.cells}


def test_a_rerun_into_the_same_folder_keeps_every_section(study, on_cluster, source, model):
    """The second run finds every block done: it generates nothing, yet its report shows all the first
    one did (sections, figures, half-lives with CIs, findings), from the rows of both runs."""
    out, first = study
    before = _outline(out / "report")
    assert {"summary", "section-a", "section-b", "section-e", "headline"} <= set(before["ids"])
    again = on_cluster(run_loop_study, job=LoopJob(
        source=source, out=OutputLayout(str(out)), model=model,
        spec="S2L2A>S1RTC", iterations=K, controls="ae-roundtrip", block_samples=4,
        run_seed=3, feature_extractor="random-conv"))
    assert again["run_id"] != first["run_id"] and again["blocks_run"] == 0
    after = _outline(out / "report")
    assert after == before
    df = tables.read_table(str(out / "tables" / "metrics"), run_id=again["run_id"])
    assert (df["level"] == "summary").any() and not (df["level"] == "sample").any()
