"""One job object per flow: built once from the flat options (CLI, flow parameters), validated there,
and turned back into the flow's JSON parameters unchanged."""

from __future__ import annotations

import inspect
import json

import pytest
from copgen.flows.complete import complete_flow
from copgen.flows.jobs import CompleteJob, JobError, LoopJob
from copgen.flows.loop_study import loop_study_flow
from copgen.modalities import Modality
from copgen.storage.majortom.world import write_world_descriptor


@pytest.fixture
def world(tmp_path):
    root = str(tmp_path / "world")
    write_world_descriptor(root, {"synthetic": True, "thumbnail_sizes": {"S2L2A": 96, "DEM": 32}})
    return root


def test_complete_job_round_trips_through_the_flows_parameters(world, tmp_path):
    job = CompleteJob.from_options(source=world, out=str(tmp_path / "out"), weights="w.safetensors",
                                   vae="a.safetensors", generate="S1RTC,DEM", samples_per_cell=2, steps=7,
                                   solver="2m", bbox="8,45.5,9.5,46.5", start="2020-01-01", run_seed=5)
    assert job.source.thumbnail_sizes == {"S2L2A": 96, "DEM": 32}  # from the world descriptor
    assert job.targets == (Modality.DEM, Modality.S1RTC) and job.model.steps == 7
    assert job.filters.bbox == (8.0, 45.5, 9.5, 46.5)
    params = json.loads(json.dumps(job.to_options()))  # what a deployment stores
    assert set(params) <= set(inspect.signature(complete_flow.fn).parameters)
    assert CompleteJob.from_options(**params) == job


def test_loop_job_round_trips_and_checks_its_loop_once(world, tmp_path):
    job = LoopJob.from_options(source=world, out=str(tmp_path), weights="w", vae="a", spec="S2L2A>S1RTC",
                               iterations=3, controls="ae-roundtrip,fixed-seed", cells=4)
    assert len(job.configs()) == 3 and job.controls == ("ae-roundtrip", "fixed-seed")
    params = json.loads(json.dumps(job.to_options()))
    assert set(params) <= set(inspect.signature(loop_study_flow.fn).parameters)
    assert LoopJob.from_options(**params) == job


@pytest.mark.parametrize("options, message", [
    ({"samples_per_cell": 0}, "--samples-per-cell 0"),
    ({"patches": "half"}, "--patches 'half'"),
    ({"bbox": "1,2,3"}, "--bbox '1,2,3'"),
    ({"block_samples": 0}, "--block-samples 0"),
    ({"run_id": "../x"}, "--run-id"),
])
def test_a_bad_complete_option_is_refused_when_the_job_is_built(world, tmp_path, options, message):
    with pytest.raises(JobError, match=message.replace("(", r"\(")):
        CompleteJob.from_options(source=world, out=str(tmp_path), weights="w", vae="a", **options)


def test_a_bad_loop_option_is_refused_when_the_job_is_built(world, tmp_path):
    base = {"source": world, "out": str(tmp_path), "weights": "w", "vae": "a"}
    with pytest.raises(JobError, match="loop options"):
        LoopJob.from_options(**base, spec="S2L2A>S2L2A")
    with pytest.raises(JobError, match="unknown control 'teleport'"):
        LoopJob.from_options(**base, controls="teleport")
    with pytest.raises(TypeError, match="spek"):  # a misspelt option is not silently ignored
        LoopJob.from_options(**base, spek="S2L2A>S1RTC")
