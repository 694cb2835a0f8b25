"""One job object per flow: built once from the flat options (CLI, flow parameters), validated there,
and turned back into the flow's JSON parameters unchanged."""

from __future__ import annotations

import inspect
import json

import pytest
from copgen.errors import TrainingError
from copgen.flows.complete import complete_flow
from copgen.flows.jobs import AutoencoderStage, CompleteJob, JobError, LoopJob, NetworkStage, TrainJob
from copgen.flows.loop_study import loop_study_flow
from copgen.flows.train import train_flow
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


def test_train_job_maps_the_clis_stage_options_and_round_trips_through_the_flows_parameters(tmp_path):
    # the CLI's flat names: <stage>_<setting>, beside whole stage dicts (a flow's or deployment's parameters)
    job = TrainJob.from_options(source_url="world", out_dir=str(tmp_path), network_steps=7,
                                network_init="n.st", network_clean_prob=0.5, autoencoder_crop=8,
                                autoencoder={"lr": 1e-3}, time_limit_s=60.0, seed=3)
    assert job.network == NetworkStage(steps=7, init="n.st", clean_prob=0.5)
    assert job.autoencoder == AutoencoderStage(crop=8, lr=1e-3) and job.autoencoder.betas == (0.5, 0.9)
    assert job.autoencoder_weights == f"{tmp_path}/autoencoder.safetensors"  # the one this run trains
    params = json.loads(json.dumps(job.to_options()))  # what a deployment stores: betas become lists
    assert set(params) <= set(inspect.signature(train_flow.fn).parameters)
    assert TrainJob.from_options(**params) == job
    kept = TrainJob.from_options(**{**params, "autoencoder_url": "ae.safetensors"})
    assert kept.autoencoder_weights == "ae.safetensors"


@pytest.mark.parametrize("options, message", [
    ({"network_steps": 0}, "steps must be a positive integer, got 0"),
    ({"autoencoder_batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"network": {"save_dtype": "float8"}}, "save_dtype 'float8'"),
    ({"time_limit_s": 0}, "time_limit_s must be > 0 seconds, got 0"),
    ({"sample_size": -64}, "sample_size must be a positive integer"),
    ({"patch": "half"}, "patch 'half'"),
    ({"network_clean_prob": 1.0}, r"clean_prob must be in \[0, 1\), got 1.0"),
    ({"autoencoder_crop": 0}, "crop must be a positive integer"),
    ({"generated_fraction": 1.5}, "generated_fraction 1.5"),
])
def test_a_bad_train_option_is_refused_when_the_job_is_built(tmp_path, options, message):
    with pytest.raises(TrainingError, match=message):
        TrainJob.from_options(source_url="world", out_dir=str(tmp_path), **options)


def test_a_misspelt_train_option_is_not_silently_ignored(tmp_path):
    for key in ("network_stepz", "decoder_steps", "netwrk"):
        with pytest.raises(TypeError, match=key):
            TrainJob.from_options(source_url="world", out_dir=str(tmp_path), **{key: 1})
