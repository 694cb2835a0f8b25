"""End-to-end training on a tiny synthetic Major TOM world: checkpoints, strict reload, training.json,
resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from copgen.flows import train as tf
from copgen.flows.jobs import AutoencoderStage, NetworkStage, TrainJob
from copgen.flows.models import load_autoencoder, load_network
from copgen.modalities import Modality
from copgen.storage.checkpoint_files import sha256_of
from copgen.storage.majortom.synthetic import write_world
from safetensors.torch import load_file

SAMPLE = 16  # px per sample; the world's 64 px thumbnails give 16 patches per cell
AE_CONFIG = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1}  # downsample 2 -> latent 8x8
NET_CONFIG = {"patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}
QUIET = {"log": lambda _msg: None}


def net_job(world, out, *, autoencoder_url, sample_size=SAMPLE, seed=0, resume=False, time_limit_s=None,
            **network) -> TrainJob:
    """A network-only job: ``network`` are the stage's settings (``steps``, ``config``, ``batch_size``...)."""
    return TrainJob(str(world), str(out), network=NetworkStage(**network), autoencoder_url=autoencoder_url,
                    sample_size=sample_size, seed=seed, resume=resume, time_limit_s=time_limit_s)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # module scope: the module fixtures below train too (2 threads thrash on a busy box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("train") / "world")
    write_world(root, seed=3, rows=2, cols=2, thumbnail_size=64, cloud_prob=0.2)
    return root


@pytest.fixture(scope="module")
def data(world):
    return tf.load_training_data(world, sample_size=SAMPLE, patch="all", **QUIET)


@pytest.fixture(scope="module")
def autoencoder_dir(world, data, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ae"))
    stage = AutoencoderStage(config=AE_CONFIG, steps=6, batch_size=8, save_every=4, crop=8)
    tf.train_autoencoder(TrainJob(world, out, autoencoder=stage, sample_size=SAMPLE), data=data, **QUIET)
    return out


def test_training_data_are_the_complete_cells_cut_into_patches(world, data):
    assert data.images.dtype == np.uint8
    assert data.images.shape == (4 * 16, len(Modality), SAMPLE, SAMPLE, 3)
    assert data.n_cells == 4 and data.patches[:16] == list(range(16))
    # every modality carries signal (the DEM was brought to the optical side before cutting)
    assert all(data.images[:, m].std() > 1 for m in range(len(Modality)))
    centre = tf.load_training_data(world, sample_size=SAMPLE, patch="center", max_cells=2, **QUIET)
    assert centre.images.shape == (2, len(Modality), SAMPLE, SAMPLE, 3) and centre.n_cells == 2


def test_autoencoder_checkpoint_reloads_strictly(autoencoder_dir, data):
    ae = load_autoencoder(f"{autoencoder_dir}/autoencoder.safetensors")
    cfg = json.loads((Path(autoencoder_dir) / "autoencoder.json").read_text())["config"]
    assert ae.downsample_factor == 2 and cfg["resolution"] == SAMPLE
    # the scale factor is 1/std of the training latents, not SD's constant
    assert cfg["scale_factor"] != pytest.approx(0.18215)
    assert ae.scale_factor == pytest.approx(cfg["scale_factor"])
    saved = load_file(f"{autoencoder_dir}/autoencoder.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in ae.state_dict().items())  # file bytes: exact
    entry = json.loads((Path(autoencoder_dir) / "training.json").read_text())["autoencoder"]
    assert entry["steps"] == 6 and entry["data"]["samples"] == data.images.shape[0]
    assert entry["data"]["cells"] == 4 and set(entry["final_losses"]) == {"l1", "l2", "kl"}
    assert len(entry["loss_curve"]["points"]) == 6 and entry["wall_time_s"] > 0
    assert entry["metadata"]["crop"] == 8  # trained on 8 px crops, saved for 16 px samples


def test_network_end_to_end_and_resume_matches_an_uninterrupted_run(world, data, autoencoder_dir, tmp_path):
    ae_url = f"{autoencoder_dir}/autoencoder.safetensors"
    kw = dict(
        autoencoder_url=ae_url, sample_size=SAMPLE, config=NET_CONFIG, batch_size=8, lr=1e-3, warmup_steps=2,
        save_every=3, seed=5,
    )  # fmt: skip
    straight = tmp_path / "straight"
    tf.train_network(net_job(world, straight, steps=6, **kw), data=data, **QUIET)
    net = load_network(str(straight / "network.safetensors"))
    assert net.img_size == SAMPLE // 2 and net.in_chans == 4
    info = json.loads((straight / "network.json").read_text())
    assert info["config"]["img_size"] == SAMPLE // 2
    assert info["metadata"]["autoencoder"]["sha256"] == sha256_of(ae_url)  # which autoencoder it needs
    state = torch.load(straight / "network_train_state.pt", weights_only=True)
    ema = {k: v.float() for k, v in state["trainer"]["ema"].items()}
    # EMA weights are published: the same tensors through two files, exact
    assert all(torch.equal(ema[k], v) for k, v in net.state_dict().items())
    assert not all(torch.equal(state["trainer"]["model"][k], v) for k, v in net.state_dict().items())
    doc = json.loads((straight / "training.json").read_text())["network"]
    assert doc["steps"] == 6 and doc["resumed_from"] is None
    assert set(doc["final_losses"]) == {m.name for m in Modality}
    assert doc["data"] == data.describe()

    # 4 steps, then resume to 6: same weights and loss history as the uninterrupted run. Exact: the promise
    # under test, on the same machine and software (README); both runs are on this machine.
    split = tmp_path / "split"
    tf.train_network(net_job(world, split, steps=4, **kw), data=data, **QUIET)
    entry = tf.train_network(net_job(world, split, steps=6, resume=True, **kw), data=data, **QUIET)
    assert entry["steps"] == 6 and entry["resumed_from"] == 4
    assert entry["loss_curve"] == doc["loss_curve"]
    resumed = load_network(str(split / "network.safetensors"))
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in net.state_dict().items())

    with pytest.raises(tf.TrainingError, match="config"):
        deeper = {**NET_CONFIG, "depth": 4}
        tf.train_network(net_job(world, split, steps=8, resume=True, **{**kw, "config": deeper}), data=data,
                         **QUIET)


def test_time_limit_stops_early_with_a_resumable_checkpoint(world, data, autoencoder_dir, tmp_path):
    kw = dict(
        autoencoder_url=f"{autoencoder_dir}/autoencoder.safetensors", sample_size=SAMPLE, config=NET_CONFIG,
        batch_size=8, save_every=1000,
    )  # fmt: skip
    out = str(tmp_path / "limited")
    entry = tf.train_network(net_job(world, out, steps=100_000, time_limit_s=5, **kw), data=data, **QUIET)
    assert entry["stopped_at_time_limit"] and 0 < entry["steps"] < 100_000
    assert entry["steps_requested"] == 100_000
    assert load_network(f"{out}/network.safetensors") is not None
    done = entry["steps"]
    more = tf.train_network(net_job(world, out, steps=done + 2, resume=True, **kw), data=data, **QUIET)
    assert more["resumed_from"] == done and more["steps"] == done + 2 and not more["stopped_at_time_limit"]
    with pytest.raises(tf.TrainingError, match="time_limit_s"):
        tf.train_network(net_job(world, out, steps=2, time_limit_s=0, **kw), data=data, **QUIET)


def test_flow_skips_the_autoencoder_when_one_is_given(world, autoencoder_dir, tmp_path):
    out = tmp_path / "flow"
    result = tf.train_flow.fn(
        world, str(out), autoencoder_url=f"{autoencoder_dir}/autoencoder.safetensors", sample_size=SAMPLE,
        patch="center", network={"config": NET_CONFIG, "steps": 2, "batch_size": 4},
    )  # fmt: skip
    assert result["autoencoder"] is None and result["network"]["steps"] == 2
    assert not (out / "autoencoder.safetensors").exists()
    assert (out / "network.safetensors").exists()
    doc = json.loads((out / "training.json").read_text())
    assert set(doc) == {"network"} and doc["network"]["data"]["samples"] == 4


def test_a_deployment_runs_the_flow_from_the_jobs_parameters(prefect_api, world, autoencoder_dir, tmp_path):
    """A real Prefect flow run (parameters validated and stored by the API) from ``TrainJob.to_options``,
    as JSON: what a deployment carries."""
    stage = NetworkStage(config=NET_CONFIG, steps=2, batch_size=4, betas=(0.9, 0.99))
    job = TrainJob(world, str(tmp_path / "deployed"), network=stage, sample_size=SAMPLE, patch="center",
                   autoencoder_url=f"{autoencoder_dir}/autoencoder.safetensors")
    result = tf.train_flow(**json.loads(json.dumps(job.to_options())))
    net = result["network"]
    assert result["autoencoder"] is None and net["steps"] == 2 and net["batch_size"] == 4
    assert net["optimizer"]["betas"] == [0.9, 0.99] and net["config"]["depth"] == NET_CONFIG["depth"]
    assert net["data"]["samples"] == 4  # 4 cells, their centre patches


def test_bad_settings_are_named(world, data, autoencoder_dir, tmp_path):
    with pytest.raises(tf.TrainingError, match="img_size"):
        ae_url = f"{autoencoder_dir}/autoencoder.safetensors"
        job = net_job(world, tmp_path, autoencoder_url=ae_url, config={**NET_CONFIG, "img_size": 4}, steps=1)
        tf.train_network(job, data=data, **QUIET)
    with pytest.raises(tf.TrainingError, match="batch_size"):
        stage = AutoencoderStage(steps=1, batch_size=0)
        tf.train_autoencoder(TrainJob(world, str(tmp_path), autoencoder=stage, sample_size=SAMPLE), data=data)


def test_autoencoder_fine_tunes_from_weights_and_records_full_size_reconstruction(
    world, data, autoencoder_dir, tmp_path
):
    start = f"{autoencoder_dir}/autoencoder.safetensors"
    stage = AutoencoderStage(config=AE_CONFIG, steps=2, batch_size=4, lr=1e-12, init=start)
    job = TrainJob(world, str(tmp_path), autoencoder=stage, sample_size=SAMPLE)
    entry = tf.train_autoencoder(job, data=data, **QUIET)
    # lr ~0: the published weights are the ones it started from (so they were loaded)
    tuned, initial = load_file(f"{tmp_path}/autoencoder.safetensors"), load_file(start)
    assert all(torch.allclose(tuned[k], v, rtol=0, atol=1e-8) for k, v in initial.items())
    assert entry["metadata"]["init_from"] == start
    psnr = entry["reconstruction_psnr"]
    assert set(psnr) == {m.name for m in Modality}
    # the figure is the full-size posterior-mean round trip, computed independently here
    cfg = json.loads((tmp_path / "autoencoder.json").read_text())["config"]
    ae = load_autoencoder(f"{tmp_path}/autoencoder.safetensors").eval()
    pick = np.linspace(0, len(data.images) - 1, min(len(data.images), 64)).round().astype(int)
    x = data.images[pick, 0].astype(np.float64)
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
        mean = ae.encode_moments(t)[:, : cfg["embed_dim"]]
        y = ((ae.decoder(ae.post_quant_conv(mean)) + 1) * 127.5).clamp(0, 255).round()
    mse = ((y.permute(0, 2, 3, 1).numpy() - x) ** 2).reshape(len(x), -1).mean(axis=1)
    assert psnr["DEM"] == pytest.approx(np.mean(10 * np.log10(255.0**2 / mse)), abs=1e-2)


def test_bundled_model_recipe_runs_end_to_end(tmp_path):
    """benchmarks/train_bundled.py (how copgen_core/bundled was made) at toy scale, as a user runs it: two
    world blocks written in parallel processes and pooled, the bundled autoencoder kept with its training
    record, the network started from the bundled weights with clean_prob (its second stage)."""
    import subprocess
    import sys

    from copgen import bundled

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "recipe"
    args = ["--out", str(out), "--device", "cpu", "--blocks", "2", "--rows", "2", "--cols", "2",
            "--workers", "2", "--ae", str(bundled.AUTOENCODER), "--net-init", str(bundled.NETWORK),
            "--clean-prob", "0.5", "--net-steps", "2", "--net-batch", "8"]  # fmt: skip
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "train_bundled.py"), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((out / "model" / "training.json").read_text())
    bundled_record = json.loads((bundled.HERE / "training.json").read_text())
    assert doc["autoencoder"] == bundled_record["autoencoder"]  # kept, with its training record
    net = doc["network"]
    assert net["steps"] == 2 and net["data"]["cells"] == 8 and net["data"]["samples"] == 8 * 16
    assert net["metadata"]["clean_prob"] == 0.5 and net["metadata"]["init_from"] == str(bundled.NETWORK)
    assert net["metadata"]["autoencoder"]["sha256"] == bundled.checksums()["autoencoder.safetensors"]
    assert load_network(str(out / "model" / "network.safetensors")).img_size == 8
